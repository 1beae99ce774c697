"""Run a recipe script with PYTHON set to a stub that records each call's arguments and exits,
so nothing is converted, trained or evaluated; the recorded calls are what a test checks."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

STUB = """#!/usr/bin/env bash
for a in "$@"; do printf '%s\\0' "$a"; done >> "$CALLS"
printf '\\n\\0' >> "$CALLS"
"""


def run_script(
    script: Path,
    tmp_path: Path,
    name: str = "calls",
    extra: tuple[str, ...] = (),
    *,
    env: dict[str, str],
    clear: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """`bash script *extra` in `tmp_path` with the recording stub as PYTHON (its calls go to
    tmp_path/name); `env` on top of this process's environment less the names in `clear`
    (settings a caller's shell may export). A one-row NuminaMath-style file is at
    tmp_path/numina.jsonl."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    (tmp_path / "numina.jsonl").write_text('{"problem": "1+1?", "solution": "\\\\boxed{2}"}\n')
    base = {k: v for k, v in os.environ.items() if k not in clear}
    base.update(PYTHON=str(stub), CALLS=str(tmp_path / name))
    return subprocess.run(
        ["bash", str(script), *extra],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


def recorded_calls(path: Path) -> list[list[str]]:
    """The stub's record: one argument list per call, in order."""
    out, current = [], []
    for arg in path.read_text().split("\0")[:-1]:
        if arg == "\n":
            out.append(current)
            current = []
        else:
            current.append(arg)
    return out


def torchrun_call(calls: list[list[str]]) -> list[str]:
    """The one call that launches the trainer (`-m torch.distributed.run ...`)."""
    (train,) = [c for c in calls if "dft_megatron.train" in c]
    assert train[:2] == ["-m", "torch.distributed.run"], train[:2]
    return train


def trainer_argv(calls: list[list[str]]) -> list[str]:
    """The trainer's arguments (after `-m dft_megatron.train`)."""
    train = torchrun_call(calls)
    return train[train.index("dft_megatron.train") + 1 :]
