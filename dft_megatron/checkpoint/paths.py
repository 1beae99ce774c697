"""Where things are in a Megatron-LM save directory (no torch, no Megatron imports)."""

from __future__ import annotations

import re
from pathlib import Path

TRACKER = "latest_checkpointed_iteration.txt"
TOKENIZER_DIR = "tokenizer"
"""The tokenizer's folder inside a save directory (Hugging Face format)."""


def checkpoint_root(load: str | Path) -> Path | None:
    """The save directory a --load path belongs to: SAVE itself, or SAVE for a path
    SAVE/iter_NNNNNNN or SAVE/release; None when it is not a directory."""
    path = Path(load)
    if (re.fullmatch(r"iter_\d{7}", path.name) or path.name == "release") and path.parent.is_dir():
        return path.parent
    return path if path.is_dir() else None


def read_tracker(root: str | Path) -> tuple[int | None, bool]:
    """(iteration, release) that SAVE/latest_checkpointed_iteration.txt names."""
    tracker = Path(root) / TRACKER
    text = tracker.read_text().strip()
    if text == "release":
        return None, True
    if not re.fullmatch(r"\d+", text):
        raise ValueError(f"{tracker} holds {text!r}: neither an iteration number nor 'release'")
    return int(text), False


def checkpoint_dir(root: str | Path) -> Path:
    """The folder the tracker of save directory `root` names (release/ or iter_NNNNNNN/)."""
    iteration, release = read_tracker(root)
    return Path(root) / ("release" if release else f"iter_{iteration:07d}")


def has_checkpoint(load: str | Path | None) -> bool:
    """Whether `load` is a save directory with a tracker file (a checkpoint to resume)."""
    root = checkpoint_root(load) if load else None
    return root is not None and (root / TRACKER).is_file()


def stored_tokenizer(load: str | Path | None) -> Path | None:
    """SAVE/tokenizer of a --load path, if it holds a Hugging Face tokenizer."""
    root = checkpoint_root(load) if load else None
    if root is not None and (root / TOKENIZER_DIR / "tokenizer_config.json").is_file():
        return root / TOKENIZER_DIR
    return None
