"""Looking at processed SFT data: packed sequences shown with their targets marked, and
dumped as JSON Lines (input_ids, loss_mask, document boundaries) for other tools."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TARGET_OPEN, TARGET_CLOSE = "\u27e6", "\u27e7"  # ⟦ target tokens ⟧


def render_sequence(seq: dict[str, torch.Tensor], tokenizer) -> str:
    """One packed sequence as text: each sample on its own lines, the tokens that are
    targets (labels with loss) inside ⟦ ⟧, the padding summarized."""
    seg, labels, mask = seq["segment_ids"], seq["labels"], seq["loss_mask"]
    out = []
    for k in range(int(seg.max()) + 1):
        at = (seg == k).nonzero().flatten()
        first = int(seq["tokens"][at[0]])
        pieces = [_decode(tokenizer, [first])]
        run, run_is_target = [], None
        for i in at.tolist():
            is_target = bool(mask[i] > 0)
            if run and is_target != run_is_target:
                pieces.append(_wrap(_decode(tokenizer, run), run_is_target))
                run = []
            run.append(int(labels[i]))
            run_is_target = is_target
        if run:
            pieces.append(_wrap(_decode(tokenizer, run), run_is_target))
        weight = float(seq["loss_weight"][at[0]])
        head = f"--- sample {k}: {len(at) + 1} tokens"
        head += f", {int((mask[at] > 0).sum())} targets"
        head += f", weight {weight:g}" if weight != 1.0 else ""
        out.append(head + " ---\n" + "".join(pieces))
    pad = int((seg < 0).sum())
    if pad:
        out.append(f"--- padding: {pad} positions ---")
    return "\n".join(out)


def _decode(tokenizer, ids: list[int]) -> str:
    if tokenizer is None:
        return " ".join(map(str, ids)) + " "
    return tokenizer.decode(ids, skip_special_tokens=False)


def _wrap(text: str, is_target: bool) -> str:
    return f"{TARGET_OPEN}{text}{TARGET_CLOSE}" if is_target else text


def sequence_record(seq: dict[str, torch.Tensor]) -> dict:
    """A packed sequence as plain lists: input_ids and loss_mask over the positions
    (labels = input_ids shifted by one within each sample), the samples' [start, end)
    position ranges and their per-position weights."""
    seg = seq["segment_ids"]
    bounds = []
    for k in range(int(seg.max()) + 1):
        at = (seg == k).nonzero().flatten()
        bounds.append([int(at[0]), int(at[-1]) + 1])
    return {
        "input_ids": seq["tokens"].tolist(),
        "labels": seq["labels"].tolist(),
        "loss_mask": [int(v > 0) for v in seq["loss_mask"].tolist()],
        "loss_weight": seq["loss_weight"].tolist(),
        "position_ids": seq["position_ids"].tolist(),
        "documents": bounds,
    }


def dump_jsonl(dataset, path: str | Path) -> int:
    """Every sequence of `dataset` as one JSON line in `path`; returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for i in range(len(dataset)):
            fh.write(json.dumps(sequence_record(dataset[i])) + "\n")
    return len(dataset)
