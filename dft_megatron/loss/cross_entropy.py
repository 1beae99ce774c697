"""Vocab-parallel DFT cross-entropy: one fused autograd Function.

DFT (Wu et al., 2025) weights every target token's cross-entropy by the stop-gradient
of that token's own probability:

    L_t = w(sg(p_t)) * CE_t,    CE_t = log sum_j exp(z_tj) - z_t,y_t,    p_t = exp(-CE_t)

so the weight costs no extra pass over the vocabulary: it follows from the CE itself.
The gradient with respect to the logits is the CE gradient scaled per token,

    dL_t / dz_t = w_t * (softmax(z_t) - onehot(y_t)),

which backward writes into the softmax buffer saved by forward, as Megatron-Core's
`vocab_parallel_cross_entropy` does. The CE steps themselves (max shift, target
gather, sum-exp, softmax, gradient) are Megatron-Core's own `VocabParallelCrossEntropy`
static steps, so loss_type="sft" is Megatron-Core's CE computed the same way.

Tensor parallelism: each rank holds a contiguous shard [v/tp] of the vocabulary.
Collectives over `tp_group` per forward: one MAX all-reduce of the per-token logit max,
then one SUM all-reduce of a stacked [2, tokens] (or [3, tokens] with stats) tensor holding
the target logit (non-zero on the owning rank only), the sum of exp and, for the entropy,
sum_j exp(z_j) * z_j. Backward needs no collective: every rank writes its own shard.

Numerics: everything is computed in fp32 whatever the logits dtype (fp64 logits stay
fp64, for gradcheck). Memory: fp32 logits are used *in place*: after the call the tensor
passed in holds the softmax, and backward overwrites it again with the gradient; pass a
clone if the logits are needed afterwards. bf16/fp16 logits are upcast into one fp32
buffer, which then plays that role; the gradient is handed back in the logits' dtype. Beyond that
buffer only [tokens]-sized tensors are allocated, as in Megatron-Core's CE; with
`return_stats=True` the entropy adds a transient buffer of at most
`_ENTROPY_CHUNK_ELEMENTS` fp32 values.

ignore_index: such targets give exactly 0 loss and an exactly 0 gradient row, and the
weights are computed only from real targets, so a batch where every target is ignored
gives zeros, never NaN. Targets outside [0, vocab) raise a ValueError; the check reads
the [tokens] target tensor only (O(tokens)), and costs one host sync on GPU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy
from megatron.core.tensor_parallel.utils import VocabUtility

from dft_megatron.loss.weights import TokenWeighting

IGNORE_INDEX = -100
"""Default ignore_index of every DFT loss entry (torch's and Hugging Face's)."""

# Upper bound on the transient buffer of the entropy statistic (16 MiB of fp32): small
# against the [tokens, v/tp] softmax, few enough chunks that their launches do not matter.
_ENTROPY_CHUNK_ELEMENTS = 1 << 22


class DFTLossStats(NamedTuple):
    """Per-token statistics returned with `return_stats=True` (fp32, no gradient)."""

    target_prob: torch.Tensor
    """[s, b] (or [tokens]) softmax probability of the target token; 0 where ignored."""

    entropy: torch.Tensor | None
    """[s, b] (or [tokens]) entropy of the full-vocabulary predictive distribution, in nats;
    None when not asked for (`return_entropy=False`)."""

    cross_entropy: torch.Tensor
    """[s, b] (or [tokens]) plain (unweighted) cross-entropy -log p; 0 where ignored."""


def _group_size_and_rank(tp_group: dist.ProcessGroup | None) -> tuple[int, int]:
    if tp_group is None:
        return 1, 0
    return dist.get_world_size(tp_group), dist.get_rank(tp_group)


def _all_reduce(tensor: torch.Tensor, op, tp_group: dist.ProcessGroup | None) -> None:
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(tensor, op=op, group=tp_group)


def _sum_exp_times_logit(exp_logits: torch.Tensor) -> torch.Tensor:
    """[*, v] exp(z) (shifted logits z <= 0) -> [*] sum_j exp(z_j) * z_j, chunked over rows.

    z_j = log(exp(z_j)) is recovered from the buffer, so the logits need not be kept;
    xlogy gives the correct limit 0 where exp(z_j) underflowed to 0.
    """
    vocab = exp_logits.size(-1)
    rows_2d = exp_logits.view(-1, vocab)
    out = torch.empty(rows_2d.size(0), dtype=torch.float32, device=exp_logits.device)
    step = max(1, _ENTROPY_CHUNK_ELEMENTS // vocab)
    for start in range(0, rows_2d.size(0), step):
        chunk = rows_2d[start : start + step]
        out[start : start + step] = torch.special.xlogy(chunk, chunk).sum(dim=-1)
    return out.view(exp_logits.shape[:-1])


class _VocabParallelDFTCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, vocab_parallel_logits, target, ignored, weighting, tp_group, return_stats, entropy
    ):
        # [*, v/tp] -> fp32 [*, v/tp] (the input itself when already fp32 or fp64)
        logits = vocab_parallel_logits
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        logits_max = logits.max(dim=-1)[0]  # [*]
        _all_reduce(logits_max, dist.ReduceOp.MAX, tp_group)

        tp_size, tp_rank = _group_size_and_rank(tp_group)
        vocab_start, vocab_end = VocabUtility.vocab_range_from_per_partition_vocab_size(
            logits.size(-1), tp_rank, tp_size
        )
        # After this step `logits` holds exp(z - max); predicted_logits and sum_exp are
        # this shard's partial values, [*] each.
        target_mask, masked_target_1d, predicted_logits, sum_exp, exp_logits = (
            VocabParallelCrossEntropy.calculate_predicted_logits(
                logits, target, logits_max, vocab_start, vocab_end
            )
        )
        partials = [predicted_logits, sum_exp]
        if return_stats and entropy:
            partials.append(_sum_exp_times_logit(exp_logits))
        partials = torch.stack(partials)  # [2 or 3, *]
        _all_reduce(partials, dist.ReduceOp.SUM, tp_group)
        predicted_logits, sum_exp = partials[0], partials[1]

        # exp_logits becomes the softmax in place; ce = log(sum_exp) - predicted_logit.
        softmax, ce = VocabParallelCrossEntropy.calculate_cross_entropy_loss(
            exp_logits, predicted_logits, sum_exp
        )
        target_prob = torch.exp(-ce).masked_fill_(ignored, 0.0)
        weight = weighting(target_prob).masked_fill_(ignored, 0.0)
        loss = (weight * ce).masked_fill_(ignored, 0.0)

        ctx.save_for_backward(softmax, target_mask, masked_target_1d, weight)
        if not return_stats:
            return loss
        # Without the entropy: an empty placeholder (the wrapper returns None for it).
        entropy = torch.log(sum_exp) - partials[2] / sum_exp if entropy else ce.new_empty(0)
        ce = ce.masked_fill_(ignored, 0.0)
        ctx.mark_non_differentiable(target_prob, entropy, ce)
        return loss, target_prob, entropy, ce

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        softmax, target_mask, masked_target_1d, weight = ctx.saved_tensors
        grad_2d, arange_1d, softmax_update, grad_input = (
            VocabParallelCrossEntropy.prepare_gradient_calculation_operands(softmax, target_mask)
        )
        # grad = w * (softmax - onehot) * grad_loss, written into the softmax buffer.
        grad_input = VocabParallelCrossEntropy.calculate_gradients(
            grad_2d, arange_1d, masked_target_1d, softmax_update, grad_input, grad_loss * weight
        )
        return grad_input, None, None, None, None, None, None


def _default_tp_group() -> dist.ProcessGroup | None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None  # no model parallelism set up: the logits hold the whole vocabulary


def _check_targets(target: torch.Tensor, ignored: torch.Tensor, vocab_size: int) -> None:
    bad = ~ignored & ((target < 0) | (target >= vocab_size))
    if bool(bad.any()):
        positions = bad.nonzero()
        first = tuple(positions[0].tolist())
        raise ValueError(
            f"target holds {positions.size(0)} id(s) outside the vocabulary [0, {vocab_size}); "
            f"first: target[{', '.join(map(str, first))}] = {int(target[first])}. Targets "
            "must be global vocabulary ids; mark tokens without loss with ignore_index."
        )


def prepare_inputs(
    logits_shape: torch.Size,
    logits_dtype: torch.dtype,
    target: torch.Tensor,
    ignore_index: int,
    tp_group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, torch.Tensor, dist.ProcessGroup | None]:
    """Checks shared by every DFT loss entry; returns (target, ignored, tp_group).

    `target` comes back int64 with ignored positions set to -1: outside every shard, so no
    rank gathers a logit for them (ignore_index may itself be a valid id, e.g. a pad token).
    """
    if len(logits_shape) < 2:
        raise ValueError(
            "vocab_parallel_logits must be [s, b, v/tp] or [tokens, v/tp], got shape "
            f"{tuple(logits_shape)}"
        )
    if tuple(target.shape) != tuple(logits_shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal the logits shape without its "
            f"vocabulary dimension, {tuple(logits_shape[:-1])}"
        )
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer token ids, got dtype {target.dtype}")
    if not logits_dtype.is_floating_point:
        raise TypeError(f"vocab_parallel_logits must be floating point, got {logits_dtype}")
    if tp_group is None:
        tp_group = _default_tp_group()
    tp_size, _ = _group_size_and_rank(tp_group)
    target = target.long()
    ignored = target == ignore_index
    _check_targets(target, ignored, logits_shape[-1] * tp_size)
    return target.masked_fill(ignored, -1), ignored, tp_group


def vocab_parallel_dft_cross_entropy(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    loss_type: str = "dft",
    dft_min_prob: float = 0.0,
    dft_alpha: float = 1.0,
    sft_mix: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
    tp_group: dist.ProcessGroup | None = None,
    return_stats: bool = False,
    return_entropy: bool = True,
    *,
    fused: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, DFTLossStats]:
    """Per-token DFT (or plain) cross-entropy of logits split over the vocabulary.

    Args:
        vocab_parallel_logits: [s, b, v/tp] or [tokens, v/tp] logits, fp32, bf16 or fp16;
            this rank's contiguous vocabulary shard. Unfused, fp32 logits are overwritten
            in place (see the module docstring); fused, the logits are kept for backward,
            which overwrites them with their gradient.
        target: [s, b] or [tokens] int64 global vocabulary ids, the same on every TP rank.
        loss_type: "dft" (weight sg(p) and its variants) or "sft" (plain cross-entropy,
            identical to Megatron-Core's `vocab_parallel_cross_entropy`).
        dft_min_prob: weight floor c: w = max(p ** dft_alpha, c).
        dft_alpha: weight power.
        sft_mix: w = sft_mix + (1 - sft_mix) * w.
        ignore_index: targets equal to it give 0 loss and 0 gradient.
        tp_group: the tensor-parallel group the vocabulary is split over; default:
            Megatron-Core's tensor-parallel group when model parallelism is initialized,
            otherwise none (the logits hold the whole vocabulary).
        return_stats: also return `DFTLossStats` (per-token target probability, entropy
            and plain cross-entropy, for logging).
        return_entropy: with `return_stats`, whether to compute the entropy (unfused: one
            more pass over the softmax; fused: one more sum in the same pass; a third
            all-reduced row either way); False gives entropy None, and the target
            probability and CE for free.
        fused: the compiled kernels of loss/fused.py (see
            `fused_vocab_parallel_dft_cross_entropy`).

    Returns:
        fp32 per-token loss with the target's shape ([s, b] or [tokens]); with
        `return_stats`, the pair (loss, DFTLossStats).
    """
    weighting = TokenWeighting(loss_type, dft_min_prob, dft_alpha, sft_mix)
    target, ignored, tp_group = prepare_inputs(
        vocab_parallel_logits.shape, vocab_parallel_logits.dtype, target, ignore_index, tp_group
    )
    if fused:
        from dft_megatron.loss.fused import fused_apply as apply
    else:
        apply = _VocabParallelDFTCrossEntropy.apply
    out = apply(
        vocab_parallel_logits, target, ignored, weighting, tp_group, return_stats, return_entropy
    )
    if not return_stats:
        return out
    loss, target_prob, entropy, ce = out
    return loss, DFTLossStats(target_prob, entropy if return_entropy else None, ce)


def fused_vocab_parallel_dft_cross_entropy(
    *args, **kwargs
) -> torch.Tensor | tuple[torch.Tensor, DFTLossStats]:
    """`vocab_parallel_dft_cross_entropy` (same arguments, same returns) through compiled
    kernels (loss/fused.py, Megatron-Core's `jit_fuser`): no fp32 copy of the logits, the
    entropy in the same pass. What `--cross-entropy-loss-fusion` runs, after Megatron-Core's
    `fused_vocab_parallel_cross_entropy`."""
    return vocab_parallel_dft_cross_entropy(*args, fused=True, **kwargs)
