"""Is the checkpoint a run is about to load whole? Checked before Megatron-LM touches it.

A torch_dist checkpoint folder (SAVE/iter_NNNNNNN or SAVE/release) holds `metadata.json`
(format and version), `.metadata` (torch.distributed.checkpoint's index: for every tensor
and object, the file, offset and length of its bytes), the `__R_K.distcp` files those entries
point into and, when it was saved with Megatron-LM's `--verify-integrity`, `integrity.json`
(the SHA-256 of every file). Megatron-LM's loader trusts all of it: a truncated shard fails
deep in torch's reader on some rank, a bit flip in a tensor loads silently, an unreadable
tracker makes `read_metadata` call `sys.exit()` with status 0.

`load_target(load, ckpt_step)` resolves what `--load` (and `--ckpt-step`) will load, or says
why it cannot; `structure_problems(folder)` checks the index against the files (every file
it names present and long enough: truncations and missing files, no hashing);
`hash_problems(folder, names)` re-hashes files against `integrity.json`;
`orphan_checkpoints(save)` finds complete checkpoint folders no tracker names. Each problem
is one line that names the file and what to do. No torch import at module level.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dft_megatron.checkpoint.paths import TRACKER
from dft_megatron.utils.hashing import sha256_file

INTEGRITY_FILE = "integrity.json"  # megatron.core.dist_checkpointing.validation.INTEGRITY_FNAME
INDEX_FILE = ".metadata"  # torch.distributed.checkpoint's
FORMAT_FILE = "metadata.json"  # megatron.core.dist_checkpointing's


@dataclass(frozen=True)
class LoadTarget:
    """The checkpoint folder a run loads, and how it was named."""

    folder: Path
    iteration: int  # 0 for a release
    release: bool
    source: str  # "the tracker SAVE/latest_checkpointed_iteration.txt" or "--ckpt-step N"


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded as it is; the message is one line per problem."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def complete_checkpoints(root: Path) -> list[Path]:
    """The iteration folders in `root` that hold a whole checkpoint, oldest first."""
    folders = sorted(p for p in root.glob("iter_*") if re.fullmatch(r"iter_\d{7}", p.name))
    return [p for p in folders if is_complete(p)]


def iterations(folders: list[Path]) -> str:
    """ "2, 4" for SAVE/iter_0000002 and SAVE/iter_0000004."""
    return ", ".join(str(int(p.name.removeprefix("iter_"))) for p in folders)


def _others(root: Path, but: Path | None) -> str:
    """The complete checkpoints in `root` besides `but`, as a hint for --ckpt-step."""
    complete = [p for p in complete_checkpoints(root) if p != but]
    if not complete:
        return "no other complete checkpoint is in the folder"
    return (
        f"complete checkpoints there: iterations {iterations(complete[-3:])} (load one with "
        "--ckpt-step N)"
    )


def load_target(load: str | Path | None, ckpt_step: int | None = None) -> LoadTarget | None:
    """The folder `--load` resolves to, as Megatron-LM's `_load_base_checkpoint` reads it:
    the tracker's iteration (or "release"), overridden by --ckpt-step. None when there is
    nothing to load (no --load, or a --load without a tracker and no --ckpt-step: Megatron-LM
    then starts from random weights). Raises CheckpointError for an unreadable tracker or
    a named folder that is not there."""
    if not load:
        return None
    root = Path(load)
    tracker = root / TRACKER
    if ckpt_step:
        folder, release, source = root / f"iter_{ckpt_step:07d}", False, f"--ckpt-step {ckpt_step}"
    elif not tracker.is_file():
        return None
    else:
        text = tracker.read_text(errors="replace").strip()
        source = f"the tracker {tracker}"
        if text == "release":
            folder, release = root / "release", True
        elif re.fullmatch(r"\d+", text):
            folder, release = root / f"iter_{int(text):07d}", False
        else:
            shown = repr(text) if text else "nothing (an empty file)"
            raise CheckpointError(
                [
                    f"{tracker} holds {shown}, not an iteration number or 'release' (a save "
                    f"interrupted while writing it?); {_others(root, None)}; or write the "
                    "iteration to resume into the tracker"
                ]
            )
    if not folder.is_dir():
        raise CheckpointError(
            [
                f"{source} names {folder}, which does not exist; {_others(root, folder)}, or "
                "fix the tracker"
            ]
        )
    iteration = 0 if release else int(folder.name.removeprefix("iter_"))
    return LoadTarget(folder, iteration, release, source)


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds a whole torch_dist checkpoint by its index (files present and
    long enough; no hashing)."""
    return folder.is_dir() and not structure_problems(folder)


def _read_index(folder: Path):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(folder)).read_metadata()


def _required_sizes(folder: Path) -> dict[str, int]:
    """Each data file the index names -> the bytes it must hold at least."""
    need: dict[str, int] = {}
    for info in _read_index(folder).storage_data.values():
        end = info.offset + info.length
        need[info.relative_path] = max(need.get(info.relative_path, 0), end)
    return need


def structure_problems(folder: str | Path) -> list[str]:
    """What is missing or short in a torch_dist checkpoint folder (one line each)."""
    folder = Path(folder)
    redo = "restore the file, or load another checkpoint"
    if not (folder / FORMAT_FILE).is_file():
        if any(folder.glob("mp_rank_*")) or any(folder.glob("*.pt")):
            return []  # a legacy torch-format checkpoint: Megatron-LM's own checks apply
        return [f"{folder / FORMAT_FILE} is missing: not a whole torch_dist checkpoint; {redo}"]
    if not (folder / INDEX_FILE).is_file():
        return [f"{folder / INDEX_FILE} (the tensor index) is missing: an unfinished save; {redo}"]
    try:
        need = _required_sizes(folder)
    except Exception as e:  # a truncated or damaged pickle
        return [f"{folder / INDEX_FILE} cannot be read ({type(e).__name__}: {e}); {redo}"]
    problems = []
    for name, size in sorted(need.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{path} is missing (the index names it); {redo}")
        elif (have := path.stat().st_size) < size:
            problems.append(f"{path} is truncated: {have} bytes, the index needs {size}; {redo}")
    return problems


def integrity_manifest(folder: str | Path) -> dict[str, str] | None:
    """integrity.json's {file: sha256}, or None when the checkpoint was saved without it."""
    path = Path(folder) / INTEGRITY_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("algorithm", "sha256") != "sha256":
        raise CheckpointError([f"{path}: hash algorithm {data['algorithm']!r}, not sha256"])
    return dict(data["files"])


def hash_problems(folder: str | Path, names: list[str], threads: int = 4) -> list[str]:
    """Re-hash `names` (files of integrity.json) in `folder` and name each that differs."""
    folder = Path(folder)
    manifest = integrity_manifest(folder) or {}
    names = [n for n in names if n in manifest]

    def check(name: str) -> str | None:
        path = folder / name
        if not path.is_file():
            return f"{path} is missing ({INTEGRITY_FILE} lists it); restore it or load another"
        got = sha256_file(path)
        if got != manifest[name]:
            return (
                f"{path} is damaged: its SHA-256 is {got[:12]}..., {INTEGRITY_FILE} recorded "
                f"{manifest[name][:12]}... at save time (a bit flip or a partial copy); "
                "restore it from a copy or load another checkpoint"
            )
        return None

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return [p for p in pool.map(check, sorted(names)) if p]


def orphan_checkpoints(save: str | Path | None) -> list[Path]:
    """Complete iteration folders in `save` while it has no tracker: a run started there
    would begin from random weights and overwrite them when it reaches their iteration."""
    if not save or not Path(save).is_dir() or (Path(save) / TRACKER).exists():
        return []
    return complete_checkpoints(Path(save))
