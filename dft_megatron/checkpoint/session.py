"""A Megatron-LM session in one process, for conversion and verification.

`megatron_session(argv)` does what the start of Megatron-LM's `pretrain` does, minus the
training: the CPU bridge (where there is no GPU), Megatron-LM's arguments (with DFT's),
a world of one process over gloo, `initialize_megatron` (model parallel TP1 x PP1, seeds),
and yields the args; on exit it tears Megatron-LM's global state down
(`destroy_global_state`), so a process may open several sessions one after another.
Inside it, `get_model(model_provider, wrap_with_ddp=False)` builds the model exactly as
training does, and Megatron-LM's own `save_checkpoint` / `load_checkpoint` write and read it.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from dft_megatron.checkpoint.paths import TRACKER

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def megatron_session(argv: list[str], training: bool = True, **overrides) -> Iterator:
    """Megatron-LM initialized in this process (a world of 1) with `argv`; yields the args.

    `training=False`: no training data is needed. `overrides` are set on the args after
    parsing, before Megatron-LM's validation (e.g. padded_vocab_size, which has no flag)."""
    from megatron.training import initialize
    from megatron.training.training import destroy_global_state

    from dft_megatron.compat.megatron_training import (
        install_megatron_training_cpu_bridge,
        install_megatron_training_fixes,
    )
    from dft_megatron.training.arguments import parse_megatron_args

    install_megatron_training_fixes()
    install_megatron_training_cpu_bridge()
    made_world = not dist.is_initialized()
    env = {}
    if made_world and "RANK" not in os.environ:
        env = dict(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(_free_port()),
            RANK="0",
            WORLD_SIZE="1",
            LOCAL_RANK="0",
        )
        os.environ.update(env)
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) != 1:
            raise RuntimeError(
                "conversion runs in one process: launch it with python, not torchrun"
            )
        args = parse_megatron_args(argv, training, **overrides)
        if made_world:
            backend = "nccl" if args.distributed_backend == "nccl" else "gloo"
            dist.init_process_group(backend, rank=0, world_size=1)
        initialize.initialize_megatron()  # looked up now: the CPU bridge may have wrapped it
        yield args
    finally:
        destroy_global_state()
        if made_world and dist.is_initialized():
            dist.destroy_process_group()
        for key in env:
            os.environ.pop(key, None)


def save_release(model: list[torch.nn.Module], save: str | Path) -> Path:
    """Megatron-LM's `save_checkpoint` of `model` (weights only) as SAVE/release: the form of a
    converted model, which `--load SAVE` starts from at iteration 0. Returns SAVE/release."""
    from megatron.training.checkpointing import save_checkpoint

    save = Path(save)
    save_checkpoint(0, model, None, None, 0)
    written = save / "iter_0000000"
    release = save / "release"
    if release.exists():
        shutil.rmtree(release)
    os.replace(written, release)
    tmp = save / f".{TRACKER}.tmp"
    tmp.write_text("release")
    os.replace(tmp, save / TRACKER)
    return release


def load_weights(model: list[torch.nn.Module]) -> int:
    """Megatron-LM's `load_checkpoint` of the session's --load into `model` (weights only);
    returns the checkpoint's iteration (0 for a release)."""
    from megatron.training.checkpointing import load_checkpoint

    iteration, _ = load_checkpoint(model, None, None, strict=True)
    return iteration
