"""DFT on a mixture-of-experts model (Qwen3-MoE layout) through Megatron-LM's trainer, with
expert parallelism on CPU processes over gloo, against references this code does not compute.

The model: a random-init Qwen3-MoE built with transformers (2 layers, both MoE: 4 experts of
width 32, top 2 renormalized as the hub's Qwen3-MoE models route; q/k norms; GQA), converted
to a Megatron-LM checkpoint. The router's load-balancing loss is on (--moe-aux-loss-coeff
0.01), token dropping off (Megatron-LM's default: no capacity factor).

- Layout parity: 3 DFT steps from the checkpoint on the same mock batches at EP2 (DP2; the
  alltoall dispatcher; also with the distributed optimizer), TP2 x EP2 with sequence
  parallelism (alltoall and allgather) give the
  EP1 run's loss, CE, mean target p (1e-4 absolute), grad norm and load-balancing loss (1e-4
  relative) and token counts; the load-balancing loss is logged apart from the DFT loss.
- One Adam step at TP2 x EP2 on pre-tokenized rows moves every weight as one
  torch.optim.AdamW step (same lr, betas, eps; no decay, no clipping) of the same objective
  computed in float64 by transformers' model (`experts_implementation="eager"`, its router
  logits from `output_router_logits`):
      J = [sum over loss tokens of -sg(p) log p
           + coeff * sum over micro-batches b, MoE layers l of T_b * aux_l(b)] / N,
  N the loss tokens of the global batch, T_b the tokens of micro-batch b and aux_l(b)
  Megatron-Core's switch load-balancing loss of layer l over b's tokens,
  E * sum_i (count_i / (T_b * k)) * mean_t softmax(router logits_t)_i (Megatron-Core's
  scaling of the aux loss under --calculate-per-token-loss, which the trainer uses: each
  micro-batch's aux loss counts as T_b of the token-mean loss's tokens). Rows are one
  micro-batch each, so the grouping does not matter. Compared per tensor against the
  largest expected update plus the fp32 rounding of the stored weights.
"""

from __future__ import annotations

import pytest
import torch

from dft_megatron.convert.hf_init import init_hf_model
from dft_megatron.convert.hf_to_megatron import convert_hf_to_megatron
from dft_megatron.convert.megatron_to_hf import convert_megatron_to_hf
from dft_megatron.models import ModelConfig
from tests.convert.hf_models import save_tokenizer
from tests.launch import train
from tests.training.one_step import adam_step_flags, adam_updates, assert_moved_as, write_rows

ARCH = ModelConfig(
    num_layers=2,
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
    qk_layernorm=True,
    num_experts=4,
    moe_router_topk=2,
    moe_ffn_hidden_size=32,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    family="qwen3_moe",
)
AUX = 0.01


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    save_tokenizer(root / "tokenizer")
    return init_hf_model(ARCH, root / "tokenizer", root / "hf", seed=11)


@pytest.fixture(scope="module")
def checkpoint(hf_model):
    out = hf_model.parent / "megatron"
    convert_hf_to_megatron(hf_model, out, dtype="fp32")
    return out


MOE = ["--moe-aux-loss-coeff", str(AUX), "--moe-router-load-balancing-type", "aux_loss"]
STEPS = [
    "--mock-data",
    "--micro-batch-size", "1",
    "--global-batch-size", "4",
    "--train-iters", "3",
    "--lr", "1e-3",
    "--lr-decay-style", "constant",
    "--seed", "7",
    *MOE,
]  # fmt: skip
EP = ["--expert-model-parallel-size", "2"]
TP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
LAYOUTS = {
    "ep2": (2, [*EP, "--moe-token-dispatcher-type", "alltoall"]),
    "tp2_ep2": (4, [*TP2, *EP, "--moe-token-dispatcher-type", "alltoall"]),
    "tp2_ep2_allgather": (4, [*TP2, *EP, "--moe-token-dispatcher-type", "allgather"]),
    "ep2_distopt": (
        2,
        [*EP, "--moe-token-dispatcher-type", "alltoall", "--use-distributed-optimizer"],
    ),
}


@pytest.fixture(scope="module")
def reference(checkpoint, tmp_path_factory):
    run = train(
        tmp_path_factory.mktemp("ep1"), "ep1", 1, ["--load", str(checkpoint), "--finetune", *STEPS]
    )
    assert [r["iteration"] for r in run.train] == [1, 2, 3]
    return run


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_expert_parallel_parity(layout, checkpoint, reference, tmp_path):
    nproc, flags = LAYOUTS[layout]
    run = train(tmp_path, layout, nproc, ["--load", str(checkpoint), "--finetune", *STEPS, *flags])
    assert len(run.train) == len(reference.train) == 3
    for got, ref in zip(run.train, reference.train, strict=True):
        it = ref["iteration"]
        assert got["iteration"] == it and got["tokens"] == ref["tokens"]
        for key in ("loss", "ce_loss", "target_prob_mean"):
            assert got[key] == pytest.approx(ref[key], abs=1e-4), (layout, it, key)
        for key in ("grad_norm", "load_balancing_loss"):
            assert got[key] == pytest.approx(ref[key], rel=1e-4), (layout, it, key)
    # The router's loss is logged apart: Megatron-LM's line has both, the DFT loss alone is
    # "lm loss" (a token mean of sg(p) * CE, below the CE it weights).
    assert "load_balancing_loss:" in run.output and "lm loss:" in run.output
    first = reference.train[0]
    assert 0.5 < first["load_balancing_loss"] < 2.0  # ~1 for near-uniform routing
    assert first["loss"] < first["ce_loss"]


def _aux_loss(router_logits: torch.Tensor, topk: int) -> torch.Tensor:
    """Megatron-Core's switch load-balancing loss (without the coefficient) of one layer over
    one micro-batch's tokens [T, E]: E * sum_i f_i P_i, f_i the fraction of the T * k routed
    slots that go to expert i, P_i the mean softmax probability of expert i."""
    tokens, experts = router_logits.shape
    probs = torch.softmax(router_logits, dim=-1)
    chosen = torch.topk(probs, topk, dim=-1).indices
    counts = torch.zeros(experts, dtype=probs.dtype).index_add_(
        0, chosen.reshape(-1), torch.ones(chosen.numel(), dtype=probs.dtype)
    )
    return experts * (counts / (tokens * topk) * probs.mean(0)).sum()


def test_one_adam_step_equals_transformers(hf_model, checkpoint, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    data, save = tmp_path / "rows.jsonl", tmp_path / "step"
    rows = write_rows(data)
    flags = adam_step_flags(checkpoint, data, save, tmp_path)
    flags += [*TP2, *EP, "--moe-token-dispatcher-type", "alltoall", *MOE]
    run = train(tmp_path, "step", 4, flags)
    exported = convert_megatron_to_hf(save, tmp_path / "hf")

    model = AutoModelForCausalLM.from_pretrained(
        hf_model, dtype=torch.float64, experts_implementation="eager"
    )
    dft, aux_total, ce, count, aux_logged = 0.0, 0.0, 0.0, 0, []
    for r in rows:
        ids = torch.tensor(r["input_ids"])
        mask = torch.tensor(r["loss_mask"][1:], dtype=torch.float64)
        out = model(ids[None, :-1], output_router_logits=True)
        logp = torch.log_softmax(out.logits[0], dim=-1)
        logp_target = logp.gather(1, ids[1:, None])[:, 0]
        dft = dft - (logp_target.exp().detach() * logp_target * mask).sum()
        ce -= float((logp_target.detach() * mask).sum())
        count += int(mask.sum())
        layers = [_aux_loss(logits, ARCH.moe_router_topk) for logits in out.router_logits]
        assert len(layers) == 2
        aux_total = aux_total + AUX * 32 * sum(layers)
        aux_logged.append(float(sum(layers)) / len(layers))
    ((dft + aux_total) / count).backward()
    (record,) = run.train
    assert record["tokens"] == count
    assert record["loss"] == pytest.approx(float(dft) / count, rel=1e-5)  # the DFT loss alone
    assert record["ce_loss"] == pytest.approx(ce / count, rel=1e-5)
    # Megatron-LM's logged value: the mean over MoE layers and micro-batches, no coefficient.
    assert record["load_balancing_loss"] == pytest.approx(sum(aux_logged) / 4, rel=1e-5)

    # transformers writes its fused experts back as the hub's per-expert tensors.
    expected_after = adam_updates(model, tmp_path / "expected")
    after = load_file(str(exported / "model.safetensors"))
    initial = load_file(str(hf_model / "model.safetensors"))
    assert sum(".experts." in n for n in initial) == 2 * 4 * 3  # layers x experts x (g, u, d)
    assert_moved_as(initial, after, {n: expected_after[n] - w for n, w in initial.items()})
