"""Hugging Face <-> Megatron-LM conversion end to end, on tiny random-init models.

Per family (llama: GQA, untied, Llama-3.2 RoPE scaling with factor 32 and 8192 original
positions; mistral without sliding window; qwen2: qkv bias, tied embeddings, bf16), all
with a vocabulary of 96 padded to 128 rows:
- HF -> Megatron, then loaded as the trainer loads it (Megatron-LM's arguments from the
  checkpoint, `initialize_megatron`, `get_model` with the trainer's model provider,
  Megatron-LM's `load_checkpoint`) at TP1, TP2, PP2, TP2 x PP2 (llama also at TP4, its
  query groups replicated; 4 gloo processes, DP fills the rest) gives transformers' fp32 logits
  (reference: `AutoModelForCausalLM` in fp32 on the same tokens; 1e-5 relative to the
  largest |logit|), gathered over TP from Megatron-Core's pipeline schedule, and its
  token-mean CE (1e-5 relative) from the trainer's own `forward_step` and `loss_func`,
  where the padded vocabulary columns are masked;
- HF -> Megatron -> HF is bit-identical (names, dtypes, values; the tokenizer files too);
- `dft_megatron.train --load` of the qwen2 import without model flags: --eval-only over
  pre-tokenized rows (padded to --seq-length) reports transformers' CE over the same
  targets; fine-tuned for 2 steps at TP2 x PP2 (model and optimizer saved at iteration 2,
  tied embeddings split over the stages) its validation of the saved weights reports the CE
  transformers computes on the export of that checkpoint, which the export CLI (--iteration,
  --verify) writes and transformers loads and generates from with the tokenizer that
  travelled in the checkpoint;
- the import CLI's --verify passes, and exits 1 for a wrong model (two layers swapped);
  verification fails for a wrong model (another family's RoPE); a non-empty output is
  refused without --force (one line) and replaced with it;
- a TP size that does not divide the heads (or whose query groups are neither a multiple
  nor a divisor of it) fails the trainer's model config (Megatron-Core's TransformerConfig
  from the checkpoint's args) with a one-line message naming both sizes; query groups that
  divide the TP size are replicated (TP4 of the 2-group models loads: the layouts above).
Processes (tests/convert/worker.py): one conversion process, the 4 gloo ranks of
tests/dist.py's pool (layouts, --eval-only, fine-tuning), one export CLI process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.convert import worker
from tests.convert.hf_models import DTYPES, VOCAB, hf_logits, save_hf_model
from tests.convert.worker import BATCH, FAMILIES, SEQ, layouts_of, rows, tokens
from tests.dist import pool
from tests.launch import kill_tree

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 900


def _run(work: Path, name: str, cmd: list[str]) -> tuple[int, str]:
    """Run `cmd` from the repository root without GPUs; (exit code, output). A run past
    TIMEOUT_S is killed with its process group (torchrun's ranks, their helpers)."""
    log = work / f"{name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)},
            start_new_session=True,
        )
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
    return proc.returncode, log.read_text()


def _worker(work: Path, steps: str) -> None:
    cmd = [sys.executable, "-m", "tests.convert.worker", steps, str(work)]
    rc, output = _run(work, steps, cmd)
    if rc != 0:
        tail = "\n".join(output.splitlines()[-60:])
        raise AssertionError(f"tests.convert.worker {steps} exited {rc}:\n{tail}")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("convert")
    for family in FAMILIES:
        save_hf_model(family, w / "hf" / family)
    (w / "rows.jsonl").write_text(
        "".join(json.dumps({"input_ids": r.tolist()}) + "\n" for r in rows())
    )
    _worker(w, "convert")
    pool(4).run(worker.pooled, "layouts,eval_only,train", str(w), timeout=TIMEOUT_S)
    export = [sys.executable, str(ROOT / "tools" / "convert_megatron_to_hf.py")]
    export += ["--megatron-dir", str(w / "trained"), "--iteration", "2"]
    export += ["--hf-dir", str(w / "hf_trained"), "--verify"]
    rc, output = _run(w, "export", export)
    (w / "export.json").write_text(json.dumps({"rc": rc, "output": output}))
    return w


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _ce(hf_dir: Path, ids: torch.Tensor) -> float:
    """transformers' token-mean next-token CE of rows `ids` [b, s + 1] (fp32)."""
    logits = hf_logits(hf_dir, ids[:, :-1])
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("family", FAMILIES)
def test_import_matches_transformers_at_every_layout(work, family):
    ids = tokens()
    ref = hf_logits(work / "hf" / family, ids[:, :-1])
    ce_ref = F.cross_entropy(ref.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    scale = float(ref.abs().max())
    assert scale > 1.0  # random weights of std 0.1: logits of order 1
    for layout in layouts_of(family):
        got = torch.load(work / f"{family}_{layout.name}.pt")
        logits = got["logits"]
        assert logits.shape == (BATCH, SEQ, 128)  # padded vocabulary: 96 real + 32 masked
        assert (logits[..., VOCAB:] == torch.finfo(torch.float32).min).all()
        where = layout.name
        torch.testing.assert_close(
            logits[..., :VOCAB],
            ref,
            rtol=1e-5,
            atol=1e-5 * scale,
            msg=lambda m, w=where: f"{w}: {m}",
        )
        assert got["tokens"] == BATCH * SEQ, where
        assert got["ce"] == pytest.approx(float(ce_ref), rel=1e-5), where


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_identical(work, family):
    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    original, back = tensors(work / "hf" / family), tensors(work / "back" / family)
    assert sorted(original) == sorted(back)
    for name, t in original.items():
        assert t.dtype == back[name].dtype == DTYPES[family], name
        assert torch.equal(t, back[name]), name
    assert (work / "back" / family / "model.safetensors.index.json").is_file()  # 100KB shards
    # Megatron-LM's release checkpoint, and the tokenizer went HF -> CKPT/tokenizer -> HF.
    assert (work / "mg" / family / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert (work / "mg" / family / "release" / "metadata.json").is_file()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (work / "mg" / family / "tokenizer" / name).is_file()
        assert (work / "back" / family / name).read_bytes() == (
            work / "hf" / family / name
        ).read_bytes()


def test_release_checkpoint_stores_the_architecture(work):
    """The import's args are what --load needs instead of model flags."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(work / "mg" / "llama" / "release"))
    args = common["args"]
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (2, 64, 4)
    assert args.group_query_attention and args.num_query_groups == 2
    assert args.use_rope_scaling and args.rope_scaling_factor == 32.0
    assert args.rotary_base == 500000 and args.untie_embeddings_and_output_weights
    assert (args.model_family, args.vocab_size, args.padded_vocab_size) == ("llama", 96, 128)


def test_moe_checkpoint_stores_experts_and_routing(work):
    """Qwen3-MoE's args: experts, width, top k, layer 0 dense, no renormalization, q/k norms;
    the checkpoint holds every expert under one key with an expert axis (any EP reads it)."""
    from megatron.core import dist_checkpointing

    path = str(work / "mg" / "qwen3_moe" / "release")
    args = dist_checkpointing.load_common_state_dict(path)["args"]
    assert (args.num_experts, args.moe_ffn_hidden_size, args.moe_router_topk) == (4, 32, 2)
    assert args.moe_layer_freq == [0, 1] and args.moe_router_pre_softmax and args.qk_layernorm
    assert (args.model_family, args.kv_channels) == ("qwen3_moe", 16)
    keys = dist_checkpointing.load_tensors_metadata(path)
    experts = "decoder.layers.1.mlp.experts.experts."  # SequentialMLP's = TEGroupedMLP's keys
    assert tuple(keys[experts + "linear_fc1.weight"].global_shape) == (4, 64, 64)  # E, 2fm, h
    assert tuple(keys[experts + "linear_fc2.weight"].global_shape) == (4, 64, 32)
    assert tuple(keys["decoder.layers.1.mlp.router.weight"].global_shape) == (4, 64)
    assert "decoder.layers.0.mlp.linear_fc1.weight" in keys  # the dense layer


def test_grouped_gemm_checkpoint_args_do_not_carry_over(work):
    """A checkpoint saved with --moe-grouped-gemm in its args (a GPU run's) exports on CPU,
    bit-identical: Megatron-LM's --use-checkpoint-args would force the flag on, which needs
    Transformer Engine; the command line's value is kept."""
    original = load_file(work / "hf" / "qwen3_moe" / "model.safetensors")
    back = load_file(work / "back_grouped_gemm" / "model.safetensors")
    assert sorted(original) == sorted(back)
    assert all(torch.equal(t, back[name]) for name, t in original.items())


def test_cli_verify_and_force(work):
    r = json.loads((work / "convert.json").read_text())
    assert r["import_cli_verify_rc"] == 0  # --verify passed
    assert r["import_cli_no_force_rc"] == 2  # the output was no longer empty
    (line,) = r["import_cli_no_force_stderr"].splitlines()
    assert line.startswith("error: ") and "not empty; pass --force" in line
    assert r["import_cli_force_rc"] == 0


def test_verification_fails_for_a_wrong_model(work):
    r = json.loads((work / "convert.json").read_text())
    assert r["import_cli_wrong_model_rc"] == 1  # two layers' weights swapped: --verify FAILs
    passed, relative_diff = r["verify_wrong_model"]
    assert not passed and relative_diff > 1e-2


def test_eval_only_on_pretokenized_rows_gives_transformers_ce(work):
    """--eval-only of the qwen2 import (bf16, TP2 x PP2, rows padded to --seq-length) reports
    transformers' token-mean CE over the same targets; so does the fine-tuning's first
    forward, on the same weights and rows."""
    ce_ref = _ce(work / "hf" / "qwen2", rows())
    (rec,) = _records(work / "eval_only.jsonl")
    assert rec["split"] == "valid" and rec["iteration"] == 0
    assert rec["tokens"] == BATCH * SEQ  # every token after the first; no padding
    assert rec["ce_loss"] == pytest.approx(ce_ref, rel=1e-5)
    first = _records(work / "train.jsonl")[0]
    assert first["iteration"] == 1 and first["ce_loss"] == pytest.approx(ce_ref, rel=1e-5)


def test_trained_checkpoint_exports_and_generates(work):
    from megatron.core import dist_checkpointing
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = json.loads((work / "export.json").read_text())
    assert export["rc"] == 0, export["output"][-3000:]
    assert "verify: " in export["output"] and ": PASS" in export["output"]
    path = work / "trained" / "iter_0000002"
    args = dist_checkpointing.load_common_state_dict(str(path))["args"]
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
    keys = dist_checkpointing.load_tensors_metadata(str(path))
    assert any(k.startswith("optimizer.") for k in keys)  # Adam's moments were saved

    out = work / "hf_trained"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["tie_word_embeddings"]
    assert config["vocab_size"] == VOCAB
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)  # from the tokenizer
    trained, imported = (
        load_file(out / "model.safetensors"),
        load_file(work / "hf" / "qwen2" / "model.safetensors"),
    )
    assert sorted(trained) == sorted(imported)
    assert not torch.equal(trained["model.embed_tokens.weight"].float(),
                           imported["model.embed_tokens.weight"].float())  # fmt: skip

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok("1+2=", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(
            **prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0
        )
    assert gen.shape == (1, prompt["input_ids"].shape[1] + 5)
    assert int(gen.max()) < VOCAB
    text = tok.decode(gen[0])
    assert text.startswith("1+2=") and len(text) > 4


def test_trainer_validation_gives_transformers_ce_of_the_export(work):
    """The fine-tuning's validation at iteration 2 (the saved weights, TP2 x PP2) reports the
    CE that transformers computes on the exported checkpoint."""
    valid = [r for r in _records(work / "train.jsonl") if r.get("split") == "valid"]
    assert valid and all(r["iteration"] == 2 and r["tokens"] == BATCH * SEQ for r in valid)
    ce_ref = _ce(work / "hf_trained", rows())
    assert valid[-1]["ce_loss"] == pytest.approx(ce_ref, rel=1e-5)
    assert ce_ref < _ce(work / "hf" / "qwen2", rows())  # 2 steps on these rows lowered it


def test_tp_not_dividing_heads_or_query_groups_fails(work):
    """The trainer refuses, in one line each, a TP size the --load checkpoint's heads or query
    groups cannot split (before Megatron-Core would fail on every rank while building the
    model). Query groups may divide the TP size (replicated: TP4 of the 2-group llama loads,
    see the layouts test)."""
    r = json.loads((work / "convert.json").read_text())
    assert r["tp3_heads"].splitlines() == [
        "error: --tensor-model-parallel-size 3 does not divide --num-attention-heads (4)",
        "error: --num-query-groups (2) must be a multiple or a divisor of "
        "--tensor-model-parallel-size (3)",
    ]
    assert r["tp2_groups3"] == (
        "error: --num-query-groups (3) must be a multiple or a divisor of "
        "--tensor-model-parallel-size (2)"
    )
    assert r["tp4_groups"] == ""


def test_no_output_left_behind_by_a_refusal(work, tmp_path):
    """A refused import (unsupported architecture) writes nothing."""
    from dft_megatron.convert.families import ConversionError
    from dft_megatron.convert.hf_to_megatron import convert_hf_to_megatron

    src = tmp_path / "falcon"
    shutil.copytree(work / "hf" / "llama", src)
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="FalconForCausalLM.*not supported"):
        convert_hf_to_megatron(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
