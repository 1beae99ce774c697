#!/usr/bin/env bash
# A bf16 DFT fine-tune of a converted model through the three loss paths, side by side: the
# unfused loss, the fused one (--cross-entropy-loss-fusion; Triton on a GPU) and the chunked
# output layer (--dft-chunked-output-layer). Part of scripts/gpu_check.sh; runs on a CPU too
# (smaller: HIDDEN=64 ITERS=3).
#   bash scripts/finetune_paths.sh OUT.json
# A tiny Qwen2-style model made by transformers (tools/init_hf_model.py, seed 5), converted in
# bf16 (tools/convert_hf_to_megatron.py), then per TP size in $TPS (default 1) and per path:
# torchrun -m dft_megatron.train --load ... --finetune --bf16 --seed 1234 on the bundled math
# data. OUT.json: per run the losses, CEs and grad norms, and the largest relative difference
# of its loss from the unfused run at the same TP (bf16 kernels differ: expect 1e-3, not 1e-7).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# == 1 ]] || { echo "usage: bash scripts/finetune_paths.sh OUT.json" >&2; exit 2; }
RESULT=$1
PY=${PYTHON:-python3}
TPS=${TPS:-1}
HIDDEN=${HIDDEN:-256}
ITERS=${ITERS:-20}
WORK=$(mktemp -d /tmp/finetune_paths.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
DATA=examples/data/math

"$PY" tools/init_hf_model.py --family qwen2 --tokenizer-model "$DATA/tokenizer" \
    --num-layers 4 --hidden-size "$HIDDEN" --num-attention-heads 4 --num-query-groups 2 \
    --ffn-hidden-size $((4 * HIDDEN)) --max-position-embeddings 1024 --seed 5 \
    --output-dir "$WORK/hf"
"$PY" tools/convert_hf_to_megatron.py --hf-dir "$WORK/hf" --megatron-dir "$WORK/megatron" \
    --dtype bf16
for tp in $TPS; do
    for path in unfused fused chunked; do
        flags=()
        [[ $path == fused ]] && flags=(--cross-entropy-loss-fusion)
        [[ $path == chunked ]] && flags=(--dft-chunked-output-layer)
        echo "=== TP$tp, $path"
        "$PY" -m torch.distributed.run --standalone --nproc-per-node "$tp" \
            -m dft_megatron.train --load "$WORK/megatron" --finetune --bf16 --seed 1234 \
            --tensor-model-parallel-size "$tp" --loss-type dft \
            --sft-data "$DATA/train.jsonl" --prompt-key problem --response-key solution \
            --seq-length 512 --micro-batch-size 4 --global-batch-size 16 \
            --train-iters "$ITERS" --lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 2 \
            --log-interval 1 --data-cache-path "$WORK/cache" \
            --log-metrics-jsonl "$WORK/tp${tp}_$path.jsonl" "${flags[@]}"
    done
done
"$PY" - "$WORK" "$RESULT" <<'PY'
import json
import sys
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
runs = {}
for f in sorted(work.glob("tp*_*.jsonl")):
    records = [json.loads(line) for line in f.read_text().splitlines()]
    runs[f.stem] = [r for r in records if r.get("split") != "valid"]
result = {}
for name, recs in runs.items():
    ref = runs[name.split("_")[0] + "_unfused"]
    worst = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(recs, ref, strict=True))
    result[name] = {
        "loss": [r["loss"] for r in recs],
        "ce_loss": [r["ce_loss"] for r in recs],
        "grad_norm": [r["grad_norm"] for r in recs],
        "max_rel_diff_loss_vs_unfused": worst,
    }
    print(
        f"{name:12s} loss {recs[0]['loss']:.5f} -> {recs[-1]['loss']:.5f}, "
        f"CE {recs[0]['ce_loss']:.4f} -> {recs[-1]['ce_loss']:.4f}; "
        f"largest relative difference of the loss from unfused {worst:.2e}"
    )
out.write_text(json.dumps(result, indent=1))
PY
