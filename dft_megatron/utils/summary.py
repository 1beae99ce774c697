"""The CPU quickstart's closing summary: losses per stage, where the files are, and the
evaluation table. `python -m dft_megatron.utils.summary OUT` (OUT: the quickstart folder).

It reads the stages' `--log-metrics-jsonl` files (dft_megatron/training/metrics.py: one record
per logged iteration, and per validation with "split": "valid"): the first and the last
logged training iteration, the fractions of target tokens with p < 0.01 and p > 0.99 (the
regimes DFT polarizes), and the last validation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

STAGES = (("pretrain", "pre-training (text, SFT loss)"), ("dft", "DFT fine-tuning"))


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary(out: str | Path) -> str:
    from dft_megatron.eval.runner import format_results_table

    out = Path(out)
    lines = ["training (token means over the target tokens; p: mean target probability):"]
    for folder, title in STAGES:
        recs = _records(out / folder / "metrics.jsonl")
        train = [r for r in recs if r.get("split") != "valid"]
        valid = [r for r in recs if r.get("split") == "valid"]
        if not train:
            lines.append(f"  {title}: no metrics in {out / folder}")
            continue
        first, last = train[0], train[-1]
        lines.append(
            f"  {title}: iterations {first['iteration']}..{last['iteration']}: loss "
            f"{first['loss']:.4f} -> {last['loss']:.4f}, CE {first['ce_loss']:.3f} -> "
            f"{last['ce_loss']:.3f}, p {first['target_prob_mean']:.3f} -> "
            f"{last['target_prob_mean']:.3f}"
        )
        if all(k in r for r in (first, last) for k in ("p<0.01", "p>0.99")):
            lines.append(
                f"    target tokens with p < 0.01: {first['p<0.01']:.1%} -> {last['p<0.01']:.1%}, "
                f"p > 0.99: {first['p>0.99']:.1%} -> {last['p>0.99']:.1%}"
            )
        if valid:
            v = valid[-1]
            lines.append(
                f"    validation at iteration {v['iteration']}: loss {v['loss']:.4f}, "
                f"CE {v['ce_loss']:.3f}, p {v['target_prob_mean']:.3f}"
            )
    lines += [
        "",
        "files:",
        f"  Hugging Face models:     {out / 'hf_init'} (initial), {out / 'hf'} (DFT result)",
        f"  Megatron-LM checkpoints: {out / 'megatron_init'}, {out / 'pretrain'}, {out / 'dft'}",
        f"  TensorBoard:             tensorboard --logdir {out / 'tensorboard'}",
        f"  evaluation:              {out / 'eval'} (results.json, <benchmark>.samples.jsonl)",
    ]
    figures = out / "figures"
    if (figures / "learning_curves.png").is_file():
        lines += [
            f"  figures:                 {figures / 'learning_curves.png'}, "
            f"{figures / 'target_prob_hist.png'}",
            "    what to see: DFT's loss falls while the CE of the same tokens does not, and the "
            "target probabilities polarize (mass moves to both ends of the histogram);",
            "    SFT vs DFT and the variants, with accuracy: bash examples/reproduce_dft_cpu.sh "
            "(docs/RESULTS.md)",
        ]
    results = out / "eval" / "results.json"
    if results.is_file():
        lines += [
            "",
            "evaluation (percent):",
            format_results_table(json.loads(results.read_text())),
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart"))  # noqa: T201
