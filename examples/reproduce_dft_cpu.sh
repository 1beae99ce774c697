#!/usr/bin/env bash
# What DFT does, on this machine: SFT, DFT and its variants fine-tuned from one base model
# with the same data, steps and seeds, then judged with the paper's evaluation protocol.
#
#   1. data: generated step-by-step problems a small model can learn on CPU (easy arithmetic
#      and linear equations, tools/make_math_data.py), split into a pre-training half, a
#      fine-tuning half and an in-distribution held-out set (no shared problem), and a
#      byte-level BPE tokenizer trained on the training rows
#   2. the base: a Qwen2-style model (4 layers, hidden 128) from a Hugging Face random init,
#      converted, then SFT on the pre-training half to partial competence
#   3. every method fine-tuned from that base on the fine-tuning half (same iterations, lr,
#      seed and batches): sft, dft, asft (anchored to the base), eaft, chord, prob-power (-p^k)
#   4. the offline-RL setting of the paper's Table 3: k samples per fine-tuning problem from
#      the base at temperature 1, judged by the verifier; DFT on them with the verdict as
#      --sample-weight-key (rejected samples weigh 0)
#   5. each model converted to Hugging Face and evaluated (k samples at temperature 1, the
#      last \boxed{} judged by math-verify: avg@k), the base too
#   6. OUT/results.json (per method: held-out avg@k, the target-probability regime fractions at
#      the start and end of fine-tuning) and the figures, made by tools/plot_metrics.py's library:
#      OUT/learning_curves.png (the paper's Figure 1 view), OUT/target_prob_hist.png (SFT vs DFT
#      on the training data: Figure 2), OUT/accuracy.png
#
#   bash examples/reproduce_dft_cpu.sh              # 24 minutes on 2 cores (docs/RESULTS.md)
#   SMOKE=1 OUT=/tmp/smoke bash examples/reproduce_dft_cpu.sh   # the same steps, tiny (CI)
#
# Environment (defaults in brackets; SMOKE=1 shrinks every size): OUT [runs/reproduce_dft]
# (replaced if it exists), SEED [1234], METHODS ["sft dft asft eaft chord prob-power"],
# OFFLINE_RL [1], HIDDEN [128], PRETRAIN_ITERS, FT_ITERS, EVAL_PROBLEMS, EVAL_SAMPLES, RL_PROBLEMS, LR,
# MASTER_PORT [29527], PYTHON. docs/RESULTS.md has the full run's table and figures.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    PYTHON=python
    [[ -x "$REPO_ROOT/.venv/bin/python" ]] && PYTHON="$REPO_ROOT/.venv/bin/python"
fi
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_VISIBLE_DEVICES=""  # the CPU path, also on a GPU machine
if ! "$PYTHON" -c 'import torch, megatron.core, transformers, matplotlib' 2>/dev/null; then
    echo "error: $PYTHON lacks dft-megatron's dependencies; run: bash scripts/setup.sh" >&2
    exit 1
fi

OUT=${OUT:-runs/reproduce_dft}
SEED=${SEED:-1234}
METHODS=${METHODS:-"sft dft asft eaft chord prob-power"}
OFFLINE_RL=${OFFLINE_RL:-1}
if [[ "${SMOKE:-0}" == 1 ]]; then
    ROWS=${ROWS:-240} TEST_ROWS=${TEST_ROWS:-16}
    PRETRAIN_ITERS=${PRETRAIN_ITERS:-6} FT_ITERS=${FT_ITERS:-3}
    EVAL_PROBLEMS=${EVAL_PROBLEMS:-4} EVAL_SAMPLES=${EVAL_SAMPLES:-2} RL_PROBLEMS=${RL_PROBLEMS:-4}
    MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-24} LOG_INTERVAL=1
else
    ROWS=${ROWS:-3000} TEST_ROWS=${TEST_ROWS:-200}
    PRETRAIN_ITERS=${PRETRAIN_ITERS:-1200} FT_ITERS=${FT_ITERS:-100}
    EVAL_PROBLEMS=${EVAL_PROBLEMS:-100} EVAL_SAMPLES=${EVAL_SAMPLES:-4} RL_PROBLEMS=${RL_PROBLEMS:-150}
    MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-160} LOG_INTERVAL=10
fi
LR=${LR:-1e-3}
HIDDEN=${HIDDEN:-128}
[[ "${SMOKE:-0}" == 1 ]] && HIDDEN=${SMOKE_HIDDEN:-64}
START=$SECONDS

note() { printf '\n=== %s (%ds)\n' "$1" $((SECONDS - START)); }
train() { OMP_NUM_THREADS=2 "$PYTHON" -m torch.distributed.run --nproc-per-node 1 \
    --master-port "${MASTER_PORT:-29527}" -m dft_megatron.train "$@"; }
evaluate() {  # evaluate NAME HF_DIR: held-out avg@k into OUT/eval/NAME
    "$PYTHON" "$REPO_ROOT/tools/eval_math.py" --model "$2" --benchmarks "heldout=$DATA/test.jsonl" \
        --max-problems "$EVAL_PROBLEMS" --num-samples "$EVAL_SAMPLES" \
        --max-new-tokens "$MAX_NEW_TOKENS" --batch-size 32 --prompt-template qwen-boxed \
        --seed "$SEED" --output-dir "$OUT/eval/$1" --judge-workers 1
}

[[ -e "$OUT" ]] && { echo "replacing the previous output in $OUT"; rm -rf "$OUT"; }
mkdir -p "$OUT"
DATA="$OUT/data"

note "1. data: $ROWS training rows (half pre-training, half fine-tuning), $TEST_ROWS held out"
"$PYTHON" "$REPO_ROOT/tools/make_math_data.py" --output-dir "$DATA" --train-size "$ROWS" \
    --test-size "$TEST_ROWS" --seed "$SEED" --kinds arithmetic,linear \
    --train-difficulties easy --test-difficulties easy --vocab-size 512 > "$DATA.json"
head -n $((ROWS / 2)) "$DATA/train.jsonl" > "$DATA/pretrain.jsonl"
tail -n +$((ROWS / 2 + 1)) "$DATA/train.jsonl" > "$DATA/finetune.jsonl"

note "2. the base model: Hugging Face init, conversion, SFT to partial competence ($PRETRAIN_ITERS iterations)"
"$PYTHON" "$REPO_ROOT/tools/init_hf_model.py" --family qwen2 --tokenizer-model "$DATA/tokenizer" \
    --num-layers 4 --hidden-size "$HIDDEN" --num-attention-heads 4 --num-query-groups 2 \
    --ffn-hidden-size $((3 * HIDDEN)) --max-position-embeddings 512 --seed "$SEED" --output-dir "$OUT/hf_init"
"$PYTHON" "$REPO_ROOT/tools/convert_hf_to_megatron.py" --hf-dir "$OUT/hf_init" \
    --megatron-dir "$OUT/megatron_init" --dtype fp32

# Megatron-LM's flags; the architecture and the tokenizer come from the --load checkpoint.
COMMON=(--micro-batch-size 8 --global-batch-size 16 --seq-length 256 --seed "$SEED"
        --prompt-key problem --response-key solution --log-interval "$LOG_INTERVAL"
        --lr-decay-style cosine --lr-warmup-fraction 0.05 --weight-decay 0.0)
train "${COMMON[@]}" --load "$OUT/megatron_init" --finetune --sft-data "$DATA/pretrain.jsonl" \
    --data-cache-path "$OUT/cache/pretrain" --loss-type sft --lr 3e-3 --min-lr 3e-4 \
    --train-iters "$PRETRAIN_ITERS" --save "$OUT/base" --save-interval "$PRETRAIN_ITERS" \
    --log-metrics-jsonl "$OUT/base/metrics.jsonl" --tensorboard-dir "$OUT/tensorboard/base"
"$PYTHON" "$REPO_ROOT/tools/convert_megatron_to_hf.py" --megatron-dir "$OUT/base" \
    --hf-dir "$OUT/hf/base"

declare -A FLAGS=(
    [sft]="--loss-type sft"
    [dft]="--loss-type dft"
    [asft]="--loss-type asft --asft-kl-coeff 0.1"
    [eaft]="--loss-type eaft --eaft-topk 20 --eaft-alpha 1"
    [chord]="--loss-type chord"
    [prob-power]="--loss-type prob-power --prob-power-k 3"
)
finetune() {  # finetune NAME DATA_FILE FLAGS...: from the base, then to Hugging Face
    local name=$1 data=$2
    shift 2
    train "${COMMON[@]}" --load "$OUT/base" --finetune --sft-data "$data" \
        --data-cache-path "$OUT/cache/$name" --lr "$LR" --min-lr "$("$PYTHON" -c "print($LR / 10)")" \
        --train-iters "$FT_ITERS" --save "$OUT/$name" --save-interval "$FT_ITERS" \
        --log-metrics-jsonl "$OUT/$name/metrics.jsonl" --tensorboard-dir "$OUT/tensorboard/$name" \
        "$@"
    "$PYTHON" "$REPO_ROOT/tools/convert_megatron_to_hf.py" --megatron-dir "$OUT/$name" \
        --hf-dir "$OUT/hf/$name"
}

note "3. fine-tuning from the base: $METHODS ($FT_ITERS iterations each, lr $LR, seed $SEED)"
for method in $METHODS; do
    [[ -n "${FLAGS[$method]:-}" ]] || { echo "error: METHODS: unknown method $method" >&2; exit 2; }
    note "3. $method: ${FLAGS[$method]}"
    # shellcheck disable=SC2086  # the flags are words
    finetune "$method" "$DATA/finetune.jsonl" ${FLAGS[$method]}
done

if [[ "$OFFLINE_RL" == 1 ]]; then
    note "4. offline RL: $EVAL_SAMPLES samples of $RL_PROBLEMS fine-tuning problems from the base, judged"
    "$PYTHON" "$REPO_ROOT/tools/eval_math.py" --model "$OUT/hf/base" \
        --benchmarks "rollouts=$DATA/finetune.jsonl" --max-problems "$RL_PROBLEMS" \
        --num-samples "$EVAL_SAMPLES" --max-new-tokens "$MAX_NEW_TOKENS" --batch-size 32 \
        --prompt-template qwen-boxed --seed "$SEED" --output-dir "$OUT/rollouts" --judge-workers 1
    "$PYTHON" -m dft_megatron.eval.comparison rewards --rollouts "$OUT/rollouts/rollouts" \
        --problems "$DATA/finetune.jsonl" --output "$DATA/rollouts.jsonl"
    note "4. dft-rft: DFT on the judged samples, the verdict as the sample weight"
    finetune dft-rft "$DATA/rollouts.jsonl" --loss-type dft --sample-weight-key reward
fi

note "5. evaluation: $EVAL_PROBLEMS held-out problems x $EVAL_SAMPLES samples per model"
for name in base $METHODS $([[ "$OFFLINE_RL" == 1 ]] && echo dft-rft); do
    evaluate "$name" "$OUT/hf/$name"
done

note "6. results"
"$PYTHON" -m dft_megatron.eval.comparison summarize --out "$OUT" --seed "$SEED" \
    --methods "base $METHODS $([[ "$OFFLINE_RL" == 1 ]] && echo dft-rft)" \
    --settings "pretrain_iters=$PRETRAIN_ITERS ft_iters=$FT_ITERS lr=$LR rows=$ROWS test_rows=$TEST_ROWS eval_problems=$EVAL_PROBLEMS eval_samples=$EVAL_SAMPLES"
printf '\n=== done in %ds: %s/results.json and the figures in %s\n' $((SECONDS - START)) "$OUT" "$OUT"
