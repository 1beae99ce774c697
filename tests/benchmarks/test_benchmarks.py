"""The benchmarks run as documented and write the documented rows (tiny shapes; no timing
assertions: the figures are the benchmarks' to report, not the tests' to judge)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import bench_loss, bench_output_layer, bench_train_step
from benchmarks.common import ROW_KEYS


def _check_rows(rows, tps, vocab, methods):
    assert [(r["tp"], r["method"]) for r in rows] == [(tp, m) for tp in tps for m in methods]
    for r in rows:
        assert set(r) == set(ROW_KEYS) and r["vocab"] == vocab
        assert r["ms"] > 0 and r["peak_mib"] >= 0
        if r["method"] == "mcore_ce":
            assert r["time_ratio_mcore_ce"] == 1.0
        if r["method"] == "mcore_fused_ce":
            assert r["time_ratio_mcore_fused_ce"] == 1.0
        assert math.isfinite(r["time_ratio_mcore_ce"]) and r["time_ratio_mcore_ce"] > 0


@pytest.mark.parametrize(
    "module,methods",
    [
        (bench_loss, ["mcore_ce", "mcore_fused_ce", "dft", "dft_fused", "dft_fused_stats"]),
        (bench_output_layer, list(bench_output_layer.METHODS)),
    ],
    ids=["bench_loss", "bench_output_layer"],
)
def test_table_benchmarks_write_their_rows(module, methods, tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["--tokens", "64", "--vocab", "320", "--tp", "2", "--warmup", "0"]
    argv += ["--reps", "1", "--json", str(out), "--methods", *methods]
    if module is bench_output_layer:
        argv += ["--hidden", "32", "--chunk-tokens", "16"]
    module.main(argv)
    _check_rows(json.loads(out.read_text()), [2], 320, methods)
    printed = capsys.readouterr().out
    assert "| TP | vocab | method |" in printed and "megatron-core" in printed


def test_train_step_benchmark_steps_the_fused_and_chunked_engine(tmp_path, capsys):
    out = tmp_path / "rows.json"
    variants = ["engine_dft", "engine_dft_fused", "engine_dft_chunked"]
    bench_train_step.main(
        ["--tp", "1", "--warmup", "0", "--reps", "1", "--json", str(out), "--variants"]
        + variants
        + ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"]
        + ["--seq-length", "64", "--max-position-embeddings", "64", "--vocab-size", "320"]
        + ["--dft-output-chunk-tokens", "16"]
    )
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == variants
    assert rows[0]["time_ratio_dft"] == 1.0 and rows[0]["time_ratio_mcore"] is None
    printed = capsys.readouterr().out
    # The same weights and batch through the three loss paths: the same first-step DFT loss.
    line = next(ln for ln in printed.splitlines() if "first-step DFT loss" in ln)
    losses = [float(part.split()[-1]) for part in line.split(": ", 1)[1].split(" (")[0].split(", ")]
    assert len(losses) == 3 and max(losses) - min(losses) < 1e-6 * max(losses), line
