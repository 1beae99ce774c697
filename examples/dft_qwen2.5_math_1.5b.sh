#!/usr/bin/env bash
# The DFT paper's recipe: Qwen2.5-Math-1.5B fine-tuned with DFT on the first 100k rows of
# NuminaMath-CoT (lr 5e-5, global batch 256, sequence 2048, 1 epoch, cosine decay with 10%
# warm-up), converted back to Hugging Face and evaluated with the paper's protocol (16
# samples at temperature 1.0, avg@16 over the last \boxed{} answer).
#
#   HF_MODEL=/models/Qwen2.5-Math-1.5B NUMINA=/data/numina_cot_100k.jsonl \
#   BENCHMARKS=/data/Qwen2.5-Math/evaluation/data bash examples/dft_qwen2.5_math_1.5b.sh
#
# Inputs (downloaded beforehand; nothing here touches the network):
#   HF_MODEL    Hugging Face folder of Qwen2.5-Math-1.5B (config.json, safetensors, tokenizer)
#   NUMINA      JSON Lines of NuminaMath-CoT's first 100k training rows (keys problem,
#               solution), e.g. made on a machine with hub access by
#                 python -c "import datasets; datasets.load_dataset('AI-MO/NuminaMath-CoT',
#                   split='train[:100000]').to_json('numina_cot_100k.jsonl')"
#   BENCHMARKS  the evaluation/data folder of github.com/QwenLM/Qwen2.5-Math (math500,
#               minerva_math, olympiadbench, aime24, amc23)
# Optional: OUT [runs/dft_qwen2.5_math_1.5b], GPUS_PER_NODE [8], NNODES/NODE_RANK/MASTER_ADDR/
#   MASTER_PORT (multi-node: run once per node), LOSS_TYPE [dft; sft for the baseline], PYTHON.
#
# Batching: the paper's global batch is 256 samples of up to 2048 tokens, so packing is off
# (--no-packing: one sample per sequence). Packing (the trainer's default) is several times
# faster; with it, a global batch of 256 sequences holds more samples: lower
# GLOBAL_BATCH_SIZE to keep the paper's samples per step.
set -euo pipefail

: "${HF_MODEL:?set HF_MODEL to the Qwen2.5-Math-1.5B folder}"
: "${NUMINA:?set NUMINA to the NuminaMath-CoT JSON Lines file}"
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
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-256}

# 1. Hugging Face -> Megatron (once; the checkpoint carries the architecture and tokenizer).
if [[ ! -f "$OUT/hf_import/latest_checkpointed_iteration.txt" ]]; then
    "$PYTHON" "$REPO_ROOT/tools/convert_hf_to_megatron.py" --hf-dir "$HF_MODEL" \
        --megatron-dir "$OUT/hf_import" --dtype bf16 --verify
fi

# 2. DFT fine-tuning: 1.5B fits one GPU; data parallel over all of them, distributed optimizer.
"$PYTHON" -m torch.distributed.run --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" \
    --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m dft_megatron.train \
    --load "$OUT/hf_import" --finetune \
    --sft-data "$NUMINA" --prompt-key problem --response-key solution --no-packing \
    --seq-length 2048 --truncation right \
    --loss-type "$LOSS_TYPE" \
    --bf16 --use-distributed-optimizer \
    --micro-batch-size 4 --global-batch-size "$GLOBAL_BATCH_SIZE" --train-epochs 1 \
    --lr 5e-5 --min-lr 0 --lr-decay-style cosine --lr-warmup-fraction 0.1 --clip-grad 1.0 \
    --save "$OUT/checkpoints" --save-interval 100 \
    --tensorboard-dir "$OUT/tensorboard" --log-metrics-jsonl "$OUT/metrics.jsonl" \
    --log-interval 1 --num-workers 8

[[ "$NODE_RANK" == 0 ]] || exit 0

# 3. Megatron -> Hugging Face (the latest checkpoint), loadable by transformers and vLLM.
"$PYTHON" "$REPO_ROOT/tools/convert_megatron_to_hf.py" --megatron-dir "$OUT/checkpoints" \
    --hf-dir "$OUT/hf" --force

# 4. Evaluation: the paper's protocol (vLLM when installed, else transformers).
if [[ -n "${BENCHMARKS:-}" ]]; then
    "$PYTHON" "$REPO_ROOT/tools/eval_math.py" --model "$OUT/hf" --benchmarks "$BENCHMARKS" \
        --output-dir "$OUT/eval" --prompt-template qwen-boxed \
        --num-samples 16 --temperature 1.0 --top-p 1.0 --max-new-tokens 4096
fi
