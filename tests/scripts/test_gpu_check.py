"""scripts/gpu_check.sh on a machine without CUDA: one `error:` line that says so and where to
run it, exit status 2, nothing run and no output folder made."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_gpu_check_refuses_without_cuda(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")],
        env={**os.environ, "PYTHON": sys.executable, "OUT": str(out)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: scripts/gpu_check.sh needs a CUDA GPU")
    assert "README.md" in lines[0] and "Traceback" not in done.stderr
    assert done.stdout == "" and not out.exists()
