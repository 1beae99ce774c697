"""Figures from training logs: learning curves (the DFT paper's Figure 1 view) and the
distribution of target-token probabilities (its Figure 2 view), for one run or several
overlaid (SFT vs DFT vs variants).

A run's logs are either of:
- the `--log-metrics-jsonl` file (dft_megatron/training/metrics.py): one record per logged
  training iteration and one per validation (those carry "split": "valid"), with token means
  ("loss": the objective optimized, "ce_loss", "target_prob_mean", "entropy"), the fractions
  of target tokens in the p regimes ("p<0.01", ...) and "p_histogram", the target-token counts
  in 20 bins over [0, 1];
- a TensorBoard directory written by Megatron-LM's trainer: `loss_func`'s report as scalars
  ("lm loss", "ce loss", "target p", the regimes; "<key> validation" for validation) and
  metrics.py's histograms "train/target_prob" and "valid/target_prob".

Both load into the same `RunMetrics`, keyed by the JSONL's field names. A run resumed from an
earlier checkpoint appends to the same log and logs some iterations again: the later entry
wins and the earlier one is counted as skipped, as are records that are not metrics records;
`load_run` reports them (logging warning) rather than dropping them silently.

Figures are drawn on a `matplotlib.figure.Figure` with the Agg canvas (no pyplot, so no
global backend switch and no figure left open in the caller's process).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

logger = logging.getLogger(__name__)

# metrics.py's REGIME_NAMES (not imported: metrics.py imports torch, which a plot does not
# need; tests/utils/test_plots.py checks that both agree). torch.bucketize's bins: p <= 0.01,
# 0.01 < p <= 0.5, 0.5 < p <= 0.99, p > 0.99.
REGIME_NAMES = ("p<0.01", "p 0.01-0.5", "p 0.5-0.99", "p>0.99")
REGIME_TITLES = ("p ≤ 0.01", "0.01 < p ≤ 0.5", "0.5 < p ≤ 0.99", "p > 0.99")

# Megatron-LM's TensorBoard tags (training/step.py's report keys, training_log's own) ->
# the JSONL's field names; other tags keep their names.
TENSORBOARD_NAMES = {
    "lm loss": "loss",
    "ce loss": "ce_loss",
    "target p": "target_prob_mean",
    "learning-rate": "lr",
    "grad-norm": "grad_norm",
}
TENSORBOARD_HISTOGRAMS = {"train/target_prob": "train", "valid/target_prob": "valid"}
_VALIDATION_TAG = re.compile(r"^(?P<key>.+) validation(?P<suffix>.*)$")
_NOT_SCALARS = ("iteration", "split", "p_histogram")

SPLITS = ("train", "valid")


class MetricsError(ValueError):
    """A log that cannot be read or plotted; the message names the file (and line)."""


@dataclass
class Series:
    """One metric over iterations, in increasing iteration order."""

    iterations: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


@dataclass
class Histogram:
    """Target-token counts per p bin at one iteration; `edges` has one more entry than
    `counts` (bin i covers edges[i] to edges[i + 1])."""

    edges: list[float]
    counts: list[float]

    @property
    def total(self) -> float:
        return sum(self.counts)

    def fractions(self) -> list[float]:
        """The counts as fractions of the target tokens, so runs of any size compare."""
        return [c / self.total for c in self.counts]


@dataclass
class Split:
    """The training or the validation part of a run's logs."""

    scalars: dict[str, Series] = field(default_factory=dict)
    histograms: dict[int, Histogram] = field(default_factory=dict)

    @property
    def iterations(self) -> list[int]:
        """Every iteration that logged a scalar or a histogram, sorted."""
        its = set(self.histograms)
        for s in self.scalars.values():
            its.update(s.iterations)
        return sorted(its)


@dataclass
class RunMetrics:
    """A run's training and validation metrics, keyed by the JSONL's field names ("loss",
    "ce_loss", "target_prob_mean", "p<0.01", ...), and what was skipped reading them."""

    source: Path
    train: Split = field(default_factory=Split)
    valid: Split = field(default_factory=Split)
    skipped: list[str] = field(default_factory=list)
    """One line per skipped record: where it is and why."""

    def last_iteration(self) -> int | None:
        """The last logged training iteration (the last validation one for an eval-only log)."""
        its = self.train.iterations or self.valid.iterations
        return its[-1] if its else None

    def histogram_at(
        self, iteration: int | None = None, split: str = "train"
    ) -> tuple[int, Histogram]:
        """(iteration, Histogram): the last one, or the one logged nearest to `iteration`
        (runs log at different intervals; the caller shows which iteration it got)."""
        hists = _split(self, split).histograms
        if not hists:
            raise MetricsError(f"{self.source}: no {split} target-probability histogram")
        it = max(hists) if iteration is None else min(hists, key=lambda i: (abs(i - iteration), i))
        return it, hists[it]

    def describe(self) -> str:
        """One line: what was read (for a CLI to show before plotting)."""
        parts = [str(self.source)]
        for name in SPLITS:
            s = _split(self, name)
            its = s.iterations
            if its:
                parts.append(
                    f"{name}: {len(its)} iterations ({its[0]}..{its[-1]}), "
                    f"{len(s.histograms)} histograms"
                )
        parts.append(f"{len(self.skipped)} records skipped")
        return "; ".join(parts)

    def skip_report(self, limit: int = 5) -> str:
        """The number of skipped records and the first `limit` reasons."""
        lines = [f"{self.source}: {len(self.skipped)} records skipped"]
        lines += [f"  {s}" for s in self.skipped[:limit]]
        if len(self.skipped) > limit:
            lines.append(f"  ... and {len(self.skipped) - limit} more")
        return "\n".join(lines)


def _split(run: RunMetrics, name: str) -> Split:
    if name not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
    return run.train if name == "train" else run.valid


# --- loading -------------------------------------------------------------------------------


def load_run(path: str | Path) -> RunMetrics:
    """Read a run's metrics JSONL (a file) or TensorBoard log (a directory, or one event file).

    Raises MetricsError for a missing path, a line that is not JSON (file and line named) and
    a log without any metrics; logs a warning with the skipped records."""
    path = Path(path)
    if not path.exists():
        raise MetricsError(f"{path}: no such file or directory")
    if path.is_dir() or path.name.startswith("events.out.tfevents"):
        run = _load_tensorboard(path)
    else:
        run = _load_jsonl(path)
    if not (run.train.iterations or run.valid.iterations):
        detail = f" ({run.skip_report()})" if run.skipped else ""
        raise MetricsError(f"{path}: empty log: no metrics records{detail}")
    if run.skipped:
        logger.warning("%s", run.skip_report())
    return run


def _record_problem(rec) -> str | None:
    """Why a parsed JSONL line is not a metrics record, or None if it is one."""
    if not isinstance(rec, dict):
        return f"not a JSON object ({type(rec).__name__})"
    it = rec.get("iteration")
    if isinstance(it, bool) or not isinstance(it, int):
        return f"no integer 'iteration' (got {it!r})"
    if rec.get("split", "train") not in SPLITS:
        return f"unknown split {rec['split']!r}"
    return None


def _keep_latest(entries: Iterable[tuple[int, object, str]], skipped: list[str]) -> list:
    """Entries (iteration, value, where) in log order -> the same with each iteration once.
    A run restarted from an earlier checkpoint appends to the same log, so the iteration goes
    back: the entries logged before the restart from that iteration on were lost with the
    crashed run, are dropped and go to `skipped`."""
    kept: list[tuple[int, object, str]] = []
    for it, value, where in entries:
        while kept and kept[-1][0] >= it:
            old_it, _, old_where = kept.pop()
            skipped.append(
                f"{old_where}: iteration {old_it} superseded by {where} (the log starts again "
                f"at iteration {it}: a run resumed from an earlier checkpoint)"
            )
        kept.append((it, value, where))
    return kept


def _uniform_histogram(counts) -> Histogram | None:
    """metrics.py's p_histogram (counts in equal bins over [0, 1]) as a Histogram; None if it
    counts no token (no target token was logged)."""
    if (
        not isinstance(counts, list)
        or not counts
        or not all(isinstance(c, int | float) and not isinstance(c, bool) for c in counts)
    ):
        raise ValueError("p_histogram is not a list of numbers")
    n = len(counts)
    hist = Histogram([i / n for i in range(n + 1)], [float(c) for c in counts])
    return hist if hist.total > 0 else None


def _jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text file; MetricsError for an unreadable or binary one."""
    try:
        with open(path, encoding="utf-8") as f:
            yield from enumerate(f, 1)
    except UnicodeDecodeError:
        raise MetricsError(f"{path}: not a UTF-8 text file (expected a metrics JSONL)") from None
    except OSError as e:
        raise MetricsError(f"{path}: cannot read: {e.strerror}") from None


def _load_jsonl(path: Path) -> RunMetrics:
    run = RunMetrics(path)
    entries: dict[str, list] = {name: [] for name in SPLITS}
    for lineno, line in _jsonl_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise MetricsError(
                f"{where}: not a JSON line ({e.msg} at column {e.colno}): {line.strip()[:80]}"
            ) from None
        problem = _record_problem(rec)
        if problem:
            run.skipped.append(f"{where}: {problem}")
            continue
        entries[rec.get("split", "train")].append((rec["iteration"], rec, where))
    for name in SPLITS:
        split = _split(run, name)
        for it, rec, where in _keep_latest(entries[name], run.skipped):
            _add_record(split, it, rec, where, run.skipped)
    return run


def _add_record(split: Split, iteration: int, rec: dict, where: str, skipped: list[str]) -> None:
    """A JSONL record's numbers as points of the split's series (None -> NaN: metrics.py
    writes lr and grad_norm as null where Megatron-LM has none), its histogram as the split's
    histogram at `iteration`. Flags (booleans such as "skipped") are not series."""
    for key, value in rec.items():
        if key in _NOT_SCALARS or isinstance(value, bool):
            continue
        if value is None:
            value = math.nan
        if isinstance(value, int | float):
            series = split.scalars.setdefault(key, Series())
            series.iterations.append(iteration)
            series.values.append(float(value))
    if "p_histogram" in rec:
        try:
            hist = _uniform_histogram(rec["p_histogram"])
        except ValueError as e:
            skipped.append(f"{where}: {e} (the histogram is skipped, the scalars kept)")
            return
        if hist is not None:
            split.histograms[iteration] = hist


def _check_event_files(path: Path) -> None:
    """Raise MetricsError unless `path` is an event file or a directory holding some (pointing
    at the run directories when they are one level down)."""
    if path.is_file() or any(path.glob("events.out.tfevents.*")):
        return
    nested = sorted({str(p.parent) for p in path.rglob("events.out.tfevents.*")})
    if nested:
        raise MetricsError(
            f"{path}: no TensorBoard event files here, but in {', '.join(nested)}: give each "
            "as its own run"
        )
    raise MetricsError(
        f"{path}: a directory without TensorBoard event files (events.out.tfevents.*); for a "
        "metrics JSONL give the .jsonl file"
    )


def _tensorboard_key(tag: str) -> tuple[str, str] | None:
    """A scalar tag -> (split, series name); None for the " vs samples" copies (the same
    values over consumed samples instead of iterations)."""
    if tag.endswith(" vs samples"):
        return None
    m = _VALIDATION_TAG.match(tag)
    if m:
        return "valid", TENSORBOARD_NAMES.get(m["key"], m["key"]) + m["suffix"]
    return "train", TENSORBOARD_NAMES.get(tag, tag)


def _load_tensorboard(path: Path) -> RunMetrics:
    # Only TensorBoard inputs need the package (a dependency of the project: --tensorboard-dir).
    from tensorboard.backend.event_processing import event_accumulator as ea

    _check_event_files(path)
    acc = ea.EventAccumulator(str(path), size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0})
    try:
        acc.Reload()
    except Exception as e:  # a truncated or foreign file: tensorboard raises several kinds
        raise MetricsError(f"{path}: cannot read the TensorBoard events: {e}") from e
    run = RunMetrics(path)
    tags = acc.Tags()
    for tag in tags["scalars"]:
        key = _tensorboard_key(tag)
        if key is None:
            continue
        events = (
            (e.step, e.value, f"{path}: {tag!r} event {i}") for i, e in enumerate(acc.Scalars(tag))
        )
        points = _keep_latest(events, run.skipped)
        _split(run, key[0]).scalars[key[1]] = Series(
            [p[0] for p in points], [float(p[1]) for p in points]
        )
    for tag in tags["histograms"]:
        if tag not in TENSORBOARD_HISTOGRAMS:
            continue
        events = (
            (e.step, e.histogram_value, f"{path}: {tag!r} event {i}")
            for i, e in enumerate(acc.Histograms(tag))
        )
        split = _split(run, TENSORBOARD_HISTOGRAMS[tag])
        for it, h, _ in _keep_latest(events, run.skipped):
            # metrics.py writes min 0 and the upper edge of each bin as its limit.
            edges = [h.min, *h.bucket_limit]
            if any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
                run.skipped.append(f"{path}: {tag!r} step {it}: bucket limits not increasing")
            elif sum(h.bucket) > 0:
                split.histograms[it] = Histogram(list(edges), list(h.bucket))
    return run


def load_accuracy(path: str | Path) -> float:
    """The benchmark-average avg@k (a fraction) of an evaluation's results.json
    (tools/eval_math.py: {"settings": {"num_samples": k}, "average": {"avg@k": ...}})."""
    path = Path(path)
    try:
        results = json.loads(path.read_text())
        return float(results["average"][f"avg@{results['settings']['num_samples']}"])
    except FileNotFoundError:
        raise MetricsError(f"{path}: no such file") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise MetricsError(f"{path}: not an evaluation results.json ({e!r})") from None


# --- figures -------------------------------------------------------------------------------

_TRAIN_STYLE = {"linestyle": "-", "linewidth": 1.6}
_VALID_STYLE = {"linestyle": "--", "marker": "o", "markersize": 4, "linewidth": 1.2}
_CURVES = (
    ("loss", "training objective (lm loss)", "loss"),
    ("ce_loss", "cross-entropy", "CE loss (nats / token)"),
    ("target_prob_mean", "mean target-token probability", "mean p"),
)


def _colors(names: Iterable[str]) -> dict[str, str]:
    """One color per run, in the runs' order (the same in every figure)."""
    return {name: f"C{i % 10}" for i, name in enumerate(names)}


def _save(fig: Figure, path: str | Path, dpi: int) -> Path:
    """Write the figure (format from the suffix: .png) on the Agg canvas."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi)
    return path


def _draw_metric(ax, runs: Mapping[str, RunMetrics], colors, key: str) -> None:
    """Each run's training series of `key` (solid) and validation series (dashed, dots)."""
    drawn = False
    for name, run in runs.items():
        for split, style in ((run.train, _TRAIN_STYLE), (run.valid, _VALID_STYLE)):
            s = split.scalars.get(key)
            if s and s.iterations:
                ax.plot(s.iterations, s.values, color=colors[name], **style)
                drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "not in these logs", ha="center", va="center", transform=ax.transAxes)


def _fraction_limits(ax) -> None:
    """A fraction's y axis from 0 (flat lines at 0 or 1 otherwise get a range around them),
    up to a little above the largest value drawn."""
    if ax.lines:
        ymax = max(ax.dataLim.ymax, 0.0)
        ax.set_ylim(0.0, min(1.02, max(0.05, 1.1 * ymax)))


def _check_accuracy(runs, accuracy) -> None:
    for name, acc in accuracy.items():
        if name not in runs:
            raise MetricsError(f"accuracy for {name!r}, which is not a run ({', '.join(runs)})")
        values = acc.values() if isinstance(acc, Mapping) else [acc]
        for v in values:
            if not 0.0 <= v <= 1.0:
                raise MetricsError(f"accuracy {v} for {name!r}: give a fraction in [0, 1]")


def _draw_accuracy(ax, runs, colors, accuracy) -> None:
    """Held-out accuracy in percent: a series (iteration -> fraction) as a line, a single
    value at the run's last training iteration, labeled."""
    for name, acc in accuracy.items():
        points = (
            sorted(acc.items())
            if isinstance(acc, Mapping)
            else [(runs[name].last_iteration(), acc)]
        )
        xs, ys = [p[0] for p in points], [100 * p[1] for p in points]
        ax.plot(xs, ys, color=colors[name], marker="s", markersize=6, linewidth=1.4)
        ax.annotate(
            f"{ys[-1]:.1f}",
            (xs[-1], ys[-1]),
            textcoords="offset points",
            xytext=(-5, 5),  # above left: the last point is often at the right edge
            ha="right",
            color=colors[name],
        )
    ax.margins(y=0.15)  # room for the labels
    ax.set_ylabel("accuracy (%)")


def plot_learning_curves(
    runs: Mapping[str, RunMetrics],
    path: str | Path,
    accuracy: Mapping[str, float | Mapping[int, float]] | None = None,
    title: str | None = None,
    dpi: int = 150,
) -> Path:
    """The learning-curves figure: top row the objective, the CE loss and the mean target
    probability, training (solid) and validation (dashed) over iterations, and, given
    `accuracy` (run -> a fraction, or iteration -> fraction), the held-out accuracy; bottom
    row the fraction of target tokens in each p regime. One color per run. Returns the path."""
    if not runs:
        raise ValueError("plot_learning_curves: no runs")
    accuracy = dict(accuracy or {})
    _check_accuracy(runs, accuracy)
    colors = _colors(runs)
    top = [key for key, _, _ in _CURVES] + (["accuracy"] if accuracy else [])
    width = len(top) * len(REGIME_NAMES)  # columns that both rows divide evenly
    mosaic = [
        [k for k in top for _ in range(width // len(top))],
        [k for k in REGIME_NAMES for _ in range(width // len(REGIME_NAMES))],
    ]
    fig = Figure(figsize=(4.2 * max(len(top), len(REGIME_NAMES)), 8), layout="constrained")
    axes = fig.subplot_mosaic(mosaic, sharex=True)
    for key, panel_title, ylabel in _CURVES:
        _draw_metric(axes[key], runs, colors, key)
        axes[key].set(title=panel_title, ylabel=ylabel)
    for key, panel_title in zip(REGIME_NAMES, REGIME_TITLES, strict=True):
        _draw_metric(axes[key], runs, colors, key)
        axes[key].set(title=f"target tokens with {panel_title}", ylabel="fraction of tokens")
        _fraction_limits(axes[key])
    if accuracy:
        _draw_accuracy(axes["accuracy"], runs, colors, accuracy)
        axes["accuracy"].set_title("held-out accuracy")
    for ax in axes.values():
        ax.set_xlabel("iteration")
        ax.tick_params(labelbottom=True)  # sharex hides them on the top row
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], color=colors[n], linewidth=3, label=n) for n in runs]
    handles += [
        Line2D([], [], color="0.3", label="training", **_TRAIN_STYLE),
        Line2D([], [], color="0.3", label="validation", **_VALID_STYLE),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 8))
    fig.suptitle(title or "Learning curves: " + " vs ".join(runs))
    return _save(fig, path, dpi)


def plot_target_prob_histograms(
    runs: Mapping[str, RunMetrics],
    path: str | Path,
    iteration: int | None = None,
    log_y: bool = False,
    split: str = "train",
    side_by_side: bool = False,
    title: str | None = None,
    dpi: int = 150,
) -> Path:
    """The distribution of target-token probabilities p (fraction of target tokens per bin),
    each run at its last logged iteration, or the logged one nearest to `iteration` (the
    legend says which): overlaid in one panel, or one panel per run (`side_by_side`).
    `log_y` shows the rare middle bins next to the p ≈ 0 and p ≈ 1 peaks. Raises
    MetricsError if a run has no histogram of `split`. Returns the path."""
    if not runs:
        raise ValueError("plot_target_prob_histograms: no runs")
    chosen = {name: run.histogram_at(iteration, split) for name, run in runs.items()}
    colors = _colors(runs)
    n_panels = len(runs) if side_by_side else 1
    fig = Figure(figsize=(6.5 * n_panels if side_by_side else 8, 5), layout="constrained")
    axes = fig.subplots(1, n_panels, sharey=True, squeeze=False)[0]
    for i, (name, (it, hist)) in enumerate(chosen.items()):
        ax = axes[i if side_by_side else 0]
        label = f"{name} (iteration {it}, {hist.total:,.0f} tokens)"
        fractions = hist.fractions()
        if side_by_side:
            ax.stairs(fractions, hist.edges, fill=True, color=colors[name], alpha=0.7, label=label)
        else:
            ax.stairs(fractions, hist.edges, color=colors[name], linewidth=2, label=label)
            ax.stairs(fractions, hist.edges, fill=True, color=colors[name], alpha=0.12)
    for ax in axes:
        ax.set(xlim=(0, 1), xlabel="target-token probability p")
        ax.set_xticks([i / 10 for i in range(11)])
        if log_y:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper center")
    axes[0].set_ylabel("fraction of target tokens" + (" (log scale)" if log_y else ""))
    when = "the last logged iteration" if iteration is None else f"iteration ≈ {iteration}"
    data = "training" if split == "train" else "validation"
    fig.suptitle(title or f"Target-token probabilities on the {data} data at {when}")
    return _save(fig, path, dpi)


def plot_accuracy(
    accuracy: Mapping[str, float],
    path: str | Path,
    k: int | None = None,
    title: str | None = None,
    dpi: int = 150,
) -> Path:
    """One bar per method: held-out accuracy (fractions in [0, 1], drawn in percent), the
    value written on each bar."""
    for name, value in accuracy.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"accuracy of {name!r} must be a fraction in [0, 1], got {value}")
    names = list(accuracy)
    colors = _colors(names)
    fig = Figure(figsize=(max(4.0, 1.1 * len(names) + 1.5), 3.6), layout="constrained")
    ax = fig.add_subplot()
    values = [100 * accuracy[n] for n in names]
    bars = ax.bar(names, values, color=[colors[n] for n in names])
    ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], padding=2, fontsize=8)
    ax.set_ylabel(f"held-out avg@{k} (%)" if k else "held-out accuracy (%)")
    ax.set_ylim(0, max(values + [1.0]) * 1.2)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(title or "Held-out accuracy by fine-tuning objective")
    return _save(fig, path, dpi)
