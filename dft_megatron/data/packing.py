"""Packing samples into fixed-length sequences, and the attention that keeps them apart.

A sample of n tokens fills n - 1 positions (inputs t[:-1], labels t[1:]). `pack` puts
samples into sequences of `capacity` positions by best-fit decreasing (each sample, longest
first, goes into the fullest sequence that still has room): on SFT length distributions it
leaves well under 5% padding. A packed sequence carries a segment id per position (the
sample's index within the sequence, -1 on the padding at its end) and positions that
restart at 0 for every sample.

Attention must not cross samples:
- the local (non-TE) layer spec takes a block-diagonal causal mask, [b, 1, s, s] bool with
  True where attention is blocked (Megatron-Core's convention). Learned absolute position
  embeddings read the restarted positions; RoPE, which GPTModel applies at 0..s-1, needs
  nothing more: its attention scores depend only on the distance between query and key,
  and the mask keeps both in one sample;
- Transformer Engine takes THD packed sequences: `PackedSeqParams` with the cumulative
  sample lengths (cu_seqlens), so attention and RoPE restart per sample without a mask.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch


def pack(lengths: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Best-fit decreasing: sample indices grouped so that each group's lengths sum to at
    most `capacity` (every length must be <= capacity). Deterministic for given lengths."""
    lengths = np.asarray(lengths)
    if len(lengths) and int(lengths.max()) > capacity:
        raise ValueError(f"a sample of {int(lengths.max())} positions exceeds {capacity}")
    order = np.argsort(-lengths, kind="stable")
    room: list[int] = []  # free positions of each open sequence, ascending
    owner: list[int] = []  # the sequence each entry of `room` belongs to
    bins: list[list[int]] = []
    for i in order:
        n = int(lengths[i])
        j = bisect.bisect_left(room, n)
        if j == len(room):  # no sequence has room: open one
            bins.append([int(i)])
            left, b = capacity - n, len(bins) - 1
        else:
            left, b = room.pop(j) - n, owner.pop(j)
            bins[b].append(int(i))
        k = bisect.bisect_left(room, left)
        room.insert(k, left)
        owner.insert(k, b)
    return [np.asarray(b, dtype=np.int64) for b in bins]


def assemble(
    samples: list[tuple[list[int], list[int], float]], seq_length: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """Samples (token ids, target mask, weight) -> one sequence of `seq_length` positions:
    {"tokens", "labels", "loss_mask", "loss_weight", "position_ids", "segment_ids"}, [s]."""
    tokens = np.full(seq_length, pad_id, dtype=np.int64)
    labels = np.full(seq_length, pad_id, dtype=np.int64)
    loss_mask = np.zeros(seq_length, dtype=np.float32)
    weight = np.zeros(seq_length, dtype=np.float32)
    positions = np.zeros(seq_length, dtype=np.int64)
    segments = np.full(seq_length, -1, dtype=np.int64)
    at = 0
    for k, (ids, mask, w) in enumerate(samples):
        n = len(ids) - 1
        if at + n > seq_length:
            raise ValueError(f"samples of {at + n} positions do not fit in {seq_length}")
        ids = np.asarray(ids, dtype=np.int64)
        tokens[at : at + n] = ids[:-1]
        labels[at : at + n] = ids[1:]
        loss_mask[at : at + n] = np.asarray(mask[1:], dtype=np.float32)
        weight[at : at + n] = w
        positions[at : at + n] = np.arange(n)
        segments[at : at + n] = k
        at += n
    positions[at:] = np.arange(seq_length - at)  # the padding is a segment of its own
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(loss_mask),
        "loss_weight": torch.from_numpy(weight),
        "position_ids": torch.from_numpy(positions),
        "segment_ids": torch.from_numpy(segments),
    }


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] segment ids -> [b, 1, s, s] bool, True where query i may not see key j (j > i
    or another segment)."""
    s = segment_ids.shape[1]
    other = segment_ids.unsqueeze(2) != segment_ids.unsqueeze(1)
    future = torch.triu(torch.ones(s, s, dtype=torch.bool, device=segment_ids.device), 1)
    return (other | future).unsqueeze(1)


def packed_seq_params(segment_ids: torch.Tensor):
    """[1, s] segment ids -> Megatron-Core PackedSeqParams (THD) for Transformer Engine:
    cumulative lengths of the segments (the padding at the end counts as one)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    if segment_ids.shape[0] != 1:
        raise ValueError(
            "THD packed sequences take one packed sequence per micro-batch: use "
            "--micro-batch-size 1 (raise --global-batch-size's micro-batch count instead)"
        )
    seg = segment_ids[0]
    starts = torch.nonzero(torch.diff(seg, prepend=seg[:1] - 1)).flatten()
    cu = torch.cat([starts, torch.tensor([seg.numel()], device=seg.device)]).to(torch.int32)
    max_len = int(torch.diff(cu).max())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
    )
