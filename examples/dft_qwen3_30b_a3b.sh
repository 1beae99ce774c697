#!/usr/bin/env bash
# DFT fine-tuning of Qwen3-30B-A3B (a mixture of experts: 48 layers, 128 experts of which 8
# are active per token, 30B parameters, 3B active) with the DFT paper's recipe (Wu et al.,
# 2025) on the first 100k rows of NuminaMath-CoT, on Megatron-LM's trainer with expert
# parallelism; converted back to Hugging Face and evaluated with the paper's protocol (16
# samples at temperature 1.0, top-p 1.0, up to 4096 new tokens, avg@16).
#
#   HF_MODEL=/models/Qwen3-30B-A3B NUMINA=/data/numina_cot_100k.jsonl \
#   BENCHMARKS=/data/Qwen2.5-Math/evaluation/data bash examples/dft_qwen3_30b_a3b.sh
#
# The recipe is examples/dft_qwen2.5_math_1.5b.sh's (the DFT repository's sft_trainer.yaml:
# lr 5e-5 cosine to 0 with 10% warm-up, AdamW (0.9, 0.95), weight decay 0.01, clip 1.0, global
# batch 256 samples of up to 2048 tokens, 1 epoch, bf16, token mean over the response tokens);
# the paper trained no MoE model, so it is applied unchanged (extra arguments override it).
# tests/examples/test_qwen3_moe_recipe.py checks that each flag reaches the trainer.
#
# The MoE and parallel choices (Megatron-LM's flags; the architecture itself, experts and
# top-k included, comes from the converted checkpoint's args, so no model flag is repeated):
#   --expert-model-parallel-size EP [8]     the experts are 29B of the 30B parameters: 16 of
#                                           the 128 on each rank of an EP group (alltoall
#                                           between them), one copy per EP group
#   --tensor-model-parallel-size TP [2]     attention and embeddings (1.5B) over TP ranks ...
#   --expert-tensor-parallel-size ETP [1]   ... but not the experts (768 wide: TP would only
#                                           add communication); attention at TP, experts at EP
#                                           on the same GPUs (Megatron-Core's parallel folding)
#   --sequence-parallel                     activations split over TP; MoE needs it at TP > 1
#                                           (Megatron-Core's MoELayer.forward raises without)
#   --use-distributed-optimizer             fp32 master weights and Adam moments sharded over
#                                           the data-parallel ranks (the experts' over EDP =
#                                           world / (EP x ETP x PP))
#   --moe-grouped-gemm                      one grouped GEMM for a rank's experts (Transformer
#                                           Engine); the same weights as a checkpoint converted
#                                           without it (the command line's value is kept)
#   --moe-token-dispatcher-type alltoall    Megatron-LM's dispatcher for EP > 1 (the checkpoint
#                                           does not set it; allgather is the default)
#   --moe-router-load-balancing-type aux_loss, --moe-aux-loss-coeff 1e-3
#                                           Qwen3-MoE's own balancing loss and coefficient
#                                           (config.json's router_aux_loss_coef); it is added
#                                           to the gradient and logged apart from the DFT loss
#                                           (load_balancing_loss)
#   --moe-router-dtype fp32                 the router's softmax and top-k in fp32 under bf16
#   --calculate-per-token-loss              DFT's token mean over the global batch's response
#                                           tokens (the trainer's default, named here)
# Memory: per GPU, EP8 holds 3.6B expert parameters with their bf16 weights, fp32 gradients
# and (sharded over EDP) fp32 Adam state: about 45 GB at EDP 2 (2 nodes of 8 GPUs, the
# default), about 70 GB at EDP 1 (one node: use GPUs with more than 80 GB, e.g. H200, or more
# nodes). EP must divide 128 and the world size must be a multiple of TP x PP and of
# ETP x EP x PP.
#
# Inputs (downloaded beforehand; nothing here touches the network):
#   HF_MODEL    Hugging Face folder of Qwen3-30B-A3B (config.json, safetensors, tokenizer)
#   NUMINA      JSON Lines of NuminaMath-CoT's first 100k training rows (keys problem,
#               solution); DATA is accepted as another name for it
#   BENCHMARKS  the evaluation/data folder of github.com/QwenLM/Qwen2.5-Math; without it no
#               evaluation
# Optional: OUT [runs/dft_qwen3_30b_a3b], GPUS_PER_NODE [8], NNODES [2], NODE_RANK [0],
#   MASTER_ADDR [localhost], MASTER_PORT [6000] (multi-node: run once per node, the same OUT
#   on a shared file system), TP [2], EP [8], ETP [1], PP [1], MICRO_BATCH_SIZE [1],
#   LOSS_TYPE [dft; sft for the baseline], VERIFY [0; 1: the conversion compares logits with
#   transformers' in fp32 on CPU, which holds an fp32 copy of the model: about 130 GB of RAM],
#   EVAL_TP [2: GPUs per model for vLLM in the evaluation], PYTHON. Extra arguments are
#   Megatron-LM or DFT flags for the trainer.
#
# Not run here (no GPU cluster, no hub access): every step has run at small scale on CPU
# (tests/training/test_megatron_lm_moe_scripts.py trains these MoE flags at EP2).
set -euo pipefail

: "${HF_MODEL:?set HF_MODEL to the Qwen3-30B-A3B folder}"
NUMINA=${NUMINA:-${DATA:-}}
: "${NUMINA:?set NUMINA (or DATA) to the NuminaMath-CoT JSON Lines file (first 100k rows)}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON=${PYTHON:-$([[ -x "$REPO_ROOT/.venv/bin/python" ]] && echo "$REPO_ROOT/.venv/bin/python" || echo python)}
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-runs/dft_qwen3_30b_a3b}
LOSS_TYPE=${LOSS_TYPE:-dft}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
TP=${TP:-2}
EP=${EP:-8}
ETP=${ETP:-1}
PP=${PP:-1}
EVAL_TP=${EVAL_TP:-2}
export CUDA_DEVICE_MAX_CONNECTIONS=1

WORLD=$((GPUS_PER_NODE * NNODES))
if ((WORLD % (TP * PP) || WORLD % (ETP * EP * PP) || 128 % EP)); then
    echo "error: $WORLD GPUs cannot hold TP=$TP PP=$PP with ETP=$ETP EP=$EP (the world size must" \
        "be a multiple of TP x PP and of ETP x EP x PP, and EP must divide the 128 experts)" >&2
    exit 2
fi
rows=$(wc -l < "$NUMINA")
if ((rows != 100000)); then
    echo "warning: $NUMINA has $rows rows; the paper trains on the first 100000 of NuminaMath-CoT" >&2
fi

# 1. Hugging Face -> Megatron-LM checkpoint (once, on node 0 before the others start; a
#    "release" checkpoint with the architecture in its args and the tokenizer beside it).
if [[ ! -f "$OUT/hf_import/latest_checkpointed_iteration.txt" ]]; then
    VERIFY_ARGS=()
    [[ "${VERIFY:-0}" == 1 ]] && VERIFY_ARGS=(--verify)
    "$PYTHON" "$REPO_ROOT/tools/convert_hf_to_megatron.py" --hf-dir "$HF_MODEL" \
        --megatron-dir "$OUT/hf_import" --dtype bf16 "${VERIFY_ARGS[@]}"
fi

# 2. DFT fine-tuning on Megatron-LM's trainer: no model flags (they come from the checkpoint).
DISTRIBUTED_ARGS=(
    --nproc-per-node "$GPUS_PER_NODE"
    --nnodes "$NNODES"
    --node-rank "$NODE_RANK"
    --master-addr "$MASTER_ADDR"
    --master-port "$MASTER_PORT"
)
CHECKPOINT_ARGS=(
    --load "$OUT/hf_import"
    --finetune # weights only: iteration, optimizer and schedule start fresh
    --save "$OUT/checkpoints"
    --save-interval 100
)
TRAINING_ARGS=(
    --micro-batch-size "${MICRO_BATCH_SIZE:-1}"
    --global-batch-size 256
    --train-epochs 1
    --optimizer adam
    --lr 5e-5
    --min-lr 0
    --lr-decay-style cosine
    --lr-warmup-fraction 0.1
    --adam-beta1 0.9
    --adam-beta2 0.95
    --weight-decay 0.01
    --clip-grad 1.0
    --bf16
)
MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size "$TP"
    --pipeline-model-parallel-size "$PP"
    --expert-model-parallel-size "$EP"
    --expert-tensor-parallel-size "$ETP"
    --sequence-parallel
    --use-distributed-optimizer
)
MOE_ARGS=(
    --moe-grouped-gemm
    --moe-token-dispatcher-type alltoall
    --moe-router-load-balancing-type aux_loss
    --moe-aux-loss-coeff 1e-3
    --moe-router-dtype fp32
)
DFT_ARGS=(
    --loss-type "$LOSS_TYPE"
    --calculate-per-token-loss # the global token mean over the response tokens (the default)
)
DATA_ARGS=(
    --sft-data "$NUMINA"
    --prompt-key problem
    --response-key solution
    --seq-length 2048
    --no-packing
    --truncation right
    --preprocess-workers 8
    --data-cache-path "$OUT/data_cache"
)
LOGGING_ARGS=(
    --log-interval 1
    --log-throughput
    --tensorboard-dir "$OUT/tensorboard"
    --log-metrics-jsonl "$OUT/metrics.jsonl"
)
"$PYTHON" -m torch.distributed.run "${DISTRIBUTED_ARGS[@]}" -m dft_megatron.train \
    "${CHECKPOINT_ARGS[@]}" \
    "${TRAINING_ARGS[@]}" \
    "${MODEL_PARALLEL_ARGS[@]}" \
    "${MOE_ARGS[@]}" \
    "${DFT_ARGS[@]}" \
    "${DATA_ARGS[@]}" \
    "${LOGGING_ARGS[@]}" \
    "$@"

[[ "$NODE_RANK" == 0 ]] || exit 0

# 3. Megatron-LM checkpoint -> Hugging Face (the latest checkpoint; its TP x EP layout is
#    resharded on export), loadable by transformers and vLLM.
"$PYTHON" "$REPO_ROOT/tools/convert_megatron_to_hf.py" --megatron-dir "$OUT/checkpoints" \
    --hf-dir "$OUT/hf" --force

# 4. Evaluation: the paper's protocol (vLLM over EVAL_TP GPUs when installed, else transformers).
if [[ -n "${BENCHMARKS:-}" ]]; then
    "$PYTHON" "$REPO_ROOT/tools/eval_math.py" --model "$OUT/hf" --benchmarks "$BENCHMARKS" \
        --output-dir "$OUT/eval" --prompt-template qwen-boxed \
        --num-samples 16 --temperature 1.0 --top-p 1.0 --max-new-tokens 4096 \
        --tensor-parallel-size "$EVAL_TP"
fi
