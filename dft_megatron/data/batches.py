"""From a map-style dataset to this rank's micro-batches of one global batch.

Global batch k holds samples [k * G, (k + 1) * G) of the dataset (G = global batch
size; the dataset's own order, shuffled or not, is its business). Data-parallel rank r
takes the r-th contiguous slice of G / DP samples and cuts it into micro-batches, so the
set of samples in a step and the token-mean loss over it are the same at every layout.
Resuming from `consumed_samples` continues with the next global batch. Past the end of
the dataset the sampler wraps to the start (training epochs) or, with `wrap=False` (one
evaluation pass), fills the last global batch with samples that carry no loss. With a
`shuffle_seed`, epoch e reads the dataset in the order of a permutation seeded by
(seed, e): global sample g is dataset[perm_e[g mod n]], e = g // n. It depends on g only,
so every DP size and every resume point sees the same sequence of samples.
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
    """Samples -> one Batch. A sample is either {"tokens": [s + 1], "loss_mask": [s]} (labels
    are the tokens shifted by one) or a packed sequence from SFTDataset with explicit
    "labels", "position_ids", "loss_weight" and "segment_ids", [s] each."""
    loss_mask = torch.stack([s["loss_mask"] for s in samples]).float()
    if "labels" not in samples[0]:
        tokens = torch.stack([s["tokens"] for s in samples])
        b, s1 = tokens.shape
        position_ids = torch.arange(s1 - 1).unsqueeze(0).expand(b, s1 - 1)
        return Batch(
            tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), loss_mask, position_ids
        )

    def stack(key):
        return torch.stack([s[key] for s in samples])

    segment_ids = stack("segment_ids")
    weight = stack("loss_weight")
    return Batch(
        stack("tokens"),
        stack("labels"),
        loss_mask,
        stack("position_ids"),
        loss_weight=None if bool((weight[loss_mask > 0] == 1).all()) else weight,
        # One sample per row (or none): causal attention already keeps the padding apart.
        segment_ids=segment_ids if int(segment_ids.max()) > 0 else None,
    )


class GlobalBatchSampler:
    """This DP rank's micro-batches of each global batch, in order."""

    def __init__(
        self,
        dataset,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        consumed_samples: int = 0,
        wrap: bool = True,
        shuffle_seed: int | None = None,
    ):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"--global-batch-size ({global_batch_size}) must be a multiple of "
                f"--micro-batch-size ({micro_batch_size}) x data-parallel size ({dp_size})"
            )
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples
        self.wrap = wrap
        self.shuffle_seed = shuffle_seed
        self._epoch_order: tuple[int, torch.Tensor] | None = None

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def next_global_batch(self) -> list[Batch]:
        """The micro-batches of the next global batch for this rank; advances the count."""
        per_rank = self.global_batch_size // self.dp_size
        start = self.consumed_samples + self.dp_rank * per_rank
        self.consumed_samples += self.global_batch_size
        samples = [self._sample(start + i) for i in range(per_rank)]
        mbs = self.micro_batch_size
        return [collate(samples[j : j + mbs]) for j in range(0, per_rank, mbs)]

    def _sample(self, index: int) -> dict[str, torch.Tensor]:
        n = len(self.dataset)
        if index < n or self.wrap:
            return self.dataset[self._position(index, n)]
        # Past the end of a single pass: a filler that carries no loss.
        filler = dict(self.dataset[0])
        filler["loss_mask"] = torch.zeros_like(filler["loss_mask"])
        return filler

    def _position(self, index: int, n: int) -> int:
        """Dataset position of global sample `index` (see the module docstring)."""
        if self.shuffle_seed is None:
            return index % n
        epoch = index // n
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            gen = torch.Generator().manual_seed(self.shuffle_seed * 1_000_003 + epoch)
            self._epoch_order = (epoch, torch.randperm(n, generator=gen))
        return int(self._epoch_order[1][index % n])
