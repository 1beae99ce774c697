"""The trainer on Megatron indexed pre-training data (--data-path): a weighted blend of two
preprocessed corpora, --split with a validation share, data parallel 2. Every position is a
target (no loss mask) and validation runs on its own documents."""

from __future__ import annotations

import json
from pathlib import Path

from dft_megatron.data.indexed import preprocess_jsonl
from tests.launch import train

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
    flags += ["--tokenizer-model", str(TOKENIZER), "--data-cache-path", str(tmp_path / "cache")]
    flags += ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"]
    flags += ["--seq-length", "64", "--max-position-embeddings", "64"]
    flags += ["--micro-batch-size", "2", "--global-batch-size", "8"]
    flags += ["--train-iters", "4", "--eval-interval", "2", "--eval-iters", "1", "--lr", "1e-3"]
    flags += ["--loss-type", "sft"]
    run = train(tmp_path, "pretrain", 2, flags)
    steps, valid = run.train, run.valid
    assert [r["iteration"] for r in steps] == [1, 2, 3, 4]
    assert all(r["tokens"] == 8 * 64 for r in steps)  # every position is a target
    # Every --eval-interval, then Megatron-LM's validation at the end of training.
    assert [r["iteration"] for r in valid] == [2, 4, 4] and valid[0]["tokens"] == 8 * 64
    assert steps[-1]["loss"] < steps[0]["loss"]
