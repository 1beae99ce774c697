"""The trainer on SFT data: packed chat rows with sample weights, at several layouts.

Reference: the TP1 x DP1 run from the same initial checkpoint (1e-4 absolute on the loss,
the CE and mean p; 1e-4 relative on the grad norm; the same target-token counts), as for
synthetic data. This also covers the tokenizer stored with a checkpoint (the runs after the
first get it from --load), the per-epoch shuffle at every DP size, and --eval-only over
pre-tokenized rows.
"""

from __future__ import annotations

import json

import pytest

from tests.data.conftest import make_tokenizer
from tests.training.test_trainer import run

MODEL = [
    "--family",
    "llama",
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
    "--num-attention-heads",
    "4",
    "--num-query-groups",
    "2",
    "--ffn-hidden-size",
    "128",
    "--position-embedding-type",
    "rope",
    "--normalization",
    "RMSNorm",
    "--swiglu",
    "--disable-bias-linear",
    "--untie-embeddings-and-output-weights",
    "--seq-length",
    "128",
    "--make-vocab-size-divisible-by",
    "32",
    "--hidden-dropout",
    "0",
    "--attention-dropout",
    "0",
    "--lr",
    "1e-3",
    "--lr-decay-style",
    "constant",
    "--global-batch-size",
    "4",
    "--seed",
    "11",
]


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
    """(data file, tokenizer dir, initial checkpoint) shared by the layouts."""
    tmp = tmp_path_factory.mktemp("sft")
    make_tokenizer(tmp / "tok")
    data = tmp / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _chat_rows(48)))
    ckpt = tmp / "init"
    flags = [*MODEL, "--sft-data", str(data), "--tokenizer-model", str(tmp / "tok")]
    flags += ["--data-cache-dir", str(tmp / "cache"), "--train-iters", "0", "--save", str(ckpt)]
    assert run(tmp, "init", 1, flags) == []
    assert (ckpt / "tokenizer" / "tokenizer_config.json").is_file()
    return data, ckpt, tmp / "cache"


def _finetune(sft, *extra):
    data, ckpt, cache = sft
    return [
        *MODEL,
        "--sft-data",
        str(data),
        "--sample-weight-key",
        "reward",
        "--data-cache-dir",
        str(cache),
        "--load",
        str(ckpt),
        "--finetune",
        "--train-iters",
        "3",
        *extra,
    ]


@pytest.fixture(scope="module")
def reference(sft, tmp_path_factory):
    return run(tmp_path_factory.mktemp("ref"), "tp1", 1, _finetune(sft, "--micro-batch-size", "4"))


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
    got = run(tmp_path, layout, world, _finetune(sft, *flags))
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
    flags = [*MODEL, "--sft-data", str(data), "--data-cache-dir", str(tmp_path / "c")]
    flags += ["--load", str(ckpt), "--eval-only", "--micro-batch-size", "2"]
    (rec,) = run(tmp_path, "eval", 2, [*flags, "--tensor-model-parallel-size", "2"])
    assert rec["tokens"] == sum(len(r["input_ids"]) - 8 for r in rows)
    assert 4.0 < rec["ce_loss"] < 7.0  # a random model over ~300 tokens: about log(300)


def test_train_epochs_sets_the_iterations(sft, tmp_path):
    """--train-epochs 1 over 8 rows padded one per sequence, global batch 4: 2 iterations."""
    _, ckpt, _ = sft
    data = tmp_path / "eight.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _chat_rows(8)))
    flags = [*MODEL, "--sft-data", str(data), "--data-cache-dir", str(tmp_path / "c")]
    flags += ["--load", str(ckpt), "--finetune", "--no-packing", "--train-epochs", "1"]
    got = run(tmp_path, "epochs", 1, flags)
    assert [r["iteration"] for r in got] == [1, 2]
