"""Samples -> micro-batches, and the order in which Megatron-LM's sampler reads them.

Megatron-LM's trainer reads a map-style dataset through its sequential sampler: global
batch k holds global samples [k * G, (k + 1) * G) (G = global batch size), split over the
data-parallel ranks micro-batch by micro-batch; resuming from `consumed_samples` continues
with the next global batch. `EpochShuffled` makes that global index the product of a
per-epoch shuffle of the SFT sequences, so the same samples form the same global batches at
every layout. Its data loader collates samples into a dict of [b, s] tensors, which
`from_stacked` turns into a `Batch`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """One micro-batch, [b, s] each."""

    tokens: torch.Tensor
    """Input token ids."""

    labels: torch.Tensor
    """Target ids: tokens shifted left by one."""

    loss_mask: torch.Tensor
    """1.0 where the label is a target, 0.0 where it carries no loss."""

    position_ids: torch.Tensor
    """Positions of the input tokens (restarting at 0 for each packed sample)."""

    loss_weight: torch.Tensor | None = None
    """Per-token loss scale (a row's sample weight); None: 1 everywhere."""

    segment_ids: torch.Tensor | None = None
    """Packed samples: which sample each position belongs to (-1: padding); None when no
    row holds more than one sample (plain causal attention)."""

    def on_context_parallel_rank(self, cp_group) -> Batch:
        """This context-parallel rank's share of the sequence: Megatron-Core's zigzag split
        into 2 x CP chunks (rank r keeps chunks r and 2 CP - 1 - r, which balances causal
        attention), [b, s / CP] each. Packed rows (segment_ids) are not split this way."""
        from megatron.core.utils import get_batch_on_this_cp_rank

        if self.segment_ids is not None:
            raise ValueError("packed sequences cannot be split over context-parallel ranks")
        fields = {k: v for k, v in vars(self).items() if k != "segment_ids"}
        split = get_batch_on_this_cp_rank(
            {**fields, "cu_seqlens": None}, is_hybrid_cp=False, cp_group=cp_group
        )
        return Batch(**{k: split[k] for k in fields})

    def to(self, device: torch.device) -> Batch:
        return Batch(
            *(None if t is None else t.to(device, non_blocking=True) for t in vars(self).values())
        )


def collate(samples: list[dict[str, torch.Tensor]]) -> Batch:
    """Samples -> one Batch (see `from_stacked`)."""
    return from_stacked({k: torch.stack([s[k] for s in samples]) for k in samples[0]})


def from_stacked(fields: dict[str, torch.Tensor]) -> Batch:
    """A micro-batch as a data loader collates it -> Batch. Either {"tokens": [b, s + 1],
    "loss_mask": [b, s]} (labels are the tokens shifted by one: mock and pre-training data) or
    packed sequences from SFTDataset with explicit "labels", "position_ids", "loss_weight"
    and "segment_ids", [b, s] each."""
    loss_mask = fields["loss_mask"].float()
    if "labels" not in fields:
        tokens = fields["tokens"]
        b, s1 = tokens.shape
        position_ids = torch.arange(s1 - 1, device=tokens.device).unsqueeze(0).expand(b, s1 - 1)
        return Batch(
            tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), loss_mask, position_ids
        )
    segment_ids = fields["segment_ids"]
    weight = fields["loss_weight"]
    return Batch(
        fields["tokens"],
        fields["labels"],
        loss_mask,
        fields["position_ids"],
        loss_weight=None if bool((weight[loss_mask > 0] == 1).all()) else weight,
        # One sample per row (or none): causal attention already keeps the padding apart.
        segment_ids=segment_ids if int(segment_ids.max()) > 0 else None,
    )


class EpochShuffled:
    """`epochs` passes over `dataset`, each in its own seeded order, as one map-style dataset.

    Item g is dataset[perm_e[g mod n]] with e = g // n and perm_e a permutation seeded by
    (seed, e). It depends on g only, so Megatron-LM's sequential sampler (which hands global
    sample indices to the DP ranks) gives the same global batches at every DP size, every
    sample once per epoch, and an exact continuation from `consumed_samples` on resume.
    With `seed=None` the epochs read the dataset in its own order.
    """

    def __init__(self, dataset, num_samples: int, seed: int | None):
        if len(dataset) == 0:
            raise ValueError("no samples to train on")
        self.dataset = dataset
        self.seed = seed
        self.epochs = max(1, -(-num_samples // len(dataset)))
        self._order: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.epochs * len(self.dataset)

    def position(self, index: int) -> int:
        """The dataset position of global sample `index`."""
        n = len(self.dataset)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range [0, {len(self)})")
        if self.seed is None:
            return index % n
        epoch = index // n
        if self._order is None or self._order[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(n, generator=gen))
        return int(self._order[1][index % n])

    def __getitem__(self, index: int):
        return self.dataset[self.position(index)]
