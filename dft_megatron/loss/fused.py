"""Fused vocab-parallel DFT cross-entropy: three compiled kernels, no fp32 vocab buffer.

The unfused path (cross_entropy.py) follows Megatron-Core's CE: an fp32 copy of the logits
becomes exp(), then the softmax, then the gradient, in place, held from forward to backward.
This path keeps nothing vocab-sized of its own. Per call, on this rank's [n, v/tp] shard:

    forward   kernel 1  m_t = max_j z_tj                                     (reads z once)
              all-reduce MAX of m                                            [n]
              kernel 2  S_t = sum_j exp(z_tj - m_t), the target's z - m (0 off this shard)
                        and, for the entropy, sum_j exp(z_tj - m_t) (z_tj - m_t)  (reads z once)
              all-reduce SUM of the stacked partials                         [2 or 3, n]
              per token  lse = m + log S, CE = lse - z_y, p = exp(-CE), w = w(p), loss = w CE
    backward  kernel 3  dz_tj = g_t w_t (exp(z_tj - m_t) / S_t - [j == y_t])  (reads z, writes dz)

Kernels 1-3 are Megatron-Core's `jit_fuser` (torch.compile, as its fused CE: C++ on CPU,
Triton on GPU). They read the logits in their own dtype and compute in fp32 (fp64 logits stay
fp64). Forward saves the logits themselves (no copy) and [n]-sized m, S and w; backward
writes the gradient *into the saved logits buffer* (one less logits-sized allocation), so the
logits passed in hold their gradient after backward. The same collectives as the unfused
path: one MAX and one SUM all-reduce per forward, none in backward. The entropy statistic
is one more reduction in kernel 2, not another pass.

`forward_partials`, `finish_forward` and `logits_grad_` are the steps; the chunked output
layer (output_layer.py) runs them per chunk of tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from megatron.core import jit
from megatron.core.tensor_parallel.utils import VocabUtility

from dft_megatron.loss.distribution import topk_entropy
from dft_megatron.loss.weights import TokenWeighting


def jit_fuser(fn):
    """Megatron-Core's `jit_fuser` (torch.compile), looked up at the first call rather than at
    import, so that Megatron-LM's `--disable-jit-fuser` (which swaps it for a no-op once the
    args are parsed) runs these kernels eagerly, as it does Megatron-Core's own."""
    compiled = None

    def call(*args):
        nonlocal compiled
        if compiled is None:
            compiled = jit.jit_fuser(fn)
        return compiled(*args)

    call.__name__, call.__doc__ = fn.__name__, fn.__doc__
    return call


@jit_fuser
def _row_max(logits: torch.Tensor) -> torch.Tensor:
    """[n, v] -> [n] max per row, in the accumulation dtype (exact: a max rounds nothing)."""
    return logits.amax(dim=-1).to(torch.float64 if logits.dtype == torch.float64 else torch.float32)


@jit_fuser
def _partials(
    logits: torch.Tensor, row_max: torch.Tensor, local_target: torch.Tensor, entropy: bool
) -> torch.Tensor:
    """[n, v], [n], [n] -> [2, n]: shifted target logit (0 off this shard) and sum of exp;
    with `entropy` a third row sum_j exp(z_j - m) (z_j - m) (one kernel per value)."""
    z = logits.to(row_max.dtype) - row_max.unsqueeze(-1)
    e = torch.exp(z)
    sum_exp = e.sum(dim=-1)
    in_shard = (local_target >= 0) & (local_target < logits.size(-1))
    picked = torch.gather(z, -1, local_target.clamp(0, logits.size(-1) - 1).unsqueeze(-1))
    target_z = torch.where(in_shard, picked.squeeze(-1), torch.zeros_like(sum_exp))
    if not entropy:
        return torch.stack([target_z, sum_exp])
    # exp(z) underflows to 0 far below the max, where z is finite: 0 * z = 0, no NaN (padded
    # columns hold the dtype's finite minimum, not -inf).
    return torch.stack([target_z, sum_exp, (e * z).sum(dim=-1)])


@jit_fuser
def _logits_grad_(
    logits: torch.Tensor,
    row_max: torch.Tensor,
    sum_exp: torch.Tensor,
    local_target: torch.Tensor,
    scale: torch.Tensor,
) -> None:
    """In place: logits [n, v] <- scale_t (softmax(z_t)_j - [j == y_t]), in the logits' dtype.

    The softmax is exp(z - m) / S as in Megatron-Core's CE (relative error ~ eps), not
    exp(z - lse), whose error grows with |lse| and shows in p - 1 near p = 1.
    """
    columns = torch.arange(logits.size(-1), device=logits.device).unsqueeze(0)
    z = logits.to(row_max.dtype) - row_max.unsqueeze(-1)
    softmax = torch.exp(z) / sum_exp.unsqueeze(-1)
    onehot = (columns == local_target.unsqueeze(-1)).to(row_max.dtype)
    logits.copy_((softmax - onehot) * scale.unsqueeze(-1))


def _all_reduce(tensor: torch.Tensor, op, tp_group: dist.ProcessGroup | None) -> None:
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(tensor, op=op, group=tp_group)


def vocab_start(vocab_shard: int, tp_group: dist.ProcessGroup | None) -> int:
    """First global vocabulary id of this rank's contiguous shard of `vocab_shard` ids."""
    if tp_group is None:
        return 0
    start, _ = VocabUtility.vocab_range_from_per_partition_vocab_size(
        vocab_shard, dist.get_rank(tp_group), dist.get_world_size(tp_group)
    )
    return start


class Partials(NamedTuple):
    """What forward keeps of one call: [n] tensors, fp32 (fp64 for fp64 logits)."""

    row_max: torch.Tensor
    """Global max logit of each row."""
    sums: torch.Tensor
    """[2 or 3, n], all-reduced: target z - max, sum of exp, (sum of exp * (z - max))."""


def forward_partials(
    logits: torch.Tensor,
    local_target: torch.Tensor,
    tp_group: dist.ProcessGroup | None,
    entropy: bool,
) -> Partials:
    """Kernels 1 and 2 with their two all-reduces, for [n, v/tp] logits.

    `local_target` holds target ids relative to this shard (anything outside [0, v/tp),
    e.g. -1 for ignored rows, contributes nothing on this rank).
    """
    row_max = _row_max(logits)
    _all_reduce(row_max, dist.ReduceOp.MAX, tp_group)
    sums = _partials(logits, row_max, local_target, entropy)
    _all_reduce(sums, dist.ReduceOp.SUM, tp_group)
    return Partials(row_max, sums)


class TokenLoss(NamedTuple):
    """Per-token results of `finish_forward`, [n] each."""

    loss: torch.Tensor
    """w * CE, 0 where ignored (fp32)."""
    cross_entropy: torch.Tensor
    """-log p, 0 where ignored."""
    target_prob: torch.Tensor
    """p, 0 where ignored."""
    entropy: torch.Tensor | None
    """Entropy of the predictive distribution (nats), None unless the partials carry it."""
    sum_exp: torch.Tensor
    """sum_j exp(z_j - max), for backward (with the partials' row max)."""
    weight: torch.Tensor
    """The objective's dL/dCE per token (the weight w(sg(p)) of a weighted CE), 0 where
    ignored, for backward."""


def finish_forward(
    partials: Partials,
    ignored: torch.Tensor,
    weighting: TokenWeighting,
    topk_entropy: torch.Tensor | None = None,
    token_scale: torch.Tensor | None = None,
) -> TokenLoss:
    """The per-token arithmetic after the all-reduces ([n]-sized, no vocabulary pass):
    the objective's loss and scale (loss/weights.py) from p and CE, times the per-token-id
    weights where given."""
    target_z, sum_exp = partials.sums[0], partials.sums[1]
    log_sum_exp = torch.log(sum_exp)
    ce = (log_sum_exp - target_z).masked_fill_(ignored, 0.0)
    target_prob = torch.exp(-ce).masked_fill_(ignored, 0.0)
    loss, scale = weighting.terms(target_prob, ce, topk_entropy)
    if token_scale is not None:
        loss, scale = loss * token_scale, scale * token_scale
    loss, scale = loss.masked_fill_(ignored, 0.0), scale.masked_fill_(ignored, 0.0)
    entropy = None
    if partials.sums.size(0) == 3:
        entropy = log_sum_exp - partials.sums[2] / sum_exp
    return TokenLoss(loss, ce, target_prob, entropy, sum_exp, scale)


def logits_grad_(
    logits: torch.Tensor,
    row_max: torch.Tensor,
    sum_exp: torch.Tensor,
    local_target: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """Kernel 3: overwrite [n, v/tp] `logits` with the gradient of sum_t scale_t CE_t."""
    _logits_grad_(logits, row_max, sum_exp, local_target, scale.to(row_max.dtype))
    return logits


class _FusedVocabParallelDFTCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits, target, ignored, weighting, tp_group, return_stats, entropy, token_scale
    ):
        # [*, v/tp] -> [n, v/tp]; target [*] global ids, -1 where ignored.
        shape = target.shape
        logits_2d = logits.view(-1, logits.size(-1))
        local_target = target.view(-1) - vocab_start(logits.size(-1), tp_group)
        ignored_1d = ignored.view(-1)
        topk_h = None
        if weighting.needs_topk_entropy:
            topk_h = topk_entropy(logits_2d, weighting.eaft_topk, tp_group)
        partials = forward_partials(logits_2d, local_target, tp_group, return_stats and entropy)
        scale_1d = None if token_scale is None else token_scale.view(-1)
        out = finish_forward(partials, ignored_1d, weighting, topk_h, scale_1d)
        ctx.save_for_backward(logits, local_target, partials.row_max, out.sum_exp, out.weight)
        loss = out.loss.view(shape)
        if not return_stats:
            return loss
        ent = out.entropy.view(shape) if out.entropy is not None else loss.new_empty(0)
        target_prob, ce = out.target_prob.view(shape), out.cross_entropy.view(shape)
        no_kl = loss.new_empty(0)
        ctx.mark_non_differentiable(target_prob, ent, ce, no_kl)
        return loss, target_prob, ent, ce, no_kl

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        logits, local_target, row_max, sum_exp, weight = ctx.saved_tensors
        logits_2d = logits.view(-1, logits.size(-1))
        scale = grad_loss.reshape(-1) * weight
        logits_grad_(logits_2d, row_max, sum_exp, local_target, scale)
        return logits, *([None] * 7)


def fused_apply(
    logits, target, ignored, weighting, tp_group, return_stats, return_entropy, token_scale
):
    """The autograd Function on validated inputs (see `fused_vocab_parallel_dft_cross_entropy`)."""
    if not logits.is_contiguous():
        logits = logits.contiguous()
    return _FusedVocabParallelDFTCrossEntropy.apply(
        logits, target, ignored, weighting, tp_group, return_stats, return_entropy, token_scale
    )
