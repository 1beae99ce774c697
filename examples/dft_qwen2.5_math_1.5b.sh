#!/usr/bin/env bash
# The DFT paper's recipe (Wu et al., 2025): Qwen2.5-Math-1.5B fine-tuned with DFT on the first
# 100k rows of NuminaMath-CoT, converted back to Hugging Face and evaluated with the paper's
# protocol (16 samples at temperature 1.0, top-p 1.0, up to 4096 new tokens, avg@16 over the
# last \boxed{} answer) on Math500, Minerva Math, OlympiadBench, AIME24 and AMC23.
#
#   HF_MODEL=/models/Qwen2.5-Math-1.5B NUMINA=/data/numina_cot_100k.jsonl \
#   BENCHMARKS=/data/Qwen2.5-Math/evaluation/data bash examples/dft_qwen2.5_math_1.5b.sh
#
# The hyperparameters are the official ones (the DFT repository's verl sft_trainer.yaml), in
# Megatron-LM's flags (tests/examples/test_recipe.py checks each one):
#   lr 5e-5, cosine decay (to 0), warm-up ratio 0.1  --lr 5e-5 --lr-decay-style cosine
#                                                    --min-lr 0 --lr-warmup-fraction 0.1
#   AdamW, betas (0.9, 0.95), weight decay 0.01      --optimizer adam (Megatron-LM's adam is
#                                                    AdamW: decoupled weight decay)
#                                                    --adam-beta1 0.9 --adam-beta2 0.95
#                                                    --weight-decay 0.01
#   grad clip 1.0                                    --clip-grad 1.0
#   global batch 256, max length 2048, 1 epoch       --global-batch-size 256 --seq-length 2048
#                                                    --no-packing --train-epochs 1
#   bf16                                             --bf16
#   loss: token mean over the response tokens        --loss-type dft --calculate-per-token-loss
#                                                    (the prompt's tokens carry no loss)
#
# Inputs (downloaded beforehand; nothing here touches the network):
#   HF_MODEL    Hugging Face folder of Qwen2.5-Math-1.5B (config.json, safetensors, tokenizer)
#   NUMINA      JSON Lines of NuminaMath-CoT's first 100k training rows (keys problem,
#               solution), e.g. made on a machine with hub access by
#                 python -c "import datasets; datasets.load_dataset('AI-MO/NuminaMath-CoT',
#                   split='train[:100000]').to_json('numina_cot_100k.jsonl')"
#   BENCHMARKS  the evaluation/data folder of github.com/QwenLM/Qwen2.5-Math (math500,
#               minerva_math, olympiadbench, aime24, amc23); without it no evaluation
# Optional: OUT [runs/dft_qwen2.5_math_1.5b], GPUS_PER_NODE [8], NNODES/NODE_RANK/MASTER_ADDR/
#   MASTER_PORT (multi-node: run once per node), LOSS_TYPE [dft; sft for the baseline],
#   MICRO_BATCH_SIZE [4], PYTHON. Extra arguments are Megatron-LM or DFT flags for the trainer.
#
# Batching: the paper's global batch is 256 samples of up to 2048 tokens, so packing is off
# (--no-packing: one sample per sequence, padded). Packing (the trainer's default) is several
# times faster, but then a global batch of 256 sequences holds more than 256 samples.
#
# Not run here (no GPU cluster, no hub access); every step has run at small scale on CPU.
set -euo pipefail

: "${HF_MODEL:?set HF_MODEL to the Qwen2.5-Math-1.5B folder}"
: "${NUMINA:?set NUMINA to the NuminaMath-CoT JSON Lines file (first 100k rows)}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON=${PYTHON:-$([[ -x "$REPO_ROOT/.venv/bin/python" ]] && echo "$REPO_ROOT/.venv/bin/python" || echo python)}
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-runs/dft_qwen2.5_math_1.5b}
LOSS_TYPE=${LOSS_TYPE:-dft}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
export CUDA_DEVICE_MAX_CONNECTIONS=1

rows=$(wc -l < "$NUMINA")
if ((rows != 100000)); then
    echo "warning: $NUMINA has $rows rows; the paper trains on the first 100000 of NuminaMath-CoT" >&2
fi

# 1. Hugging Face -> Megatron-LM checkpoint (once; a "release" checkpoint that carries the
#    architecture in its args and the tokenizer in hf_import/tokenizer).
if [[ ! -f "$OUT/hf_import/latest_checkpointed_iteration.txt" ]]; then
    "$PYTHON" "$REPO_ROOT/tools/convert_hf_to_megatron.py" --hf-dir "$HF_MODEL" \
        --megatron-dir "$OUT/hf_import" --dtype bf16 --verify
fi

# 2. DFT fine-tuning: Megatron-LM's trainer. 1.5B fits one GPU: data parallel over all of them
#    with the distributed optimizer; no model flags (they come from the checkpoint).
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
    --micro-batch-size "${MICRO_BATCH_SIZE:-4}"
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
    --tensor-model-parallel-size 1
    --pipeline-model-parallel-size 1
    --use-distributed-optimizer
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
    "${DFT_ARGS[@]}" \
    "${DATA_ARGS[@]}" \
    "${LOGGING_ARGS[@]}" \
    "$@"

[[ "$NODE_RANK" == 0 ]] || exit 0

# 3. Megatron-LM checkpoint -> Hugging Face (the latest checkpoint), loadable by transformers
#    and vLLM.
"$PYTHON" "$REPO_ROOT/tools/convert_megatron_to_hf.py" --megatron-dir "$OUT/checkpoints" \
    --hf-dir "$OUT/hf" --force

# 4. Evaluation: the paper's protocol (vLLM when installed, else transformers).
if [[ -n "${BENCHMARKS:-}" ]]; then
    "$PYTHON" "$REPO_ROOT/tools/eval_math.py" --model "$OUT/hf" --benchmarks "$BENCHMARKS" \
        --output-dir "$OUT/eval" --prompt-template qwen-boxed \
        --num-samples 16 --temperature 1.0 --top-p 1.0 --max-new-tokens 4096
fi
