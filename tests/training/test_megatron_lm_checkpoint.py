"""A checkpoint written by plain Megatron-LM (GPTModel, Megatron-LM's own loss: the miniature
pretrain_gpt.py beside this file, at TP2) loads into dft_megatron as it is: the DFT run
resumes it with its optimizer at the next iteration with no model flag, and the converter
exports it to a Hugging Face model whose logits and CE equal the checkpoint's Megatron-Core
model's (`verify_conversion`, 1e-4 relative)."""

from __future__ import annotations

import os
import subprocess
import sys

from dft_megatron.convert.megatron_to_hf import convert_megatron_to_hf
from dft_megatron.convert.verify import verify_conversion
from tests.launch import ROOT, train
from tests.training.plain_pretrain_gpt import CPU_FLAGS

LLAMA = [
    "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2",
    "--seq-length", "32", "--max-position-embeddings", "64", "--position-embedding-type", "rope",
    "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear",
    "--untie-embeddings-and-output-weights", "--tokenizer-type", "NullTokenizer",
    "--vocab-size", "250", "--micro-batch-size", "2", "--global-batch-size", "4",
    "--lr", "1e-3", "--train-iters", "4", "--calculate-per-token-loss",
    "--eval-interval", "1000", "--eval-iters", "1",
]  # fmt: skip


def test_plain_megatron_lm_checkpoint_resumes_and_exports(tmp_path):
    ckpt = tmp_path / "plain"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "tests" / "training" / "plain_pretrain_gpt.py"), *CPU_FLAGS, *LLAMA,
           "--tensor-model-parallel-size", "2", "--save", str(ckpt), "--save-interval", "2",
           "--exit-interval", "2", "--log-interval", "1"]  # fmt: skip
    done = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"

    # dft_megatron resumes it: no model flags (its args), its optimizer and iteration.
    run = train(tmp_path, "dft", 2, ["--load", str(ckpt), "--save", str(ckpt), "--mock-data",
                                     "--tensor-model-parallel-size", "2", "--save-interval", "2",
                                     "--micro-batch-size", "2", "--global-batch-size", "4",
                                     "--lr", "1e-3", "--train-iters", "4"])  # fmt: skip
    assert [r["iteration"] for r in run.train] == [3, 4]
    assert "loaded checkpoint from" in run.output or "successfully loaded" in run.output

    hf = convert_megatron_to_hf(ckpt, tmp_path / "hf")
    assert (hf / "config.json").is_file()
    result = verify_conversion(hf, ckpt, seq_length=16)
    assert result.passed, result.report()
