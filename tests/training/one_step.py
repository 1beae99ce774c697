"""One optimizer step of the trainer against the same step in plain transformers: the rows it
trains on, the flags of an exact Adam step, and the per-tensor comparison of the updates."""

from __future__ import annotations

import json
from pathlib import Path

import torch

LR, EPS, BETAS = 1e-3, 1e-6, (0.9, 0.95)


def write_rows(path: Path, seed: int = 1, prompts=(3, 5, 8, 11), length: int = 33) -> list[dict]:
    """Pre-tokenized rows (ids 3-48 of the test tokenizer), one per prompt length, each
    `length` tokens (seq-length `length - 1`: no padding), written to `path` as JSONL."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for prompt in prompts:
        ids = torch.randint(3, 49, (length,), generator=gen).tolist()
        rows.append({"input_ids": ids, "loss_mask": [0] * prompt + [1] * (length - prompt)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def adam_step_flags(checkpoint: Path, data: Path, save: Path, tmp_path: Path) -> list[str]:
    """One Adam step (LR, BETAS, EPS; no decay, no clipping, constant lr) on `data`'s four rows,
    one per micro-batch, from `checkpoint`, saved to `save`."""
    flags = ["--load", str(checkpoint), "--finetune", "--sft-data", str(data), "--no-packing"]
    flags += ["--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "4"]
    flags += ["--train-iters", "1", "--optimizer", "adam", "--lr", str(LR)]
    flags += ["--adam-beta1", str(BETAS[0]), "--adam-beta2", str(BETAS[1]), "--adam-eps", str(EPS)]
    flags += ["--weight-decay", "0", "--clip-grad", "0", "--lr-decay-style", "constant"]
    flags += ["--save", str(save), "--save-interval", "1"]
    flags += ["--data-cache-path", str(tmp_path / "cache")]
    return flags


def adam_updates(model: torch.nn.Module, out: Path) -> dict[str, torch.Tensor]:
    """One torch.optim.AdamW step (LR, BETAS, EPS, no decay) of `model`'s accumulated grads,
    saved by transformers to `out` (its on-disk names), as {name: weights after}."""
    from safetensors.torch import load_file

    torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0).step()
    model.save_pretrained(out)
    return load_file(str(out / "model.safetensors"))


def assert_moved_as(
    initial: dict[str, torch.Tensor],
    after: dict[str, torch.Tensor],
    expected_update: dict[str, torch.Tensor],
) -> None:
    """Every tensor moved by its expected update: within 1e-3 of the largest element of that
    update plus the fp32 rounding of the stored weights; every update is non-zero."""
    assert sorted(after) == sorted(initial) == sorted(expected_update)
    for name, w0 in initial.items():
        expected = expected_update[name].double()
        moved = after[name].double() - w0.double()
        scale = expected.abs().max()
        assert scale > 0, name
        rounding = 4 * torch.finfo(torch.float32).eps * w0.double().abs().max()
        assert (moved - expected).abs().max() <= 1e-3 * scale + rounding, name
