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


class _Indexed:
    """Sample i carries its own index, so the order the sampler reads is visible."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return {"tokens": torch.full((5,), i), "loss_mask": torch.ones(4)}


def _order(dp: int, steps: int, consumed: int = 0, n: int = 12, seed: int = 4) -> list[int]:
    """Global sample order over `steps` steps of global batch 4, all DP ranks together."""
    samplers = [
        GlobalBatchSampler(_Indexed(n), 4, 1, r, dp, consumed_samples=consumed, shuffle_seed=seed)
        for r in range(dp)
    ]
    order = []
    for _ in range(steps):
        for s in samplers:
            order += [int(b.tokens[0, 0]) for b in s.next_global_batch()]
    return order


def test_shuffled_epochs_same_at_every_dp_size_and_resumable():
    one = _order(dp=1, steps=9)  # three epochs of 12
    assert _order(dp=2, steps=9) == one == _order(dp=4, steps=9)
    epochs = [one[:12], one[12:24], one[24:]]
    assert all(sorted(e) == list(range(12)) for e in epochs)  # every sample once per epoch
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled per epoch
    assert epochs[0] != list(range(12))
    # Resume mid-epoch (after 5 steps = 20 samples) continues without repeat or skip.
    assert _order(dp=2, steps=4, consumed=20) == one[20:]
    assert _order(dp=1, steps=9, seed=5) != one


def _cp_worker(rank, world_size):
    import torch.distributed as dist

    from dft_megatron.data import Batch

    group = dist.new_group(list(range(world_size)))
    s = 8
    ar = torch.arange(s).unsqueeze(0)
    batch = Batch(ar, ar + 100, torch.ones(1, s), ar.clone(), loss_weight=ar.float())
    mine = batch.on_context_parallel_rank(group)
    # Zigzag over 2 x CP = 4 chunks of 2: rank 0 keeps chunks 0 and 3, rank 1 chunks 1 and 2.
    expect = [[0, 1, 6, 7], [2, 3, 4, 5]][rank]
    assert mine.tokens.tolist() == [expect]
    assert mine.labels.tolist() == [[t + 100 for t in expect]]
    assert mine.position_ids.tolist() == [expect]
    assert mine.loss_weight.tolist() == [[float(t) for t in expect]]
    assert mine.segment_ids is None


def test_context_parallel_split():
    from tests.dist import spawn

    spawn(_cp_worker, 2)
