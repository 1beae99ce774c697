"""Where things are in a Megatron-LM save directory (no torch, no Megatron imports)."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

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


# Files of a Hugging Face folder that travel with a checkpoint (CKPT/tokenizer/): the
# tokenizer's, its chat template, and the generation defaults (bos/eos ids, sampling).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def copy_tokenizer_files(src: Path | None, dst: Path) -> list[str]:
    """Copy the TOKENIZER_FILES present in `src` into `dst` (created); returns their names."""
    if src is None or not src.is_dir():
        logger.warning("no tokenizer files to copy: the source has no tokenizer folder")
        return []
    found = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if not found:
        logger.warning("%s holds none of the tokenizer files %s", src, ", ".join(TOKENIZER_FILES))
        return []
    dst.mkdir(parents=True, exist_ok=True)
    for name in found:
        shutil.copy2(src / name, dst / name)
    logger.info("copied %s from %s to %s", ", ".join(found), src, dst)
    return found
