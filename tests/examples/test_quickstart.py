"""The README's main command, examples/quickstart.sh, end to end at smoke size: every stage
runs (init, import with --verify, text pre-training and DFT at TP 2 over gloo, export,
evaluation) and the summary reports them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_smoke(tmp_path):
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        OUT=str(tmp_path / "qs"),
        PRETRAIN_ITERS="2",
        DFT_ITERS="2",
        EVAL_PROBLEMS="2",
        EVAL_SAMPLES="1",
        MASTER_PORT="29561",
    )
    done = subprocess.run(
        ["bash", str(ROOT / "examples" / "quickstart.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert ": PASS" in done.stdout + done.stderr  # the import's --verify
    assert "pre-training (text, SFT loss): iterations" in out
    assert "DFT fine-tuning: iterations" in out
    results = json.loads((tmp_path / "qs" / "eval" / "results.json").read_text())
    assert set(results["benchmarks"]) == {"heldout", "seen"}
    assert (tmp_path / "qs" / "hf" / "config.json").is_file()
    assert list((tmp_path / "qs" / "tensorboard" / "dft").iterdir())
