"""Run an example script for real, as a user does: bash, this interpreter as PYTHON, a free
rendezvous port, the given environment on top of this process's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.dist import free_port

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(script: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    """`bash examples/<script>`; fails the test with the output's end when it exits non-zero."""
    full = dict(os.environ, PYTHON=sys.executable, MASTER_PORT=str(free_port()), **env)
    done = subprocess.run(
        ["bash", str(EXAMPLES / script)], env=full, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done
