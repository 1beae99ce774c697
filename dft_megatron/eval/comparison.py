"""The comparison of fine-tuning objectives that examples/reproduce_dft_cpu.sh runs.

    python -m dft_megatron.eval.comparison rewards --rollouts DIR/NAME --problems FILE --output FILE
    python -m dft_megatron.eval.comparison summarize --out OUT --methods "base sft dft ..."

`rewards`: the offline-RL data of the DFT paper's Table 3. The evaluation of the base model on
training problems (tools/eval_math.py: NAME.completions.jsonl holds the sampled text,
NAME.samples.jsonl the verifier's verdict) becomes SFT rows {problem, solution: the sample,
reward: 1 if judged correct else 0}, trained with `--sample-weight-key reward` (rejected samples
weigh 0). Empty samples cannot be trained on: they are counted and left out.

`summarize`: OUT/results.json with, per method, the held-out avg@k and pass@k of
OUT/eval/METHOD/results.json and, from the run's metrics JSONL (OUT/METHOD/metrics.jsonl), the
target-probability regime fractions and mean at the first and the last logged training
iteration, plus the command's settings and the versions; the figures OUT/learning_curves.png,
OUT/target_prob_hist.png (SFT vs DFT where both ran) and OUT/accuracy.png; a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

REGIMES = ("p<0.01", "p 0.01-0.5", "p 0.5-0.99", "p>0.99")


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
    return rows


def reward_rows(rollouts: Path, problems: Path, output: Path) -> dict:
    """Write the offline-RL rows of one evaluation (see the module docstring); returns counts."""
    completions = {
        (r["problem_index"], r["sample_index"]): r["completion"]
        for r in _jsonl(Path(f"{rollouts}.completions.jsonl"))
    }
    verdicts = _jsonl(Path(f"{rollouts}.samples.jsonl"))
    source = _jsonl(problems)
    rows, empty = [], 0
    for v in verdicts:
        key = (v["problem_index"], v["sample_index"])
        text = completions[key]
        if not text.strip():
            empty += 1
            continue
        problem = source[v["problem_index"]]["problem"]
        rows.append({"problem": problem, "solution": text, "reward": float(bool(v["correct"]))})
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    accepted = sum(r["reward"] > 0 for r in rows)
    counts = {
        "samples": len(verdicts),
        "rows": len(rows),
        "accepted": accepted,
        "empty_samples_left_out": empty,
        "problems_with_an_accepted_sample": len(
            {v["problem_index"] for v in verdicts if v["correct"]}
        ),
    }
    print(f"{output}: {json.dumps(counts)}")  # noqa: T201
    if not accepted:
        print(  # noqa: T201
            f"warning: no sample of {rollouts} was judged correct: every row weighs 0, the "
            "fine-tuning on them changes nothing",
            file=sys.stderr,
        )
    return counts


def _training_records(path: Path) -> list[dict]:
    return [r for r in _jsonl(path) if r.get("split") != "valid"] if path.is_file() else []


def _regimes(record: dict | None) -> dict | None:
    if record is None:
        return None
    out = {name: record[name] for name in REGIMES if name in record}
    out["target_prob_mean"] = record.get("target_prob_mean")
    out["iteration"] = record["iteration"]
    return out


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for package in ("torch", "megatron-core", "transformers", "math-verify"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def summarize(out: Path, methods: list[str], seed: int | None, settings: dict) -> dict:
    """OUT/results.json and the figures (see the module docstring); returns the results."""
    from dft_megatron.utils import plots

    per_method, accuracy, runs = {}, {}, {}
    k = None
    extraction = None
    for name in methods:
        results = json.loads((out / "eval" / name / "results.json").read_text())
        k = results["settings"]["num_samples"]
        extraction = results["settings"].get("answer_extraction")
        held = results["benchmarks"]["heldout"]
        metrics = out / name / "metrics.jsonl"
        records = _training_records(metrics)
        entry = {
            f"heldout_avg@{k}": held[f"avg@{k}"],
            f"heldout_pass@{k}": held["pass@k"][str(k)],
            "no_answer_fraction": held.get("no_answer_fraction"),
            "regimes_first": _regimes(records[0] if records else None),
            "regimes_last": _regimes(records[-1] if records else None),
            "ce_loss_last": records[-1]["ce_loss"] if records else None,
        }
        per_method[name] = entry
        accuracy[name] = held[f"avg@{k}"]
        if records and name != "base":
            runs[name] = plots.load_run(metrics)
    figures = {}
    if runs:
        finetuned = {n: a for n, a in accuracy.items() if n in runs}
        figures["learning_curves"] = plots.plot_learning_curves(
            runs, out / "learning_curves.png", accuracy=finetuned
        )
        pair = {n: runs[n] for n in ("sft", "dft") if n in runs} or runs
        figures["target_prob_hist"] = plots.plot_target_prob_histograms(
            pair, out / "target_prob_hist.png", log_y=True
        )
    figures["accuracy"] = plots.plot_accuracy(accuracy, out / "accuracy.png", k=k)
    results = {
        "command": "bash examples/reproduce_dft_cpu.sh",
        "seed": seed,
        "settings": settings,
        "answer_extraction": extraction,
        "num_samples": k,
        "versions": _versions(),
        "methods": per_method,
        "figures": {n: str(p.name) for n, p in figures.items()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(format_table(results))  # noqa: T201
    return results


def format_table(results: dict) -> str:
    """The methods' held-out accuracy and regime fractions, one row each."""
    k = results["num_samples"]
    head = (
        f"{'method':<12} {'avg@' + str(k):>8} {'pass@' + str(k):>8} "
        f"{'p<0.01':>15} {'p>0.99':>15} {'mean p':>15}"
    )
    lines = [head, "-" * len(head)]

    def change(entry: dict, key: str) -> str:
        first, last = entry["regimes_first"], entry["regimes_last"]
        if not first or first.get(key) is None:
            return "-"
        return f"{first[key]:.3f} -> {last[key]:.3f}"

    for name, e in results["methods"].items():
        avg, top = 100 * e[f"heldout_avg@{k}"], 100 * e[f"heldout_pass@{k}"]
        lines.append(
            f"{name:<12} {avg:>7.1f}% {top:>7.1f}% "
            f"{change(e, 'p<0.01'):>15} {change(e, 'p>0.99'):>15} "
            f"{change(e, 'target_prob_mean'):>15}"
        )
    lines.append(
        "regimes: the fraction of target tokens of the training data in each p range at the "
        "first -> last logged iteration (base: its pre-training)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("rewards", help="offline-RL rows from a judged evaluation")
    r.add_argument("--rollouts", required=True, help="OUTPUT_DIR/NAME of tools/eval_math.py")
    r.add_argument("--problems", required=True, help="the benchmark file that was evaluated")
    r.add_argument("--output", required=True, help="the JSONL rows to write")
    s = sub.add_parser("summarize", help="OUT/results.json and the figures")
    s.add_argument("--out", required=True)
    s.add_argument("--methods", required=True, help="space-separated run names under OUT")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--settings", default="", help="KEY=VALUE words recorded in results.json")
    args = parser.parse_args(argv)
    try:
        if args.command == "rewards":
            reward_rows(Path(args.rollouts), Path(args.problems), Path(args.output))
        else:
            settings = dict(w.split("=", 1) for w in args.settings.split() if "=" in w)
            summarize(Path(args.out), args.methods.split(), args.seed, settings)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)  # noqa: T201
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
