"""Run `python -m dft_megatron.train` the way a user does: its entry on CPU ranks over gloo.

`train` returns the exit code, the combined output of the ranks and the records of
`--log-metrics-jsonl` (which it adds): one per logged iteration (every iteration:
`--log-interval 1` unless given) and one per validation ({"split": "valid"}).

Where a run happens:
- A run expected to succeed, with the environment as it is, runs in the persistent gloo ranks
  of tests/dist.py's pool: `dft_megatron.training.entry.main(argv)`, the function that
  `python -m dft_megatron.train` calls, with RANK / WORLD_SIZE / LOCAL_RANK and one thread per
  rank as torchrun sets them, each rank's stdout and stderr in the run's log, the working
  directory the run's folder; afterwards Megatron-LM's global state is destroyed
  (`destroy_global_state`, as its in-process restart does), the TensorBoard writer closed and
  torch.compile's caches reset, so the next run starts as a new process would. A fresh
  torchrun costs 10-20 s of start-up here (torch, Megatron-Core and transformers imported by
  every rank); a pooled run costs its own work.
- Every other run (refusals and their exit codes, runs with their own environment, runs
  started in the background for signal and kill drills) is a fresh torchrun in a subprocess,
  as a user starts it. `DFT_TESTS_FRESH_PROCESSES=1` sends every run there.

A run that outlives `timeout` is killed (torchrun's process tree, or the pool's ranks) and
fails the test with the end of its output.
"""

from __future__ import annotations

import contextlib
import gc
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
    """Wait for a started run. Processes it started that outlive it (a checkpoint writer whose
    rank was killed by a drill, orphaned) are killed when it ends, as tests/dist.py's `spawn`
    does for its ranks."""
    from tests.dist import kill_all, note_descendants

    deadline = time.monotonic() + timeout
    descendants: dict = {}
    while proc.poll() is None:
        note_descendants([proc], descendants)
        if time.monotonic() > deadline:
            kill_tree(proc)
            kill_all(descendants.values())
            raise AssertionError(f"run timed out after {timeout} s:\n{log.read_text()[-6000:]}")
        time.sleep(0.5)
    kill_all(descendants.values())
    return Run(proc.returncode, log.read_text(), metrics)


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    return e.code if isinstance(e.code, int) else 1


def run_in_pool(rank: int, world_size: int, workdir: str, log: str, argv: list[str]) -> int:
    """One rank of `torchrun -m dft_megatron.train ARGV` in a pooled process (see the module
    docstring); returns the rank's exit code."""
    import traceback

    import torch

    from dft_megatron.training import entry

    cwd = os.getcwd()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.chdir(workdir)
    _as_a_new_process()
    try:
        code = entry.main(argv)
    except SystemExit as e:
        code = _exit_code(e)
    except BaseException:  # noqa: BLE001 - the run's failure, reported in its log
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.chdir(cwd)
        _forget_megatron_state()
        torch._dynamo.reset()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
    return code


def _as_a_new_process() -> None:
    """megatron.training's module state as a new process has it: start-up timestamps (a set
    one adds a collective to `pretrain`), the loaded checkpoint's version and iteration, the
    async-save queue."""
    from megatron.training import async_utils, checkpointing, training

    training._TRAIN_START_TIME = training._LEGACY_TRAIN_START_TIME = time.time()
    training._STARTUP_TIMESTAMPS.update(program_start=None, main_entry=None, pretrain_entry=None)
    training.num_checkpoints_memory_reported = 0
    checkpointing._CHECKPOINT_VERSION = None
    checkpointing._LOADED_ITERATION = None
    async_utils._async_calls_queue = None


def _forget_megatron_state() -> None:
    """What a process exit would drop: the TensorBoard writer (flushed and closed), Megatron-LM's
    globals and process groups, Megatron-Core's MoE metrics tracker."""
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker
    from megatron.training import global_vars, training

    writer = global_vars._GLOBAL_TENSORBOARD_WRITER
    if writer is not None:
        writer.close()
    training.destroy_global_state()
    destroy_moe_metrics_tracker()
    gc.collect()  # the run's model, optimizer and data loaders sit in reference cycles


def _pooled(expect_ok: bool, env: dict | None) -> bool:
    return expect_ok and not env and os.environ.get("DFT_TESTS_FRESH_PROCESSES") != "1"


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
    if _pooled(expect_ok, env):
        from tests.dist import pool

        workdir.mkdir(parents=True, exist_ok=True)
        metrics, log = workdir / f"{name}.metrics.jsonl", workdir / f"{name}.log"
        flags = _with_metrics(flags, metrics)
        metrics = Path(flags[flags.index("--log-metrics-jsonl") + 1])
        log.write_text("")
        try:
            codes = pool(nproc).run(run_in_pool, str(workdir), str(log), flags, timeout=timeout)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}\n{log.read_text()[-6000:]}") from None
        run = Run(next((c for c in codes if c != 0), 0), log.read_text(), metrics)
    else:
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
