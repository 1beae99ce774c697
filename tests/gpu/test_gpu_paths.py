"""GPU-only paths of the trainer: Transformer Engine layers, FP8 recipes, NCCL layouts.

Skipped without CUDA (the TE and FP8 tests also without Transformer Engine, each FP8 recipe
where this GPU or TE cannot run it). Every run goes through `dft_megatron.training.trainer.
train` with a config from `parse_args`, in spawned processes, one per GPU, that join an NCCL
group as torchrun would describe it (env://): the pytest process itself never holds a
process group or FP8 state, and a crash in CUDA code fails one test, not the session.

References and tolerances:
- TE spec step: finite loss, CE and gradient norm; the model built holds TE modules.
- FP8 (one test per recipe): the first step's plain CE within 5e-2 relative of the bf16 TE
  run's from the same checkpoint on the same batch (FP8 GEMMs quantize activations and
  weights to 3-4 significant bits, so the forward moves by a few per cent at most).
- TE vs local spec, bf16: the loss curve over 4 steps from one checkpoint within 2e-2
  relative (different kernels and bf16 rounding order; a wrong mapping of the layer norms
  or the fused QKV would move it by far more).
- NCCL layouts, fp32 with TF32 off: TP2 (and TP2 + sequence parallel) against TP1 from one
  checkpoint, 1e-3 relative on the loss, CE, mean target probability and gradient norm
  (reduction order only; a wrong shard moves them by O(1)).
- Resume on one GPU (local spec, bf16, distributed optimizer, overlapped grad reduce and
  param gather, dropout on): 6 steps straight against 3, save, load, 3 more; the records
  of the two runs equal to 1e-6 relative (the same kernels on the same data; a wrong
  optimizer step count, LR schedule or RNG state moves them by far more). Every run checks
  that the CPU bridge stayed off.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.dist import spawn

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (TE layers, FP8, NCCL)"
)

TIMEOUT_S = 900.0

# Small, but every GEMM dimension a multiple of 128 (FP8 GEMMs need multiples of 16, MXFP8 of
# 32, blockwise scaling works in 128-wide blocks): hidden 256, QKV 768, FFN 1024, 256 tokens
# per micro-batch. Vocabulary 1000, padded to 1024 rows.
TINY = [
    "--mock-data", "--num-layers", "2", "--hidden-size", "256", "--num-attention-heads", "4",
    "--seq-length", "128", "--vocab-size", "1000", "--hidden-dropout", "0",
    "--attention-dropout", "0", "--lr", "1e-3", "--lr-decay-style", "constant",
    "--global-batch-size", "4", "--micro-batch-size", "2", "--seed", "7",
]  # fmt: skip
TE_BF16 = ["--bf16", "--transformer-impl", "transformer_engine"]
LOCAL_BF16 = ["--bf16", "--transformer-impl", "local"]

FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
# Megatron-Core 0.19's get_fp8_recipe: the TE version each recipe needs.
FP8_MIN_TE = {
    "delayed": "1.0",
    "tensorwise": "2.2.0.dev0",
    "mxfp8": "2.1.0",
    "blockwise": "2.3.0.dev0",
}
# Transformer Engine's support checks: FP8 tensor cores from Ada (8.9); 128-block scaling from
# Hopper (9.0, CUDA >= 12.9); MXFP8 (32-element blocks, E8M0 scales) from Blackwell (10.0).
FP8_MIN_CAPABILITY = {
    "delayed": (8, 9),
    "tensorwise": (8, 9),
    "mxfp8": (10, 0),
    "blockwise": (9, 0),
}
FP8_TE_CHECK = {
    "delayed": "is_fp8_available",
    "tensorwise": "is_fp8_available",
    "mxfp8": "is_mxfp8_available",
    "blockwise": "is_fp8_block_scaling_available",
}


def _have_te() -> bool:
    from dft_megatron.models.gpt import transformer_engine_available

    return transformer_engine_available()


# Without CUDA the module-level mark skips (and TE is not even imported).
needs_te = pytest.mark.skipif(
    torch.cuda.is_available() and not _have_te(),
    reason="needs Transformer Engine (pip install 'dft-megatron[te]', or the NGC container)",
)


def fp8_unsupported(recipe: str) -> str | None:
    """Why this GPU / Transformer Engine cannot run `recipe`, or None when it can."""
    from megatron.core.utils import get_te_version, is_te_min_version

    if not is_te_min_version(FP8_MIN_TE[recipe]):
        return (
            f"FP8 recipe {recipe} needs Transformer Engine >= {FP8_MIN_TE[recipe]}; "
            f"installed: {get_te_version()}"
        )
    capability = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if capability < FP8_MIN_CAPABILITY[recipe]:
        need = ".".join(map(str, FP8_MIN_CAPABILITY[recipe]))
        return (
            f"FP8 recipe {recipe} needs compute capability >= {need}; {name} is "
            f"{capability[0]}.{capability[1]}"
        )
    from transformer_engine.pytorch.fp8 import FP8GlobalStateManager

    check = getattr(FP8GlobalStateManager, FP8_TE_CHECK[recipe], None)
    if check is not None:
        ok, reason = check()
        if not ok:
            return f"FP8 recipe {recipe} on {name}: Transformer Engine says: {reason}"
    return None


# ------------------------------------------------------------------ NCCL processes


def spawn_nccl(fn, world_size: int, *args, timeout: float = TIMEOUT_S) -> None:
    """Run `fn(rank, world_size, *args)` on `world_size` GPUs (one process each)."""
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs, {torch.cuda.device_count()} visible")
    spawn(fn, world_size, *args, timeout=timeout, backend="nccl")


def _train_worker(rank, world_size, argv, out):
    """`train(parse_args(argv))`; rank 0 writes the records and the built model's modules."""
    from dft_megatron.training import trainer
    from dft_megatron.training.arguments import parse_args

    modules = set()
    build_model = trainer.build_model

    def build_and_note(cfg, transformer_impl):
        chunks = build_model(cfg, transformer_impl)
        modules.update(type(m).__name__ for c in chunks for m in c.modules())
        return chunks

    trainer.build_model = build_and_note  # the one the trainer's _run calls
    cfg, given = parse_args(argv)
    records = trainer.train(cfg, given)
    from dft_megatron.compat import cpu as bridge

    if bridge.cpu_bridge_active() or torch.Tensor.cuda is not bridge._ORIG_TENSOR_CUDA:
        raise AssertionError("the CPU bridge was installed in a CUDA run")
    if rank == 0:
        Path(out).write_text(json.dumps({"records": records, "modules": sorted(modules)}))


def run(tmp: Path, name: str, world_size: int, argv: list[str]) -> dict:
    out = tmp / f"{name}.json"
    spawn_nccl(_train_worker, world_size, argv, str(out))
    return json.loads(out.read_text())


def _finetune(ckpt: Path, *extra: str, iters: int = 3) -> list[str]:
    return [*TINY, "--load", str(ckpt), "--finetune", "--train-iters", str(iters), *extra]


def _assert_finite(records: list[dict], iters: int) -> None:
    assert [r["iteration"] for r in records] == list(range(1, iters + 1))
    for r in records:
        for key in ("loss", "ce_loss", "target_prob_mean", "grad_norm"):
            assert math.isfinite(r[key]), (key, r)
        assert r["tokens"] > 0


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def te_checkpoint(tmp_path_factory) -> Path:
    """A TE-spec bf16 model, randomly initialized and saved at TP1 (--train-iters 0)."""
    path = tmp_path_factory.mktemp("te_init") / "ckpt"
    got = run(path.parent, "init", 1, [*TINY, *TE_BF16, "--train-iters", "0", "--save", str(path)])
    assert got["records"] == []
    return path


@pytest.fixture(scope="module")
def te_bf16(te_checkpoint, tmp_path_factory) -> dict:
    """4 bf16 steps of the TE-spec model from `te_checkpoint`, single process."""
    return run(
        tmp_path_factory.mktemp("te_bf16"), "te", 1, _finetune(te_checkpoint, *TE_BF16, iters=4)
    )


# ------------------------------------------------------------------ tests


@needs_te
def test_te_spec_train_step(te_bf16):
    """The TE layer spec builds, trains in bf16 and saves/loads through the trainer."""
    assert {
        "TELayerNormColumnParallelLinear",
        "TEDotProductAttention",
        "TERowParallelLinear",
    } <= set(te_bf16["modules"]), te_bf16["modules"]
    _assert_finite(te_bf16["records"], 4)


@needs_te
@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_fp8_step(recipe, te_checkpoint, te_bf16, tmp_path):
    reason = fp8_unsupported(recipe)
    if reason:
        pytest.skip(reason)
    fp8 = ["--fp8-format", "hybrid", "--fp8-recipe", recipe]
    got = run(tmp_path, f"fp8_{recipe}", 1, _finetune(te_checkpoint, *TE_BF16, *fp8, iters=2))
    _assert_finite(got["records"], 2)
    first, ref = got["records"][0], te_bf16["records"][0]
    assert first["ce_loss"] == pytest.approx(ref["ce_loss"], rel=5e-2), (recipe, first, ref)
    assert first["tokens"] == ref["tokens"]


@needs_te
def test_te_spec_matches_local_spec_bf16(te_checkpoint, te_bf16, tmp_path):
    """One checkpoint, two layer specs (Megatron-Core maps the local spec's layer-norm keys onto
    TE's fused ones): the same loss curve to bf16 accuracy."""
    local = run(tmp_path, "local", 1, _finetune(te_checkpoint, *LOCAL_BF16, iters=4))
    assert not any(name.startswith("TE") for name in local["modules"]), local["modules"]
    _assert_finite(local["records"], 4)
    for te, lo in zip(te_bf16["records"], local["records"], strict=True):
        for key in ("loss", "ce_loss", "target_prob_mean"):
            assert lo[key] == pytest.approx(te[key], rel=2e-2), (key, te, lo)
        assert lo["tokens"] == te["tokens"]
    # The curve moved, so agreeing on it means something.
    assert te_bf16["records"][-1]["ce_loss"] != te_bf16["records"][0]["ce_loss"]


@pytest.fixture(scope="module")
def fp32_checkpoint(tmp_path_factory) -> Path:
    """An fp32 model (TE spec where installed) saved at TP1, for the layout comparisons."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, {torch.cuda.device_count()} visible")
    path = tmp_path_factory.mktemp("fp32_init") / "ckpt"
    run(path.parent, "init", 1, [*TINY, "--train-iters", "0", "--save", str(path)])
    return path


@pytest.fixture(scope="module")
def fp32_tp1(fp32_checkpoint, tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("tp1")
    return run(tmp, "tp1", 1, _finetune(fp32_checkpoint, "--micro-batch-size", "4"))["records"]


NCCL_LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", "2"],
    "tp2_sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
}


@pytest.mark.parametrize("layout", NCCL_LAYOUTS)
def test_nccl_layout_matches_tp1(layout, fp32_checkpoint, fp32_tp1, tmp_path):
    got = run(tmp_path, layout, 2, _finetune(fp32_checkpoint, *NCCL_LAYOUTS[layout]))["records"]
    _assert_finite(got, 3)
    for ref, rec in zip(fp32_tp1, got, strict=True):
        for key in ("loss", "ce_loss", "target_prob_mean", "grad_norm"):
            assert rec[key] == pytest.approx(ref[key], rel=1e-3), (layout, key, ref, rec)
        assert rec["tokens"] == ref["tokens"]
    assert got[-1]["loss"] != got[0]["loss"]


def test_overlap_distributed_optimizer_resume_bf16(tmp_path):
    """--use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather in bf16 on one
    GPU (local spec): 6 steps straight == 3, save, load, 3 more; validation in between."""
    flags = [
        *TINY,
        *LOCAL_BF16,
        "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
        "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
        "--lr-decay-style", "cosine", "--lr-warmup-iters", "2", "--train-iters", "6",
        "--eval-interval", "2", "--eval-iters", "1",
    ]  # fmt: skip
    straight = run(tmp_path, "straight", 1, flags)["records"]
    ckpt = tmp_path / "ckpt"
    first = run(tmp_path, "first", 1, [*flags, "--save", str(ckpt), "--exit-interval", "3"])
    second = run(tmp_path, "second", 1, [*flags, "--load", str(ckpt)])
    train_records = [r for r in straight if r.get("split") != "valid"]
    resumed = [r for r in first["records"] + second["records"] if r.get("split") != "valid"]
    assert [r["iteration"] for r in resumed] == list(range(1, 7)), resumed
    _assert_finite(train_records, 6)
    for a, b in zip(train_records, resumed, strict=True):
        assert b["lr"] == a["lr"], (a, b)
        for key in ("loss", "ce_loss", "target_prob_mean", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), (key, a, b)
    assert train_records[-1]["loss"] != train_records[0]["loss"]
    evals = [r for r in straight if r.get("split") == "valid"]
    assert [r["iteration"] for r in evals] == [2, 4, 6], evals
