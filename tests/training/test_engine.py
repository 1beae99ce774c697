"""`python -m dft_megatron.train` on Megatron-LM's trainer, run as users run it (torchrun, CPU
processes over gloo), against references this code does not compute.

- Layout parity: from one converted checkpoint (a random-init Llama-style model built with
  transformers: GQA, SwiGLU, RMSNorm, untied, 4 layers), 3 DFT steps on the same mock
  batches at TP2 with sequence parallelism, PP2, DP2 with the distributed optimizer, PP2 x VP2
  (interleaved 1F1B) and TP2 x PP2 with the distributed optimizer give the TP1 run's loss, CE
  and mean target p (1e-4 absolute), grad norm (1e-4 relative) and target-token counts.
- The fused loss (--cross-entropy-loss-fusion, at TP2 x SP) and the chunked output layer
  (--dft-chunked-output-layer, chunks of 5 tokens, at TP2 x SP and TP2 x PP2 with the
  distributed optimizer) give the unfused TP1 run's losses, mean p and entropy (1e-5
  absolute) and grad norm (1e-5 relative).
- One DFT step at TP2 through each loss path equals one SGD step of the objective computed in
  float64 by transformers (weights, loss and CE).
- A converted model fine-tuned in bf16 with --finetune and a --seed other than the
  conversion's keeps its weights: exported after 2 steps at lr 1e-12, every tensor equals
  transformers' original within bf16 rounding (2^-8 relative per element); the same with
  --no-load-optim instead of --finetune.
- Sample-based schedules: --train-samples / --lr-warmup-samples / --lr-decay-samples give
  the iteration count and Megatron-LM's warm-up + cosine learning rates (closed form); with
  --decoupled-lr one step moves only the embedding and output layer (compared with the
  exported weights against transformers' original).
"""

from __future__ import annotations

import math

import pytest
import torch

from dft_megatron.convert.hf_init import init_hf_model
from dft_megatron.convert.hf_to_megatron import convert_hf_to_megatron
from dft_megatron.convert.megatron_to_hf import convert_megatron_to_hf
from dft_megatron.models import ModelConfig
from tests.convert.hf_models import save_tokenizer
from tests.launch import train
from tests.training.one_step import assert_moved_as

ARCH = ModelConfig(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    seq_length=32,
    max_position_embeddings=64,
    position_embedding_type="rope",
    normalization="RMSNorm",
    swiglu=True,
    add_bias_linear=False,
    untie_embeddings_and_output_weights=True,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    family="llama",
)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    save_tokenizer(root / "tokenizer")
    return init_hf_model(ARCH, root / "tokenizer", root / "hf", seed=5)


@pytest.fixture(scope="module")
def checkpoint(hf_model):
    out = hf_model.parent / "megatron"
    convert_hf_to_megatron(hf_model, out, dtype="fp32")
    return out


@pytest.fixture(scope="module")
def checkpoint_bf16(hf_model):
    out = hf_model.parent / "megatron_bf16"
    convert_hf_to_megatron(hf_model, out, dtype="bf16")
    return out


STEPS = [
    "--mock-data",
    "--micro-batch-size", "1",
    "--global-batch-size", "4",
    "--train-iters", "3",
    "--lr", "1e-3",
    "--lr-decay-style", "constant",
    "--seed", "7",
]  # fmt: skip

LAYOUTS = {
    "tp2_sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "dp2_distopt": (2, ["--use-distributed-optimizer"]),
    "pp2_vp2": (
        2,
        ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
    ),
    "tp2_pp2_distopt": (
        4,
        [
            "--tensor-model-parallel-size", "2",
            "--pipeline-model-parallel-size", "2",
            "--use-distributed-optimizer",
        ],
    ),
}  # fmt: skip


LOSS_PATHS = {
    "unfused": [],
    "fused": ["--cross-entropy-loss-fusion"],
    "chunked": ["--dft-chunked-output-layer", "--dft-output-chunk-tokens", "5"],
}
PATH_LAYOUTS = [  # TP2, SP, PP2 and TP2 x PP2 (the fused loss sees only the last stage's logits)
    ("fused", "tp2_sp"),
    ("chunked", "tp2_sp"),
    ("chunked", "tp2_pp2_distopt"),
]


@pytest.fixture(scope="module")
def reference(checkpoint, tmp_path_factory):
    run = train(
        tmp_path_factory.mktemp("tp1"), "tp1", 1, ["--load", str(checkpoint), "--finetune", *STEPS]
    )
    assert [r["iteration"] for r in run.train] == [1, 2, 3]
    return run.train


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_parity(layout, checkpoint, reference, tmp_path):
    nproc, flags = LAYOUTS[layout]
    run = train(tmp_path, layout, nproc, ["--load", str(checkpoint), "--finetune", *STEPS, *flags])
    assert len(run.train) == len(reference)
    for ours, ref in zip(run.train, reference, strict=True):
        assert ours["tokens"] == ref["tokens"] > 0
        for key in ("loss", "ce_loss", "target_prob_mean", "entropy"):
            assert ours[key] == pytest.approx(ref[key], abs=1e-4), (layout, ours["iteration"], key)
        assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    # DFT trains: the weighted loss is far below the CE it weights.
    assert reference[0]["loss"] < 0.5 * reference[0]["ce_loss"]


@pytest.mark.parametrize("path,layout", PATH_LAYOUTS)
def test_loss_path_parity(path, layout, checkpoint, reference, tmp_path):
    """The fused loss and the chunked output layer train as the unfused TP1 run does."""
    nproc, flags = LAYOUTS[layout]
    flags = ["--load", str(checkpoint), "--finetune", *STEPS, *flags, *LOSS_PATHS[path]]
    run = train(tmp_path, f"{path}_{layout}", nproc, flags)
    assert len(run.train) == len(reference)
    for ours, ref in zip(run.train, reference, strict=True):
        assert ours["tokens"] == ref["tokens"] > 0
        for key in ("loss", "ce_loss", "target_prob_mean", "entropy"):
            assert ours[key] == pytest.approx(ref[key], abs=1e-5), (path, layout, key, ours)
        assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)


def _max_relative_error(hf_dir, exported, per_element: bool = True) -> dict[str, float]:
    """Per tensor: max over elements of |ours - original| / |original| (per_element), or
    max |ours - original| / max |original| (relative to the tensor's scale)."""
    from safetensors.torch import load_file

    original = load_file(str(hf_dir / "model.safetensors"))
    ours = load_file(str(exported / "model.safetensors"))
    assert sorted(ours) == sorted(original)
    out = {}
    for name, ref in original.items():
        ref = ref.double()
        diff = (ours[name].double() - ref).abs()
        scale = ref.abs().clamp_min(1e-30) if per_element else ref.abs().max()
        out[name] = float((diff / scale).max())
    return out


@pytest.mark.parametrize("weights_only", ["--finetune", "--no-load-optim"])
def test_bf16_fine_tune_keeps_converted_weights(weights_only, hf_model, checkpoint_bf16, tmp_path):
    save = tmp_path / "run"
    flags = ["--load", str(checkpoint_bf16), weights_only, "--bf16", "--seed", "999"]
    flags += ["--mock-data", "--micro-batch-size", "1", "--global-batch-size", "2"]
    flags += ["--train-iters", "2", "--lr", "1e-12", "--save", str(save), "--save-interval", "2"]
    flags += ["--tensor-model-parallel-size", "2"]
    train(tmp_path, "bf16", 2, flags)
    exported = convert_megatron_to_hf(save, tmp_path / "hf")
    errors = _max_relative_error(hf_model, exported)
    # bf16 keeps 8 significant bits: rounding moves an element by at most 2^-9 of itself.
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 2.0**-8, (worst, errors[worst])


def test_sample_based_schedule_and_decoupled_lr(hf_model, checkpoint, tmp_path):
    lr, min_lr, warmup, decay, gbs = 1e-3, 1e-4, 8, 36, 4
    flags = ["--load", str(checkpoint), "--finetune", "--mock-data", "--micro-batch-size", "1"]
    flags += ["--global-batch-size", str(gbs), "--train-samples", "40", "--lr", str(lr)]
    flags += ["--min-lr", str(min_lr), "--lr-warmup-samples", str(warmup)]
    flags += ["--lr-decay-samples", str(decay), "--lr-decay-style", "cosine"]
    run = train(tmp_path, "samples", 1, flags)
    assert [r["iteration"] for r in run.train] == list(range(1, 11))  # 40 samples / 4

    def expected(samples: int) -> float:  # Megatron-LM's linear warm-up, then cosine decay
        if samples <= warmup:
            return lr * samples / warmup
        ratio = min((samples - warmup) / (decay - warmup), 1.0)
        return min_lr + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (lr - min_lr)

    # The logged lr is the scheduler's after the iteration's step (samples consumed so far).
    for r in run.train:
        assert r["lr"] == pytest.approx(expected(r["iteration"] * gbs), rel=1e-6), r["iteration"]

    # --decoupled-lr: the embedding and output layer learn at their own rate; with the base
    # lr vanishingly small, one step moves only them.
    save = tmp_path / "decoupled"
    flags = ["--load", str(checkpoint), "--finetune", "--mock-data", "--micro-batch-size", "1"]
    flags += ["--global-batch-size", "2", "--train-iters", "1", "--lr", "1e-12"]
    flags += ["--decoupled-lr", "1e-2", "--lr-decay-style", "constant", "--weight-decay", "0"]
    flags += ["--save", str(save), "--save-interval", "1"]
    train(tmp_path, "decoupled", 1, flags)
    exported = convert_megatron_to_hf(save, tmp_path / "hf")
    errors = _max_relative_error(hf_model, exported, per_element=False)
    moved = {name for name, e in errors.items() if e > 1e-4}
    assert moved == {"model.embed_tokens.weight", "lm_head.weight"}, errors
    assert torch.isfinite(torch.tensor(list(errors.values()))).all()


@pytest.mark.parametrize("path", list(LOSS_PATHS))
def test_one_step_equals_transformers_gradient_step(path, hf_model, checkpoint, tmp_path):
    """One DFT step of the engine at TP2 (SGD, no decay, no clipping) on pre-tokenized rows,
    through each loss path (the chunked one skips the prompt tokens' logits),
    moves every weight as one SGD step of the same objective does in plain transformers:
    W1 = W0 - lr * grad of the token mean over loss tokens of -sg(p) log p, computed in
    float64 by transformers' model. Compared per tensor: within 1e-3 of the largest update
    plus the fp32 rounding of the stored weights (a large lr, since DFT's gradients at
    p ~ 1/vocab are small and a norm weight near 1 resolves only ~1e-7)."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in (17, 20, 24, 33):
        ids = torch.randint(3, 49, (n,), generator=gen).tolist()
        rows.append({"input_ids": ids, "loss_mask": [0] * 5 + [1] * (n - 5)})
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lr, save = 10.0, tmp_path / "step"
    flags = ["--load", str(checkpoint), "--finetune", "--sft-data", str(data), "--no-packing"]
    flags += ["--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4"]
    flags += ["--train-iters", "1", "--optimizer", "sgd", "--sgd-momentum", "0", "--lr", str(lr)]
    flags += ["--weight-decay", "0", "--clip-grad", "0", "--lr-decay-style", "constant"]
    flags += ["--tensor-model-parallel-size", "2", "--save", str(save), "--save-interval", "1"]
    flags += ["--data-cache-path", str(tmp_path / "cache"), *LOSS_PATHS[path]]
    run = train(tmp_path, "step", 2, flags)
    exported = convert_megatron_to_hf(save, tmp_path / "hf")

    model = AutoModelForCausalLM.from_pretrained(hf_model, dtype=torch.float64)
    total, ce, count = 0.0, 0.0, 0
    for r in rows:
        ids = torch.tensor(r["input_ids"])
        mask = torch.tensor(r["loss_mask"][1:], dtype=torch.float64)
        logp = torch.log_softmax(model(ids[None, :-1]).logits[0], dim=-1)
        logp_target = logp.gather(1, ids[1:, None])[:, 0]
        total = total - (logp_target.exp().detach() * logp_target * mask).sum()
        ce -= float((logp_target.detach() * mask).sum())
        count += int(mask.sum())
    (total / count).backward()
    assert run.train[0]["tokens"] == count
    assert run.train[0]["loss"] == pytest.approx(float(total) / count, rel=1e-5)
    assert run.train[0]["ce_loss"] == pytest.approx(ce / count, rel=1e-5)

    before = load_file(str(hf_model / "model.safetensors"))
    after = load_file(str(exported / "model.safetensors"))
    sgd = {name: -lr * p.grad for name, p in model.named_parameters()}
    assert_moved_as(before, after, sgd)


def test_logging_outputs(checkpoint, tmp_path):
    """JSON lines with the documented keys on the logged iterations, validation every
    --eval-interval, Megatron-LM's TensorBoard scalars (DFT's among them) and the p histogram,
    whose count is the iteration's target tokens."""
    tb = tmp_path / "tb"
    flags = ["--load", str(checkpoint), "--finetune", *STEPS, "--train-iters", "4"]
    flags += ["--log-interval", "2", "--eval-interval", "3", "--eval-iters", "2"]
    flags += ["--tensorboard-dir", str(tb)]
    run = train(tmp_path, "log", 1, flags)
    assert [r["iteration"] for r in run.train] == [2, 4]
    for rec in run.train:
        for key in ("loss", "ce_loss", "target_prob_mean", "entropy", "grad_norm", "lr"):
            assert isinstance(rec[key], float), key
        assert 0 < rec["loss"] < rec["ce_loss"]  # DFT's loss: p-weighted CE
        fractions = [rec[k] for k in ("p<0.01", "p 0.01-0.5", "p 0.5-0.99", "p>0.99")]
        assert sum(fractions) == pytest.approx(1.0)
        assert sum(rec["p_histogram"]) == rec["tokens"]
    # Every 3rd iteration, and Megatron-LM's validation at the end of training.
    assert [r["iteration"] for r in run.valid] == [3, 4]
    assert not any(r["full_pass"] for r in run.valid)
    assert "[dft] iteration 4/4" in run.output

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb), size_guidance={"histograms": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"lm loss", "ce loss", "target p", "p>0.99", "learning-rate"} <= scalars, scalars
    hist = events.Histograms("train/target_prob")[-1]
    assert hist.step == 4 and hist.histogram_value.num == run.train[-1]["tokens"]
    assert events.Histograms("valid/target_prob")


@pytest.mark.parametrize("precision", ["--bf16", "--fp16"])
def test_half_precision_tracks_fp32(precision, checkpoint, reference, tmp_path):
    """bf16 / fp16 (Float16Module, fp32 main weights, fp16 loss scaling) from the same fp32
    weights: the first step's DFT loss and CE within 2e-2 relative of fp32's."""
    run = train(tmp_path, precision, 1, ["--load", str(checkpoint), "--finetune", *STEPS,
                                         precision])  # fmt: skip
    for key in ("loss", "ce_loss"):
        assert run.train[0][key] == pytest.approx(reference[0][key], rel=2e-2), key
