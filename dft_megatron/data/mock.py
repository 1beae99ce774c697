"""Synthetic training data: deterministic token sequences, one per global sample index.

Sample i depends only on (seed, i), never on the parallel layout or on which rank reads
it, so runs at different TP/PP/DP sizes see the same global batches. Each sample is a
"prompt" whose tokens carry no loss followed by a "response" whose tokens do, like an SFT
sample; the prompt length varies with the index.
"""

from __future__ import annotations

import torch


class MockDataset:
    """`len` samples of `seq_length + 1` token ids in [0, vocab_size) with a loss mask."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int, size: int = 1 << 40):
        self.vocab_size = vocab_size
        self.seq_length = seq_length
        self.seed = seed
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """{"tokens": [s + 1] int64, "loss_mask": [s] float (1: label s is a target)}."""
        if not 0 <= index < self.size:
            raise IndexError(f"mock sample {index} out of range [0, {self.size})")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        tokens = torch.randint(0, self.vocab_size, (self.seq_length + 1,), generator=gen)
        prompt = int(torch.randint(0, self.seq_length // 2 + 1, (), generator=gen))
        loss_mask = torch.ones(self.seq_length)
        loss_mask[:prompt] = 0.0
        return {"tokens": tokens, "loss_mask": loss_mask}
