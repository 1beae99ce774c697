"""The trainer on SFT data: packed chat rows with sample weights, at several layouts.

Reference: the TP1 x DP1 run from the same converted checkpoint (1e-4 absolute on the loss,
the CE and mean p; 1e-4 relative on the grad norm; the same target-token counts), as for
synthetic data. This also covers the tokenizer stored with a checkpoint (every run gets it
from --load), the per-epoch order at every DP size (Megatron-LM's sampler over
`EpochShuffled`), --eval-only over pre-tokenized rows (every target token once, at TP2) and
over the chat rows (the assistant tokens only, counted with the tokenizer alone), and
--train-epochs.
"""

from __future__ import annotations

import json

import pytest

from dft_megatron.convert.hf_init import init_hf_model
from dft_megatron.convert.hf_to_megatron import convert_hf_to_megatron
from dft_megatron.models import ModelConfig
from tests.data.conftest import make_tokenizer
from tests.launch import train

ARCH = ModelConfig(
    family="llama",
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=128,
    position_embedding_type="rope",
    normalization="RMSNorm",
    swiglu=True,
    add_bias_linear=False,
    untie_embeddings_and_output_weights=True,
    seq_length=128,
    make_vocab_size_divisible_by=32,
    hidden_dropout=0.0,
    attention_dropout=0.0,
)
STEPS = ["--lr", "1e-3", "--lr-decay-style", "constant", "--global-batch-size", "4"]
STEPS += ["--seed", "11"]


def _chat_rows(n):
    rows = []
    for i in range(n):
        turns = [
            {"role": "user", "content": f"What is {i} + {i % 7}?"},
            {
                "role": "assistant",
                "content": f"{i} + {i % 7} = {i + i % 7}. \\boxed{{{i + i % 7}}}",
            },
        ]
        if i % 3 == 0:
            turns += [
                {"role": "user", "content": "Thanks!"},
                {"role": "assistant", "content": "You are welcome."},
            ]
        rows.append({"messages": turns, "reward": 0.5 + (i % 4) / 4})
    return rows


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """(data file, initial checkpoint with its tokenizer, data cache) shared by the layouts:
    a random-init HF model of the chat tokenizer, converted."""
    tmp = tmp_path_factory.mktemp("sft")
    make_tokenizer(tmp / "tok")
    data = tmp / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _chat_rows(48)))
    hf = init_hf_model(ARCH, tmp / "tok", tmp / "hf", seed=3)
    ckpt = tmp / "init"
    convert_hf_to_megatron(hf, ckpt, dtype="fp32")
    assert (ckpt / "tokenizer" / "tokenizer_config.json").is_file()
    return data, ckpt, tmp / "cache"


def _finetune(sft, *extra):
    data, ckpt, cache = sft
    return [
        *STEPS,
        "--sft-data", str(data),
        "--sample-weight-key", "reward",
        "--data-cache-path", str(cache),
        "--load", str(ckpt),
        "--finetune",
        "--train-iters", "3",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(sft, tmp_path_factory):
    run = train(tmp_path_factory.mktemp("ref"), "tp1", 1, _finetune(sft, "--micro-batch-size", "4"))
    return run.train


LAYOUTS = {
    "tp2_dp2_distopt": (
        4,
        [
            "--tensor-model-parallel-size",
            "2",
            "--micro-batch-size",
            "1",
            "--use-distributed-optimizer",
        ],
    ),
    "pp2": (2, ["--pipeline-model-parallel-size", "2", "--micro-batch-size", "2"]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sft_layout_matches_tp1(layout, sft, reference, tmp_path):
    world, flags = LAYOUTS[layout]
    got = train(tmp_path, layout, world, _finetune(sft, *flags)).train
    assert [r["iteration"] for r in got] == [1, 2, 3]
    for ref, rec in zip(reference, got, strict=True):
        for key in ("loss", "ce_loss", "target_prob_mean"):
            assert rec[key] == pytest.approx(ref[key], abs=1e-4), (layout, key, ref, rec)
        assert rec["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), (layout, ref, rec)
        assert rec["tokens"] == ref["tokens"] > 0
    assert got[-1]["loss"] != got[0]["loss"]


def test_eval_only_on_pretokenized_rows(sft, tmp_path):
    """--eval-only --sft-data over input_ids/loss_mask rows reads every target token once."""
    _, ckpt, _ = sft
    rows = []
    for i in range(5):
        ids = [(7 * i + 3 * j) % 250 for j in range(20 + 9 * i)]
        mask = [0] * 8 + [1] * (len(ids) - 8)
        rows.append({"input_ids": ids, "loss_mask": mask})
    data = tmp_path / "tok.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = ["--sft-data", str(data), "--data-cache-path", str(tmp_path / "c")]
    flags += ["--load", str(ckpt), "--eval-only", "--micro-batch-size", "2"]
    flags += ["--global-batch-size", "4", "--tensor-model-parallel-size", "2"]
    (rec,) = train(tmp_path, "eval", 2, flags).valid
    assert rec["full_pass"] and rec["iteration"] == 0  # a converted model: iteration 0
    assert rec["tokens"] == sum(len(r["input_ids"]) - 8 for r in rows)
    assert 4.0 < rec["ce_loss"] < 7.0  # a random model over ~300 tokens: about log(300)


def test_eval_only_on_chat_rows_reads_the_assistant_tokens_only(sft, tmp_path):
    """--eval-only --sft-data over the chat rows: the target tokens are each assistant turn's
    content and its <|im_end|>, counted here with the tokenizer alone (ChatML: a turn's content
    follows a newline, so its byte-level BPE tokens are those of the content by itself); the
    system, user and role-header tokens are no target."""
    from dft_megatron.data import load_tokenizer

    data, ckpt, _ = sft
    tok = load_tokenizer(ckpt / "tokenizer")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    targets = sum(
        len(tok(m["content"], add_special_tokens=False)["input_ids"]) + 1  # + <|im_end|>
        for r in rows
        for m in r["messages"]
        if m["role"] == "assistant"
    )
    flags = ["--sft-data", str(data), "--data-cache-path", str(tmp_path / "c")]
    flags += ["--load", str(ckpt), "--eval-only", "--micro-batch-size", "4"]
    flags += ["--global-batch-size", "4"]
    (rec,) = train(tmp_path, "eval_chat", 1, flags).valid
    assert rec["full_pass"] and rec["tokens"] == targets


def test_train_epochs_sets_the_iterations(sft, tmp_path):
    """--train-epochs 1 over 8 rows padded one per sequence, global batch 4: 2 iterations."""
    _, ckpt, _ = sft
    data = tmp_path / "eight.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _chat_rows(8)))
    flags = [*STEPS, "--sft-data", str(data), "--data-cache-path", str(tmp_path / "c")]
    flags += ["--load", str(ckpt), "--finetune", "--no-packing", "--train-epochs", "1"]
    flags += ["--micro-batch-size", "2"]
    got = train(tmp_path, "epochs", 1, flags).train
    assert [r["iteration"] for r in got] == [1, 2]
