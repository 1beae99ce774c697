"""The DFT family's objectives through Megatron-LM's trainer, against transformers in float64.

Policy and reference are two random-init Qwen2-style models built with transformers
(different seeds: different weights, the same architecture), each converted to a Megatron-LM
checkpoint. One Adam step of the trainer (`-m dft_megatron.train`, 4 CPU processes over
gloo) from the converted policy must move every weight as one torch.optim.AdamW step (same
lr, betas, eps; no decay, no clipping) of the same objective written out on transformers'
float64 models:

- asft at TP 2 x PP 2 with the reference loaded from its own checkpoint (--ref-load):
      J = sum over loss tokens of [-sg(p) log p + lambda KL(q_ref || p_theta)] / N
  with the logged loss (DFT + lambda KL), CE and KL matching the reference's values;
- eaft with a --token-weights table (by class and by id) and the --sft-mix-decay-iters
  schedule (its first iteration's mix) at TP 2 x DP 2:
      J = sum over loss tokens of t(y) [m CE + (1 - m) sg((H_20 / ln 20)^a) CE] / N.

Tolerance: per tensor, 1e-3 of the largest expected update plus the fp32 rounding of the
stored weights (the update of one Adam step is ~lr per element, the trainer runs fp32).
Breaking the objective on purpose (the reference as the policy, no KL) fails the asft test:
the reference weights there move by lr where the KL gradient is.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from dft_megatron.convert.hf_init import init_hf_model
from dft_megatron.convert.hf_to_megatron import convert_hf_to_megatron
from dft_megatron.convert.megatron_to_hf import convert_megatron_to_hf
from tests.convert.hf_models import save_tokenizer
from tests.launch import train
from tests.training.one_step import adam_step_flags, adam_updates, assert_moved_as, write_rows
from tests.training.test_engine import ARCH as ENGINE_ARCH

# test_engine's model with 2 layers and Qwen2's qkv bias.
ARCH = replace(ENGINE_ARCH, num_layers=2, add_qkv_bias=True, family="qwen2")
KL_COEFF = 0.5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(policy HF dir, policy checkpoint, reference HF dir, reference checkpoint)."""
    root = tmp_path_factory.mktemp("objectives")
    save_tokenizer(root / "tokenizer")
    out = []
    for name, seed in (("policy", 11), ("reference", 12)):
        hf = init_hf_model(ARCH, root / "tokenizer", root / f"{name}_hf", seed=seed)
        ckpt = root / f"{name}_megatron"
        convert_hf_to_megatron(hf, ckpt, dtype="fp32")
        out += [hf, ckpt]
    return tuple(out)


def _check_adam_step(model, policy_hf, exported, tmp_path):
    """Every weight of `exported` moved as one AdamW step of `model`'s accumulated grads."""
    from safetensors.torch import load_file

    expected_after = adam_updates(model, tmp_path / "expected")
    initial = load_file(str(policy_hf / "model.safetensors"))
    after = load_file(str(exported / "model.safetensors"))
    assert_moved_as(initial, after, {n: expected_after[n] - w for n, w in initial.items()})


def test_asft_step_at_tp2_pp2_equals_transformers(models, tmp_path):
    from transformers import AutoModelForCausalLM

    policy_hf, policy_ckpt, ref_hf, ref_ckpt = models
    rows = write_rows(tmp_path / "rows.jsonl")
    save = tmp_path / "step"
    flags = adam_step_flags(policy_ckpt, tmp_path / "rows.jsonl", save, tmp_path)
    flags += ["--loss-type", "asft", "--asft-kl-coeff", str(KL_COEFF), "--ref-load", str(ref_ckpt)]
    flags += ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    run = train(tmp_path, "asft", 4, flags)
    assert "asft reference from" in run.output and "MiB of weights" in run.output
    exported = convert_megatron_to_hf(save, tmp_path / "hf")

    model = AutoModelForCausalLM.from_pretrained(policy_hf, dtype=torch.float64)
    reference = AutoModelForCausalLM.from_pretrained(ref_hf, dtype=torch.float64)
    dft, kl_total, ce, count = 0.0, 0.0, 0.0, 0
    for r in rows:
        ids = torch.tensor(r["input_ids"])
        mask = torch.tensor(r["loss_mask"][1:], dtype=torch.float64)
        logp = torch.log_softmax(model(ids[None, :-1]).logits[0], dim=-1)
        with torch.no_grad():
            ref_logp = torch.log_softmax(reference(ids[None, :-1]).logits[0], dim=-1)
        logp_target = logp.gather(1, ids[1:, None])[:, 0]
        dft = dft - (logp_target.exp().detach() * logp_target * mask).sum()
        kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
        kl_total = kl_total + (kl * mask).sum()
        ce -= float((logp_target.detach() * mask).sum())
        count += int(mask.sum())
    ((dft + KL_COEFF * kl_total) / count).backward()
    (record,) = run.train
    assert record["tokens"] == count
    assert record["kl"] == pytest.approx(float(kl_total) / count, rel=1e-5)
    assert record["kl"] > 0.01  # two different models: the term is not vacuous
    assert record["loss"] == pytest.approx(float(dft + KL_COEFF * kl_total) / count, rel=1e-5)
    assert record["ce_loss"] == pytest.approx(ce / count, rel=1e-5)
    assert "kl:" in run.output  # Megatron-LM's iteration line carries it apart
    _check_adam_step(model, policy_hf, exported, tmp_path)
    _check_resume_keeps_the_reference(save, ref_ckpt, policy_ckpt)


def _check_resume_keeps_the_reference(save, ref_ckpt, policy_ckpt):
    """Resuming from the asft run's checkpoint without --ref-load anchors to the reference
    that run used, not to the weights trained so far; another architecture is refused."""
    from dft_megatron.checkpoint.integrity import load_target
    from dft_megatron.training.safeguards import resolve_reference, stored_args

    args = stored_args(load_target(str(save), None).folder)
    args.load, args.ref_load, args.ckpt_step = str(save), None, None
    assert resolve_reference(args) == []
    assert args.ref_load == str(ref_ckpt)
    args.ref_load, args.load = None, str(policy_ckpt)  # a converted model: the reference is itself
    assert resolve_reference(args) == [] and args.ref_load == str(policy_ckpt)
    args.hidden_size = 128
    (problem,) = resolve_reference(args)
    assert "--ref-load" in problem and "hidden_size 64 there, 128 here" in problem


def test_eaft_with_token_weights_and_schedule_equals_transformers(models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dft_megatron.loss.token_weights import token_classes

    policy_hf, policy_ckpt, _, _ = models
    rows = write_rows(tmp_path / "rows.jsonl")
    table = {"default": 1.0, "classes": {"number": 2.0, "punctuation": 0.5}, "ids": {"7": 3.0}}
    (tmp_path / "weights.json").write_text(json.dumps(table))
    save = tmp_path / "step"
    flags = adam_step_flags(policy_ckpt, tmp_path / "rows.jsonl", save, tmp_path)
    flags += ["--loss-type", "eaft", "--eaft-alpha", "0.5", "--token-weights"]
    flags += [str(tmp_path / "weights.json"), "--sft-mix", "0.8", "--sft-mix-decay-iters", "4"]
    flags += ["--tensor-model-parallel-size", "2"]
    run = train(tmp_path, "eaft", 4, flags)
    assert "--token-weights" in run.output and "ids from class number" in run.output
    exported = convert_megatron_to_hf(save, tmp_path / "hf")

    tokenizer = AutoTokenizer.from_pretrained(policy_hf)
    model = AutoModelForCausalLM.from_pretrained(policy_hf, dtype=torch.float64)
    vocab = model.config.vocab_size
    classes = token_classes(tokenizer, vocab)
    weights = torch.tensor([table["classes"].get(c, 1.0) for c in classes], dtype=torch.float64)
    weights[7] = 3.0
    assert (weights == 2.0).any() and (weights == 0.5).any()
    mix = 0.8  # iteration 0 of the linear schedule
    objective, count = 0.0, 0
    for r in rows:
        ids = torch.tensor(r["input_ids"])
        mask = torch.tensor(r["loss_mask"][1:], dtype=torch.float64)
        logits = model(ids[None, :-1]).logits[0]
        logp = torch.log_softmax(logits, dim=-1)
        ce = -logp.gather(1, ids[1:, None])[:, 0]
        top = torch.softmax(logits.detach().topk(20, dim=-1).values, dim=-1)
        entropy = -(top * top.log()).sum(-1)
        w = (entropy / math.log(20)) ** 0.5
        per_token = weights[ids[1:]] * (mix * ce + (1 - mix) * w * ce)
        objective = objective + (per_token * mask).sum()
        count += int(mask.sum())
    (objective / count).backward()
    (record,) = run.train
    assert record["sft_mix"] == pytest.approx(mix)
    assert record["loss"] == pytest.approx(float(objective) / count, rel=1e-5)
    _check_adam_step(model, policy_hf, exported, tmp_path)
