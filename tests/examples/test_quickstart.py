"""The README's main command, examples/quickstart.sh, end to end at smoke size: every stage
runs (init, import with --verify, text pre-training and DFT at TP 2 over gloo on Megatron-LM's
trainer, export, evaluation), the checkpoints are Megatron-LM's, and the summary reports
the stages."""

from __future__ import annotations

import json

from tests.examples.run import run_example


def test_quickstart_smoke(tmp_path):
    done = run_example(
        "quickstart.sh",
        900,
        OUT=str(tmp_path / "qs"),
        PRETRAIN_ITERS="2",
        DFT_ITERS="2",
        LOG_INTERVAL="1",
        EVAL_PROBLEMS="2",
        EVAL_SAMPLES="1",
    )
    out = done.stdout
    assert ": PASS" in done.stdout + done.stderr  # the import's --verify
    assert "pre-training (text, SFT loss): iterations" in out
    assert "DFT fine-tuning: iterations 1..2" in out
    assert "validation at iteration 2" in out  # the end-of-training validation
    assert "[dft] iteration 2/2 | loss" in done.stdout + done.stderr
    qs = tmp_path / "qs"
    for stage in ("pretrain", "dft"):  # Megatron-LM's torch_dist layout, with the tokenizer
        assert (qs / stage / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
        assert (qs / stage / "iter_0000002").is_dir()
        assert (qs / stage / "tokenizer" / "tokenizer_config.json").is_file()
    assert (
        qs / "megatron_init" / "latest_checkpointed_iteration.txt"
    ).read_text().strip() == "release"
    results = json.loads((tmp_path / "qs" / "eval" / "results.json").read_text())
    assert set(results["benchmarks"]) == {"heldout", "seen"}
    assert (tmp_path / "qs" / "hf" / "config.json").is_file()
    assert list((tmp_path / "qs" / "tensorboard" / "dft").iterdir())
    for figure in ("learning_curves", "target_prob_hist"):  # the summary points to them
        path = qs / "figures" / f"{figure}.png"
        assert path.read_bytes().startswith(b"\x89PNG") and str(path) in out
