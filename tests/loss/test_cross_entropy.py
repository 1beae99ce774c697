"""vocab_parallel_dft_cross_entropy against a float64 reference of the formula.

Reference: the loss and its gradient computed in float64 with plain torch on the full
vocabulary, L_t = w(sg(p_t)) * CE_t with the weight detached, from the same (dtype-rounded)
logits the function sees. Logits are peaked so that target probabilities span 1e-6 to
1 - 1e-6.

Tolerances:
- fp32 logits: rtol 1e-5 on loss and gradient, plus atol 1e-6 on the loss and 4 fp32
  epsilons (4 x 1.2e-7) x max(grad_output) on the gradient: near p = 1 the CE is
  log(1 + eps) of an fp32 sum, and the target entry of the gradient is p - 1 of an fp32
  softmax summed over shards, both resolved only to a few fp32 epsilons in absolute
  terms (Megatron-Core's CE is bound by the same).
- bf16 / fp16 logits: rtol 1e-2 (the gradient comes back in the logits' dtype).

Both entries are checked alike: `vocab_parallel_dft_cross_entropy` (Megatron-Core's CE
steps) and `fused_vocab_parallel_dft_cross_entropy` (compiled kernels, `--cross-entropy-loss-
fusion`).

Tensor parallelism: every rank slices its vocabulary shard from one global tensor and
compares its loss with the reference and its gradient with the reference gradient's
shard (TP = 1 in-process; TP = 2 and 4 on the persistent gloo ranks of tests/dist.py's pool).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dft_megatron.loss import (
    TokenWeighting,
    fused_vocab_parallel_dft_cross_entropy,
    vocab_parallel_dft_cross_entropy,
)
from tests.dist import pool

VOCAB = 96  # divisible by TP 1, 2 and 4
SEQ, BATCH = 8, 3

VARIANTS = {
    "sft": dict(loss_type="sft"),
    "dft": dict(loss_type="dft"),
    "dft_floor": dict(loss_type="dft", dft_min_prob=0.05),
    "dft_alpha_0.5": dict(loss_type="dft", dft_alpha=0.5),
    "dft_alpha_2": dict(loss_type="dft", dft_alpha=2.0),
    "dft_mix": dict(loss_type="dft", sft_mix=0.3),
    "dft_all": dict(loss_type="dft", dft_min_prob=0.02, dft_alpha=1.5, sft_mix=0.2),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = {"sbv": (SEQ, BATCH), "nv": (SEQ * BATCH,)}
ENTRIES = {
    "unfused": vocab_parallel_dft_cross_entropy,
    "fused": fused_vocab_parallel_dft_cross_entropy,
}


def peaked_logits(shape, vocab, seed, ignore_index=None):
    """Logits [*shape, vocab] (fp64) and targets [*shape] with log-uniform target probs.

    The target logit is set so that softmax(z)[y] is exactly the drawn probability, which
    spans 1e-6 to 1 - 1e-6 (both ends included).
    """
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, vocab, generator=g, dtype=torch.float64) * 2.0
    target = torch.randint(0, vocab, shape, generator=g)
    n = target.numel()
    log_p = torch.empty(n, dtype=torch.float64).uniform_(-6.0, 0.0, generator=g) * 2.302585
    p = log_p.exp().clamp_max(1 - 1e-6)
    p[0], p[-1] = 1e-6, 1 - 1e-6
    flat = logits.view(n, vocab)
    rows = torch.arange(n)
    flat[rows, target.view(-1)] = -torch.inf
    lse_others = torch.logsumexp(flat, dim=-1)
    flat[rows, target.view(-1)] = lse_others + torch.log(p) - torch.log1p(-p)
    if ignore_index is not None:
        target.view(-1)[1::5] = ignore_index
    return logits, target


def reference(logits64, target, variant, grad_out, ignore_index=-100):
    """Float64 loss, gradient of sum(loss * grad_out), target prob and entropy."""
    z = logits64.detach().clone().requires_grad_()
    vocab = z.size(-1)
    ce = F.cross_entropy(
        z.view(-1, vocab), target.view(-1), reduction="none", ignore_index=ignore_index
    ).view(target.shape)
    p = torch.exp(-ce.detach())
    kw = VARIANTS[variant]
    w = torch.ones_like(p)
    if kw["loss_type"] == "dft":
        w = p ** kw.get("dft_alpha", 1.0)
        w = torch.maximum(w, torch.full_like(w, kw.get("dft_min_prob", 0.0)))
        mix = kw.get("sft_mix", 0.0)
        w = mix + (1 - mix) * w
    ignored = target == ignore_index
    loss = torch.where(ignored, 0.0, w * ce)
    (loss * grad_out).sum().backward()
    probs = torch.softmax(z.detach(), dim=-1)
    entropy = -torch.special.xlogy(probs, probs).sum(-1)  # 0 log 0 = 0 (padded ids)
    return loss.detach(), z.grad, torch.where(ignored, 0.0, p), entropy, ce.detach()


def shard(t, tp, rank):
    v = t.size(-1) // tp
    return t[..., rank * v : (rank + 1) * v]


def check_case(
    variant,
    dtype_name,
    shape_name,
    seed,
    tp_group=None,
    ignore=False,
    device="cpu",
    entry="unfused",
):
    """Run one case on this rank's shard (on `device`) and compare with the float64 reference
    (computed on the CPU)."""
    tp = 1 if tp_group is None else dist.get_world_size(tp_group)
    rank = 0 if tp_group is None else dist.get_rank(tp_group)
    dtype = DTYPES[dtype_name]
    logits64, target = peaked_logits(
        SHAPES[shape_name], VOCAB, seed, ignore_index=-100 if ignore else None
    )
    # The function sees dtype-rounded logits; the reference uses the same values in fp64.
    logits = logits64.to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.rand(target.shape, generator=g, dtype=torch.float64) + 0.5
    ref_loss, ref_grad, ref_p, ref_h, ref_ce = reference(logits.double(), target, variant, grad_out)

    x = shard(logits, tp, rank).clone().to(device).requires_grad_()
    loss, stats = ENTRIES[entry](
        x.clone(), target.to(device), **VARIANTS[variant], tp_group=tp_group, return_stats=True
    )
    loss.backward(grad_out.float().to(device))

    assert loss.dtype == torch.float32 and loss.shape == target.shape
    assert x.grad.dtype == dtype
    assert loss.device == x.device and stats.target_prob.device == x.device
    loss, grad = loss.cpu(), x.grad.cpu()
    stats = type(stats)(*(None if t is None else t.cpu() for t in stats))
    if dtype == torch.float32:
        eps = torch.finfo(torch.float32).eps
        rtol, atol_loss, atol_grad = 1e-5, 1e-6, 4 * eps * grad_out.max().item()
    else:
        rtol, atol_loss, atol_grad = 1e-2, 1e-4, 1e-3 * ref_grad.abs().max().item()
    msg = f"{entry} {variant} {dtype_name} {shape_name} tp={tp} rank={rank}"
    torch.testing.assert_close(
        loss.double(), ref_loss, rtol=rtol, atol=atol_loss, msg=lambda m: f"loss {msg}: {m}"
    )
    torch.testing.assert_close(
        grad.double(),
        shard(ref_grad, tp, rank),
        rtol=rtol,
        atol=atol_grad,
        msg=lambda m: f"grad {msg}: {m}",
    )
    torch.testing.assert_close(stats.target_prob.double(), ref_p, rtol=rtol, atol=1e-7)
    torch.testing.assert_close(stats.entropy.double(), ref_h, rtol=rtol, atol=1e-5)
    torch.testing.assert_close(stats.cross_entropy.double(), ref_ce, rtol=rtol, atol=atol_loss)
    if ignore:
        ignored = target == -100
        assert torch.all(loss[ignored] == 0)
        assert torch.all(grad[ignored] == 0)


def check_all_ignored(tp_group=None, device="cpu", entry="unfused"):
    tp = 1 if tp_group is None else dist.get_world_size(tp_group)
    rank = 0 if tp_group is None else dist.get_rank(tp_group)
    logits64, target = peaked_logits((SEQ, BATCH), VOCAB, seed=3)
    target = target.fill_(-100).to(device)
    for variant in VARIANTS:
        x = shard(logits64.float(), tp, rank).clone().to(device).requires_grad_()
        loss, stats = ENTRIES[entry](
            x.clone(), target, **VARIANTS[variant], tp_group=tp_group, return_stats=True
        )
        # The trainer's token mean divides by the number of loss tokens, here 0 -> max(.,1).
        (loss.sum() / max(int((target != -100).sum()), 1)).backward()
        assert torch.all(loss == 0) and torch.all(x.grad == 0), variant
        assert torch.all(stats.target_prob == 0) and torch.all(stats.cross_entropy == 0)
        assert torch.isfinite(stats.entropy).all()


def check_matches_megatron_ce(tp_group, entry="unfused"):
    """loss_type='sft' is Megatron-Core's own vocab_parallel_cross_entropy to 1e-6."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    tp, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    logits64, target = peaked_logits((SEQ, BATCH), VOCAB, seed=5)
    logits = shard(logits64.float(), tp, rank)
    grad_out = torch.rand(target.shape, generator=torch.Generator().manual_seed(6))
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    ours = ENTRIES[entry](a.clone(), target, loss_type="sft", tp_group=tp_group)
    theirs = vocab_parallel_cross_entropy(b.clone(), target, tp_group=tp_group)
    ours.backward(grad_out)
    theirs.backward(grad_out)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    # The fused kernels sum exp() in another order: a few fp32 epsilons on p - 1 near p = 1.
    atol = 1e-7 if entry == "unfused" else 4 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=atol)


def check_collectives(tp_group, entry="unfused"):
    """One MAX and one SUM all-reduce per call, with and without stats; none backward."""
    calls = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        calls.append((op, tuple(tensor.shape)))
        return real_all_reduce(tensor, op=op, group=group, async_op=async_op)

    logits64, target = peaked_logits((SEQ, BATCH), VOCAB, seed=7)
    x = shard(logits64.float(), dist.get_world_size(tp_group), dist.get_rank(tp_group))
    dist.all_reduce = counting_all_reduce
    try:
        results = {}
        for return_stats, return_entropy in ((False, True), (True, False), (True, True)):
            calls.clear()
            y = x.clone().requires_grad_()
            out = ENTRIES[entry](
                y.clone(),
                target,
                tp_group=tp_group,
                return_stats=return_stats,
                return_entropy=return_entropy,
            )
            loss = out[0] if return_stats else out
            loss.sum().backward()
            rows = 3 if return_stats and return_entropy else 2
            tokens = (SEQ, BATCH) if entry == "unfused" else (SEQ * BATCH,)  # fused: [n] rows
            assert calls == [
                (dist.ReduceOp.MAX, tokens),
                (dist.ReduceOp.SUM, (rows, *tokens)),
            ], calls
            results[(return_stats, return_entropy)] = (
                loss,
                y.grad,
                out[1] if return_stats else None,
            )
        # Without the entropy: the same loss, gradient, target p and CE (to the fp32 rounding
        # of a differently chunked all-reduce), and entropy None.
        (l1, g1, s1), (l2, g2, s2) = results[(True, False)], results[(True, True)]
        for a, b in ((l1, l2), (g1, g2), (s1.target_prob, s2.target_prob)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(s1.cross_entropy, s2.cross_entropy, rtol=1e-6, atol=1e-7)
        assert s1.entropy is None and s2.entropy is not None
    finally:
        dist.all_reduce = real_all_reduce


def check_bad_target(tp_group=None, device="cpu", entry="unfused"):
    tp = 1 if tp_group is None else dist.get_world_size(tp_group)
    logits64, target = peaked_logits((SEQ, BATCH), VOCAB, seed=8)
    x = shard(logits64.float(), tp, 0).to(device)
    for bad in (VOCAB, -1, 10**9):
        t = target.clone().to(device)
        t[2, 1] = bad
        with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 96\).*target\[2, 1\]"):
            ENTRIES[entry](x.clone(), t, tp_group=tp_group)


def all_cases():
    yield from itertools.product(VARIANTS, DTYPES, SHAPES)


# ---------------------------------------------------------------- TP = 1, in process


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("variant,dtype_name,shape_name", list(all_cases()))
def test_matches_float64_reference(variant, dtype_name, shape_name, entry):
    check_case(variant, dtype_name, shape_name, seed=11, entry=entry)


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_ignore_index(variant, entry):
    check_case(variant, "fp32", "sbv", seed=12, ignore=True, entry=entry)


@pytest.mark.parametrize("entry", ENTRIES)
def test_ignore_index_that_is_a_valid_id(entry):
    """ignore_index may be a real vocabulary id (a pad token): still no loss, no gradient."""
    logits64, target = peaked_logits((SEQ, BATCH), VOCAB, seed=13)
    target[::2] = 0
    x = logits64.float().requires_grad_()
    loss = ENTRIES[entry](x.clone(), target, ignore_index=0)
    loss.sum().backward()
    assert torch.all(loss[target == 0] == 0) and torch.all(x.grad[target == 0] == 0)
    assert torch.all(loss[target != 0] > 0)


@pytest.mark.parametrize("entry", ENTRIES)
def test_all_ignored_gives_zeros(entry):
    check_all_ignored(entry=entry)


@pytest.fixture
def single_rank_world():
    """A one-rank gloo world (Megatron-Core's CE always all-reduces), torn down after."""
    from tests.dist import free_port

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("entry", ENTRIES)
def test_sft_matches_megatron_ce(single_rank_world, entry):
    check_matches_megatron_ce(single_rank_world, entry)


@pytest.mark.parametrize("entry", ENTRIES)
def test_bad_targets(entry):
    check_bad_target(entry=entry)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(loss_type="kl"), "loss_type must be one of"),
        (dict(dft_min_prob=1.5), "dft_min_prob must be in"),
        (dict(dft_alpha=-1.0), "dft_alpha must be >= 0"),
        (dict(sft_mix=2.0), "sft_mix must be in"),
        (dict(loss_type="sft", dft_alpha=2.0), "only applies to loss_type dft / asft"),
    ],
)
@pytest.mark.parametrize("entry", ENTRIES)
def test_bad_arguments(kwargs, match, entry):
    x = torch.randn(4, VOCAB)
    with pytest.raises(ValueError, match=match):
        ENTRIES[entry](x, torch.zeros(4, dtype=torch.long), **kwargs)


@pytest.mark.parametrize("entry", ENTRIES)
def test_bad_shapes_and_dtypes(entry):
    x = torch.randn(4, 3, VOCAB)
    with pytest.raises(ValueError, match=r"target shape \(4,\) must equal .* \(4, 3\)"):
        ENTRIES[entry](x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        ENTRIES[entry](x, torch.zeros(4, 3))


def test_fp32_logits_are_used_in_place():
    """Documented semantics: fp32 logits hold the softmax after forward, as in Megatron-Core."""
    logits64, target = peaked_logits((SEQ, BATCH), VOCAB, seed=14)
    x = logits64.float()
    vocab_parallel_dft_cross_entropy(x, target)
    torch.testing.assert_close(x, torch.softmax(logits64, -1).float(), rtol=1e-5, atol=1e-7)
    y = logits64.bfloat16()
    before = y.clone()
    vocab_parallel_dft_cross_entropy(y, target)
    assert torch.equal(y, before)  # upcast into a new fp32 buffer: input untouched


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_fused_keeps_the_logits_and_writes_their_gradient_into_them(dtype_name):
    """Documented semantics of the fused path: forward leaves the logits as they are (no
    copy is kept), backward overwrites them with their gradient (no new logits-sized buffer)."""
    logits64, target = peaked_logits((SEQ, BATCH), VOCAB, seed=14)
    x = logits64.to(DTYPES[dtype_name])
    before = x.clone()
    z = x.requires_grad_(False).clone().requires_grad_()  # a leaf the caller owns
    logits = z * 1.0  # a non-leaf, as the output layer's logits are
    loss = fused_vocab_parallel_dft_cross_entropy(logits, target)
    assert torch.equal(logits, before)
    loss.sum().backward()
    assert torch.equal(logits, z.grad)
    assert z.grad.dtype == x.dtype


@pytest.mark.parametrize("entry", ENTRIES)
def test_gradcheck_float64(entry):
    """gradcheck of the whole Function (sft, where the loss is exactly differentiable).

    Backward reuses the softmax buffer, so it can run once per forward (a second backward
    over the same graph is refused by autograd's version check, as with Megatron-Core's CE).
    """
    logits64, target = peaked_logits((5,), 7, seed=15)
    target[1] = -100
    coef = torch.rand(5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def objective(z):
        return ENTRIES[entry](z.clone(), target, loss_type="sft") @ coef

    # gradcheck runs backward twice over one graph; non-reentrant activation checkpointing
    # recomputes the forward (and so the softmax buffer) for each backward.
    torch.autograd.gradcheck(
        lambda z: checkpoint(objective, z, use_reentrant=False), (logits64.requires_grad_(),)
    )


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "sft"])
def test_dft_gradient_is_weighted_ce_gradient_with_frozen_weight(variant):
    """Finite differences (float64) of sum_t w_t(z0) * CE_t(z): the weight is a stop-gradient.

    This is what gradcheck would check if it could hold sg(p) fixed while it perturbs z.
    """
    logits64, target = peaked_logits((6,), 9, seed=16)
    z0 = logits64.clone().requires_grad_()
    loss, stats = vocab_parallel_dft_cross_entropy(
        z0.clone(), target, **VARIANTS[variant], return_stats=True
    )
    loss.sum().backward()
    kw = VARIANTS[variant]
    w0 = TokenWeighting(**kw)(stats.target_prob)

    def frozen_weight_objective(z):
        ce = vocab_parallel_dft_cross_entropy(z.clone(), target, loss_type="sft")
        return (w0 * ce).sum()

    eps = 1e-6
    numeric = torch.zeros_like(logits64)
    for idx in itertools.product(*map(range, logits64.shape)):
        plus, minus = logits64.clone(), logits64.clone()
        plus[idx] += eps
        minus[idx] -= eps
        numeric[idx] = (frozen_weight_objective(plus) - frozen_weight_objective(minus)) / (2 * eps)
    torch.testing.assert_close(z0.grad, numeric, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------- TP = 2 and 4, gloo ranks


def _tp_worker(rank, world_size):
    group = dist.new_group(list(range(world_size)))
    for entry in ENTRIES:
        for i, (variant, dtype_name, shape_name) in enumerate(all_cases()):
            check_case(variant, dtype_name, shape_name, seed=100 + i, tp_group=group, entry=entry)
        for variant in VARIANTS:
            check_case(variant, "fp32", "sbv", seed=200, tp_group=group, ignore=True, entry=entry)
        check_all_ignored(group, entry=entry)
        check_matches_megatron_ce(group, entry=entry)
        check_collectives(group, entry=entry)
        check_bad_target(group, entry=entry)

    # The default group is Megatron-Core's tensor-parallel group once it is initialized.
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    logits64, target = peaked_logits((SEQ, BATCH), VOCAB, seed=300)
    x = shard(logits64.float(), world_size, rank)
    explicit = vocab_parallel_dft_cross_entropy(x.clone(), target, tp_group=group)
    default = vocab_parallel_dft_cross_entropy(x.clone(), target)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel(tp):
    pool(tp).run(_tp_worker)
