"""Samples through Megatron-LM's own sampler: the same samples per step at every DP size,
every SFT sequence once per epoch in a per-epoch order, exact resume from consumed samples.

Reference: Megatron-LM's `MegatronPretrainingSampler` (what `--dataloader-type single`, the
default, builds), read for every DP rank of a global batch and concatenated in rank order.
"""

from __future__ import annotations

import torch
from megatron.training.datasets.data_samplers import MegatronPretrainingSampler
from torch.utils.data import default_collate

from dft_megatron.data import EpochShuffled, MockDataset, from_stacked
from dft_megatron.data.provider import OnePass

DATA = MockDataset(vocab_size=50, seq_length=8, seed=3, size=64)


def _global_steps(dataset, dp: int, mbs: int, gbs: int, steps: int, consumed: int = 0):
    """[steps][gbs] sample indices as Megatron-LM's sampler hands them to the DP ranks."""
    per_rank = []
    for rank in range(dp):
        sampler = MegatronPretrainingSampler(
            total_samples=len(dataset),
            consumed_samples=consumed,
            micro_batch_size=mbs,
            data_parallel_rank=rank,
            data_parallel_size=dp,
        )
        batches = iter(sampler)
        per_rank.append([[i for _ in range(gbs // (mbs * dp)) for i in next(batches)]
                         for _ in range(steps)])  # fmt: skip
    return [sorted(i for rank in per_rank for i in rank[k]) for k in range(steps)]


def test_same_samples_per_step_at_every_dp_size():
    reference = _global_steps(DATA, dp=1, mbs=8, gbs=8, steps=3)
    for dp, mbs in ((1, 2), (2, 1), (2, 4), (4, 2)):
        assert _global_steps(DATA, dp, mbs, 8, 3) == reference, (dp, mbs)


def test_labels_are_inputs_shifted_and_masks_align():
    batch = from_stacked(default_collate([DATA[0], DATA[1]]))
    sample = DATA[0]
    assert torch.equal(batch.tokens[0], sample["tokens"][:-1])
    assert torch.equal(batch.labels[0], sample["tokens"][1:])
    assert torch.equal(batch.loss_mask[0], sample["loss_mask"])
    assert torch.equal(batch.position_ids[0], torch.arange(8))


def test_one_pass_pads_the_last_batch_with_no_loss():
    data = OnePass(MockDataset(vocab_size=50, seq_length=8, seed=3, size=5), 8)
    assert len(data) == 8
    assert data[4]["loss_mask"].sum() > 0  # the fifth and last sample
    assert all(data[i]["loss_mask"].sum() == 0 for i in range(5, 8))  # fillers


class _Indexed:
    """Sample i carries its own index, so the order the sampler reads is visible."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return {"tokens": torch.full((5,), i), "loss_mask": torch.ones(4)}


def _order(dp: int, steps: int, consumed: int = 0, n: int = 12, seed: int = 4) -> list[int]:
    """Global sample order over `steps` steps of global batch 4, DP ranks in rank order."""
    data = EpochShuffled(_Indexed(n), 36, seed)
    order = []
    for step in _global_steps(data, dp, 1, 4, steps, consumed):
        order += [int(data[g]["tokens"][0]) for g in step]
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
    assert len(EpochShuffled(_Indexed(12), 25, 4)) == 36  # whole epochs cover the count


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
