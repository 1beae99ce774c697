"""The DFT family's objectives against float64 references written from their papers' formulas.

Each reference is the objective as its source writes it, on the full vocabulary in float64,
differentiated by autograd (nothing of dft_megatron's is used):

    chord        sg(p (1 - p)) CE                                       CHORD
    eaft         sg((H_k / ln k)^alpha) CE, H_k over torch.topk's k      EAFT
    prob-power   1 - p^k, differentiated as it is (no stop-gradient)    Beyond Log Likelihood
    threshold    L * 1{sg(p) >= tau}                                    Beyond Log Likelihood
    sft mix      m CE + (1 - m) L
    token table  L * table[y]
    asft         sg(p) CE + lambda sum_j q_j (log q_j - log p_j), q = softmax(reference)   ASFT

Checked: the per-token loss and the gradient with respect to the logits (for the chunked
output layer: with respect to the hidden states and the weight), on every entry that runs the
objective (unfused, fused, chunked output layer; asft unfused only), at TP 1 in-process and TP
2 on gloo ranks, each rank holding its vocabulary shard of the same global logits.

Tolerances: fp64 inputs rtol 1e-9 / atol 1e-12 (the arithmetic is the formula's, in fp64);
fp32 inputs rtol 1e-5 with atol 1e-6 on the loss and 4 fp32 epsilons on the gradient (the
bound of tests/loss/test_cross_entropy.py, where it is explained), both times k for 1 - p^k,
which moves k times the CE's rounding.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from dft_megatron.loss import (
    TokenWeighting,
    chunked_output_layer_dft_cross_entropy,
    vocab_parallel_dft_cross_entropy,
)
from tests.dist import pool
from tests.loss.test_cross_entropy import peaked_logits, shard

VOCAB, SEQ, BATCH, HIDDEN = 96, 6, 3, 16
TABLE = torch.linspace(0.25, 2.0, VOCAB, dtype=torch.float64)  # a weight per token id

CASES = {
    "chord": dict(loss_type="chord"),
    "chord_threshold": dict(loss_type="chord", prob_threshold=0.01),
    "eaft_k5": dict(loss_type="eaft", eaft_topk=5),
    "eaft_k64_alpha0.5": dict(loss_type="eaft", eaft_topk=64, eaft_alpha=0.5),  # k > v/tp
    "eaft_k200": dict(loss_type="eaft", eaft_topk=200, eaft_alpha=2.0),  # k > the vocabulary
    "eaft_mix": dict(loss_type="eaft", eaft_topk=10, sft_mix=0.4),
    "neg_p": dict(loss_type="prob-power"),
    "neg_p10": dict(loss_type="prob-power", prob_power_k=10.0),
    "neg_p2_threshold": dict(loss_type="prob-power", prob_power_k=2.0, prob_threshold=0.1),
    "dft_threshold": dict(loss_type="dft", prob_threshold=0.05),
    "dft_mix_table": dict(loss_type="dft", sft_mix=0.3, table=True),
    "sft_table": dict(loss_type="sft", table=True),
    "asft": dict(loss_type="asft", kl_coeff=0.1),
    "asft_table_alpha": dict(loss_type="asft", kl_coeff=0.5, dft_alpha=0.5, table=True),
}
ENTRIES = ("unfused", "fused", "chunked")


def weighting_of(case: str) -> tuple[TokenWeighting, torch.Tensor | None]:
    kw = dict(CASES[case])
    table = TABLE if kw.pop("table", False) else None
    return TokenWeighting(**kw), table


def reference_loss(z, target, case, ref_logits=None, ignore_index=-100):
    """Float64 per-token loss of `case` on full-vocabulary logits z (differentiable)."""
    kw = CASES[case]
    kind = kw["loss_type"]
    ignored = target == ignore_index
    log_p = torch.log_softmax(z, dim=-1)
    ce = -log_p.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    p = torch.exp(-ce).detach()
    if kind == "sft":
        loss = ce
    elif kind in ("dft", "asft"):
        loss = p ** kw.get("dft_alpha", 1.0) * ce
    elif kind == "chord":
        loss = p * (1 - p) * ce
    elif kind == "eaft":
        k = kw["eaft_topk"]
        top = z.detach().topk(min(k, z.size(-1)), dim=-1).values
        q = torch.softmax(top, dim=-1)
        entropy = -(q * torch.log(q)).sum(-1)
        loss = (entropy / math.log(k)) ** kw.get("eaft_alpha", 1.0) * ce
    elif kind == "prob-power":
        loss = 1 - torch.exp(-ce) ** kw.get("prob_power_k", 1.0)
    if kw.get("prob_threshold", 0.0) > 0:
        loss = loss * (p >= kw["prob_threshold"])
    mix = kw.get("sft_mix", 0.0)
    loss = mix * ce + (1 - mix) * loss
    if kw.get("table"):
        loss = loss * TABLE[target.clamp_min(0)]
    if kind == "asft":
        q = torch.softmax(ref_logits, dim=-1)
        kl = (q * (torch.log_softmax(ref_logits, dim=-1) - log_p)).sum(-1)
        loss = loss + kw["kl_coeff"] * kl
    return torch.where(ignored, 0.0, loss)


def _inputs(seed: int):
    """Hidden states, output weight (fp64) whose logits are peaked as in test_cross_entropy,
    the targets (every fifth ignored), the reference's logits and an upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    logits, target = peaked_logits((SEQ, BATCH), VOCAB, seed, ignore_index=-100)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=g, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64) * 0.7
    ref_logits, _ = peaked_logits((SEQ, BATCH), VOCAB, seed + 1)
    grad_out = torch.rand(SEQ, BATCH, generator=g, dtype=torch.float64) + 0.5
    return logits, hidden, weight, target, ref_logits, grad_out


def check(case, entry, dtype, seed, tp_group=None):
    """Ours on this rank's shard vs the float64 reference: loss, and the gradient's shard."""
    tp = 1 if tp_group is None else dist.get_world_size(tp_group)
    rank = 0 if tp_group is None else dist.get_rank(tp_group)
    weighting, table = weighting_of(case)
    logits, hidden, weight, target, ref_logits, grad_out = _inputs(seed)
    if entry == "chunked":  # the logits of these hidden states and weights
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        want = reference_loss(h @ w.t(), target, case, ref_logits)
        (want * grad_out).sum().backward()
        want_grads = (h.grad, shard(w.grad.t(), tp, rank).t())
        h_ours = hidden.to(dtype).requires_grad_()
        w_ours = shard(weight.t(), tp, rank).t().to(dtype).contiguous().requires_grad_()
        loss = chunked_output_layer_dft_cross_entropy(
            h_ours,
            w_ours,
            target,
            weighting=weighting,
            token_weights=table,
            tp_group=tp_group,
            chunk_tokens=5,
        )
        (loss * grad_out.to(loss.dtype)).sum().backward()
        got_grads = (h_ours.grad, w_ours.grad)
    else:
        z = logits.clone().requires_grad_()
        want = reference_loss(z, target, case, ref_logits)
        (want * grad_out).sum().backward()
        want_grads = (shard(z.grad, tp, rank),)
        z_ours = shard(logits, tp, rank).to(dtype).requires_grad_()
        ref = shard(ref_logits, tp, rank).to(dtype) if weighting.needs_reference else None
        loss = vocab_parallel_dft_cross_entropy(
            z_ours.clone(),
            target,
            weighting=weighting,
            token_weights=table,
            tp_group=tp_group,
            ref_logits=ref,
            fused=entry == "fused",
        )
        (loss * grad_out.to(loss.dtype)).sum().backward()
        got_grads = (z_ours.grad,)
    loss_tol, grad_tol = _tolerances(dtype, grad_out, CASES[case].get("prob_power_k", 1.0))
    torch.testing.assert_close(loss.double(), want.detach(), **loss_tol)
    for got, ref_grad in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got.double(), ref_grad, **grad_tol)


def _tolerances(dtype, grad_out, k):
    if dtype == torch.float64:
        return dict(rtol=1e-9, atol=1e-12), dict(rtol=1e-9, atol=1e-12)
    # 1 - p^k moves k times the CE's fp32 rounding: the loss's atol grows with k.
    eps = torch.finfo(torch.float32).eps
    return dict(rtol=1e-5, atol=1e-6 * max(1.0, k)), dict(
        rtol=1e-5, atol=4 * eps * float(grad_out.max()) * max(1.0, k)
    )


def cases_for(entry):
    return [c for c in CASES if entry == "unfused" or CASES[c]["loss_type"] != "asft"]


ALL = [(c, e) for e in ENTRIES for c in cases_for(e)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case,entry", ALL, ids=[f"{c}-{e}" for c, e in ALL])
def test_matches_float64_reference(case, entry, dtype):
    check(case, entry, dtype, seed=7)


def test_prob_power_gradient_is_k_times_the_weighted_ce_gradient():
    """-p^k is not DFT with weight p^k: its gradient is k p^k times CE's (k = 1: DFT's)."""
    logits, _, _, target, _, _ = _inputs(3)
    grads = {}
    for name, kw in {
        "neg_p3": dict(loss_type="prob-power", prob_power_k=3.0),
        "dft_alpha3": dict(loss_type="dft", dft_alpha=3.0),
        "neg_p": dict(loss_type="prob-power"),
        "dft": dict(loss_type="dft"),
    }.items():
        z = logits.clone().requires_grad_()
        loss = vocab_parallel_dft_cross_entropy(z * 1.0, target, weighting=TokenWeighting(**kw))
        loss.sum().backward()
        grads[name] = z.grad
    torch.testing.assert_close(grads["neg_p3"], 3 * grads["dft_alpha3"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads["neg_p"], grads["dft"], rtol=1e-12, atol=1e-14)


def test_asft_kl_is_logged_apart_and_vanishes_against_itself():
    """The stats carry KL(pi_ref || pi) per token; a reference equal to the policy gives KL 0
    and the DFT loss and gradient unchanged."""
    logits, _, _, target, ref_logits, _ = _inputs(5)
    asft = TokenWeighting("asft", kl_coeff=0.3)
    loss, stats = vocab_parallel_dft_cross_entropy(
        logits.clone(), target, weighting=asft, ref_logits=ref_logits.clone(), return_stats=True
    )
    q = torch.softmax(ref_logits, -1)
    kl = (q * (torch.log_softmax(ref_logits, -1) - torch.log_softmax(logits, -1))).sum(-1)
    want = torch.where(target == -100, 0.0, kl)
    torch.testing.assert_close(stats.kl, want, rtol=1e-9, atol=1e-12)
    z1 = logits.clone().requires_grad_()
    z2 = logits.clone().requires_grad_()
    same = vocab_parallel_dft_cross_entropy(
        z1 * 1.0, target, weighting=asft, ref_logits=logits.clone()
    )
    dft = vocab_parallel_dft_cross_entropy(z2 * 1.0, target)
    same.sum().backward()
    dft.sum().backward()
    torch.testing.assert_close(same, dft, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(loss_type="chord", dft_alpha=2.0), "dft_alpha only applies to loss_type dft / asft"),
        (dict(loss_type="dft", eaft_topk=5), "eaft_topk only applies to loss_type eaft"),
        (dict(loss_type="asft"), "needs kl_coeff > 0"),
        (dict(loss_type="eaft", eaft_topk=1), "eaft_topk must be >= 2"),
        (dict(loss_type="prob-power", prob_power_k=0.0), "prob_power_k must be > 0"),
        (dict(loss_type="dft", prob_threshold=1.0), r"prob_threshold must be in \[0, 1\)"),
        (dict(loss_type="sft", prob_threshold=0.1), "prob_threshold only applies"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenWeighting(**kwargs)


def test_reference_logits_are_checked():
    logits, _, weight, target, ref_logits, _ = _inputs(9)
    asft = TokenWeighting("asft", kl_coeff=0.1)
    with pytest.raises(ValueError, match="needs the reference model's logits"):
        vocab_parallel_dft_cross_entropy(logits.clone(), target, weighting=asft)
    with pytest.raises(ValueError, match="must equal the policy logits'"):
        vocab_parallel_dft_cross_entropy(
            logits.clone(), target, weighting=asft, ref_logits=ref_logits[..., :10]
        )
    with pytest.raises(ValueError, match="drop --cross-entropy-loss-fusion"):
        vocab_parallel_dft_cross_entropy(
            logits.clone(), target, weighting=asft, ref_logits=ref_logits, fused=True
        )
    with pytest.raises(ValueError, match="drop --dft-chunked-output-layer"):
        chunked_output_layer_dft_cross_entropy(
            torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.float64), weight, target, weighting=asft
        )
    with pytest.raises(ValueError, match="only asft uses them"):
        vocab_parallel_dft_cross_entropy(logits.clone(), target, ref_logits=ref_logits)
    with pytest.raises(ValueError, match="the table must cover the model's vocabulary"):
        vocab_parallel_dft_cross_entropy(logits.clone(), target, token_weights=TABLE[:10])


def _tp_worker(rank, world_size):
    group = dist.new_group(list(range(world_size)))
    for i, (case, entry) in enumerate(ALL):
        for dtype in (torch.float64, torch.float32):
            try:
                check(case, entry, dtype, seed=40 + i, tp_group=group)
            except AssertionError as e:
                raise AssertionError(f"{case} {entry} {dtype}: {e}") from None


def test_tensor_parallel_2():
    pool(2).run(_tp_worker)
