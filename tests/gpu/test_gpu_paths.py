"""GPU-only paths of the Megatron-LM engine: Transformer Engine layers, FP8 recipes, NCCL
layouts, overlapped communication, a bf16 fine-tune of a converted model.

Skipped without CUDA (the TE and FP8 tests also without Transformer Engine, each FP8 recipe
where this GPU or TE cannot run it; the 2-rank ones with fewer than 2 GPUs). Every run is
`torchrun -m dft_megatron.train` as a user starts it (tests/launch.py), one process per GPU
over NCCL: the pytest process holds no process group or FP8 state, and a crash in CUDA code
fails one test, not the session. Every run checks that the CPU bridge stayed off.

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
- Resume on one GPU (bf16, distributed optimizer, overlapped grad reduce and param gather,
  dropout on): 6 steps straight against 3, save, load, 3 more; the records of the two runs
  equal to 1e-6 relative (the same kernels on the same data; a wrong optimizer step count,
  LR schedule or RNG state moves them by far more).
- A converted model fine-tuned in bf16 with --finetune and another --seed keeps its weights
  on the GPU as on the CPU (tests/training/test_engine.py): exported after 2 steps at lr
  1e-12, every tensor within bf16 rounding of transformers' original.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.launch import train

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (TE layers, FP8, NCCL)"
)

TIMEOUT_S = 600.0
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")

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
FP32_NO_TF32 = {"NVIDIA_TF32_OVERRIDE": "0"}
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
    from dft_megatron.training.arguments import transformer_engine_available

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


# ------------------------------------------------------------------ runs


def _run(tmp_path: Path, name: str, nproc: int, flags: list[str], env: dict | None = None):
    run = train(tmp_path, name, nproc, flags, timeout=TIMEOUT_S, env=env)
    assert "CPU bridge" not in run.output, "the CPU bridge switched on with a GPU present"
    return run


def _assert_finite(records: list[dict], iters: int) -> None:
    assert [r["iteration"] for r in records] == list(range(1, iters + 1))
    for r in records:
        for key in ("loss", "ce_loss", "grad_norm"):
            assert math.isfinite(r[key]), (key, r)


def _save_first(tmp_path: Path, flags: list[str], nproc: int = 1) -> Path:
    """A checkpoint of 1 step of `flags` (the shared starting point of a comparison)."""
    ckpt = tmp_path / "start"
    _run(tmp_path, "start", nproc, [*TINY, *flags, "--train-iters", "1", "--save", str(ckpt),
                                    "--save-interval", "1"])  # fmt: skip
    return ckpt


def _continue(tmp_path: Path, name: str, ckpt: Path, flags: list[str], nproc: int = 1,
              iters: int = 3, env: dict | None = None) -> list[dict]:  # fmt: skip
    run = _run(tmp_path, name, nproc, [*TINY, *flags, "--load", str(ckpt), "--finetune",
                                       "--train-iters", str(iters)], env)  # fmt: skip
    return run.train


@needs_te
def test_te_spec_train_step(tmp_path):
    run = _run(tmp_path, "te", 1, [*TINY, *TE_BF16, "--train-iters", "2"])
    _assert_finite(run.train, 2)


@needs_te
@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_fp8_step(recipe, tmp_path):
    reason = fp8_unsupported(recipe)
    if reason:
        pytest.skip(reason)
    ckpt = _save_first(tmp_path, TE_BF16)
    bf16 = _continue(tmp_path, "bf16", ckpt, TE_BF16, iters=1)
    fp8 = _continue(tmp_path, "fp8", ckpt, [*TE_BF16, "--fp8-format", "hybrid",
                                            "--fp8-recipe", recipe], iters=1)  # fmt: skip
    _assert_finite(fp8, 1)
    assert fp8[0]["ce_loss"] == pytest.approx(bf16[0]["ce_loss"], rel=5e-2)


@needs_te
def test_te_spec_matches_local_spec_bf16(tmp_path):
    ckpt = _save_first(tmp_path, ["--bf16", "--transformer-impl", "local"])
    local = _continue(tmp_path, "local", ckpt, ["--bf16", "--transformer-impl", "local"], iters=4)
    te = _continue(tmp_path, "te", ckpt, TE_BF16, iters=4)
    for a, b in zip(local, te, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2)


LAYOUTS = {
    "tp2": ["--tensor-model-parallel-size", "2"],
    "tp2_sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
}


@two_gpus
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_nccl_layout_matches_tp1(layout, tmp_path):
    local = ["--transformer-impl", "local"]
    ckpt = _save_first(tmp_path, local)
    ref = _continue(tmp_path, "tp1", ckpt, local, env=FP32_NO_TF32)
    got = _continue(tmp_path, layout, ckpt, [*local, *LAYOUTS[layout]], nproc=2,
                    env=FP32_NO_TF32)  # fmt: skip
    for a, b in zip(ref, got, strict=True):
        for key in ("loss", "ce_loss", "target_prob_mean", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-3), (layout, key)


def test_overlap_distributed_optimizer_resume_bf16(tmp_path):
    flags = [*TINY, "--bf16", "--use-distributed-optimizer", "--overlap-grad-reduce",
             "--overlap-param-gather", "--hidden-dropout", "0.1"]  # fmt: skip
    straight = _run(tmp_path, "straight", 1, [*flags, "--train-iters", "6"]).train
    ckpt = tmp_path / "ckpt"
    resume = [*flags, "--train-iters", "6", "--save", str(ckpt), "--load", str(ckpt),
              "--save-interval", "3"]  # fmt: skip
    first = _run(tmp_path, "first", 1, [*resume, "--exit-interval", "3"]).train
    second = _run(tmp_path, "second", 1, resume).train
    got = first + second
    assert [r["iteration"] for r in got] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, got, strict=True):
        for key in ("loss", "ce_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), (a["iteration"], key)


def test_bf16_fine_tune_keeps_converted_weights_on_gpu(tmp_path):
    import subprocess
    import sys

    from tests.convert.hf_models import save_hf_model
    from tests.training.test_engine import _max_relative_error

    hf = save_hf_model("qwen2", tmp_path / "hf")
    ckpt = tmp_path / "ckpt"
    # Conversion is a CPU job (tools/ hide the GPUs); in this process the GPU is visible.
    code = (
        "import os; os.environ['CUDA_VISIBLE_DEVICES']=''\n"
        "from dft_megatron.convert.hf_to_megatron import convert_hf_to_megatron\n"
        "from dft_megatron.convert.megatron_to_hf import convert_megatron_to_hf\n"
        "import sys\n"
        "if __name__ == '__main__':\n"
        "    f = convert_hf_to_megatron if sys.argv[1] == 'in' else convert_megatron_to_hf\n"
        "    f(sys.argv[2], sys.argv[3])\n"
    )
    script = tmp_path / "convert.py"
    script.write_text(code)
    subprocess.run([sys.executable, str(script), "in", str(hf), str(ckpt)], check=True)
    save = tmp_path / "run"
    _run(tmp_path, "ft", 1, ["--load", str(ckpt), "--finetune", "--bf16", "--seed", "999",
                             "--mock-data", "--micro-batch-size", "1", "--global-batch-size",
                             "2", "--train-iters", "2", "--lr", "1e-12", "--save", str(save),
                             "--save-interval", "2"])  # fmt: skip
    subprocess.run([sys.executable, str(script), "out", str(save), str(tmp_path / "back")],
                   check=True)  # fmt: skip
    errors = _max_relative_error(hf, tmp_path / "back")
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 2.0**-8, (worst, errors[worst])
