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
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

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
        try:
            from megatron.core import parallel_state

            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


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
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if backend == "gloo":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # inherited by the spawned interpreters
    try:
        context = mp.start_processes(
            _worker,
            args=(world_size, free_port(), backend, fn, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
    finally:
        if hidden is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = hidden
    deadline = time.monotonic() + timeout
    descendants: dict[int, psutil.Process] = {}
    try:
        # join() raises ProcessRaisedException with the failing rank and its traceback.
        while not context.join(timeout=1.0):
            _note_descendants(context.processes, descendants)
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
        _kill(descendants.values())


def _note_descendants(ranks, seen: dict[int, psutil.Process]) -> None:
    for rank in ranks:
        try:
            for child in psutil.Process(rank.pid).children(recursive=True):
                seen.setdefault(child.pid, child)
        except psutil.Error:  # the rank has just exited
            continue


def _kill(procs) -> None:
    # psutil.Process remembers the creation time: a recycled pid is not mistaken for ours.
    alive = [p for p in procs if p.is_running()]
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=5)
