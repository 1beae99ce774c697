"""What keeps a run's checkpoints whole through kills, preemptions, bad files and bad steps.

Megatron-LM's trainer brings the machinery (the signal handler, --exit-duration-in-mins,
the NaN checks and the rerun state machine, --verify-integrity's hashes); this module closes
the gaps a cluster's bad days open, each a test in tests/training/test_faults.py:

Before Megatron-LM reads anything (`checkpoint_problems`, every rank, while parsing):
- the tracker must name a folder that exists (an empty or garbled tracker made Megatron-LM's
  `read_metadata` `sys.exit()` with status 0), and that folder must hold every file its
  tensor index names, each long enough (`checkpoint.integrity.structure_problems`);
- a --save folder with complete checkpoints but no tracker would start from random weights
  and overwrite them: refused;
- `architecture_problems`: a checkpoint of another architecture than the command line's is
  refused with the fields that differ (Megatron-LM asserts on a few, or fails on a shape
  deep in torch's loader).

After the process group exists (`preflight`, every rank, before `pretrain`):
- the --save lock (`checkpoint.lock.SaveLock`, global rank 0);
- the files' SHA-256 against integrity.json, shared out over the ranks (Megatron-LM's own
  load-time verification, on rank 0 alone, is then switched off for that load);
- the SFT files against the fingerprint the checkpoint recorded (`data.fingerprint`): a
  resume on edited data is refused unless --allow-data-change.

Around Megatron-LM's `save_checkpoint` (`install_checkpoint_guards`):
- the tracker is written to a temporary file and renamed (a kill leaves the old or the new
  one, never a half-written one);
- a model with NaN or Inf weights is not saved: the run stops, naming the iteration and the
  tensors, and the last checkpoint stays the tracker's;
- a save that hits a full disk stops the run with what is left: the previous checkpoint,
  still named by the tracker;
- a save requested without --save (the rerun state machine's, on a NaN loss) is reported
  instead of crashing on a None path.
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from dft_megatron.checkpoint.integrity import (
    FORMAT_FILE,
    INDEX_FILE,
    CheckpointError,
    LoadTarget,
    hash_problems,
    integrity_manifest,
    iterations,
    load_target,
    orphan_checkpoints,
    structure_problems,
)
from dft_megatron.checkpoint.lock import SaveFolderInUseError, SaveLock
from dft_megatron.checkpoint.paths import TRACKER
from dft_megatron.data.fingerprint import data_changes, data_fingerprint
from dft_megatron.training.metrics import collective_device

logger = logging.getLogger(__name__)

EXIT_NON_FINITE_WEIGHTS = 17  # Megatron-LM's EXIT_CODE_FAILED_ON_RESULT_VALIDATION
EXIT_DISK_FULL = 28  # errno ENOSPC


class GuardExit(SystemExit):
    """A stop by the save guards below, its reason already logged (not the rerun state
    machine's exit, whose code 17 the NaN-weights stop shares)."""


# ------------------------------------------------------------------ before loading


def checkpoint_problems(args: argparse.Namespace) -> list[str]:
    """What stops the --load checkpoint from loading as it is (no hashing of shards)."""
    try:
        target = load_target(args.load, getattr(args, "ckpt_step", None))
    except CheckpointError as e:
        return e.problems
    if target is None:
        orphans = orphan_checkpoints(args.save)
        if not orphans:
            return []
        return [
            f"--save {args.save} holds complete checkpoints (iterations {iterations(orphans)}) "
            "but no "
            f"{TRACKER}: this run would start from random weights and overwrite them; to resume "
            f"one, --load {args.save} --ckpt-step N; to start over, give another --save"
        ]
    problems = structure_problems(target.folder)
    if not problems and integrity_manifest(target.folder) is not None:
        problems = hash_problems(target.folder, [INDEX_FILE, FORMAT_FILE])  # the small ones
    return problems


def stored_args(folder: Path) -> argparse.Namespace | None:
    """The args a torch_dist checkpoint was saved with (its common state), or None."""
    if not (folder / FORMAT_FILE).is_file():
        return None
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(folder)).get("args")


# Fields that decide the tensors' shapes (or which tensors exist), with their flags.
ARCHITECTURE_FLAGS = {
    "num_layers": "--num-layers",
    "hidden_size": "--hidden-size",
    "ffn_hidden_size": "--ffn-hidden-size",
    "num_attention_heads": "--num-attention-heads",
    "num_query_groups": "--num-query-groups",
    "kv_channels": "--kv-channels",
    "padded_vocab_size": "--vocab-size / --make-vocab-size-divisible-by",
    "position_embedding_type": "--position-embedding-type",
    "normalization": "--normalization",
    "swiglu": "--swiglu",
    "add_bias_linear": "--disable-bias-linear",
    "add_qkv_bias": "--add-qkv-bias",
    "untie_embeddings_and_output_weights": "--untie-embeddings-and-output-weights",
    "qk_layernorm": "--qk-layernorm",
    "num_experts": "--num-experts",
    "moe_ffn_hidden_size": "--moe-ffn-hidden-size",
    "moe_layer_freq": "--moe-layer-freq",
    "moe_shared_expert_intermediate_size": "--moe-shared-expert-intermediate-size",
}


def architecture_problems(
    args: argparse.Namespace, load: str | None = None, what: str = "--load"
) -> list[str]:
    """The checkpoint `load` (default: --load) resolves to against the command line's
    architecture."""
    load = args.load if load is None else load
    step = getattr(args, "ckpt_step", None) if what == "--load" else None
    target = load_target(load, step)
    stored = stored_args(target.folder) if target is not None else None
    if stored is None:
        return []
    fields = dict(ARCHITECTURE_FLAGS)
    if args.position_embedding_type == "learned_absolute":
        fields["max_position_embeddings"] = "--max-position-embeddings"
    if not args.group_query_attention and not getattr(stored, "group_query_attention", False):
        fields.pop("num_query_groups")
    diffs = [
        f"{name} {getattr(stored, name, None)} there, {getattr(args, name, None)} here ({flag})"
        for name, flag in fields.items()
        if getattr(stored, name, None) != getattr(args, name, None)
    ]
    if not diffs:
        return []
    if what != "--load":
        return [
            f"{what} {target.folder} is a checkpoint of another architecture than the trained "
            f"model's: {'; '.join(diffs)}; the reference must have the policy's architecture"
        ]
    return [
        f"{target.folder} is a checkpoint of another architecture: {'; '.join(diffs)}; drop the "
        "model flags to take the checkpoint's (--use-checkpoint-args), or load a checkpoint of "
        "this model"
    ]


def resolve_reference(args: argparse.Namespace) -> list[str]:
    """--loss-type asft: set --ref-load where it was not given, and check its checkpoint.

    The default is the reference the --load checkpoint's own run used when it was an asft
    run's (a resume keeps its anchor, not the weights trained so far), else --load itself
    (the model fine-tuning starts from)."""
    if args.loss_type != "asft":
        return []
    if args.ref_load is None:
        target = load_target(args.load, getattr(args, "ckpt_step", None)) if args.load else None
        stored = stored_args(target.folder) if target is not None else None
        inherited = getattr(stored, "ref_load", None) if stored is not None else None
        args.ref_load = inherited or args.load
        if args.ref_load is None:
            return ["--loss-type asft needs a reference model: give --ref-load DIR (or --load)"]
        if int(os.environ.get("RANK", "0")) == 0:
            why = "the --load checkpoint's run used it" if inherited else "the --load checkpoint"
            logger.info("asft: reference model from --ref-load %s (%s)", args.ref_load, why)
    ref_args = argparse.Namespace(**{**vars(args), "load": args.ref_load, "ckpt_step": None})
    try:
        if load_target(args.ref_load, None) is None:
            return [f"--ref-load {args.ref_load}: holds no checkpoint (no {TRACKER})"]
    except CheckpointError as e:
        return [f"--ref-load: {p}" for p in e.problems]
    problems = [f"--ref-load: {p}" for p in checkpoint_problems(ref_args)]
    return problems or architecture_problems(args, args.ref_load, "--ref-load")


# ------------------------------------------------------------------ after the process group


def _gather_problems(mine: list[str]) -> list[str]:
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return [p for rank_problems in every for p in rank_problems]


def _broadcast(value):
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def preflight(args: argparse.Namespace, sft_paths: list[str]) -> SaveLock | None:
    """The --save lock, the shards' hashes and the data fingerprint (see the module
    docstring), on every rank; raises CheckpointError with the problems of all ranks. Sets
    `args.dft_data_fingerprint` (saved with every checkpoint). Returns the held lock."""
    rank, world = dist.get_rank(), dist.get_world_size()
    problems: list[str] = []
    target = load_target(args.load, getattr(args, "ckpt_step", None))  # checked while parsing
    manifest = integrity_manifest(target.folder) if target is not None else None
    if manifest is not None:  # the small index files were hashed while parsing
        shards = sorted(set(manifest) - {INDEX_FILE, FORMAT_FILE})
        problems += hash_problems(target.folder, shards[rank::world])
    elif target is not None and rank == 0:
        logger.info(
            "%s has no integrity.json (saved without --verify-integrity): its files' sizes are "
            "checked, not their contents",
            target.folder,
        )
    # Needed to record (a run that saves) or to compare (a resume).
    wanted = sft_paths and (args.save or _resumes(args, target))
    fingerprint = data_fingerprint(sft_paths) if wanted and rank == 0 else None
    fingerprint = _broadcast(fingerprint) if world > 1 else fingerprint
    args.dft_data_fingerprint = fingerprint
    if rank == 0 and fingerprint is not None and _resumes(args, target):
        problems += _data_problems(args, target, fingerprint)
    lock = None
    if args.save and rank == 0 and not problems:  # a refused run writes nothing, not even this
        lock = SaveLock(args.save)
        try:
            lock.acquire()
        except SaveFolderInUseError as e:
            problems.append(str(e))
            lock = None
    problems = _gather_problems(problems) if world > 1 else problems
    if problems:
        if lock is not None:
            lock.release()
        raise CheckpointError(problems)
    return lock


def _resumes(args: argparse.Namespace, target: LoadTarget | None) -> bool:
    """Whether the run continues a checkpoint's sample order (not a fresh start from it)."""
    return target is not None and not target.release and not args.finetune


def _data_problems(args, target: LoadTarget, fingerprint: list[list]) -> list[str]:
    stored = getattr(stored_args(target.folder), "dft_data_fingerprint", None)
    changes = data_changes(stored, fingerprint)
    if not changes:
        return []
    if args.allow_data_change:
        for line in changes:
            logger.warning("--allow-data-change: %s; the sample order is recomputed", line)
        return []
    return [
        f"the SFT data changed since {target.folder} was saved: {line}; resuming would continue "
        "its sample count into a different order (samples seen twice, others never); restore "
        "the file, or pass --allow-data-change to go on with the new data"
        for line in changes
    ]


# ------------------------------------------------------------------ around save / load


@contextmanager
def _atomic_text(path: str):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _AtomicTracker:
    """`maybe_msc` for checkpointing.py: the tracker written by rename, the rest as is."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def open(self, path, mode="r", *a, **kw):
        local = not str(path).startswith("msc://")
        if local and "w" in mode and os.path.basename(str(path)) == TRACKER:
            return _atomic_text(str(path))
        return self._inner.open(path, mode, *a, **kw)


def non_finite_parameters(model: list[torch.nn.Module]) -> list[str]:
    """Names of this rank's parameters holding NaN or Inf."""
    return [
        f"{name} (chunk {i})" if len(model) > 1 else name
        for i, chunk in enumerate(model)
        for name, p in chunk.named_parameters()
        if not torch.isfinite(p.detach()).all()
    ]


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _disk_full(e: BaseException, save: str) -> bool:
    """Whether a failed save ran out of space: ENOSPC in the exception chain, or (torch's
    writers report some short writes as "unexpected pos") less room left on the filesystem
    than the last checkpoint took."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    tracker = Path(save) / TRACKER
    if not tracker.is_file():
        return shutil.disk_usage(save).free < 2**20
    text = tracker.read_text().strip()
    last = Path(save) / ("release" if text == "release" else f"iter_{int(text or 0):07d}")
    return last.is_dir() and shutil.disk_usage(save).free < _folder_bytes(last)


def _last_checkpoint(save: str) -> str:
    tracker = Path(save) / TRACKER
    if not tracker.is_file():
        return "no earlier checkpoint is in the folder"
    text = tracker.read_text().strip()
    return f"the tracker still names {'release' if text == 'release' else f'iteration {text}'}"


def _guard_save(original):
    @functools.wraps(original)
    def save_checkpoint(iteration, model, *a, **kw):
        from megatron.training import get_args

        args = get_args()
        if not args.save:
            if dist.get_rank() == 0:
                logger.error(
                    "iteration %d: Megatron-LM asked for a checkpoint (after a failed "
                    "validation or a signal) but the run has no --save: nothing saved",
                    iteration,
                )
            return None
        bad = non_finite_parameters(model)
        flag = torch.tensor([float(bool(bad))], device=collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            if bad:
                logger.error(
                    "iteration %d: not saving a model with NaN or Inf weights (%s%s) to %s; %s. "
                    "Likely cause: a diverging learning rate or a bad batch with Megatron-LM's "
                    "NaN checks off (--no-check-for-nan-in-loss-and-grad); lower --lr or resume "
                    "from that checkpoint with the checks on",
                    iteration,
                    ", ".join(bad[:3]),
                    f" and {len(bad) - 3} more" if len(bad) > 3 else "",
                    args.save,
                    _last_checkpoint(args.save),
                )
            raise GuardExit(EXIT_NON_FINITE_WEIGHTS)
        try:
            return original(iteration, model, *a, **kw)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # torch's CheckpointException is a BaseException
            if not _disk_full(e, args.save):
                raise
            free = shutil.disk_usage(args.save).free / 2**20
            logger.error(
                "iteration %d: the disk is full (%.0f MiB free in %s) while saving; %s, which is "
                "whole and loads: free space (the incomplete iter_%07d can be deleted) and "
                "relaunch the same command to continue from it",
                iteration,
                free,
                args.save,
                _last_checkpoint(args.save),
                iteration,
            )
            raise GuardExit(EXIT_DISK_FULL) from e

    save_checkpoint.__dft_megatron__ = True
    return save_checkpoint


def _verified_load(original):
    """Megatron-LM's load_checkpoint without its own rank-0 re-hash (preflight shared it
    out over the ranks; a checkpoint without integrity.json is sized, not refused)."""

    @functools.wraps(original)
    def load_checkpoint(*a, **kw):
        from megatron.training import get_args

        args = get_args()
        verify, args.verify_integrity = args.verify_integrity, False
        try:
            return original(*a, **kw)
        finally:
            args.verify_integrity = verify

    load_checkpoint.__dft_megatron__ = True
    return load_checkpoint


def install_checkpoint_guards() -> None:
    """Wrap Megatron-LM's save_checkpoint / load_checkpoint (idempotent)."""
    from megatron.training import checkpointing, training

    if getattr(checkpointing.save_checkpoint, "__dft_megatron__", False):
        return
    checkpointing.maybe_msc = _AtomicTracker(checkpointing.maybe_msc)
    checkpointing.save_checkpoint = _guard_save(checkpointing.save_checkpoint)
    training.save_checkpoint = checkpointing.save_checkpoint  # `from ... import` in training.py
    checkpointing.load_checkpoint = _verified_load(checkpointing.load_checkpoint)
    training.load_checkpoint = checkpointing.load_checkpoint
