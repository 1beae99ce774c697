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

from dft_megatron.loss.distribution import kl_from_partials, reference_partials, topk_entropy
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

    kl: torch.Tensor | None = None
    """[s, b] (or [tokens]) KL(pi_ref || pi_theta) per token (asft, with reference logits);
    0 where ignored; None without a reference."""


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
        ctx,
        vocab_parallel_logits,
        target,
        ignored,
        weighting: TokenWeighting,
        tp_group,
        return_stats,
        entropy,
        token_scale,
        ref_logits,
    ):
        # [*, v/tp] -> fp32 [*, v/tp] (the input itself when already fp32 or fp64)
        logits = _accumulation_dtype(vocab_parallel_logits)
        vocab = logits.size(-1)
        topk_h = None
        if weighting.needs_topk_entropy:  # before the logits become exp() in place
            topk_h = topk_entropy(logits.view(-1, vocab), weighting.eaft_topk, tp_group)
        logits_max = logits.max(dim=-1)[0]  # [*]
        ref = ref_max = None
        partials = []
        if ref_logits is not None:
            ref = _accumulation_dtype(ref_logits)
            maxes = torch.stack([logits_max, ref.max(dim=-1)[0]])  # one MAX all-reduce for both
            _all_reduce(maxes, dist.ReduceOp.MAX, tp_group)
            logits_max, ref_max = maxes[0], maxes[1]
            # e^{r - M_r} in place, and its cross sum with the raw policy logits
            ref.sub_(ref_max.unsqueeze(-1)).exp_()
            cross = reference_partials(
                ref.view(-1, vocab), ref_max.reshape(-1), logits.view(-1, vocab)
            )
            partials += [ref.sum(dim=-1), cross.view(ref.shape[:-1])]
        else:
            _all_reduce(logits_max, dist.ReduceOp.MAX, tp_group)

        tp_size, tp_rank = _group_size_and_rank(tp_group)
        vocab_start, vocab_end = VocabUtility.vocab_range_from_per_partition_vocab_size(
            vocab, tp_rank, tp_size
        )
        # After this step `logits` holds exp(z - max); predicted_logits and sum_exp are
        # this shard's partial values, [*] each.
        target_mask, masked_target_1d, predicted_logits, sum_exp, exp_logits = (
            VocabParallelCrossEntropy.calculate_predicted_logits(
                logits, target, logits_max, vocab_start, vocab_end
            )
        )
        partials = [predicted_logits, sum_exp] + partials
        if return_stats and entropy:
            partials.append(_sum_exp_times_logit(exp_logits))
        partials = torch.stack(partials)  # [2 to 5, *]
        _all_reduce(partials, dist.ReduceOp.SUM, tp_group)
        predicted_logits, sum_exp = partials[0], partials[1]

        # exp_logits becomes the softmax in place; ce = log(sum_exp) - predicted_logit.
        softmax, ce = VocabParallelCrossEntropy.calculate_cross_entropy_loss(
            exp_logits, predicted_logits, sum_exp
        )
        target_prob = torch.exp(-ce).masked_fill_(ignored, 0.0)
        if topk_h is not None:
            topk_h = topk_h.view(ce.shape)
        loss, scale = weighting.terms(target_prob, ce, topk_h)
        if token_scale is not None:
            loss, scale = loss * token_scale, scale * token_scale
        loss, scale = loss.masked_fill_(ignored, 0.0), scale.masked_fill_(ignored, 0.0)
        kl = None
        if ref is not None:
            ref_sum_exp, cross = partials[2], partials[3]
            kl = kl_from_partials(cross, ref_sum_exp, ref_max, sum_exp, logits_max)
            kl = kl.masked_fill_(ignored, 0.0)
            loss = loss + weighting.kl_coeff * kl
            ref.div_(ref_sum_exp.unsqueeze(-1))  # q, in place, for backward

        ctx.save_for_backward(softmax, target_mask, masked_target_1d, scale, ref, ignored)
        ctx.kl_coeff = weighting.kl_coeff
        if not return_stats:
            return loss
        # Without the entropy (or the KL): empty placeholders (the wrapper returns None).
        entropy = torch.log(sum_exp) - partials[-1] / sum_exp if entropy else ce.new_empty(0)
        ce = ce.masked_fill_(ignored, 0.0)
        kl = kl if kl is not None else ce.new_empty(0)
        ctx.mark_non_differentiable(target_prob, entropy, ce, kl)
        return loss, target_prob, entropy, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        softmax, target_mask, masked_target_1d, scale, q, ignored = ctx.saved_tensors
        grad_2d, arange_1d, softmax_update, grad_input = (
            VocabParallelCrossEntropy.prepare_gradient_calculation_operands(softmax, target_mask)
        )
        # grad = scale * (softmax - onehot) * grad_loss, written into the softmax buffer; the
        # KL term adds lambda * grad_loss * (softmax - q).
        row_scale = grad_loss * scale
        kl_scale = None
        if q is not None:
            kl_scale = (grad_loss * ctx.kl_coeff).masked_fill(ignored, 0.0)
            row_scale = row_scale + kl_scale
        grad_input = VocabParallelCrossEntropy.calculate_gradients(
            grad_2d, arange_1d, masked_target_1d, softmax_update, grad_input, row_scale
        )
        if kl_scale is not None:
            # (s + k)(softmax - onehot) + k (onehot - q) = s (softmax - onehot) + k (softmax - q)
            grad_input.sub_(q * kl_scale.unsqueeze(-1))
            grad_2d[arange_1d, masked_target_1d] += kl_scale.view(-1) * softmax_update
        return grad_input, *([None] * 8)


def _accumulation_dtype(logits: torch.Tensor) -> torch.Tensor:
    """fp32 (a copy) for half-precision logits; fp32 and fp64 logits as they are."""
    if logits.dtype not in (torch.float32, torch.float64):
        return logits.float()
    return logits


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


def resolve_weighting(
    weighting: TokenWeighting | None,
    loss_type: str,
    dft_min_prob: float,
    dft_alpha: float,
    sft_mix: float,
) -> TokenWeighting:
    """The objective of a loss entry: `weighting` when given (then the scalar arguments must
    stay at their defaults), else the one the scalars describe."""
    if weighting is None:
        return TokenWeighting(loss_type, dft_min_prob, dft_alpha, sft_mix)
    if (loss_type, dft_min_prob, dft_alpha, sft_mix) != ("dft", 0.0, 1.0, 0.0):
        raise ValueError(
            "give the objective either as weighting=TokenWeighting(...) or as loss_type / "
            "dft_min_prob / dft_alpha / sft_mix, not both"
        )
    return weighting


def token_scale(
    token_weights: torch.Tensor | None,
    target: torch.Tensor,
    ignored: torch.Tensor,
    logits_dtype: torch.dtype,
) -> torch.Tensor | None:
    """[vocab] per-token-id weights and [*] targets (-1 where ignored) -> [*] per-token
    multipliers of the objective (0 where ignored; fp32, fp64 for fp64 logits), or None
    without a table."""
    if token_weights is None:
        return None
    if token_weights.dim() != 1:
        raise ValueError(f"token_weights must be [vocab], got shape {tuple(token_weights.shape)}")
    high = int(target.max()) if target.numel() else -1
    if high >= token_weights.numel():
        raise ValueError(
            f"token_weights has {token_weights.numel()} entries but a target id is {high}: "
            "the table must cover the model's vocabulary"
        )
    dtype = torch.float64 if logits_dtype == torch.float64 else torch.float32
    table = token_weights.to(device=target.device, dtype=dtype)
    return table[target.clamp_min(0)].masked_fill_(ignored, 0.0)


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
    weighting: TokenWeighting | None = None,
    token_weights: torch.Tensor | None = None,
    ref_logits: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, DFTLossStats]:
    """Per-token DFT (or plain, or variant) cross-entropy of logits split over the vocabulary.

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
        weighting: the objective as a `TokenWeighting` (every loss type of loss/weights.py),
            instead of loss_type / dft_min_prob / dft_alpha / sft_mix.
        token_weights: [vocab] weight per target token id (fp32; the per-token-id table),
            multiplying the objective's loss and gradient (not the KL term).
        ref_logits: asft only, required there: the reference model's logits, the same shape
            and vocabulary shard as `vocab_parallel_logits`; the loss adds kl_coeff x
            KL(pi_ref || pi_theta) per target token. Unfused only. fp32 reference logits are
            overwritten in place (they become the reference's softmax, kept for backward).

    Returns:
        fp32 per-token loss with the target's shape ([s, b] or [tokens]); with
        `return_stats`, the pair (loss, DFTLossStats).
    """
    weighting = resolve_weighting(weighting, loss_type, dft_min_prob, dft_alpha, sft_mix)
    target, ignored, tp_group = prepare_inputs(
        vocab_parallel_logits.shape, vocab_parallel_logits.dtype, target, ignore_index, tp_group
    )
    _check_reference(weighting, ref_logits, vocab_parallel_logits.shape, fused)
    inputs = (
        vocab_parallel_logits,
        target,
        ignored,
        weighting,
        tp_group,
        return_stats,
        return_entropy,
        token_scale(token_weights, target, ignored, vocab_parallel_logits.dtype),
    )
    if fused:
        from dft_megatron.loss.fused import fused_apply

        out = fused_apply(*inputs)
    else:
        out = _VocabParallelDFTCrossEntropy.apply(*inputs, ref_logits)
    if not return_stats:
        return out
    loss, target_prob, entropy, ce, kl = out
    return loss, DFTLossStats(
        target_prob, entropy if return_entropy else None, ce, kl if ref_logits is not None else None
    )


def _check_reference(
    weighting: TokenWeighting, ref_logits: torch.Tensor | None, shape: torch.Size, fused: bool
) -> None:
    if weighting.needs_reference and ref_logits is None:
        raise ValueError("loss_type 'asft' needs the reference model's logits (ref_logits)")
    if ref_logits is None:
        return
    if not weighting.needs_reference:
        raise ValueError(
            f"ref_logits given with loss_type {weighting.loss_type!r}; only asft uses them"
        )
    if fused:
        raise ValueError(
            "asft's KL term runs in the unfused loss only: drop --cross-entropy-loss-fusion"
        )
    if tuple(ref_logits.shape) != tuple(shape):
        raise ValueError(
            f"ref_logits shape {tuple(ref_logits.shape)} must equal the policy logits' "
            f"{tuple(shape)} (the same tokens and vocabulary shard)"
        )


def fused_vocab_parallel_dft_cross_entropy(
    *args, **kwargs
) -> torch.Tensor | tuple[torch.Tensor, DFTLossStats]:
    """`vocab_parallel_dft_cross_entropy` (same arguments, same returns) through compiled
    kernels (loss/fused.py, Megatron-Core's `jit_fuser`): no fp32 copy of the logits, the
    entropy in the same pass. What `--cross-entropy-loss-fusion` runs, after Megatron-Core's
    `fused_vocab_parallel_cross_entropy`."""
    return vocab_parallel_dft_cross_entropy(*args, fused=True, **kwargs)
