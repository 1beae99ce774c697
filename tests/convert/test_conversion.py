"""Hugging Face <-> Megatron-Core conversion end to end, on tiny random-init models.

Per family (llama: GQA, untied, Llama-3.2 RoPE scaling with factor 32 and 8192 original
positions; mistral without sliding window; qwen2: qkv bias, tied embeddings, bf16), all
with a vocabulary of 96 padded to 128 rows:
- HF -> Megatron, then the trainer's own model building and checkpoint loading at TP1, TP2,
  PP2 and TP2 x PP2 (4 gloo ranks, DP fills the rest) gives transformers' fp32 logits
  (reference: `AutoModelForCausalLM` in fp32 on the same tokens; 1e-5 relative to the
  largest |logit|) and its token-mean CE (1e-5 relative; Megatron-Core's through the
  trainer's loss path, where the padded vocabulary columns are masked);
- HF -> Megatron -> HF is bit-identical (names, dtypes, values);
- a checkpoint the trainer saved at TP2 after 2 steps (with optimizer state) exports with
  the CLI (--iteration, --verify), loads in transformers and generates text with the
  tokenizer that travels in the checkpoint folder;
- the CLI's --verify passes on an import (and verification fails for a wrong model); the
  CLI refuses a non-empty output without --force;
- a TP size that does not divide heads / query groups fails at the trainer's load check.
Process spawns: one of 2 ranks (training), one of 1 (conversions), one of 4 (layouts).
"""

from __future__ import annotations

import json
import runpy
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.convert.hf_models import DTYPES, VOCAB, hf_logits, save_hf_model, save_tokenizer
from tests.dist import spawn

FAMILIES = ("llama", "mistral", "qwen2")
LAYOUTS = ((1, 1), (2, 1), (1, 2), (2, 2))  # (TP, PP)
SEQ, BATCH = 16, 2
ROOT = Path(__file__).resolve().parents[2]

TRAIN = [
    "--mock-data",
    "--family", "llama",
    "--num-layers", "2",
    "--hidden-size", "64",
    "--num-attention-heads", "4",
    "--num-query-groups", "2",
    "--ffn-hidden-size", "176",
    "--position-embedding-type", "rope",
    "--normalization", "RMSNorm",
    "--swiglu",
    "--disable-bias-linear",
    "--untie-embeddings-and-output-weights",
    "--vocab-size", str(VOCAB),
    "--seq-length", str(SEQ),
    "--hidden-dropout", "0",
    "--attention-dropout", "0",
    "--lr", "1e-3",
    "--train-iters", "2",
    "--global-batch-size", "2",
    "--micro-batch-size", "1",
    "--tensor-model-parallel-size", "2",
]  # fmt: skip


def tokens() -> torch.Tensor:
    """[b, s + 1] token ids: inputs [:, :-1], next-token targets [:, 1:]."""
    return torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(3))


def _tool(name: str):
    """The `main` of tools/NAME.py (run without its __main__ block)."""
    return runpy.run_path(str(ROOT / "tools" / f"{name}.py"), run_name="tool")["main"]


# ------------------------------------------------------------------ spawned workers


def _train_worker(rank, world_size, save):
    from dft_megatron.training.arguments import parse_args
    from dft_megatron.training.trainer import train

    cfg, given = parse_args([*TRAIN, "--save", save])
    train(cfg, given)


def _convert_worker(rank, world_size, work: str):
    """All conversions in one process: imports (library and CLI), exports, the trainer's."""
    from dft_megatron.convert.hf_to_megatron import convert_hf_to_megatron
    from dft_megatron.convert.megatron_to_hf import convert_megatron_to_hf

    w = Path(work)
    results = {}
    for family in FAMILIES:
        if family == "llama":  # through the CLI, with --verify
            argv = ["--hf-dir", str(w / "hf" / family), "--megatron-dir", str(w / "mg" / family)]
            results["import_cli_rc"] = _tool("convert_hf_to_megatron")([*argv, "--verify"])
            results["import_cli_no_force_rc"] = _tool("convert_hf_to_megatron")(argv)
        else:
            convert_hf_to_megatron(w / "hf" / family, w / "mg" / family)
        # Small shards: the index path of the export.
        convert_megatron_to_hf(w / "mg" / family, w / "back" / family, max_shard_size="100KB")
    trained = ["--megatron-dir", str(w / "trained"), "--iteration", "2"]
    results["export_cli_rc"] = _tool("convert_megatron_to_hf")(
        [*trained, "--hf-dir", str(w / "hf_trained"), "--verify"]
    )
    # --verify catches a wrong model: mistral's checkpoint against llama's HF folder. Both
    # hold the same random weights (same seed and shapes); only their RoPE differs.
    from dft_megatron.convert.verify import verify_conversion

    wrong = verify_conversion(w / "hf" / "llama", w / "mg" / "mistral")
    results["verify_wrong_model"] = [wrong.passed, wrong.max_abs_diff / wrong.max_abs_logit]
    (w / "convert.json").write_text(json.dumps(results))


def _logits_step(captured: list, data_iterator, chunk):
    """A forward step that keeps the last stage's logits [b, s, v/tp] in `captured`."""
    b = next(data_iterator)
    out = chunk(b.tokens, b.position_ids, None)

    def loss_func(output):
        captured.append(output.detach())
        return output.sum() * 0, torch.tensor(1), {}

    return out, loss_func


def _layouts_worker(rank, world_size, work: str):
    """The trainer's model at each layout, loaded from each import: logits and CE."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from dft_megatron.compat import install_cpu_bridge
    from dft_megatron.data.batches import Batch
    from dft_megatron.training import checkpointing
    from dft_megatron.training.arguments import config_from_values
    from dft_megatron.training.trainer import (
        build_model,
        resolve_model_config,
        run_microbatches,
        validate,
    )

    install_cpu_bridge()
    w = Path(work)
    ids = tokens()
    batch = Batch(
        tokens=ids[:, :-1].contiguous(),
        labels=ids[:, 1:].contiguous(),
        loss_mask=torch.ones(BATCH, SEQ),
        position_ids=torch.arange(SEQ).expand(BATCH, SEQ),
    )
    for family in FAMILIES:
        for tp, pp in LAYOUTS:
            values = {
                "load": str(w / "mg" / family),
                "finetune": True,
                "mock_data": True,
                "tensor_model_parallel_size": tp,
                "pipeline_model_parallel_size": pp,
                "micro_batch_size": BATCH,
                "global_batch_size": BATCH * world_size // (tp * pp),
            }
            cfg = config_from_values(values)
            info = resolve_model_config(cfg, set(values))
            validate(cfg, world_size, on_gpu=False)
            parallel_state.initialize_model_parallel(tp, pp)
            model_parallel_cuda_manual_seed(0)
            model = build_model(cfg, "local")
            checkpointing.load_checkpoint(info, model, load_rng=False)
            for chunk in model:
                chunk.eval()
            captured = []
            with torch.no_grad():
                get_forward_backward_func()(
                    forward_step_func=partial(_logits_step, captured),
                    data_iterator=iter([batch]),
                    model=model,
                    num_microbatches=1,
                    seq_length=SEQ,
                    micro_batch_size=BATCH,
                    forward_only=True,
                )
                ce = run_microbatches(model, [batch], torch.device("cpu"), forward_only=True)
            if parallel_state.is_pipeline_last_stage():
                group = parallel_state.get_tensor_model_parallel_group()
                parts = [torch.empty_like(captured[0]) for _ in range(tp)]
                dist.all_gather(parts, captured[0].contiguous(), group=group)
                if parallel_state.get_tensor_model_parallel_rank() == 0 and (
                    parallel_state.get_data_parallel_rank() == 0
                ):
                    torch.save(
                        {"logits": torch.cat(parts, -1), "ce": ce.summary()["ce_loss"]},
                        w / f"{family}_tp{tp}_pp{pp}.pt",
                    )
            parallel_state.destroy_model_parallel()
            dist.barrier()


# ------------------------------------------------------------------ fixture


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("convert")
    for family in FAMILIES:
        save_hf_model(family, w / "hf" / family)
    spawn(_train_worker, 2, str(w / "trained"))
    # A --mock-data run has no tokenizer to store (an --sft-data run's --save stores its own);
    # give this checkpoint one, as the export copies it.
    save_tokenizer(w / "trained" / "tokenizer")
    spawn(_convert_worker, 1, str(w))
    spawn(_layouts_worker, 4, str(w))
    return w


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("family", FAMILIES)
def test_import_matches_transformers_at_every_layout(work, family):
    ids = tokens()
    ref = hf_logits(work / "hf" / family, ids[:, :-1])
    ce_ref = torch.nn.functional.cross_entropy(ref.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    scale = float(ref.abs().max())
    assert scale > 1.0  # random weights of std 0.1: logits of order 1
    for tp, pp in LAYOUTS:
        got = torch.load(work / f"{family}_tp{tp}_pp{pp}.pt")
        logits = got["logits"]
        assert logits.shape == (BATCH, SEQ, 128)  # padded vocabulary: 96 real + 32 masked
        assert (logits[..., VOCAB:] == torch.finfo(torch.float32).min).all()
        where = f"TP{tp} x PP{pp}"
        torch.testing.assert_close(
            logits[..., :VOCAB],
            ref,
            rtol=1e-5,
            atol=1e-5 * scale,
            msg=lambda m, w=where: f"{w}: {m}",
        )
        assert got["ce"] == pytest.approx(float(ce_ref), rel=1e-5), (tp, pp)


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
    # The tokenizer went HF -> CKPT/tokenizer -> HF.
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (work / "mg" / family / "tokenizer" / name).is_file()
        assert (work / "back" / family / name).read_bytes() == (
            work / "hf" / family / name
        ).read_bytes()


def test_cli_verify_and_force(work):
    rc = json.loads((work / "convert.json").read_text())
    assert rc["import_cli_rc"] == 0  # --verify passed
    assert rc["import_cli_no_force_rc"] == 2  # the output was no longer empty
    assert rc["export_cli_rc"] == 0
    passed, relative_diff = rc["verify_wrong_model"]
    assert not passed and relative_diff > 1e-2


def test_trained_checkpoint_exports_and_generates(work):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = json.loads((work / "trained" / "iter_0000002" / "dft_megatron.json").read_text())
    assert meta["tensor_model_parallel_size"] == 2 and meta["has_optimizer"]
    out = work / "hf_trained"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == VOCAB
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    prompt = tok("1+2=", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, prompt["input_ids"].shape[1] + 5)
    assert int(gen.max()) < VOCAB
    text = tok.decode(gen[0])
    assert text.startswith("1+2=") and len(text) > 4


def test_tp_not_dividing_heads_fails_at_load(work):
    from dft_megatron.training.arguments import config_from_values
    from dft_megatron.training.config import ConfigError
    from dft_megatron.training.trainer import resolve_model_config, validate

    for tp, message in (
        (3, r"--num-attention-heads \(4\) must be divisible by --tensor-model-parallel-size \(3\)"),
        (4, r"--num-query-groups \(2\) must be divisible by --tensor-model-parallel-size \(4\)"),
    ):
        values = {
            "load": str(work / "mg" / "llama"),
            "finetune": True,
            "mock_data": True,
            "tensor_model_parallel_size": tp,
        }
        cfg = config_from_values(values)
        resolve_model_config(cfg, set(values))
        with pytest.raises(ConfigError, match=message):
            validate(cfg, tp, on_gpu=False)


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


def test_eval_only_on_pretokenized_rows_gives_transformers_ce(work, tmp_path):
    """The end-to-end check of an import: --eval-only --sft-data over pre-tokenized rows
    (TP 2, padded to --seq-length) reports transformers' token-mean CE over the same targets."""
    from tests.training.test_trainer import run

    ids = tokens()
    rows = [{"input_ids": row.tolist()} for row in ids]  # every token after the first
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ref = hf_logits(work / "hf" / "qwen2", ids[:, :-1])
    ce_ref = torch.nn.functional.cross_entropy(ref.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    flags = ["--load", str(work / "mg" / "qwen2"), "--eval-only", "--sft-data", str(data)]
    flags += ["--data-cache-dir", str(tmp_path / "cache"), "--no-packing"]
    flags += ["--seq-length", str(SEQ + 4), "--tensor-model-parallel-size", "2"]
    flags += ["--micro-batch-size", "1", "--global-batch-size", "2"]
    (rec,) = run(tmp_path, "eval", 2, flags)
    assert rec["tokens"] == BATCH * SEQ
    assert rec["ce_loss"] == pytest.approx(float(ce_ref), rel=1e-5)


def _train_pp2_tied_worker(rank, world_size, save):
    from dft_megatron.training.arguments import parse_args
    from dft_megatron.training.trainer import train

    flags = [f for f in TRAIN if f != "--untie-embeddings-and-output-weights"]
    flags[flags.index("llama")] = "qwen2"
    flags[flags.index("--tensor-model-parallel-size") + 1] = "1"
    flags += ["--add-qkv-bias", "--pipeline-model-parallel-size", "2", "--save", save]
    cfg, given = parse_args(flags)
    train(cfg, given)


def _export_worker(rank, world_size, work: str, out: str):
    w = Path(work)
    argv = ["--megatron-dir", str(w / "pp2"), "--hf-dir", str(w / out), "--verify"]
    (w / f"{out}.rc").write_text(str(_tool("convert_megatron_to_hf")(argv)))


def test_pipeline_parallel_tied_checkpoint_exports(tmp_path):
    """A qwen2 checkpoint saved at PP 2 with tied embeddings (the output layer on the last
    stage shares the first stage's embedding) exports and passes --verify."""
    spawn(_train_pp2_tied_worker, 2, str(tmp_path / "pp2"))
    save_tokenizer(tmp_path / "pp2" / "tokenizer")
    spawn(_export_worker, 1, str(tmp_path), "hf")
    assert (tmp_path / "hf.rc").read_text() == "0"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["tie_word_embeddings"]
    meta = json.loads((tmp_path / "pp2" / "iter_0000002" / "dft_megatron.json").read_text())
    assert meta["pipeline_model_parallel_size"] == 2
