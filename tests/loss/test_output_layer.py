"""chunked_output_layer_dft_cross_entropy against a float64 reference of the whole layer.

Reference: logits = hidden @ weight.T in float64 from the same (dtype-rounded) hidden states
and weight, then the float64 DFT loss of tests/loss/test_cross_entropy.py (`reference`), and
autograd's float64 gradients of sum(loss * grad_out) with respect to the hidden states and
the weight. Target probabilities span 1e-6 to 1 - 1e-6 (peaked logits made by choosing the
hidden states through a least-squares solve).

Tolerances (relative, plus an absolute floor at 1e-6 of the largest reference entry):
- fp32: 1e-5 on loss, hidden-state and weight gradients.
- bf16 / fp16: 1e-2 on the loss; 2e-2 relative to the largest entry on the gradients (the
  logits and the gradient GEMMs are in that dtype, as in a half-precision model's output
  layer).

Layouts: TP 1 in process; TP 2 and 4 on gloo ranks, every rank slicing its vocabulary shard
of one global weight (and, with sequence parallelism, its sequence slice of the hidden
states). Each case runs with chunks that do not divide the tokens, a padded vocabulary,
ignored targets, all-ignored batches, a weight shared with an embedding lookup (tied
embeddings: both gradients add up), and Megatron-Core DDP's `main_grad` buffer.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dft_megatron.loss.output_layer import chunked_output_layer_dft_cross_entropy
from tests.dist import pool
from tests.loss.test_cross_entropy import DTYPES, VARIANTS, peaked_logits, reference

VOCAB, HIDDEN = 96, 16
SEQ, BATCH = 8, 3
CHUNK = 5  # 24 tokens: chunks of 5, 5, 5, 5, 4 (fewer where targets are ignored)


def make_case(seed, ignore=False, dtype=torch.float32):
    """hidden [s, b, h] and weight [V, h] (dtype-rounded, fp64), target [s, b]."""
    logits64, target = peaked_logits(
        (SEQ, BATCH), VOCAB, seed, ignore_index=-100 if ignore else None
    )
    g = torch.Generator().manual_seed(seed + 7)
    weight = torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64)
    # hidden states whose logits are the peaked ones as closely as least squares allows, so
    # that target probabilities stay spread out.
    hidden = torch.linalg.lstsq(weight, logits64.view(-1, VOCAB).T).solution.T
    hidden = hidden.reshape(SEQ, BATCH, HIDDEN)
    return hidden.to(dtype).double(), weight.to(dtype).double(), target


def reference_grads(hidden64, weight64, target, variant, grad_out, unpadded):
    """Float64 loss, target p, CE, entropy and the gradients of sum(loss * grad_out) with
    respect to hidden [s, b, h] and weight [V, h] (chain rule through logits = h W^T)."""
    logits = hidden64 @ weight64.T
    logits[..., unpadded:] = -1e30  # padded ids: probability exactly 0, as the model's mask
    loss, grad_logits, p, entropy, ce = reference(logits, target, variant, grad_out)
    grad_hidden = grad_logits @ weight64
    grad_weight = grad_logits.reshape(-1, VOCAB).T @ hidden64.reshape(-1, HIDDEN)
    return loss, p, ce, entropy, grad_hidden, grad_weight


def check_chunked(
    variant,
    dtype_name,
    seed,
    tp_group=None,
    sequence_parallel=False,
    ignore=False,
    unpadded=VOCAB,
    tied=False,
    main_grad=False,
    device="cpu",
):
    tp = 1 if tp_group is None else dist.get_world_size(tp_group)
    rank = 0 if tp_group is None else dist.get_rank(tp_group)
    dtype = DTYPES[dtype_name]
    hidden64, weight64, target = make_case(seed, ignore, dtype)
    target = torch.where(target >= unpadded, target - VOCAB + unpadded, target)  # real ids only
    grad_out = torch.rand(target.shape, generator=torch.Generator().manual_seed(seed + 1)) + 0.5
    grad_out = grad_out.double()
    ref_loss, ref_p, ref_ce, ref_h, ref_gh, ref_gw = reference_grads(
        hidden64, weight64, target, variant, grad_out, unpadded
    )
    v, s = VOCAB // tp, SEQ // tp
    w_shard = weight64[rank * v : (rank + 1) * v].to(dtype)
    ref_gw = ref_gw[rank * v : (rank + 1) * v]
    h_local = hidden64[rank * s : (rank + 1) * s] if sequence_parallel else hidden64
    ref_gh_local = ref_gh[rank * s : (rank + 1) * s] if sequence_parallel else ref_gh

    hidden = h_local.to(dtype).to(device).requires_grad_()
    weight = torch.nn.Parameter(w_shard.clone().to(device))
    if main_grad:  # Megatron-Core DDP's fp32 buffer and flag
        weight.main_grad = torch.zeros(weight.shape, dtype=torch.float32, device=device)
        weight.grad_added_to_main_grad = False
        weight.zero_out_wgrad = tied
    loss, stats = chunked_output_layer_dft_cross_entropy(
        hidden,
        weight,
        target.to(device),
        **VARIANTS[variant],
        tp_group=tp_group,
        sequence_parallel=sequence_parallel,
        chunk_tokens=CHUNK,
        unpadded_vocab_size=unpadded,
        return_stats=True,
    )
    objective = (loss.double() * grad_out.to(device)).sum()
    lookup_grad = torch.zeros_like(ref_gw)
    if tied:  # the same weight also embeds tokens (rows of this shard): gradients add up
        ids = torch.arange(0, v, 3)
        emb = weight[ids.to(device)]
        emb_coef = torch.linspace(-1, 1, emb.numel(), dtype=torch.float64).view(emb.shape)
        objective = objective + (emb.double() * emb_coef.to(device)).sum()
        lookup_grad[ids] = emb_coef
    objective.backward()

    if dtype == torch.float32:
        rtol, atol = 1e-5, 1e-6
    else:
        rtol, atol = 1e-2, 2e-2
    msg = f"{variant} {dtype_name} tp={tp} rank={rank} sp={sequence_parallel} tied={tied}"

    def close(actual, expected, what, floor=None):
        floor = atol * expected.abs().max().item() if floor is None else floor
        torch.testing.assert_close(
            actual.double().cpu(),
            expected,
            rtol=rtol,
            atol=max(floor, 1e-7),
            msg=lambda m: f"{what} {msg}: {m}",
        )

    close(loss, ref_loss, "loss", floor=1e-6 if dtype == torch.float32 else 1e-3)
    close(stats.target_prob, ref_p, "target p", floor=1e-6 if dtype == torch.float32 else 1e-3)
    close(stats.cross_entropy, ref_ce, "ce", floor=1e-6 if dtype == torch.float32 else 1e-3)
    ignored = target == -100
    close(stats.entropy.cpu()[~ignored], ref_h[~ignored], "entropy", floor=1e-5)
    close(hidden.grad, ref_gh_local, "hidden grad")
    if main_grad:
        assert weight.grad_added_to_main_grad
        if tied:  # the embedding's gradient came as .grad on top of zeros (DDP adds it)
            close(weight.grad, lookup_grad, "embedding grad")
        close(weight.main_grad, ref_gw, "weight grad (main_grad)")
    else:
        assert weight.grad.dtype == dtype
        close(weight.grad, ref_gw + lookup_grad, "weight grad")
    if ignore:
        loss, entropy = loss.cpu(), stats.entropy.cpu()
        assert torch.all(loss[ignored] == 0) and torch.all(entropy[ignored] == 0)


def check_all_ignored(tp_group=None):
    hidden64, weight64, target = make_case(3)
    target.fill_(-100)
    hidden = hidden64.float().requires_grad_()
    weight = torch.nn.Parameter(weight64.float()[: VOCAB // (1 if tp_group is None else 2)])
    loss = chunked_output_layer_dft_cross_entropy(
        hidden, weight, target, tp_group=tp_group, chunk_tokens=CHUNK
    )
    loss.sum().backward()
    assert torch.all(loss == 0) and torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)


# ---------------------------------------------------------------- TP = 1, in process


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_float64_reference(variant, dtype_name):
    check_chunked(variant, dtype_name, seed=21)


@pytest.mark.parametrize(
    "case",
    [
        dict(ignore=True),
        dict(unpadded=90),
        dict(tied=True),
        dict(main_grad=True),
        dict(main_grad=True, tied=True),
        dict(ignore=True, unpadded=90, main_grad=True),
    ],
    ids=lambda c: "-".join(c),
)
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_layer_cases(case, dtype_name):
    check_chunked("dft_all", dtype_name, seed=22, **case)


def test_all_ignored_gives_zeros():
    check_all_ignored()


def test_chunk_size_does_not_change_the_result():
    """Chunks of 1, 5 and all tokens give the same loss and gradients (fp32 rounding)."""
    hidden64, weight64, target = make_case(23, ignore=True)
    results = []
    for chunk in (1, 5, 1000):
        h = hidden64.float().requires_grad_()
        w = torch.nn.Parameter(weight64.float())
        loss = chunked_output_layer_dft_cross_entropy(h, w, target, chunk_tokens=chunk)
        loss.sum().backward()
        results.append((loss, h.grad, w.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_bad_arguments():
    hidden64, weight64, target = make_case(24)
    h, w = hidden64.float(), weight64.float()
    with pytest.raises(ValueError, match="chunk_tokens must be >= 1"):
        chunked_output_layer_dft_cross_entropy(h, w, target, chunk_tokens=0)
    with pytest.raises(ValueError, match=r"hidden must be \[s, b, h\] and weight \[v/tp, h\]"):
        chunked_output_layer_dft_cross_entropy(h, w[:, :4], target)
    with pytest.raises(ValueError, match=r"does not fit target \(7, 3\)"):
        chunked_output_layer_dft_cross_entropy(h, w, target[:7])
    bad = target.clone()
    bad[0, 0] = VOCAB
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 96\)"):
        chunked_output_layer_dft_cross_entropy(h, w, bad)


# ---------------------------------------------------------------- TP = 2 and 4, gloo ranks


def _tp_worker(rank, world_size):
    from dft_megatron.compat import install_cpu_bridge

    install_cpu_bridge()  # Megatron-Core's sequence-parallel gather allocates on current_device
    group = dist.new_group(list(range(world_size)))
    for i, variant in enumerate(VARIANTS):
        for dtype_name in ("fp32", "bf16"):
            check_chunked(variant, dtype_name, seed=40 + i, tp_group=group)
    for dtype_name in ("fp32", "bf16"):
        for sp in (False, True):
            check_chunked("dft_all", dtype_name, 50, group, sequence_parallel=sp, ignore=True)
            # 90 real ids: at TP 2 rank 1 holds 42 real columns of 48, at TP 4 rank 3 18 of 24
            check_chunked("dft", dtype_name, 51, group, sequence_parallel=sp, unpadded=90)
            check_chunked("dft", dtype_name, 52, group, sequence_parallel=sp, tied=True)
            check_chunked("dft", dtype_name, 53, group, sp, main_grad=True, tied=True)
    if world_size == 2:
        check_all_ignored(group)


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel(tp):
    pool(tp).run(_tp_worker)
