"""Unmodified Megatron-Core trains, checkpoints and reshards on CPU ranks through the bridge.

One run of 4 gloo ranks (tests/dist.py's pool; imports dominate the cost, so every case
shares it) walks through four layouts of the same tiny GPT (tests/compat/models.py: tied
embeddings), all with Megatron's DDP, distributed optimizer and fully parallel
`dist_checkpointing`, on one fixed global batch of 4 sequences:

1. TP1 x PP1 (DP4): the reference. A step, a save (model + optimizer), the loss of the saved
   weights, three more steps; a reload into a fresh model and optimizer at the same layout;
   a 4-layer model saved as the reference of the interleaved schedule.
2. TP2 x PP2 (DP1): load the TP1 checkpoint (model + optimizer), evaluate, take the same
   steps, save; the same with sequence parallelism; the RNG tracker (dropout under
   `get_cuda_rng_tracker().fork()`, Megatron's TP-aware GPU-style weight init).
3. TP1 x PP2 (DP2): resume from the TP2 x PP2 checkpoint; an async save and exact resume;
   the canary of a Megatron-Core checkpoint bug.
4. TP1 x PP2 x VP2 (DP2): the interleaved schedule on the 4-layer checkpoint; full
   activation recompute with dropout.

Rank 0 writes every measured number to results.json; the tests below assert on it.
Reference for every loss: the TP1 x PP1 run of the same weights and batch. Tolerance: 1e-5
relative, room for fp32 reduction order (TP splits the matmuls and the vocab softmax, DP and
PP change the order of gradient sums; measured: below 1e-7); same-layout reloads must match
exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.dist import pool

RTOL = 1e-5
WORLD_SIZE = 4


def _all_ranks(flag: bool) -> bool:
    """True when `flag` holds on every rank."""
    t = torch.tensor(int(flag))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model[0].parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _rng_checks(m, r: dict) -> None:
    """At TP2 x PP2: the RNG tracker's streams on the CPU generator."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tp_group = parallel_state.get_tensor_model_parallel_group()
    x = torch.ones(4096)

    def dropout_in_fork():
        with get_cuda_rng_tracker().fork():
            return torch.nn.functional.dropout(x, p=0.5)

    m.reseed(7)
    default_only = torch.nn.functional.dropout(x, p=0.5)
    m.reseed(7)
    first = dropout_in_fork()
    second = dropout_in_fork()  # the tracked stream moved on
    # Forks save and restore the default stream: its first draw is the one without forks.
    r["rng_default_untouched_by_fork"] = _all_ranks(
        torch.equal(default_only, torch.nn.functional.dropout(x, p=0.5))
    )
    m.reseed(7)
    r["rng_fork_reproducible"] = _all_ranks(torch.equal(first, dropout_in_fork()))
    r["rng_fork_advances"] = _all_ranks(not torch.equal(first, second))
    masks = [torch.empty_like(first) for _ in range(2)]
    dist.all_gather(masks, first, group=tp_group)
    r["rng_tp_ranks_differ"] = _all_ranks(not torch.equal(masks[0], masks[1]))

    # Megatron's GPU-style init (use_cpu_initialization=False): each TP rank draws its shard
    # from the tensor-parallel stream inside the tracker's fork.
    sizes = dataclasses.replace(m.TINY, use_cpu_initialization=False, dropout=0.1)
    m.reseed(11)
    model_a = m.build_model(sizes, ddp=False)
    m.reseed(11)
    model_b = m.build_model(sizes, ddp=False)
    m.reseed(12)
    model_c = m.build_model(sizes, ddp=False)
    r["init_reproducible"] = _all_ranks(_same(_params(model_a), _params(model_b)))
    r["init_seed_matters"] = _all_ranks(not _same(_params(model_a), _params(model_c)))
    fc1 = model_a[0].decoder.layers[0].mlp.linear_fc1.weight.detach()
    shards = [torch.empty_like(fc1) for _ in range(2)]
    dist.all_gather(shards, fc1, group=tp_group)
    r["init_tp_shards_differ"] = _all_ranks(not torch.equal(shards[0], shards[1]))

    # Dropout inside the model (attention dropout runs under the tracker's fork at TP > 1).
    batches = m.micro_batches(m.global_batch(0), 2)
    losses = []
    for seed in (21, 21, 22):
        m.reseed(seed)
        with torch.no_grad():
            losses.append(m.run_batches(model_a, batches, forward_only=True))
    r["dropout_losses"] = losses


def _cpu_megatron_run(rank: int, world_size: int, workdir: str) -> None:
    from tests.compat import models as m

    work = Path(workdir)
    r: dict = {"seconds": {}}
    tokens = m.global_batch(0)
    clock = time.perf_counter()

    def lap(phase: str) -> None:  # wall time per phase, kept in results.json for diagnosis
        nonlocal clock
        r["seconds"][phase] = round(time.perf_counter() - clock, 2)
        clock = time.perf_counter()

    # 1. TP1 x PP1 (DP4): reference, save, same-layout reload.
    m.init_parallel(1, 1, seed=1)
    batches = m.micro_batches(tokens, 1)
    model = m.build_model()
    optimizer = m.build_optimizer(model)
    r["tp1_step0"] = m.train_step(model, optimizer, batches)
    m.save_checkpoint(model, optimizer, work / "tp1pp1")
    r["tp1_eval"] = m.evaluate(model, batches)
    r["tp1_steps"] = [m.train_step(model, optimizer, batches) for _ in range(3)]

    model = m.build_model()  # the same layout, other weights
    optimizer = m.build_optimizer(model)
    r["tp1_fresh_eval"] = m.evaluate(model, batches)
    m.load_checkpoint(model, optimizer, work / "tp1pp1")
    r["tp1_reload_eval"] = m.evaluate(model, batches)
    r["tp1_reload_steps"] = [m.train_step(model, optimizer, batches) for _ in range(3)]

    deep = m.build_model(m.DEEP, ddp=False)  # reference for the interleaved schedule
    m.save_checkpoint(deep, None, work / "deep")
    r["deep_eval"] = m.evaluate(deep, batches)

    lap("1 tp1pp1")

    # 2. TP2 x PP2 (DP1): reshard the TP1 checkpoint, train, save; sequence parallel; RNG.
    m.init_parallel(2, 2, seed=2)
    batches = m.micro_batches(tokens, 2)
    model = m.build_model()
    optimizer = m.build_optimizer(model)
    m.load_checkpoint(model, optimizer, work / "tp1pp1")
    loaded = _params(model)
    r["tp2_eval"] = m.evaluate(model, batches)
    r["tp2_steps"] = [m.train_step(model, optimizer, batches) for _ in range(2)]
    r["tp2_params_changed"] = _all_ranks(
        all(not torch.equal(a, b) for a, b in zip(loaded, _params(model), strict=True))
    )
    m.save_checkpoint(model, optimizer, work / "tp2pp2")

    model = m.build_model(dataclasses.replace(m.TINY, sequence_parallel=True))
    optimizer = m.build_optimizer(model)
    m.load_checkpoint(model, optimizer, work / "tp1pp1")
    r["tp2_sp_eval"] = m.evaluate(model, batches)
    r["tp2_sp_steps"] = [m.train_step(model, optimizer, batches) for _ in range(2)]

    lap("2 tp2pp2")
    _rng_checks(m, r)
    lap("2 rng")

    # 3. TP1 x PP2 (DP2): resume from the TP2 x PP2 checkpoint (after two of the three steps).
    m.init_parallel(1, 2, seed=3)
    batches = m.micro_batches(tokens, 1)
    model = m.build_model()
    optimizer = m.build_optimizer(model)
    m.load_checkpoint(model, optimizer, work / "tp2pp2")
    r["pp2_step"] = m.train_step(model, optimizer, batches)
    # Async save (forked writer, fully parallel over DP2) and exact same-layout resume.
    m.save_checkpoint(
        model, optimizer, work / "pp2_async", async_save=True, optimizer_format=m.DP_RESHARDABLE
    )
    reloaded = m.build_model()
    reloaded_optimizer = m.build_optimizer(reloaded)
    m.load_checkpoint(
        reloaded, reloaded_optimizer, work / "pp2_async", optimizer_format=m.DP_RESHARDABLE
    )
    r["pp2_continue"] = [m.train_step(model, optimizer, batches), m.evaluate(model, batches)]
    r["pp2_async_reload_continue"] = [
        m.train_step(reloaded, reloaded_optimizer, batches),
        m.evaluate(reloaded, batches),
    ]
    # Canary for the Megatron-Core 0.19.2 "fully_reshardable" multi-bucket bug (models.py).
    m.save_checkpoint(model, optimizer, work / "pp2_full")
    m.load_checkpoint(reloaded, reloaded_optimizer, work / "pp2_full")
    r["pp2_fully_reshardable_exact"] = _all_ranks(_same(_params(model), _params(reloaded)))

    lap("3 tp1pp2")

    # 4. TP1 x PP2 x VP2 (DP2): the interleaved schedule, and full activation recompute with
    # dropout (the recomputed forward must replay the saved RNG states).
    m.init_parallel(1, 2, seed=4, vp=2)
    model = m.build_model(m.DEEP)
    m.load_checkpoint(model, None, work / "deep")
    r["vp_eval"] = m.evaluate(model, batches)
    for recompute in (False, True):
        sizes = dataclasses.replace(m.DEEP, dropout=0.2, recompute=recompute)
        model = m.build_model(sizes)
        optimizer = m.build_optimizer(model)
        m.load_checkpoint(model, None, work / "deep")
        m.reseed(9)
        step = m.train_step(model, optimizer, batches)
        r[f"vp_dropout_recompute_{recompute}"] = [step, m.evaluate(model, batches)]

    lap("4 vp")
    if rank == 0:
        (work / "results.json").write_text(json.dumps(r, indent=1))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("megatron_cpu")
    pool(WORLD_SIZE).run(_cpu_megatron_run, str(workdir))
    return json.loads((workdir / "results.json").read_text())


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=0.0)


def test_tp1_training_decreases_loss(run):
    losses = [run["tp1_step0"], *run["tp1_steps"]]
    assert all(math.isfinite(x) for x in losses), losses
    # Same batch every step: a working optimizer step lowers its loss each time.
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses


def test_tp2_pp2_training_step_matches_tp1_pp1(run):
    """TP2 x PP2 from the TP1 checkpoint: same forward loss, same losses along training."""
    assert _close(run["tp2_eval"], run["tp1_eval"]), (run["tp2_eval"], run["tp1_eval"])
    for tp2, tp1 in zip(run["tp2_steps"], run["tp1_steps"], strict=False):
        assert _close(tp2, tp1), (run["tp2_steps"], run["tp1_steps"])
    assert run["tp2_steps"][1] < run["tp2_steps"][0]
    assert run["tp2_params_changed"]


def test_checkpoint_round_trip_same_layout(run):
    """Model and optimizer state come back exactly: the next steps are bit-identical."""
    assert run["tp1_fresh_eval"] != run["tp1_eval"]
    assert run["tp1_reload_eval"] == run["tp1_eval"]
    assert run["tp1_reload_steps"] == run["tp1_steps"]


def test_checkpoint_resharding_resumes_training(run):
    """TP1 x PP1 -> TP2 x PP2 (tied embeddings across stages) -> TP1 x PP2 x DP2: the optimizer
    state moves too, so the third step's loss matches the uninterrupted TP1 run."""
    assert _close(run["pp2_step"], run["tp1_steps"][2]), (run["pp2_step"], run["tp1_steps"])


def test_async_fully_parallel_checkpoint(run):
    """At DP2 the fully parallel wrappers split the writes and exchange the loaded shards over
    DP, and the async save runs in a forked writer: the resumed run continues bit-identically."""
    assert run["pp2_async_reload_continue"] == run["pp2_continue"]


@pytest.mark.xfail(
    strict=True,
    reason="Megatron-Core 0.19.2 bug, not CPU-specific: 'fully_reshardable' optimizer state of "
    "params past the first (end-padded) grad bucket is saved from wrong offsets (here the tied "
    "embedding's own bucket at PP2 x DP2); fixed upstream in Megatron-LM PR #5077. When this "
    "passes, the Megatron-Core in use has the fix: drop the restriction noted in models.py.",
)
def test_fully_reshardable_multi_bucket_save(run):
    assert run["pp2_fully_reshardable_exact"]


def test_sequence_parallel(run):
    """TP2 x PP2 with sequence parallelism: same loss, and the same second step (so the norm
    weights' partial gradients were all-reduced over TP)."""
    assert _close(run["tp2_sp_eval"], run["tp1_eval"]), (run["tp2_sp_eval"], run["tp1_eval"])
    for sp, tp1 in zip(run["tp2_sp_steps"], run["tp1_steps"], strict=False):
        assert _close(sp, tp1), (run["tp2_sp_steps"], run["tp1_steps"])


def test_interleaved_schedule(run):
    assert _close(run["vp_eval"], run["deep_eval"]), (run["vp_eval"], run["deep_eval"])


def test_recompute_replays_dropout(run):
    """Same seed, with and without full recompute: the recomputed forward drew the same dropout
    masks, so the gradients and the loss after the step agree."""
    plain, recomputed = run["vp_dropout_recompute_False"], run["vp_dropout_recompute_True"]
    assert all(math.isfinite(x) for x in plain + recomputed)
    assert _close(plain[0], recomputed[0]) and _close(plain[1], recomputed[1]), (plain, recomputed)


def test_rng_tracker_on_cpu(run):
    """Forked dropout is reproducible from the seed, advances, leaves the default stream alone,
    and differs between TP ranks (their streams are seeded seed + 2718 + tp_rank)."""
    assert run["rng_fork_reproducible"]
    assert run["rng_fork_advances"]
    assert run["rng_default_untouched_by_fork"]
    assert run["rng_tp_ranks_differ"]


def test_tp_aware_init_and_model_dropout_reproducible(run):
    assert run["init_reproducible"]
    assert run["init_seed_matters"]
    assert run["init_tp_shards_differ"]
    same_seed_a, same_seed_b, other_seed = run["dropout_losses"]
    assert same_seed_a == same_seed_b
    assert other_seed != same_seed_a
