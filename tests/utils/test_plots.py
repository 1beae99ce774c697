"""dft_megatron/utils/plots.py and tools/plot_metrics.py on logs of a simulated DFT run.

The logs are written by the trainer's own code, not replicas of it: metrics.py's
`DFTMetrics` (on a one-process gloo group, with Megatron-LM's global args and TensorBoard
writer set as its trainer sets them) sums hand-made per-token tensors and writes the metrics
JSONL and the TensorBoard p histograms. The TensorBoard scalars are what Megatron-LM's
`training_log` and `evaluate_and_print_results` write for training/step.py's report (their
tags: the report key, "<key> vs samples", "<key> validation", "learning-rate", ...), with the
values of the JSONL record of the same iteration. Expected values are computed here from the
per-token tensors.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from dft_megatron.utils import plots
from dft_megatron.utils.plots import MetricsError, load_run

ROOT = Path(__file__).resolve().parents[2]
LOG_INTERVAL = 10
TRAIN_ITERS = 30
VALID_AT = (10, 30)
REPORT_KEYS = {  # training/step.py's report key -> the JSONL field of the same value
    "lm loss": "loss",
    "ce loss": "ce_loss",
    "target p": "target_prob_mean",
    **{name: name for name in plots.REGIME_NAMES},
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DPI = 50  # the tests' figures: a quarter of the pixels of the default 150 dpi, still checked


def _tokens(iteration: int, training: bool):
    """Per-token (p, mask) of one micro-batch: p rises over training; two tokens at the
    extremes so every regime has tokens; the last two positions are prompt tokens."""
    g = torch.Generator().manual_seed(iteration + (0 if training else 1000))
    p = torch.rand(2, 8, generator=g) ** (3.0 - iteration / 15)
    p[0, 0], p[1, 0] = 0.001, 0.999
    mask = torch.ones(2, 8)
    mask[:, -2:] = 0.0
    return p, mask


def _expected(iteration: int, training: bool) -> dict:
    """Token means, regime fractions and 20-bin counts over the target tokens, by hand."""
    p, mask = _tokens(iteration, training)
    m = mask.bool()
    t = p[m].double()
    ce = -p.log()  # in fp32, as the loss reports it
    loss = (p * ce)[m].double()
    ce = ce[m].double()
    regimes = [t <= 0.01, (t > 0.01) & (t <= 0.5), (t > 0.5) & (t <= 0.99), t > 0.99]
    counts = [0.0] * 20
    for v in t.tolist():
        counts[min(int(v * 20), 19)] += 1
    return {
        "loss": float(loss.mean()),  # DFT: sg(p) * CE
        "ce_loss": float(ce.mean()),
        "target_prob_mean": float(t.mean()),
        **{n: float(r.double().mean()) for n, r in zip(plots.REGIME_NAMES, regimes, strict=True)},
        "p_histogram": counts,
    }


def _add_micro_batch(metrics, iteration: int, training: bool) -> None:
    from dft_megatron.loss import DFTLossStats

    p, mask = _tokens(iteration, training)
    ce = -p.log()
    stats = DFTLossStats(target_prob=p, entropy=ce / 2, cross_entropy=ce)
    metrics.add(p * ce, stats, mask, training=training)


def _megatron_scalars(writer, record: dict, iteration: int, suffix: str = "") -> None:
    """What Megatron-LM's training_log (suffix "") / evaluate_and_print_results (suffix
    " validation") write for the report keys: the value over iterations and over samples."""
    for key, field in REPORT_KEYS.items():
        writer.add_scalar(f"{key}{suffix}", record[field], iteration)
        writer.add_scalar(f"{key}{suffix} vs samples", record[field], iteration * 16)


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """(metrics.jsonl, TensorBoard dir) of a 30-iteration run logged every 10 iterations,
    validated at iterations 10 and 30."""
    from megatron.training import global_vars
    from torch.utils.tensorboard import SummaryWriter

    from dft_megatron.training.metrics import DFTMetrics

    out = tmp_path_factory.mktemp("run")
    jsonl, tb = out / "metrics.jsonl", out / "tensorboard"
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=0, world_size=1)
    writer = SummaryWriter(str(tb))
    args = SimpleNamespace(train_iters=TRAIN_ITERS, log_interval=LOG_INTERVAL)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(global_vars, "_GLOBAL_ARGS", args)
            mp.setattr(global_vars, "_GLOBAL_TENSORBOARD_WRITER", writer)
            metrics = DFTMetrics(str(jsonl))
            for it in range(1, TRAIN_ITERS + 1):
                logged = it % LOG_INTERVAL == 0
                if logged:  # step.py adds the statistics on logged iterations
                    _add_micro_batch(metrics, it, training=True)
                lr = 1e-3 * (1 - it / TRAIN_ITERS)
                metrics.log_train(it, lr, 0.5 / it, skipped=False, log=logged)
                if logged:
                    record = json.loads(jsonl.read_text().splitlines()[-1])
                    _megatron_scalars(writer, record, it)
                    writer.add_scalar("learning-rate", lr, it)
                    writer.add_scalar("grad-norm", 0.5 / it, it)
                if it in VALID_AT:
                    _add_micro_batch(metrics, it, training=False)
                    metrics.log_valid(it, full_pass=False)
                    record = json.loads(jsonl.read_text().splitlines()[-1])
                    _megatron_scalars(writer, record, it, " validation")
    finally:
        writer.close()
        if owns_group:
            dist.destroy_process_group()
    return jsonl, tb


def test_regime_names_are_metrics_py_ones():
    from dft_megatron.training.metrics import HIST_BINS, REGIME_NAMES

    assert plots.REGIME_NAMES == REGIME_NAMES
    assert HIST_BINS == 20  # the bins _tokens' expected counts assume


def _check_against_expected(run, rel: float) -> None:
    """The run's series and histograms equal the hand-computed values (to `rel`)."""
    assert run.train.iterations == [10, 20, 30]
    assert run.valid.iterations == list(VALID_AT)
    for split, its, training in ((run.train, [10, 20, 30], True), (run.valid, VALID_AT, False)):
        expected = [_expected(it, training) for it in its]
        for field in REPORT_KEYS.values():
            series = split.scalars[field]
            assert series.iterations == list(its)
            assert series.values == pytest.approx([e[field] for e in expected], rel=rel), field
        for it, e in zip(its, expected, strict=True):
            hist = split.histograms[it]
            assert hist.counts == e["p_histogram"]
            assert hist.edges == pytest.approx([i / 20 for i in range(21)])
    assert run.skipped == []


def test_jsonl_loader(logged_run):
    jsonl, _ = logged_run
    run = load_run(jsonl)
    assert run.source == jsonl
    _check_against_expected(run, rel=1e-9)
    # Fields of metrics.py's records beyond the report: entropy (ce / 2 here), tokens, lr.
    e = _expected(30, True)
    assert run.train.scalars["entropy"].values[-1] == pytest.approx(e["ce_loss"] / 2)
    assert run.train.scalars["tokens"].values == [12.0, 12.0, 12.0]
    lrs = [1e-3 * (1 - i / TRAIN_ITERS) for i in (10, 20, 30)]
    assert run.train.scalars["lr"].values == pytest.approx(lrs)
    assert "skipped" not in run.train.scalars  # a flag, not a series
    assert "full_pass" not in run.valid.scalars
    assert run.last_iteration() == 30
    assert sum(run.histogram_at()[1].fractions()) == pytest.approx(1.0)


def test_tensorboard_loader(logged_run):
    _, tb = logged_run
    run = load_run(tb)
    _check_against_expected(run, rel=1e-6)  # TensorBoard stores float32 scalars
    assert run.train.scalars["lr"].iterations == [10, 20, 30]
    assert run.train.scalars["grad_norm"].values == pytest.approx([0.05, 0.025, 0.5 / 30])
    # The " vs samples" copies are keyed by samples, not iterations: not series.
    assert not [k for s in (run.train, run.valid) for k in s.scalars if "samples" in k]


def test_histogram_at_picks_the_nearest_logged_iteration(logged_run):
    run = load_run(logged_run[0])
    assert run.histogram_at()[0] == 30
    assert run.histogram_at(12)[0] == 10
    assert run.histogram_at(25)[0] == 20  # a tie goes to the earlier one
    assert run.histogram_at(1, split="valid")[0] == 10
    run.train.histograms.clear()
    with pytest.raises(MetricsError, match="no train target-probability histogram"):
        run.histogram_at()


def _write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _rec(iteration: int, loss: float, **kw) -> dict:
    return {"iteration": iteration, "loss": loss, "p_histogram": [1.0] + [0.0] * 19, **kw}


def test_a_resumed_run_supersedes_the_lost_iterations(tmp_path, caplog):
    # Crashed after logging 30 (checkpoint at 10), resumed: 20 and 30 logged again, then 40.
    path = _write_jsonl(
        tmp_path / "m.jsonl",
        [_rec(10, 4.0), _rec(20, 3.0), _rec(30, 2.0), _rec(20, 3.5), _rec(30, 2.5), _rec(40, 1.0)],
    )
    run = load_run(path)
    assert run.train.scalars["loss"].iterations == [10, 20, 30, 40]
    assert run.train.scalars["loss"].values == [4.0, 3.5, 2.5, 1.0]
    assert len(run.skipped) == 2
    assert f"{path}:3: iteration 30 superseded by {path}:4" in run.skipped[0]
    assert f"{path}:2: iteration 20 superseded by {path}:4" in run.skipped[1]
    assert "2 records skipped" in caplog.text


def test_a_resumed_tensorboard_run_supersedes_the_lost_steps(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    for steps in ((10, 20, 30), (20, 30, 40)):  # a resumed run opens a new event file
        with SummaryWriter(str(tmp_path), filename_suffix=f".{steps[0]}") as w:
            for s in steps:
                w.add_scalar("lm loss", s + 0.5 * (steps[0] == 20), s)
    run = load_run(tmp_path)
    assert run.train.scalars["loss"].iterations == [10, 20, 30, 40]
    assert run.train.scalars["loss"].values == [10.0, 20.5, 30.5, 40.5]
    assert len(run.skipped) == 2
    assert "'lm loss' event 2: iteration 30 superseded by" in run.skipped[0]
    assert "'lm loss' event 3 (the log starts again at iteration 20" in run.skipped[0]


def test_records_that_are_not_metrics_are_counted(tmp_path, caplog):
    path = _write_jsonl(
        tmp_path / "m.jsonl",
        [
            _rec(10, 4.0, lr=None),
            "",  # blank lines are not records
            [1, 2],
            {"loss": 3.0},
            _rec(20, 3.0, split="test"),
            {"iteration": 20, "loss": 3.0, "p_histogram": "oops"},
        ],
    )
    run = load_run(path)
    assert run.train.scalars["loss"].values == [4.0, 3.0]
    assert math.isnan(run.train.scalars["lr"].values[0])
    assert list(run.train.histograms) == [10]  # 20's histogram is bad, its loss is kept
    assert [s.split(": ")[0] for s in run.skipped] == [f"{path}:{n}" for n in (3, 4, 5, 6)]
    assert "not a JSON object (list)" in run.skipped[0]
    assert "no integer 'iteration'" in run.skipped[1]
    assert "unknown split 'test'" in run.skipped[2]
    assert "p_histogram is not a list of numbers" in run.skipped[3]
    assert f"{path}: 4 records skipped" in caplog.text
    assert "4 records skipped" in run.describe()


def test_errors_name_the_file_and_line(tmp_path):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [_rec(10, 1.0), _rec(20, 1.0), '{"iteration": 3'])
    with pytest.raises(MetricsError, match=rf"^{bad}:3: not a JSON line"):
        load_run(bad)
    with pytest.raises(MetricsError, match="no such file or directory"):
        load_run(tmp_path / "missing.jsonl")
    with pytest.raises(MetricsError, match="empty log"):
        load_run(_write_jsonl(tmp_path / "empty.jsonl", []))
    (tmp_path / "binary.jsonl").write_bytes(b"\x89PNG\xff\xfe")
    with pytest.raises(MetricsError, match="binary.jsonl: not a UTF-8 text file"):
        load_run(tmp_path / "binary.jsonl")
    with pytest.raises(MetricsError, match=r"empty log.*1 records skipped"):
        load_run(_write_jsonl(tmp_path / "none.jsonl", [{"loss": 1.0}]))
    (tmp_path / "logs" / "sft").mkdir(parents=True)
    with pytest.raises(MetricsError, match="without TensorBoard event files"):
        load_run(tmp_path / "logs")
    (tmp_path / "logs" / "sft" / "events.out.tfevents.1.host").write_bytes(b"")
    with pytest.raises(MetricsError, match=r"but in .*logs/sft: give each as its own run"):
        load_run(tmp_path / "logs")


def _assert_png(path: Path, min_width: int) -> None:
    """A valid PNG of at least `min_width` pixels with something drawn on it."""
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.width >= min_width and im.height >= 4 * DPI
        assert len(im.convert("L").getcolors(maxcolors=1 << 16)) > 10  # not blank


def test_figures(logged_run, tmp_path):
    runs = {"dft": load_run(logged_run[0]), "dft (TensorBoard)": load_run(logged_run[1])}
    accuracy = {"dft": 0.41, "dft (TensorBoard)": {10: 0.30, 30: 0.40}}
    out = plots.plot_learning_curves(runs, tmp_path / "lc.png", accuracy, dpi=DPI)
    assert out == tmp_path / "lc.png"
    _assert_png(out, 16 * DPI)  # 4 panels a row
    side = plots.plot_target_prob_histograms(
        runs, tmp_path / "h.png", iteration=10, split="valid", side_by_side=True, dpi=DPI
    )
    _assert_png(side, 12 * DPI)  # 2 panels
    with pytest.raises(MetricsError, match="give a fraction in"):
        plots.plot_learning_curves(runs, tmp_path / "x.png", {"dft": 41.0})
    with pytest.raises(MetricsError, match="not a run"):
        plots.plot_learning_curves(runs, tmp_path / "x.png", {"sft": 0.4})


def test_cli_end_to_end(logged_run, tmp_path):
    jsonl, tb = logged_run
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"settings": {"num_samples": 4}, "average": {"avg@4": 0.25}}))
    out = tmp_path / "figs"
    args = [
        *("--run", f"dft={jsonl}", "--run", f"tb={tb}", "--out", str(out), "--dpi", str(DPI)),
        *("--accuracy", "dft=0.4", "--accuracy", f"tb@30={results}", "--accuracy", "tb@10=0.1"),
        *("--iteration", "10", "--log-y"),
    ]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "plot_metrics.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    names = ["learning_curves.png", "target_prob_hist.png", "target_prob_hist_iter10.png"]
    assert proc.stdout.split() == [str(out / n) for n in names]
    for n in names:
        _assert_png(out / n, 8 * DPI)
    assert f"dft: {jsonl}; train: 3 iterations (10..30), 3 histograms" in proc.stderr


def _tool_main():
    """tools/plot_metrics.py's main, imported (in-process: a subprocess costs seconds)."""
    spec = importlib.util.spec_from_file_location("plot_metrics", ROOT / "tools/plot_metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_errors(tmp_path, capsys):
    main = _tool_main()
    bad = _write_jsonl(tmp_path / "bad.jsonl", [_rec(10, 1.0), "not json"])
    assert main(["--run", f"sft={bad}", "--out", str(tmp_path)]) == 2
    assert f"error: {bad}:2: not a JSON line" in capsys.readouterr().err
    assert main(["--run", f"sft={tmp_path / 'nope.jsonl'}", "--out", str(tmp_path)]) == 2
    assert "nope.jsonl: no such file or directory" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--run .*: expected NAME=VALUE"):
        main(["--run", str(bad), "--out", str(tmp_path)])
    good = _write_jsonl(tmp_path / "good.jsonl", [_rec(10, 1.0)])
    with pytest.raises(SystemExit, match="ITERATION must be an integer"):
        main(["--run", f"a={good}", "--out", str(tmp_path), "--accuracy", "a@last=0.5"])
    assert main(["--run", f"a={good}", "--out", str(tmp_path), "--accuracy", "a=bad.json"]) == 2
    assert "bad.json: no such file" in capsys.readouterr().err
