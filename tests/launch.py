"""Run `python -m dft_megatron.train` the way a user does: torchrun, CPU processes over gloo.

Megatron-LM's trainer keeps global state (its args, timers, process groups), so every run is
a fresh torchrun in a subprocess (the per-test cost is its start-up, 10-20 s here). `train`
returns the exit code, the combined output and the records of `--log-metrics-jsonl` (which
it adds): one per logged iteration (every iteration: `--log-interval 1` unless given) and
one per validation ({"split": "valid"}). A run that outlives `timeout` is killed with its
process group and fails the test with the end of its output.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TIMEOUT_S = 300


@dataclass
class Run:
    returncode: int
    output: str
    metrics: Path

    @property
    def records(self) -> list[dict]:
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines()]

    @property
    def train(self) -> list[dict]:
        return [r for r in self.records if r.get("split") != "valid"]

    @property
    def valid(self) -> list[dict]:
        return [r for r in self.records if r.get("split") == "valid"]

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.output.splitlines()[-n:])


def command(nproc: int, flags: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "dft_megatron.train",
        *flags,
    ]


def _with_metrics(flags: list[str], metrics: Path) -> list[str]:
    flags = list(flags)
    if "--log-metrics-jsonl" not in flags:
        flags += ["--log-metrics-jsonl", str(metrics)]
    if "--log-interval" not in flags:
        flags += ["--log-interval", "1"]
    return flags


def start(
    workdir: Path, name: str, nproc: int, flags: list[str], env: dict | None = None
) -> tuple[subprocess.Popen, Path, Path]:
    """Start a run in the background: (process, its metrics file, its log file)."""
    workdir.mkdir(parents=True, exist_ok=True)
    metrics = workdir / f"{name}.metrics.jsonl"
    log = workdir / f"{name}.log"
    flags = _with_metrics(flags, metrics)
    proc = subprocess.Popen(
        command(nproc, flags),
        cwd=workdir,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        start_new_session=True,
    )
    return proc, Path(flags[flags.index("--log-metrics-jsonl") + 1]), log


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc`, its process group and every descendant. torchrun starts each rank in a
    session of its own, so killing torchrun's group alone leaves the ranks running (parented
    to init, holding the cores for the rest of the suite)."""
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for child in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    proc.wait()


def wait(proc: subprocess.Popen, metrics: Path, log: Path, timeout: float) -> Run:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise AssertionError(
            f"run timed out after {timeout} s:\n{log.read_text()[-6000:]}"
        ) from None
    return Run(proc.returncode, log.read_text(), metrics)


def train(
    workdir: Path,
    name: str,
    nproc: int,
    flags: list[str],
    *,
    expect_ok: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,
    env: dict | None = None,
) -> Run:
    """Run to the end; with `expect_ok`, a non-zero exit fails with the output's end."""
    t0 = time.monotonic()
    run = wait(*start(workdir, name, nproc, flags, env), timeout)
    if expect_ok and run.returncode != 0:
        raise AssertionError(f"{name} exited {run.returncode}:\n{run.tail()}")
    run.seconds = time.monotonic() - t0
    return run


def rank_processes(proc: subprocess.Popen) -> list:
    """The `dft_megatron.train` processes a torchrun started (psutil.Process objects)."""
    import psutil

    children = psutil.Process(proc.pid).children(recursive=True)
    return [p for p in children if "dft_megatron.train" in " ".join(p.cmdline())]


def errors(run: Run) -> list[str]:
    """The one-line `error: ...` messages of a refused run (rank 0's, in order)."""
    return [
        line.removeprefix("error: ")
        for line in run.output.splitlines()
        if line.startswith("error: ")
    ]
