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

import json
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


ROW_KEYS = (
    "tp",
    "vocab",
    "tokens",
    "method",
    "ms",
    "time_ratio_mcore_ce",
    "time_ratio_mcore_fused_ce",
    "peak_mib",
    "memory_ratio_mcore_ce",
)
"""The machine-readable row of the loss and output-layer benchmarks (`--json FILE`)."""


def ratio_rows(tp: int, vocab: int, tokens: int, results: dict, methods: list[str]) -> list[dict]:
    """Rows of one (TP, vocab) measurement: `results[method] = (seconds list, peak bytes)`,
    ratios against "mcore_ce" and "mcore_fused_ce" paired per repetition (None where the
    reference was not run)."""
    seconds = {name: results[name][0] for name in methods}
    rows = []
    for name in methods:
        row = dict(tp=tp, vocab=vocab, tokens=tokens, method=name)
        row["ms"] = statistics.median(seconds[name]) * 1e3
        for ref in ("mcore_ce", "mcore_fused_ce"):
            ratio = paired_ratio(seconds, name, ref) if ref in seconds else None
            row[f"time_ratio_{ref}"] = ratio
        row["peak_mib"] = results[name][1] / MiB
        base = results.get("mcore_ce", (None, 0))[1]
        row["memory_ratio_mcore_ce"] = results[name][1] / base if base else None
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The README table of `ratio_rows` rows (also of rows read back from --json)."""

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    lines = [
        "| TP | vocab | method | fwd+bwd ms | / mcore_ce | / mcore_fused_ce | peak MiB "
        "| memory / mcore_ce |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tp']} | {r['vocab']} | {r['method']} | {r['ms']:.1f} | "
            f"{fmt(r['time_ratio_mcore_ce'], '.3f')} | "
            f"{fmt(r['time_ratio_mcore_fused_ce'], '.3f')} | {r['peak_mib']:.0f} | "
            f"{fmt(r['memory_ratio_mcore_ce'], '.3f')} |"
        )
    return "\n".join(lines)


def print_rows(rows: list[dict], header: str) -> None:
    """The command line, versions and `header`, then `markdown_table(rows)`."""
    print(f"\n{command_line()}\n{versions()}; {header}\n")
    print(markdown_table(rows))


def write_rows(path: str | None, rows: list[dict]) -> None:
    """`--json FILE`: the rows, ROW_KEYS each, as a JSON list."""
    if path:
        with open(path, "w") as f:
            json.dump([{k: r[k] for k in ROW_KEYS} for r in rows], f, indent=1)
            f.write("\n")


def table_parser(description: str, methods: tuple[str, ...], warmup: int, reps: int):
    """The arguments the loss and output-layer benchmarks share; `parse_table_args` checks
    them."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per micro-batch")
    parser.add_argument(
        "--vocab", type=int, nargs="+", default=[32000, 152064], help="vocabulary sizes"
    )
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="TP sizes")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--methods", nargs="+", default=list(methods), choices=methods)
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed calls per method")
    parser.add_argument("--reps", type=int, default=reps, help="timed calls per method (median)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows to FILE (a list)")
    return parser


def parse_table_args(parser, argv):
    args = parser.parse_args(argv)
    args.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if "mcore_ce" not in args.methods:
        parser.error("--methods must include mcore_ce, the reference of the ratios")
    for tp in args.tp:
        bad = [v for v in args.vocab if v % tp]
        if bad:
            parser.error(f"--vocab {bad} not divisible by --tp {tp}")
    return args


def run_table(worker: Callable, args, header: str) -> None:
    """`worker(rank, world_size, args, out_path)` at each --tp size; rank 0 writes
    {"<vocab>/<method>": [seconds list, peak bytes]} to out_path. Prints the table of every
    size (`print_rows`, `header` plus the backend) and writes --json."""
    import os
    import tempfile

    rows, backend = [], "gloo"
    for tp in args.tp:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "results.json")
            backend = spawn_ranks(worker, tp, args, out)
            with open(out) as f:
                results = json.load(f)
        for vocab in args.vocab:
            got = {name: results[f"{vocab}/{name}"] for name in args.methods}
            rows += ratio_rows(tp, vocab, args.tokens, got, args.methods)
    print_rows(rows, f"{header}, {backend}")
    write_rows(args.json, rows)


def round_robin(methods: dict, names: list[str], setup, target, grad, device, group, args):
    """{name: [seconds list, peak bytes]}: every method's `fn(setup(), target).backward(grad)`
    once per repetition, in turn (drift of the machine hits them all alike); --warmup
    repetitions untimed, then --reps timed."""
    import torch.distributed as dist

    samples = {name: [] for name in names}
    for rep in range(args.warmup + args.reps):
        for name in names:
            sample = measure_once(
                lambda x, fn=methods[name]: fn(x, target).backward(grad),
                setup,
                device,
                barrier=lambda: dist.barrier(group),
            )
            if rep >= args.warmup:
                samples[name].append(sample)
    return {name: ([t for t, _ in s], summarize(s)[1]) for name, s in samples.items()}
