"""The output layer and the DFT loss over chunks of tokens: the logits never exist whole.

`chunked_output_layer_dft_cross_entropy(hidden, weight, target, ...)` computes what
`vocab_parallel_dft_cross_entropy(hidden @ weight.T, target, ...)` computes, and its gradients
with respect to `hidden` and `weight`, holding at most `chunk_tokens` rows of logits
[chunk, v/tp] at a time instead of all [tokens, v/tp] (plus, unfused, an fp32 copy of them).

Algorithm (rows = the tokens whose target is not ignored; the others get no logits at all):

    forward   per chunk of rows: logits = x_c W^T -> fused DFT loss forward (loss/fused.py:
              the MAX and the SUM all-reduce) -> keep [chunk]-sized m, S, w; free the logits
    backward  per block of vocabulary columns [v_b] (all rows; as many logits as a chunk):
              logits = x W_b^T again -> dz = g w (softmax - onehot), in place (fused
              kernel 3, with the forward's m and S) -> dx += dz W_b, dW_b = dz^T x; free

Backward recomputes the logits (one more [tokens, h] x [h, v/tp] GEMM than the unfused
path) rather than computing the gradients in forward: forward cannot know the upstream
gradient per token (Megatron-LM's loss function applies the loss mask, the sample weights
and the loss scale after the model), and holding a weight-sized gradient from forward to
backward would cost, per micro-batch in flight, what the chunking saves.

Tensor parallelism, as Megatron-Core's ColumnParallelLinear: without sequence parallelism the
input enters through `copy_to_tensor_model_parallel_region` (its gradient all-reduced over TP
in backward); with sequence parallelism, [s/tp, b, h] is all-gathered along the sequence by
`gather_from_sequence_parallel_region` (reduce-scattered in backward). Per chunk, the loss adds
one MAX and one SUM all-reduce of [chunk]-sized tensors in forward, none in backward.

Weight gradient: accumulated in fp32 over chunks. Under Megatron-Core's DDP (the weight has a
`main_grad` buffer) it is added straight into `main_grad`, and the Function returns the dummy
gradient Megatron-Core's own linear layers return with gradient-accumulation fusion (zeros
for a weight shared with the embedding on the same stage, else uninitialized), with
`grad_added_to_main_grad` set, so DDP's hook adds only what else flows into the weight. Without
`main_grad`, the fp32 sum is returned in the weight's dtype.

Padded vocabulary: columns at or above `unpadded_vocab_size` get the dtype's finite minimum
before the loss, as DFTGPTModel's output-layer hook does (exactly 0 probability, 0 gradient).

Numerics: the logits are in the GEMM's dtype (bf16 in a bf16 model, as the output layer
produces them); the loss and its gradient use fp32 arithmetic (loss/fused.py). Statistics of
ignored rows (target p, CE, entropy) are 0: their logits are not computed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from dft_megatron.loss.cross_entropy import (
    IGNORE_INDEX,
    DFTLossStats,
    prepare_inputs,
    resolve_weighting,
    token_scale,
)
from dft_megatron.loss.distribution import topk_entropy
from dft_megatron.loss.fused import finish_forward, forward_partials, logits_grad_, vocab_start
from dft_megatron.loss.weights import TokenWeighting

DEFAULT_CHUNK_TOKENS = 512
"""Rows of logits per chunk: [512, v/tp] bf16 is 148 MiB / TP at Qwen2.5's 152k vocabulary
(docs/LOG.md, 2026-12-01: 1024 held 7x less than the unfused path, 512 12x, at about the
same time once backward went over vocabulary blocks)."""


def _chunk_logits(x: torch.Tensor, weight: torch.Tensor, valid_columns: int) -> torch.Tensor:
    """[c, h] x [v/tp, h] -> [c, v/tp] logits, padded columns at the dtype's finite minimum."""
    logits = torch.matmul(x, weight.t())
    if valid_columns < logits.size(-1):
        logits[:, valid_columns:].fill_(torch.finfo(logits.dtype).min)
    return logits


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc in fp32 (or fp64): in place where the dtypes agree, else through a
    product in the GEMM's dtype (rounded once, then added)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(torch.matmul(a, b))


class _ChunkedOutputLayerDFT(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x,  # [n, h], the (gathered) hidden states, one row per token
        weight,  # [v/tp, h]
        target,  # [n] global ids, -1 where ignored
        ignored,  # [n] bool
        weighting: TokenWeighting,
        tp_group,
        chunk_tokens: int,
        valid_columns: int,
        return_stats: bool,
        entropy: bool,
        token_scale,  # [n] per-token-id weights, or None
    ):
        n = x.size(0)
        rows = (~ignored).nonzero().squeeze(1)  # the same on every TP rank, as the targets
        x_rows = x.index_select(0, rows)
        local_target = target.index_select(0, rows) - vocab_start(weight.size(0), tp_group)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        m = rows.numel()
        row_max, sum_exp, w = (x.new_empty(m, dtype=acc) for _ in range(3))
        loss, ce, prob, ent = (x.new_zeros(n, dtype=acc) for _ in range(4))
        for start in range(0, m, chunk_tokens):
            part = slice(start, start + chunk_tokens)
            logits = _chunk_logits(x_rows[part], weight, valid_columns)
            topk_h = None
            if weighting.needs_topk_entropy:
                topk_h = topk_entropy(logits, weighting.eaft_topk, tp_group)
            partials = forward_partials(logits, local_target[part], tp_group, entropy)
            del logits
            none_ignored = torch.zeros_like(partials.row_max, dtype=torch.bool)
            chunk_scale = None if token_scale is None else token_scale[rows[part]]
            out = finish_forward(partials, none_ignored, weighting, topk_h, chunk_scale)
            row_max[part], sum_exp[part], w[part] = partials.row_max, out.sum_exp, out.weight
            index = rows[part]
            loss[index], ce[index], prob[index] = out.loss, out.cross_entropy, out.target_prob
            if out.entropy is not None:
                ent[index] = out.entropy
        ctx.save_for_backward(x_rows, weight, rows, local_target, row_max, sum_exp, w)
        ctx.chunk_tokens, ctx.valid_columns, ctx.n = chunk_tokens, valid_columns, n
        if not return_stats:
            return loss
        ctx.mark_non_differentiable(prob, ent, ce)
        return loss, prob, ent, ce

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        x_rows, weight, rows, local_target, row_max, sum_exp, w = ctx.saved_tensors
        scale = grad_loss.index_select(0, rows).to(w.dtype) * w
        m, shard = x_rows.size(0), weight.size(0)
        wgrad = None
        if ctx.needs_input_grad[1]:
            wgrad = getattr(weight, "main_grad", None)
            if wgrad is None:
                wgrad = torch.zeros_like(weight, dtype=w.dtype)
        # Over blocks of vocabulary columns, all rows at once, with the same logits budget as a
        # forward chunk: each block's weight gradient is then one GEMM, added to the fp32
        # accumulator once (over token chunks, every chunk would add a weight-sized product).
        # The hidden-state gradient, [rows, h], accumulates over blocks in fp32.
        block = max(1, ctx.chunk_tokens * shard // max(m, 1))
        grad_rows = torch.zeros_like(x_rows, dtype=w.dtype)
        for start in range(0, shard if m else 0, block):
            cols = slice(start, start + block)
            w_block = weight[cols]
            valid = min(max(ctx.valid_columns - start, 0), w_block.size(0))
            logits = _chunk_logits(x_rows, w_block, valid)
            grad_logits = logits_grad_(logits, row_max, sum_exp, local_target - start, scale)
            _accumulate(grad_rows, grad_logits, w_block)
            if wgrad is not None:
                _accumulate(wgrad[cols], grad_logits.t(), x_rows)
            del logits, grad_logits
        grad_x = x_rows.new_zeros(ctx.n, x_rows.size(-1))
        grad_x.index_copy_(0, rows, grad_rows.to(x_rows.dtype))
        return grad_x, _weight_grad(weight, wgrad), *([None] * 9)


def _weight_grad(weight: torch.Tensor, wgrad: torch.Tensor | None) -> torch.Tensor | None:
    """What backward returns for the weight (see the module docstring)."""
    if wgrad is None:
        return None
    if getattr(weight, "main_grad", None) is not wgrad:
        return wgrad.to(weight.dtype)
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True
    if getattr(weight, "zero_out_wgrad", False):
        return torch.zeros_like(weight)
    return torch.empty_like(weight)


def chunked_output_layer_dft_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    loss_type: str = "dft",
    dft_min_prob: float = 0.0,
    dft_alpha: float = 1.0,
    sft_mix: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
    tp_group: dist.ProcessGroup | None = None,
    sequence_parallel: bool = False,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    unpadded_vocab_size: int | None = None,
    return_stats: bool = False,
    return_entropy: bool = True,
    *,
    weighting: TokenWeighting | None = None,
    token_weights: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, DFTLossStats]:
    """Per-token DFT loss of `hidden @ weight.T` without materializing the logits.

    Args:
        hidden: [s, b, h] final hidden states (after the final norm), or [s/tp, b, h] with
            `sequence_parallel`; the GEMM runs in its dtype.
        weight: [v/tp, h] this rank's shard of the output layer (or the tied embedding).
        target: [s, b] global vocabulary ids, the same on every TP rank.
        loss_type, dft_min_prob, dft_alpha, sft_mix, ignore_index, return_stats,
            return_entropy: as in `vocab_parallel_dft_cross_entropy`.
        tp_group: the tensor-parallel group (default: Megatron-Core's, when initialized).
        sequence_parallel: `hidden` is split along the sequence over `tp_group`.
        chunk_tokens: rows of logits computed at a time (> 0).
        unpadded_vocab_size: the tokenizer's vocabulary (global); columns at or above it
            (padding to a multiple of TP) take no part. Default: all v/tp x TP columns.
        weighting, token_weights: as in `vocab_parallel_dft_cross_entropy` (every loss type
            but asft, whose reference logits this path does not compute).

    Returns:
        fp32 per-token loss [s, b]; with `return_stats`, (loss, DFTLossStats), each [s, b].
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if hidden.dim() != 3 or weight.dim() != 2 or hidden.size(-1) != weight.size(-1):
        raise ValueError(
            f"hidden must be [s, b, h] and weight [v/tp, h] with the same h; got hidden "
            f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}"
        )
    weighting = resolve_weighting(weighting, loss_type, dft_min_prob, dft_alpha, sft_mix)
    if weighting.needs_reference:
        raise ValueError(
            "asft's KL term needs the reference's logits, which the chunked output layer does "
            "not compute: drop --dft-chunked-output-layer"
        )
    shard = weight.size(0)
    target, ignored, tp_group = prepare_inputs(
        torch.Size((*target.shape, shard)), weight.dtype, target, ignore_index, tp_group
    )
    scale = token_scale(token_weights, target, ignored, weight.dtype)
    tp = 1 if tp_group is None else dist.get_world_size(tp_group)
    expected = target.size(0) // tp if sequence_parallel else target.size(0)
    if hidden.shape[:2] != (expected, target.size(1)):
        raise ValueError(
            f"hidden {tuple(hidden.shape)} does not fit target {tuple(target.shape)}"
            + (f" split over TP {tp} along the sequence" if sequence_parallel else "")
        )
    start = vocab_start(shard, tp_group)
    vocab = shard * tp if unpadded_vocab_size is None else unpadded_vocab_size
    valid_columns = min(max(vocab - start, 0), shard)

    if tp > 1:
        if sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, group=tp_group)
        else:
            hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    s, b = target.shape
    out = _ChunkedOutputLayerDFT.apply(
        hidden.reshape(s * b, -1),
        weight,
        target.view(-1),
        ignored.view(-1),
        weighting,
        tp_group,
        chunk_tokens,
        valid_columns,
        return_stats,
        return_stats and return_entropy,
        None if scale is None else scale.view(-1),
    )
    if not return_stats:
        return out.view(s, b)
    loss, prob, ent, ce = (t.view(s, b) for t in out)
    return loss, DFTLossStats(prob, ent if return_entropy else None, ce)
