"""Plot training runs' logs: learning curves and target-probability histograms (PNG).

    python tools/plot_metrics.py --run sft=runs/x/sft/metrics.jsonl \\
        --run dft=runs/x/dft/tensorboard --out figs/ \\
        [--accuracy sft=runs/x/sft/eval/results.json --accuracy dft=0.412] \\
        [--iteration 100] [--log-y] [--side-by-side] [--hist-split valid]

Each --run is NAME=PATH: PATH a --log-metrics-jsonl file or a --tensorboard-dir directory.
Writes OUT/learning_curves.png, OUT/target_prob_hist.png (each run at its last logged
iteration) and OUT/target_prob_hist_iter<N>.png per --iteration, and prints their paths.
--accuracy NAME[@ITERATION]=VALUE adds a held-out accuracy panel: VALUE a fraction in [0, 1]
or an evaluation's results.json (tools/eval_math.py; its average avg@k); without @ITERATION
it is drawn at the run's last training iteration, several @ITERATIONs make a series.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dft_megatron.utils.plots import (
    MetricsError,
    load_accuracy,
    load_run,
    plot_learning_curves,
    plot_target_prob_histograms,
)

logger = logging.getLogger("plot_metrics")


def _name_value(spec: str, flag: str) -> tuple[str, str]:
    """'NAME=VALUE' -> (NAME, VALUE), or exit with the flag's usage."""
    name, sep, value = spec.partition("=")
    if not sep or not name or not value:
        raise SystemExit(f"error: {flag} {spec!r}: expected NAME=VALUE")
    return name, value


def parse_accuracy(specs: list[str]) -> dict[str, float | dict[int, float]]:
    """--accuracy NAME[@ITERATION]=VALUE|results.json items -> run -> fraction, or run ->
    {iteration: fraction} where iterations are given."""
    out: dict[str, float | dict[int, float]] = {}
    for spec in specs:
        key, value = _name_value(spec, "--accuracy")
        name, at, iteration = key.partition("@")
        try:
            acc = float(value)
        except ValueError:
            acc = load_accuracy(value)
        if not at:
            out[name] = acc
            continue
        if not iteration.isdigit():
            raise SystemExit(f"error: --accuracy {spec!r}: ITERATION must be an integer")
        series = out.setdefault(name, {})
        if not isinstance(series, dict):
            raise SystemExit(f"error: --accuracy for {name!r} both with and without @ITERATION")
        series[int(iteration)] = acc
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a run's metrics JSONL or TensorBoard directory (repeat to overlay runs)",
    )
    parser.add_argument("--out", required=True, help="output directory for the PNGs")
    parser.add_argument(
        "--accuracy",
        action="append",
        default=[],
        metavar="NAME[@ITERATION]=VALUE",
        help="held-out accuracy: a fraction or an evaluation's results.json (repeatable)",
    )
    parser.add_argument(
        "--iteration",
        type=int,
        action="append",
        default=[],
        help="also a histogram at the logged iteration nearest to this one (repeatable)",
    )
    parser.add_argument("--log-y", action="store_true", help="histograms on a log-scale y axis")
    parser.add_argument(
        "--side-by-side", action="store_true", help="one histogram panel per run, not overlaid"
    )
    parser.add_argument(
        "--hist-split",
        choices=("train", "valid"),
        default="train",
        help="the histograms' data: training (default, the paper's view) or validation",
    )
    parser.add_argument("--dpi", type=int, default=150, help="resolution (default 150)")
    args = parser.parse_args(argv)
    # Warnings from everyone (the skipped records come as dft_megatron's), INFO from here only.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logger.setLevel(logging.INFO)

    try:
        runs = {}
        for spec in args.run:
            name, path = _name_value(spec, "--run")
            if name in runs:
                raise SystemExit(f"error: --run {name!r} given twice")
            runs[name] = load_run(path)
            logger.info("%s: %s", name, runs[name].describe())
        accuracy = parse_accuracy(args.accuracy)
        out = Path(args.out)
        written = [plot_learning_curves(runs, out / "learning_curves.png", accuracy, dpi=args.dpi)]
        with_hist = {n: r for n, r in runs.items() if getattr(r, args.hist_split).histograms}
        for name in (n for n in runs if n not in with_hist):
            logger.warning("%s: its log has no %s p histogram to plot", name, args.hist_split)
        if with_hist:
            for iteration in [None, *args.iteration]:
                suffix = "" if iteration is None else f"_iter{iteration}"
                written.append(
                    plot_target_prob_histograms(
                        with_hist,
                        out / f"target_prob_hist{suffix}.png",
                        iteration=iteration,
                        log_y=args.log_y,
                        split=args.hist_split,
                        side_by_side=args.side_by_side,
                        dpi=args.dpi,
                    )
                )
    except MetricsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
