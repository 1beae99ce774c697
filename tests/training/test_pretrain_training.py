"""The trainer on Megatron indexed pre-training data (--data-path): a weighted blend of two
preprocessed corpora, --split with a validation share, data parallel 2. Every position is a
target (no loss mask) and validation runs on its own documents."""

from __future__ import annotations

import json
from pathlib import Path

from dft_megatron.data.indexed import preprocess_jsonl
from tests.training.test_trainer import run

TOKENIZER = Path(__file__).resolve().parents[2] / "examples" / "data" / "math" / "tokenizer"


def test_blended_indexed_data(tmp_path):
    rows = [json.loads(line) for line in (TOKENIZER.parent / "train.jsonl").open()][:300]
    prefixes = []
    for name, part in (("a", rows[:150]), ("b", rows[150:])):
        src = tmp_path / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": r["solution"]}) + "\n" for r in part))
        preprocess_jsonl(src, TOKENIZER, str(tmp_path / name), append_eod=True)
        prefixes.append(str(tmp_path / f"{name}_text_document"))
    flags = ["--data-path", "0.3", prefixes[0], "0.7", prefixes[1], "--split", "90,10,0"]
    flags += ["--tokenizer-model", str(TOKENIZER), "--data-cache-dir", str(tmp_path / "cache")]
    flags += ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"]
    flags += ["--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "8"]
    flags += ["--train-iters", "4", "--eval-interval", "2", "--eval-iters", "1", "--lr", "1e-3"]
    flags += ["--loss-type", "sft"]
    records = run(tmp_path, "pretrain", 2, flags)
    train = [r for r in records if r.get("split") != "valid"]
    valid = [r for r in records if r.get("split") == "valid"]
    assert [r["iteration"] for r in train] == [1, 2, 3, 4]
    assert all(r["tokens"] == 8 * 64 for r in train)  # every position is a target
    assert [r["iteration"] for r in valid] == [2, 4] and valid[0]["tokens"] == 8 * 64
    assert train[-1]["loss"] < train[0]["loss"]
