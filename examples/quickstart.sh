#!/usr/bin/env bash
# The whole loop on CPU, on the bundled data, in minutes (2 cores, no GPU):
#
#   1. a tiny Qwen2-style model (4 layers, hidden 128, GQA, qkv bias, tied embeddings; 0.9M
#      parameters) initialized in Hugging Face format with the bundled math tokenizer
#   2. converted to a Megatron-LM checkpoint (tools/convert_hf_to_megatron.py --verify)
#   3. briefly pre-trained on the training solutions as plain text (every token a target,
#      --loss-type sft): DFT weights each token by its probability, so it needs a model that
#      already puts some mass on the targets
#   4. DFT fine-tuned on the problem -> solution pairs over gloo at tensor parallel 2, packed
#      sequences, validation, checkpoints and TensorBoard logs
#   5. converted back to Hugging Face (tools/convert_megatron_to_hf.py)
#   6. evaluated with the paper's protocol (k samples at temperature 1, last \boxed{} judged by
#      math-verify, avg@k and pass@k) on the held-out split and on seen training problems;
#      figures of both stages in OUT/figures (tools/plot_metrics.py)
#
# Stages 3 and 4 are Megatron-LM's trainer (`-m dft_megatron.train`, Megatron-LM's flags plus
# DFT's); the model flags come from the converted checkpoint (`--load ... --finetune`).
#
#   bash examples/quickstart.sh            # after bash scripts/setup.sh
#
# Environment (defaults in brackets): OUT [runs/quickstart] (replaced if it exists),
# PRETRAIN_ITERS [150], DFT_ITERS [60], LOG_INTERVAL [10], EVAL_PROBLEMS [20], EVAL_SAMPLES [4],
# MASTER_PORT [29517], PYTHON.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python
    [[ -x "$REPO_ROOT/.venv/bin/python" ]] && PYTHON="$REPO_ROOT/.venv/bin/python"
fi
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_VISIBLE_DEVICES=""  # the CPU path, also on a GPU machine
export OMP_NUM_THREADS=1        # two ranks on two cores
if ! "$PYTHON" -c 'import torch, megatron.core, transformers, datasets' 2>/dev/null; then
    echo "error: $PYTHON lacks dft-megatron's dependencies; run: bash scripts/setup.sh" >&2
    exit 1
fi

OUT=${OUT:-runs/quickstart}
DATA="$REPO_ROOT/examples/data/math"
PRETRAIN_ITERS=${PRETRAIN_ITERS:-150}
DFT_ITERS=${DFT_ITERS:-60}
LOG_INTERVAL=${LOG_INTERVAL:-10}
EVAL_PROBLEMS=${EVAL_PROBLEMS:-20}
EVAL_SAMPLES=${EVAL_SAMPLES:-4}
START=$SECONDS

step() { printf '\n=== [%s/6] %s (%ds)\n' "$1" "$2" $((SECONDS - START)); }
train() { "$PYTHON" -m torch.distributed.run --nproc-per-node 2 --master-port "${MASTER_PORT:-29517}" \
    -m dft_megatron.train "$@"; }

if [[ -e "$OUT" ]]; then
    echo "replacing the previous quickstart output in $OUT"
    rm -rf "$OUT"
fi
mkdir -p "$OUT"

step 1 "a tiny Qwen2-style model in Hugging Face format"
"$PYTHON" "$REPO_ROOT/tools/init_hf_model.py" --family qwen2 --tokenizer-model "$DATA/tokenizer" \
    --num-layers 4 --hidden-size 128 --num-attention-heads 4 --num-query-groups 2 \
    --ffn-hidden-size 384 --max-position-embeddings 1024 --output-dir "$OUT/hf_init"

step 2 "Hugging Face -> Megatron-LM checkpoint"
"$PYTHON" "$REPO_ROOT/tools/convert_hf_to_megatron.py" --hf-dir "$OUT/hf_init" \
    --megatron-dir "$OUT/megatron_init" --dtype fp32 --verify

# Megatron-LM's flags; the architecture and the tokenizer come from the --load checkpoint.
COMMON=(--tensor-model-parallel-size 2 --micro-batch-size 4 --global-batch-size 16
        --seq-length 512 --data-cache-path "$OUT/data_cache" --log-interval "$LOG_INTERVAL")

step 3 "pre-training on the solutions' text (SFT loss, TP 2, $PRETRAIN_ITERS iterations)"
train "${COMMON[@]}" --load "$OUT/megatron_init" --finetune \
    --sft-data "$DATA/train.jsonl" --data-format text --text-key solution \
    --loss-type sft --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-fraction 0.07 \
    --train-iters "$PRETRAIN_ITERS" --save "$OUT/pretrain" --save-interval "$PRETRAIN_ITERS" \
    --tensorboard-dir "$OUT/tensorboard/pretrain" --log-metrics-jsonl "$OUT/pretrain/metrics.jsonl"

step 4 "DFT fine-tuning on problem -> solution (TP 2, $DFT_ITERS iterations)"
train "${COMMON[@]}" --load "$OUT/pretrain" --finetune \
    --sft-data "$DATA/train.jsonl" --prompt-key problem --response-key solution \
    --valid-fraction 0.05 --eval-interval 20 --eval-iters 2 \
    --loss-type dft --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-fraction 0.1 \
    --train-iters "$DFT_ITERS" --save "$OUT/dft" --save-interval 30 \
    --tensorboard-dir "$OUT/tensorboard/dft" --log-metrics-jsonl "$OUT/dft/metrics.jsonl"

step 5 "Megatron-LM checkpoint -> Hugging Face"
"$PYTHON" "$REPO_ROOT/tools/convert_megatron_to_hf.py" --megatron-dir "$OUT/dft" --hf-dir "$OUT/hf"

step 6 "evaluation: $EVAL_PROBLEMS problems x $EVAL_SAMPLES samples, held-out and seen"
"$PYTHON" "$REPO_ROOT/tools/eval_math.py" --model "$OUT/hf" \
    --benchmarks "heldout=$DATA/test.jsonl,seen=$DATA/train.jsonl" \
    --max-problems "$EVAL_PROBLEMS" --num-samples "$EVAL_SAMPLES" --max-new-tokens 400 \
    --batch-size 16 --prompt-template qwen-boxed --output-dir "$OUT/eval" --judge-workers 1

# The two stages' learning curves and target-probability histograms (PNG).
"$PYTHON" "$REPO_ROOT/tools/plot_metrics.py" --run "pretrain=$OUT/pretrain/metrics.jsonl" \
    --run "dft=$OUT/dft/metrics.jsonl" --out "$OUT/figures" --log-y > /dev/null

printf '\n=== summary (%ds)\n' $((SECONDS - START))
"$PYTHON" -m dft_megatron.utils.summary "$OUT"
