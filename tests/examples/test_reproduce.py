"""examples/reproduce_dft_cpu.sh at smoke size (SMOKE=1, OUT=): every stage runs (data, the
base's init, conversion and SFT, the fine-tunes from it through Megatron-LM's trainer, the
offline-RL rows from the base's judged samples, the exports, the evaluations) and the run
writes OUT/results.json and the figures. Three methods here (sft, dft, asft); the full run
(all six and the offline-RL one) is docs/RESULTS.md's, by hand."""

from __future__ import annotations

import json

import pytest

from tests.examples.run import run_example

METHODS = ("sft", "dft", "asft")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce") / "out"
    done = run_example(
        "reproduce_dft_cpu.sh", 1200, SMOKE="1", OUT=str(out), METHODS=" ".join(METHODS)
    )
    return out, done.stdout


def test_results_json_names_every_method_and_the_protocol(smoke):
    out, stdout = smoke
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["base", *METHODS, "dft-rft"]
    assert results["seed"] == 1234 and results["num_samples"] == 2
    assert results["answer_extraction"] == "boxed"
    assert results["versions"]["megatron-core"].startswith("0.19")
    for name, entry in results["methods"].items():
        assert 0.0 <= entry["heldout_avg@2"] <= entry["heldout_pass@2"] <= 1.0, name
        first, last = entry["regimes_first"], entry["regimes_last"]
        assert sum(first[r] for r in ("p<0.01", "p 0.01-0.5", "p 0.5-0.99", "p>0.99")) == (
            pytest.approx(1.0)
        ), name
        assert last["iteration"] >= first["iteration"]
    assert "avg@2" in stdout and "dft-rft" in stdout  # the closing table


def test_methods_start_from_one_base_with_the_same_batches(smoke):
    """Same data, seed and base: the first iteration's CE (before any update) is the same for
    every method; the objectives then differ (DFT's loss is below its CE, SFT's equals it)."""
    out, _ = smoke
    first = {}
    for name in METHODS:
        records = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        first[name] = records[0]
    ce = {n: r["ce_loss"] for n, r in first.items()}
    assert max(ce.values()) - min(ce.values()) < 1e-5, ce
    assert first["sft"]["loss"] == pytest.approx(first["sft"]["ce_loss"], rel=1e-6)
    assert first["dft"]["loss"] < 0.5 * first["dft"]["ce_loss"]
    assert first["asft"]["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the base


def test_offline_rl_rows_and_figures(smoke):
    out, _ = smoke
    rows = [json.loads(x) for x in (out / "data" / "rollouts.jsonl").read_text().splitlines()]
    verdicts = (out / "rollouts" / "rollouts.samples.jsonl").read_text().splitlines()
    assert 0 < len(rows) <= len(verdicts) == 4 * 2  # RL_PROBLEMS x EVAL_SAMPLES
    assert all(r["reward"] in (0.0, 1.0) and r["solution"].strip() for r in rows)
    for name in ("learning_curves", "target_prob_hist", "accuracy"):
        png = (out / f"{name}.png").read_bytes()
        assert png.startswith(PNG) and len(png) > 10_000, name
    assert (out / "hf" / "asft" / "model.safetensors").is_file()
