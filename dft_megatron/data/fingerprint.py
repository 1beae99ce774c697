"""What the SFT files were when a checkpoint was saved, to catch a resume on edited data.

A resumed run continues Megatron-LM's sample count (`consumed_train_samples`) into the
sequence order that the data's rows decide (data/batches.EpochShuffled): a file edited
between the save and the relaunch silently changes which samples come next, and which ones
were already seen. `data_fingerprint(paths)` is one entry per file (path, size, SHA-256),
stored in the checkpoint's args (`args.dft_data_fingerprint`, in Megatron-LM's common state);
`data_changes(stored, now)` names every file that differs.
"""

from __future__ import annotations

from pathlib import Path

from dft_megatron.utils.hashing import sha256_file


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]


def data_fingerprint(paths: list[str]) -> list[list]:
    """[[path, size, sha256], ...] for every file of `paths` (folders: each file inside)."""
    out = []
    for p in paths:
        for f in _files(Path(p).resolve()):
            out.append([str(f), f.stat().st_size, sha256_file(f)])
    return out


def data_changes(stored: list[list] | None, now: list[list]) -> list[str]:
    """One line per file that is not as it was (edited, added, removed); [] when the same or
    when the checkpoint recorded nothing (saved by plain Megatron-LM or an older version)."""
    if stored is None:
        return []
    before = {path: (size, digest) for path, size, digest in stored}
    after = {path: (size, digest) for path, size, digest in now}
    changes = []
    for path in sorted(before.keys() | after.keys()):
        if path not in after:
            changes.append(f"{path} was read by the checkpointed run and is no longer given")
        elif path not in before:
            changes.append(f"{path} is new: the checkpointed run did not read it")
        elif before[path] != after[path]:
            (s0, d0), (s1, d1) = before[path], after[path]
            changes.append(
                f"{path} changed since the save ({s0} -> {s1} bytes, SHA-256 {d0[:12]}... -> "
                f"{d1[:12]}...)"
            )
    return changes
