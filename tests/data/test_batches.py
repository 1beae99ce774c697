"""The global-batch sampler: the same samples per step at every DP size, resumable."""

from __future__ import annotations

import pytest
import torch

from dft_megatron.data import GlobalBatchSampler, MockDataset

DATA = MockDataset(vocab_size=50, seq_length=8, seed=3)


def _global_step(dp: int, mbs: int, consumed: int = 0) -> torch.Tensor:
    """All DP ranks' micro-batches of one step, concatenated in rank order: [G, s]."""
    parts = []
    for rank in range(dp):
        sampler = GlobalBatchSampler(DATA, 8, mbs, rank, dp, consumed_samples=consumed)
        parts += [b.tokens for b in sampler.next_global_batch()]
    return torch.cat(parts)


def test_same_samples_at_every_layout():
    reference = _global_step(dp=1, mbs=8)
    for dp, mbs in ((1, 2), (2, 1), (2, 4), (4, 2)):
        assert torch.equal(_global_step(dp, mbs), reference), (dp, mbs)


def test_resume_continues_with_the_next_global_batch():
    sampler = GlobalBatchSampler(DATA, 8, 2, 0, 1)
    sampler.next_global_batch()
    second = torch.cat([b.tokens for b in sampler.next_global_batch()])
    assert sampler.consumed_samples == 16
    assert torch.equal(_global_step(dp=1, mbs=2, consumed=8), second)


def test_labels_are_inputs_shifted_and_masks_align():
    (batch,) = GlobalBatchSampler(DATA, 2, 2, 0, 1).next_global_batch()
    sample = DATA[0]
    assert torch.equal(batch.tokens[0], sample["tokens"][:-1])
    assert torch.equal(batch.labels[0], sample["tokens"][1:])
    assert torch.equal(batch.loss_mask[0], sample["loss_mask"])
    assert torch.equal(batch.position_ids[0], torch.arange(8))


def test_one_pass_pads_the_last_batch_with_no_loss():
    data = MockDataset(vocab_size=50, seq_length=8, seed=3, size=5)
    sampler = GlobalBatchSampler(data, 4, 2, 0, 1, wrap=False)
    sampler.next_global_batch()
    last = sampler.next_global_batch()
    masks = torch.cat([b.loss_mask for b in last])
    assert masks[0].sum() > 0  # sample 4, the fifth and last
    assert torch.all(masks[1:] == 0)  # fillers


def test_batch_must_split_evenly():
    with pytest.raises(ValueError, match=r"--global-batch-size \(6\) must be a multiple of"):
        GlobalBatchSampler(DATA, 6, 2, 0, 2)
