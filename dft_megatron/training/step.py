"""forward_step and loss_func for Megatron-LM's trainer (the shape of `pretrain_gpt.py`'s).

`forward_step(data_iterator, model)` reads one micro-batch (every rank reads its own copy
through Megatron-LM's sampler; context-parallel ranks keep their zigzag share), builds the
attention for packed samples (a block-diagonal causal mask on the local spec, THD
`PackedSeqParams` on Transformer Engine), runs the model with labels and returns
`(per-token loss [b, s], partial(loss_func, ...))`.

`loss_func` returns Megatron-LM's per-token-loss triple `(loss sum, target-token count,
report)`: with `--calculate-per-token-loss` (on by default here) the trainer divides the
gradients by the token count of the whole global batch, over micro-batches and DP x CP, so
the objective is the global token mean of the (sample-weighted) DFT loss whatever the
layout. The report holds [sum, count] pairs that Megatron-LM averages over the global
batch and prints in its iteration line: "lm loss" (the loss optimized: DFT's), "ce loss",
"target p" and the four target-probability regimes, all free by-products of the loss, and
for asft "kl" (its KL term without the coefficient). The
same per-token values go into `DFTMetrics` (histogram, metrics JSONL, the "[dft]" line; see
training/metrics.py), with the entropy on the iterations that are logged and in validation
(it costs one more pass over the softmax, so not on every step).
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.utils import unwrap_model

from dft_megatron.data.batches import Batch, from_stacked
from dft_megatron.data.packing import block_causal_mask, packed_seq_params
from dft_megatron.loss.cross_entropy import IGNORE_INDEX
from dft_megatron.training.metrics import REGIME_EDGES, REGIME_NAMES, DFTMetrics


def get_batch(data_iterator, device: torch.device) -> Batch:
    batch = from_stacked(next(data_iterator)).to(device)
    if parallel_state.get_context_parallel_world_size() > 1:
        batch = batch.on_context_parallel_rank(parallel_state.get_context_parallel_group())
    return batch


SPIKY_LOSS_FACTOR = 10  # pretrain_gpt.py's: 10x the largest loss seen so far


def _validate_loss(loss_sum: torch.Tensor, check_nan: bool) -> None:
    """pretrain_gpt.py's checks through Megatron-LM's rerun state machine, before the DP
    all-reduce: NaN and Inf (--check-for-nan-in-loss-and-grad, on by default; fatal: rerun,
    then save and exit) and --check-for-spiky-loss (logged, not fatal)."""
    from megatron.core.rerun_state_machine import get_rerun_state_machine
    from megatron.training import get_args

    machine = get_rerun_state_machine()
    if check_nan:
        for reject, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            machine.validate_result(
                result=loss_sum,
                rejection_func=reject,
                message=f"found {what} in local forward loss calculation",
                tolerance=0.0,  # the forward pass is deterministic
                fatal=True,
            )
    if getattr(get_args(), "check_for_spiky_loss", False):
        machine.validate_result(
            result=loss_sum,
            rejection_func=partial(
                machine.is_unexpectedly_large, threshold=SPIKY_LOSS_FACTOR, context="loss"
            ),
            message="Spiky loss",
            tolerance=0.0,
            fatal=False,
        )


def loss_func(batch: Batch, model, metrics: DFTMetrics | None, check_nan: bool, output_tensor):
    """Micro-batch loss sum, token count and report (see the module docstring)."""
    mask = batch.loss_mask.float()
    loss = output_tensor.float()
    if batch.loss_weight is not None:
        loss = loss * batch.loss_weight
    loss_sum = (loss * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    _validate_loss(loss_sum, check_nan)
    stats = unwrap_model(model).last_loss_stats
    m = mask.bool()
    count = num_tokens.float().view(1)

    def pair(total: torch.Tensor) -> torch.Tensor:
        return torch.cat([total.detach().float().view(1), count])

    p = stats.target_prob[m]
    regimes = torch.bucketize(p, torch.tensor(REGIME_EDGES, device=p.device, dtype=p.dtype))
    report = {
        "lm loss": pair(loss_sum),
        "ce loss": pair(stats.cross_entropy[m].sum()),
        "target p": pair(p.sum()),
    }
    counts = torch.bincount(regimes, minlength=len(REGIME_NAMES)).float()
    for name, c in zip(REGIME_NAMES, counts, strict=True):
        report[name] = pair(c)
    if stats.kl is not None:  # asft: KL(reference || policy), without its coefficient
        report["kl"] = pair(stats.kl[m].sum())
    # Only for what is logged (the entropy is there then); one copy per DP x CP rank (TP
    # ranks hold the same values), so the world SUM is the total.
    net = unwrap_model(model)
    first_tp_rank = parallel_state.get_tensor_model_parallel_rank() == 0
    if metrics is not None and net.collect_entropy and first_tp_rank:
        metrics.add(loss, stats, mask, training=net.training)
    return loss_sum, num_tokens, report


def _apply_schedule(net, metrics: DFTMetrics | None) -> None:
    """--sft-mix-decay-iters: the objective's SFT mix at the iteration being computed (also
    in validation, which reports the objective of the iteration it follows)."""
    if net.sft_mix_schedule is None:
        return
    from megatron.training import get_args

    mix = net.sft_mix_schedule(getattr(get_args(), "curr_iteration", 0))
    net.loss_weighting = net.loss_weighting.with_sft_mix(mix)
    if metrics is not None:
        metrics.sft_mix = mix


def forward_step(metrics: DFTMetrics | None, check_nan: bool, data_iterator, model):
    """`pretrain(forward_step_func=partial(forward_step, metrics, check_nan))`."""
    device = next(model.parameters()).device
    batch = get_batch(data_iterator, device)
    _apply_schedule(unwrap_model(model), metrics)
    # The entropy costs one more pass over the softmax: only where it is logged.
    unwrap_model(model).collect_entropy = metrics is None or metrics.wants_entropy(model.training)
    attention_mask, packed = None, None
    if batch.segment_ids is not None:  # packed samples: attention stays inside each
        if unwrap_model(model).config.transformer_impl == "transformer_engine":
            packed = packed_seq_params(batch.segment_ids)
        else:
            attention_mask = block_causal_mask(batch.segment_ids)
    # Tokens outside the loss mask get the loss's ignore_index: no loss and no gradient in the
    # model either (loss_func masks them anyway), and the chunked output layer then computes no
    # logits for them at all (prompt tokens of SFT data).
    labels = batch.labels.masked_fill(batch.loss_mask == 0, IGNORE_INDEX)
    output = model(
        batch.tokens,
        batch.position_ids,
        attention_mask,
        labels=labels,
        packed_seq_params=packed,
    )  # [b, s] per-token loss on the last stage, hidden states elsewhere
    return output, partial(loss_func, batch, model, metrics, check_nan)
