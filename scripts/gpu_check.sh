#!/usr/bin/env bash
# The GPU check: what to run, as one command, when a machine with an NVIDIA GPU is lent for a
# few minutes (no network there; the wheels its image lacks come along in .whl/).
#
#   bash scripts/gpu_wheels.sh        # here, once: megatron-core & co. into .whl/ (git-ignored)
#   bash scripts/gpu_check.sh         # there, from the repository root, .whl/ carried along
#
# Within GPU_CHECK_BUDGET_S seconds (default 450, i.e. under 8 minutes), each step with a
# time limit of its own, whatever the previous one did:
#   1. tests/gpu (pytest): the DFT loss on CUDA against float64, the Triton-fused loss, the
#      trainer's GPU paths (TE and FP8 ones skip without Transformer Engine);
#   2. benchmarks.bench_loss and benchmarks.bench_output_layer on the GPU (JSON rows);
#   3. a bf16 DFT fine-tune of a converted model (tools/init_hf_model.py ->
#      tools/convert_hf_to_megatron.py -> torchrun -m dft_megatron.train --finetune --bf16,
#      another --seed) through the unfused loss, the fused (Triton) loss and the chunked
#      output layer at TP1, and TP2 where there are 2 GPUs; their losses side by side.
# Results in $OUT (default ./gpu_check_out): gpu_check.log (every step's output),
# summary.json (per step: exit code, seconds), tests_gpu.xml, bench_loss.json,
# bench_output_layer.json, finetune.json. Exit status: 0 when every step passed, 1 when one
# failed, 2 when this machine has no CUDA GPU (nothing is run).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
OUT=${OUT:-$ROOT/gpu_check_out}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "error: scripts/gpu_check.sh needs a CUDA GPU: $PY finds none here" \
        "(torch.cuda.is_available() is False or torch is missing); run it on the GPU machine" \
        "(README.md, 'GPU check'), the CPU suite is bash scripts/test.sh" >&2
    exit 2
fi

mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
: > "$LOG"
SUMMARY=$OUT/summary.jsonl
: > "$SUMMARY"
START=$SECONDS
failed=0
say() { echo "$*" | tee -a "$LOG"; }

if compgen -G ".whl/*.whl" > /dev/null; then
    say "installing $(ls .whl | wc -l) carried wheels into /tmp/gpu_check_site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_check_site .whl/*.whl >> "$LOG" 2>&1 || {
        say "error: the wheels in .whl/ did not install (see $LOG)"; exit 1; }
    export PYTHONPATH=/tmp/gpu_check_site:$ROOT${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" - >> "$LOG" 2>&1 <<'PY' || { say "error: torch, megatron-core or dft_megatron does not import (see $LOG); run bash scripts/gpu_wheels.sh here and carry .whl/"; exit 1; }
import torch, megatron.core, transformers, dft_megatron
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), megatron-core "
      f"{megatron.core.__version__}, transformers {transformers.__version__}, "
      f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}")
PY
tail -n 1 "$LOG"
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())')

# step NAME LIMIT_S COMMAND...: runs COMMAND with at most LIMIT_S seconds (less if the budget
# has less left), appends its output to the log and its outcome to summary.jsonl.
step() {
    local name=$1 limit=$2 left rc t0
    shift 2
    left=$((BUDGET - (SECONDS - START)))
    ((limit > left)) && limit=$left
    if ((limit < 20)); then
        say "=== $name: skipped, ${left}s of the ${BUDGET}s budget left"
        echo "{\"step\": \"$name\", \"rc\": null, \"seconds\": 0, \"skipped\": true}" >> "$SUMMARY"
        failed=1
        return
    fi
    say "=== $name (at most ${limit}s): $*"
    t0=$SECONDS
    timeout -k 10 "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    say "=== $name: exit $rc after $((SECONDS - t0))s$( ((rc == 124)) && echo ' (time limit)')"
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >> "$SUMMARY"
    ((rc == 0)) || failed=1
}

step tests_gpu 240 "$PY" -m pytest tests/gpu -q -p no:cacheprovider -o addopts="" -ra \
    --junitxml="$OUT/tests_gpu.xml"
step bench_loss 60 "$PY" -m benchmarks.bench_loss --tp 1 --tokens 4096 --vocab 32000 152064 \
    --reps 5 --json "$OUT/bench_loss.json"
step bench_output_layer 60 "$PY" -m benchmarks.bench_output_layer --tp 1 --tokens 4096 \
    --vocab 32000 152064 --reps 5 --json "$OUT/bench_output_layer.json"

# 3. bf16 DFT fine-tune of a converted model through each loss path (TP2 too with 2 GPUs).
TPS=1
((NGPU >= 2)) && TPS="1 2"
step finetune_paths 200 env PYTHON="$PY" TPS="$TPS" bash scripts/finetune_paths.sh "$OUT/finetune.json"

"$PY" -c 'import json, sys; rows = [json.loads(l) for l in open(sys.argv[1])]; json.dump(rows, open(sys.argv[2], "w"), indent=1)' \
    "$SUMMARY" "$OUT/summary.json" && rm -f "$SUMMARY"
say "=== done in $((SECONDS - START))s: $( ((failed)) && echo 'a step FAILED' || echo 'every step passed'); results in $OUT"
exit $failed
