"""Run a test body on N CPU ranks over gloo.

`spawn(fn, world_size, *args)` starts `world_size` fresh processes (start method
"spawn", so nothing of the parent's torch state leaks in), joins them on a free
TCP port of the loopback interface, calls `fn(rank, world_size, *args)` in each,
and always tears the process groups down, also when `fn` raises. A failure on any
rank fails the test with that rank's traceback; a run that outlives `timeout`
seconds is killed and reported with the ranks that were still running.

`fn` must be a module-level function of an importable module (tests/ is a package
and the repository root is on the path), since spawned processes import it by name.

Ranks may start processes of their own (`dist_checkpointing.save` starts a multiprocessing
manager per rank). A rank that is terminated cannot stop them, so `spawn` keeps track of every
descendant of the ranks while they run and kills the ones still alive at the end.

`pool(world_size).run(fn, *args)` does what `spawn(fn, world_size, *args)` does, on ranks
that outlive the test: a `RankPool` of world_size gloo processes, started once per pytest
process and size (the first call pays the imports, about 7 s a rank on 2 cores; later calls
none), as Megatron-LM's unit tests run in one torchrun world and re-make the model-parallel
groups per test. The ranks have RANK / WORLD_SIZE / LOCAL_RANK and the thread count that
torchrun gives them; every rank of a pool runs every call, so all of them have the same
history. Each call makes a new default process group (a fresh prefix of the pool's TCP store),
runs `fn`, then destroys Megatron-Core's model-parallel state and every process group, as
`spawn` does when its ranks exit. A rank that fails, dies or hangs fails the test with its
traceback; a pool that died or hung is replaced by fresh processes at the next call. Use
`spawn` where the test is about a fresh process (what is installed at import, a CUDA-less
start).
"""

from __future__ import annotations

import atexit
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta

import psutil
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 300.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, backend: str, fn: Callable, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    if backend == "nccl":
        # Megatron-LM's setting for TP communication ordering; no TF32 in cuBLAS/cuDNN, so
        # that fp32 runs compare at fp32 precision.
        os.environ.update(CUDA_DEVICE_MAX_CONNECTIONS="1", NVIDIA_TF32_OVERRIDE="0")
        torch.cuda.set_device(rank)
    else:
        # Two cores are shared by all ranks: one intra-op thread each avoids oversubscription.
        torch.set_num_threads(1)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        fn(rank, world_size, *args)
    finally:
        _teardown()


def _start(target: Callable, nprocs: int, args: tuple, backend: str):
    """`nprocs` spawned processes running target(i, *args), without joining them. For gloo
    they see no GPU (CUDA_VISIBLE_DEVICES="", inherited by the spawned interpreters)."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if backend == "gloo":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        return mp.start_processes(
            target, args=args, nprocs=nprocs, join=False, start_method="spawn"
        )
    finally:
        if hidden is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = hidden


def spawn(
    fn: Callable,
    world_size: int,
    *args,
    timeout: float = DEFAULT_TIMEOUT_S,
    backend: str = "gloo",
) -> None:
    """Run `fn(rank, world_size, *args)` on `world_size` ranks; raise if any rank fails.

    backend "gloo" (the CPU tests): the ranks see no GPU (CUDA_VISIBLE_DEVICES=""), so on a
    GPU machine too they test the CPU paths they were written for. backend "nccl"
    (tests/gpu): one GPU per rank.
    """
    context = _start(_worker, world_size, (world_size, free_port(), backend, fn, args), backend)
    deadline = time.monotonic() + timeout
    descendants: dict[int, psutil.Process] = {}
    try:
        # join() raises ProcessRaisedException with the failing rank and its traceback.
        while not context.join(timeout=1.0):
            note_descendants(context.processes, descendants)
            if time.monotonic() > deadline:
                alive = [i for i, p in enumerate(context.processes) if p.is_alive()]
                raise TimeoutError(
                    f"{fn.__name__} on {world_size} ranks did not finish in {timeout:.0f} s; "
                    f"ranks still running: {alive}"
                )
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
            p.join()
        kill_all(descendants.values())


def note_descendants(ranks, seen: dict[int, psutil.Process]) -> None:
    for rank in ranks:
        try:
            for child in psutil.Process(rank.pid).children(recursive=True):
                seen.setdefault(child.pid, child)
        except psutil.Error:  # the rank has just exited
            continue


def kill_all(procs) -> None:
    # psutil.Process remembers the creation time: a recycled pid is not mistaken for ours.
    alive = [p for p in procs if p.is_running()]
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=5)


# ---------------------------------------------------------------- pools of persistent ranks


def _pool_worker(rank: int, size: int, port: int, queues, results) -> None:
    import multiprocessing

    import torch
    import torch.distributed as dist

    # A spawned process defaults to "spawn" for processes it starts; a process started as
    # torchrun starts ranks has the platform's default (fork on Linux), which Megatron-LM's
    # data-loader workers rely on (their worker_init_fn is a local function).
    multiprocessing.set_start_method(None, force=True)

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size))
    os.environ.update(LOCAL_WORLD_SIZE=str(size))
    if size > 1:
        torch.set_num_threads(1)  # torchrun's OMP_NUM_THREADS=1 for several processes a node
    store = dist.TCPStore("127.0.0.1", port, size, rank == 0, timedelta(minutes=5))
    while (task := queues[rank].get()) is not None:
        number, fn, args = task
        try:
            dist.init_process_group(
                "gloo",
                store=dist.PrefixStore(f"task{number}/", store),
                rank=rank,
                world_size=size,
                timeout=timedelta(minutes=5),
            )
            value = fn(rank, size, *args)
            results.put((number, rank, None, value))
        except BaseException:  # noqa: BLE001 - reported to the test, whatever it was
            results.put((number, rank, traceback.format_exc(), None))
        finally:
            _teardown()


def _teardown() -> None:
    """Megatron-Core's model-parallel state and every process group, destroyed (a rank's end)."""
    import torch.distributed as dist

    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()  # the default group and every group made from it


class RankPool:
    """`size` gloo ranks that run one test body after another, all of them each time (see the
    module docstring)."""

    def __init__(self, size: int):
        import multiprocessing

        self.size = size
        ctx = multiprocessing.get_context("spawn")
        self._queues = [ctx.Queue() for _ in range(size)]
        self._results = ctx.Queue()
        self._number = 0
        self._descendants: dict[int, psutil.Process] = {}
        args = (size, free_port(), self._queues, self._results)
        self._context = _start(_pool_worker, size, args, "gloo")

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self._context.processes)

    def run(self, fn: Callable, *args, timeout: float = DEFAULT_TIMEOUT_S) -> list:
        """`fn(rank, size, *args)` on every rank; their return values, by rank."""
        self._number += 1
        for q in self._queues:
            q.put((self._number, fn, args))
        deadline = time.monotonic() + timeout
        failures, values, grace = {}, {}, None
        while len(failures) + len(values) < self.size:
            note_descendants(self._context.processes, self._descendants)
            now = time.monotonic()
            if now > deadline or (grace is not None and now > grace) or not self.alive:
                waiting = sorted(set(range(self.size)) - set(failures) - set(values))
                why = "a rank died" if not self.alive else f"ranks {waiting} did not finish"
                failures[-1] = f"{fn.__name__} on {self.size} pooled ranks: {why}"
                self.close()
                break
            try:
                number, rank, error, value = self._results.get(timeout=1.0)
            except queue.Empty:
                continue
            assert number == self._number, (number, self._number)
            if error is None:
                values[rank] = value
            else:
                failures[rank] = error
                # The other ranks may wait in a collective for the failed one: give them a
                # moment to fail too, then replace the pool.
                grace = grace or time.monotonic() + 30.0
        if failures:
            raise AssertionError(
                "\n".join(f"rank {r}:\n{tb}" if r >= 0 else tb for r, tb in failures.items())
            )
        return [values[rank] for rank in range(self.size)]

    def close(self) -> None:
        for q in self._queues:
            try:
                q.put(None)
            except (OSError, ValueError, RuntimeError):  # RuntimeError: at interpreter exit
                continue
        deadline = time.monotonic() + 10.0
        for p in self._context.processes:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        kill_all(self._descendants.values())


_pools: dict[int, RankPool] = {}


def pool(size: int) -> RankPool:
    """This process's pool of `size` ranks: started on first use, replaced after a failure,
    closed at exit."""
    if size not in _pools or not _pools[size].alive:
        _pools[size] = RankPool(size)
    return _pools[size]


@atexit.register
def close_pools() -> None:
    while _pools:
        _pools.popitem()[1].close()
