"""Timing and peak-memory measurement shared by the benchmarks.

Peak memory is the high-water mark of memory held during the measured call, above what
was held when it started:
- CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`.
- CPU: the process's peak resident set size (VmHWM in /proc/self/status), reset through
  /proc/self/clear_refs before the call. Buffers of the sizes benchmarked here are
  mmap-ed by the allocator and handed back on free, so the resident set follows the live
  tensors closely; small allocations are below the resolution that matters here.
"""

from __future__ import annotations

import platform
import re
import statistics
import sys
import time
from collections.abc import Callable

import torch

MiB = 1 << 20


def _pin_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """Make glibc mmap every allocation above `nbytes` and unmap it on free.

    By default glibc raises its mmap threshold after large frees (up to 32 MiB), after
    which freed buffers stay resident and are reused silently: the resident set would then
    miss allocations. A fixed threshold keeps every tensor of interest visible.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, nbytes)
    except OSError:
        pass  # not glibc: the peak is then a lower bound


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


class PeakMemory:
    """Context manager; `.peak_bytes` is the peak held during the block above its start."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            _pin_mmap_threshold()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            self._start = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _status_kib("VmHWM") * 1024
        self.peak_bytes = max(0, peak - self._start)
        return False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_once(
    step: Callable[[object], None],
    setup: Callable[[], object],
    device: torch.device,
    barrier: Callable[[], None] = lambda: None,
) -> tuple[float, int]:
    """Seconds and peak bytes of one `step(setup())`; `setup` runs outside the measurement."""
    inputs = setup()
    barrier()
    synchronize(device)
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        step(inputs)
        synchronize(device)
        elapsed = time.perf_counter() - start
    return elapsed, mem.peak_bytes


def summarize(samples: list[tuple[float, int]]) -> tuple[float, int]:
    """Median seconds and largest peak over repeated `measure_once` samples."""
    return statistics.median(t for t, _ in samples), max(m for _, m in samples)


def paired_ratio(seconds: dict[str, list[float]], a: str, b: str) -> float:
    """Median over repetitions of a's time / b's time in the same repetition.

    The calls of one repetition run back to back, so load from outside the benchmark that
    comes and goes (a shared machine, the kernel zeroing fresh pages) cancels in the ratio,
    unlike in a ratio of medians.
    """
    return statistics.median(x / y for x, y in zip(seconds[a], seconds[b], strict=True))


def versions() -> str:
    import megatron.core

    where = f"{platform.machine()}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        where += f", {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return (
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"megatron-core {megatron.core.__version__}, {where}"
    )


def spawn_ranks(fn: Callable, world_size: int, *args, timeout: float = 3600.0) -> str:
    """`fn(rank, world_size, *args)` on `world_size` spawned ranks; returns the backend used.

    With CUDA: NCCL, one GPU per rank (tests.dist's "nccl" ranks, TF32 off). Without: gloo on
    the CPU. Raises if fewer GPUs than ranks are visible rather than measuring the CPU.
    """
    from tests.dist import spawn

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise SystemExit(
            f"TP {world_size} needs {world_size} GPUs, {torch.cuda.device_count()} visible; "
            "drop that --tp size (or hide the GPUs, CUDA_VISIBLE_DEVICES='', to measure the CPU)"
        )
    spawn(fn, world_size, *args, timeout=timeout, backend=backend)
    return backend


def command_line() -> str:
    """The command as typed (`python -m benchmarks.bench_loss ...`)."""
    argv = list(getattr(sys, "orig_argv", sys.argv))
    argv[0] = "python"
    return " ".join(argv)
