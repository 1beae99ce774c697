"""Checkpoints through Megatron-Core's `dist_checkpointing` (torch_dist format).

Layout of a save directory (Megatron-LM's names):

    SAVE/latest_checkpointed_iteration.txt     the iteration `--load SAVE` picks
    SAVE/tokenizer/                            the tokenizer's files (Hugging Face format), when
                                               the checkpoint came with one (conversion)
    SAVE/iter_0000042/                         one checkpoint
        dft_megatron.json                      architecture, iteration, consumed samples, config
        ... dist_checkpointing files ...       model, optimizer, scheduler, RNG states

What is saved: every model chunk's sharded state dict (global keys: any TP/PP layout loads
any other), the optimizer state (the distributed optimizer's in Megatron-Core's
"dp_reshardable" format: it reloads at the same TP x PP and any DP size; see
OPTIMIZER_METADATA for why not the fully reshardable one), the LR scheduler state, and each
rank's RNG states as a ShardedObject indexed by (PP rank, TP rank), restorable only at the
same TP x PP layout (elsewhere they are skipped, and the log says so).

Atomic: ranks write into SAVE/.iter_0000042.incomplete; once every rank is done, rank 0
writes dft_megatron.json, renames the folder to iter_0000042 and only then replaces
latest_checkpointed_iteration.txt (write to a temporary file, os.replace). A save
interrupted at any point leaves at most an .incomplete folder, which `--load` never picks
and the next save of that iteration removes (and reports).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.utils import unwrap_model

from dft_megatron.models.config import ModelConfig
from dft_megatron.training.config import ConfigError

logger = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
METADATA = "dft_megatron.json"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1
# The distributed optimizer's checkpoint format. Megatron-Core 0.19.2's default
# ("fully_sharded_model_space") makes ShardedTensors with `flattened_range`, which its own
# dist_checkpointing refuses to save; "fully_reshardable" reads every parameter after the
# first bucket of a grad buffer from the wrong offset when buckets carry end padding (tied
# embeddings at PP > 1 with DP > 1, any bucket_size): resumes silently corrupted the weights
# (fixed upstream after 0.19.2). "dp_reshardable" is exact but reloads only at the same
# TP x PP, so a checkpoint's optimizer state is restored at its own TP x PP and otherwise
# refused with a message (weights always reshard).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def iteration_dir(save: str | Path, iteration: int) -> Path:
    return Path(save) / f"iter_{iteration:07d}"


def tokenizer_dir(checkpoint_root: str | Path) -> Path | None:
    """The tokenizer folder of a checkpoint: SAVE/tokenizer, for SAVE itself or one of its
    iter_NNNNNNN folders; None when there is none."""
    root = Path(checkpoint_root)
    for base in (root, root.parent) if re.fullmatch(r"iter_\d{7}", root.name) else (root,):
        if (base / TOKENIZER_DIR).is_dir():
            return base / TOKENIZER_DIR
    return None


@dataclass
class CheckpointInfo:
    """What dft_megatron.json says about a checkpoint."""

    path: Path
    iteration: int
    consumed_samples: int
    model: ModelConfig
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    has_optimizer: bool


def resolve(load: str) -> Path:
    """The checkpoint folder `--load` means: SAVE (its latest) or SAVE/iter_NNNNNNN itself."""
    path = Path(load)
    if (path / METADATA).is_file():
        return path
    tracker = path / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        if not re.fullmatch(r"\d+", text):
            raise ConfigError(f"--load {load}: {tracker} holds {text!r}, not an iteration number")
        found = iteration_dir(path, int(text))
        if not (found / METADATA).is_file():
            raise FileNotFoundError(
                f"--load {load}: {TRACKER} names iteration {text}, but {found} is not a "
                "complete dft_megatron checkpoint"
            )
        return found
    if not path.exists():
        raise FileNotFoundError(f"--load {load}: no such directory")
    raise FileNotFoundError(
        f"--load {load}: neither a checkpoint (no {METADATA}) nor a save directory (no "
        f"{TRACKER}); give the folder passed to --save or one of its iter_NNNNNNN folders"
    )


def save_tokenizer(save: str | Path, tokenizer) -> None:
    """Store `tokenizer` as SAVE/tokenizer (once; a tokenizer already there is kept)."""
    target = Path(save) / TOKENIZER_DIR
    if not (target / "tokenizer_config.json").is_file():
        tokenizer.save_pretrained(str(target))


def read_info(path: Path) -> CheckpointInfo:
    meta = json.loads((path / METADATA).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path / METADATA}: format_version {meta.get('format_version')!r}, this version of "
            f"dft_megatron reads {FORMAT_VERSION}"
        )
    return CheckpointInfo(
        path=path,
        iteration=meta["iteration"],
        consumed_samples=meta["consumed_samples"],
        model=ModelConfig.from_dict(meta["model"]),
        tensor_model_parallel_size=meta["tensor_model_parallel_size"],
        pipeline_model_parallel_size=meta["pipeline_model_parallel_size"],
        has_optimizer=meta["has_optimizer"],
    )


def _rng_state() -> ShardedObject:
    """This rank's RNG states, one shard per (PP rank, TP rank), replicated over DP/CP."""
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    pp, tp = (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
    )
    return ShardedObject(
        "rng_state",
        state,
        (pp, tp),
        (
            parallel_state.get_pipeline_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_rank(),
        ),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(model, optimizer, scheduler, *, with_rng: bool, loading: bool) -> dict:
    chunks = unwrap_model(model)
    state = {f"model{i}": c.sharded_state_dict(prefix="") for i, c in enumerate(chunks)}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            dict(state), is_loading=loading, metadata=OPTIMIZER_METADATA
        )
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if with_rng:
        state["rng_state"] = _rng_state()
    return state


def save_checkpoint(
    save: str,
    iteration: int,
    consumed_samples: int,
    model: list[torch.nn.Module],
    optimizer,
    scheduler,
    model_config: ModelConfig,
    train_config: dict,
) -> Path:
    """Write iteration `iteration` under `save` (see the module docstring); returns its folder."""
    final = iteration_dir(save, iteration)
    tmp = final.with_name(f".{final.name}.incomplete")
    if dist.get_rank() == 0:
        Path(save).mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            logger.warning("removing %s left by an interrupted save", tmp)
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    state = _sharded_state(model, optimizer, scheduler, with_rng=True, loading=False)
    dist_checkpointing.save(state, str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        meta = {
            "format_version": FORMAT_VERSION,
            "iteration": iteration,
            "consumed_samples": consumed_samples,
            "model": model_config.to_dict(),
            "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
            "has_optimizer": optimizer is not None,
            "config": train_config,
        }
        (tmp / METADATA).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if final.exists():
            logger.warning("replacing the existing checkpoint %s", final)
            shutil.rmtree(final)
        os.replace(tmp, final)
        tracker_tmp = Path(save) / f".{TRACKER}.tmp"
        tracker_tmp.write_text(f"{iteration}\n")
        os.replace(tracker_tmp, Path(save) / TRACKER)
    dist.barrier()
    logger.info("saved checkpoint %s", final)
    return final


def load_checkpoint(
    info: CheckpointInfo,
    model: list[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    *,
    load_rng: bool = True,
) -> None:
    """Restore `info`'s checkpoint into this rank's model (and optimizer, scheduler, RNG)."""
    if optimizer is not None and not info.has_optimizer:
        raise ConfigError(
            f"--load {info.path}: the checkpoint holds no optimizer state; add --finetune "
            "(weights only) or --no-load-optim"
        )
    same_layout = (
        info.tensor_model_parallel_size == parallel_state.get_tensor_model_parallel_world_size()
        and info.pipeline_model_parallel_size
        == parallel_state.get_pipeline_model_parallel_world_size()
    )
    if optimizer is not None and not same_layout:
        raise ConfigError(
            f"--load {info.path}: the optimizer state was saved at "
            f"TP{info.tensor_model_parallel_size} x PP{info.pipeline_model_parallel_size} and "
            "reloads only at that layout (this run: "
            f"TP{parallel_state.get_tensor_model_parallel_world_size()} x "
            f"PP{parallel_state.get_pipeline_model_parallel_world_size()}); add --no-load-optim to "
            "continue from the weights and iteration with a fresh optimizer, or --finetune"
        )
    if load_rng and not same_layout:
        logger.warning(
            "checkpoint saved at TP%d x PP%d, loading at TP%d x PP%d: RNG states are per layout "
            "and are not restored (the weights are resharded)",
            info.tensor_model_parallel_size,
            info.pipeline_model_parallel_size,
            parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_pipeline_model_parallel_world_size(),
        )
        load_rng = False
    state = _sharded_state(model, optimizer, scheduler, with_rng=load_rng, loading=True)
    loaded = dist_checkpointing.load(state, str(info.path))
    for i, chunk in enumerate(unwrap_model(model)):
        chunk.load_state_dict(loaded[f"model{i}"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    if load_rng:
        _set_rng_state(loaded["rng_state"])
    logger.info(
        "loaded %s (iteration %d%s%s)",
        info.path,
        info.iteration,
        ", optimizer" if optimizer is not None else "",
        ", RNG" if load_rng else "",
    )
