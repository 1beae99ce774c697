"""Megatron-LM's command line with DFT's flags: what a Megatron-LM user's script gets.

- Megatron-LM's own example launch scripts (examples/llama/train_llama3_8b_h100_fp8.sh and
  examples/gpt3/train_gpt3_175b_distributed.sh of NVIDIA/Megatron-LM), sizes shrunk and the
  GPU-only flags dropped, train on 2 CPU processes with `pretrain_gpt.py` replaced by
  `-m dft_megatron.train` and no other edit; with the GPU-only flags kept, each is named on
  one line and the run stops before training with exit status 2 and no traceback.
- Every refusal, one by one, on the parsed flags (no process started).
"""

from __future__ import annotations

import pytest

from dft_megatron.training.arguments import layout_refusals, parse_only, refusals
from tests.launch import errors, train

# examples/llama/train_llama3_8b_h100_fp8.sh, by its flag groups; sizes shrunk (layers, width,
# vocabulary, sequence, batch, samples); its MOCK data branch.
LLAMA3_MODEL = [
    "--use-mcore-models", "--num-layers", "2", "--hidden-size", "64",
    "--ffn-hidden-size", "224", "--num-attention-heads", "4", "--group-query-attention",
    "--num-query-groups", "2", "--kv-channels", "16", "--seq-length", "64",
    "--max-position-embeddings", "64", "--position-embedding-type", "rope",
    "--rotary-base", "1000000", "--rotary-percent", "1.0", "--attention-dropout", "0.0",
    "--hidden-dropout", "0.0", "--swiglu", "--normalization", "RMSNorm",
    "--init-method-std", "0.0134", "--untie-embeddings-and-output-weights",
    "--disable-bias-linear",
]  # fmt: skip
LLAMA3_TRAINING = [
    "--micro-batch-size", "1", "--global-batch-size", "4", "--train-samples", "24",
    "--lr-decay-samples", "20", "--lr-warmup-samples", "4", "--lr", "0.00015",
    "--min-lr", "0.00001", "--decoupled-lr", "5.0e-4", "--decoupled-min-lr", "4.5e-5",
    "--lr-decay-style", "cosine", "--clip-grad", "1.0", "--weight-decay", "0.1",
    "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--bf16", "--grad-reduce-in-bf16",
    "--cross-entropy-loss-fusion", "--calculate-per-token-loss", "--manual-gc",
    "--empty-unused-memory-level", "1", "--exit-duration-in-mins", "235",
    "--use-distributed-optimizer",
]  # fmt: skip
LLAMA3_PARALLEL = [
    "--tensor-model-parallel-size", "2", "--context-parallel-size", "1", "--sequence-parallel",
]  # fmt: skip
LLAMA3_DATA = [
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000",
    "--tiktoken-pattern", "v2", "--split", "99,1,0", "--no-create-attention-mask-in-dataloader",
    "--no-mmap-bin-files", "--num-workers", "1",
]  # fmt: skip
LLAMA3_LOGGING = [
    "--log-interval", "1", "--eval-iters", "2", "--eval-interval", "3", "--save-interval", "3",
    "--log-throughput", "--ckpt-format", "torch_dist", "--distributed-timeout-minutes", "60",
]  # fmt: skip
# What the script has beyond that, which needs a GPU (Transformer Engine, CUDA streams, Nsight).
LLAMA3_GPU_ONLY = {
    "--attention-backend": ["--attention-backend", "fused"],
    "--apply-layernorm-1p": ["--apply-layernorm-1p"],
    "--fp8-format": [
        "--fp8-format", "hybrid", "--fp8-amax-history-len", "1024",
        "--fp8-amax-compute-algo", "max", "--fp8-param-gather",
    ],
    "--overlap-grad-reduce": ["--overlap-grad-reduce"],
    "--overlap-param-gather": ["--overlap-param-gather"],
    "--profile": ["--profile", "--profile-step-start", "4", "--profile-step-end", "6"],
}  # fmt: skip

# examples/gpt3/train_gpt3_175b_distributed.sh, shrunk; its data flags (GPT-2 BPE files and an
# indexed corpus, which are not here) replaced by mock data.
GPT3 = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--max-position-embeddings", "32", "--attention-backend", "auto",
    "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "4",
    "--weight-decay", "0.1", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
    "--init-method-std", "0.006", "--clip-grad", "1.0", "--fp16", "--lr", "6.0e-5",
    "--lr-decay-style", "cosine", "--min-lr", "6.0e-6", "--lr-warmup-fraction", ".001",
    "--lr-decay-iters", "4", "--tensor-model-parallel-size", "1",
    "--pipeline-model-parallel-size", "2", "--log-interval", "1", "--save-interval", "4",
    "--eval-interval", "2", "--eval-iters", "1",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "512",
]  # fmt: skip


def _llama3(tmp_path) -> list[str]:
    ckpt, tb = tmp_path / "ckpt", tmp_path / "tb"
    return [
        *LLAMA3_MODEL,
        *LLAMA3_TRAINING,
        *LLAMA3_PARALLEL,
        *LLAMA3_DATA,
        "--data-cache-path", str(tmp_path / "cache"),
        *LLAMA3_LOGGING,
        "--save", str(ckpt), "--load", str(ckpt), "--tensorboard-dir", str(tb),
        "--loss-type", "dft",
    ]  # fmt: skip


def test_megatron_lm_llama3_script_trains(tmp_path):
    run = train(tmp_path, "llama3", 2, _llama3(tmp_path))
    assert [r["iteration"] for r in run.train] == list(range(1, 7))  # 24 samples / 4
    assert [r["iteration"] for r in run.valid] == [3, 6, 6]  # every 3, and at the end
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert any((tmp_path / "tb").iterdir())
    # Megatron-LM's own iteration line carries DFT's numbers.
    assert "lm loss:" in run.output and "ce loss:" in run.output and "p>0.99:" in run.output


def test_megatron_lm_gpt3_script_trains(tmp_path):
    run = train(tmp_path, "gpt3", 2, [*GPT3, "--save", str(tmp_path / "ckpt")])
    assert [r["iteration"] for r in run.train][-1] == 4
    assert all(r["loss"] > 0 for r in run.train)


def test_gpu_only_flags_are_named_one_line_each(tmp_path):
    extra = [flag for group in LLAMA3_GPU_ONLY.values() for flag in group]
    run = train(tmp_path, "gpu_flags", 2, [*_llama3(tmp_path), *extra], expect_ok=False)
    assert run.returncode != 0
    lines = errors(run)
    for flag in LLAMA3_GPU_ONLY:
        assert sum(flag in line for line in lines) >= 1, (flag, lines)
    assert len(lines) == len(LLAMA3_GPU_ONLY)
    assert "Traceback" not in run.output.split("error:")[0]
    assert "unrecognized arguments" not in run.output and "invalid choice" not in run.output
    assert not run.train  # stopped before training


BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"]
BASE += ["--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "1"]
BASE += ["--lr", "1e-3"]


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--mock-data", "--fp8-format", "e4m3"], "--fp8-format"),
        (["--mock-data", "--transformer-impl", "transformer_engine"], "--transformer-impl"),
        (["--mock-data", "--distributed-backend", "nccl"], "--distributed-backend nccl"),
        (["--mock-data", "--context-parallel-size", "2"], "--context-parallel-size 2"),
        (["--mock-data", "--overlap-grad-reduce"], "--overlap-grad-reduce"),
        (["--mock-data", "--profile"], "--profile"),
        (["--mock-data", "--apply-layernorm-1p"], "--apply-layernorm-1p"),
        (["--mock-data", "--attention-backend", "flash"], "--attention-backend flash"),
        (["--mock-data", "--moe-grouped-gemm"], "--moe-grouped-gemm"),
        (["--mock-data", "--use-distributed-optimizer", "--overlap-param-gather"],
         "needs --overlap-grad-reduce"),
        (["--mock-data", "--sft-data", "x.jsonl"], "exclude each other"),
        (["--mock-data", "--use-distributed-optimizer", "--dist-ckpt-optim-fully-reshardable"],
         "PR #5077"),
        ([], "no training data"),
        (["--sft-data", "x.jsonl", "--context-parallel-size", "2"], "--no-packing"),
        (["--mock-data", "--train-epochs", "1"], "--train-epochs needs --sft-data"),
        (["--mock-data", "--eval-only"], "--eval-only evaluates a checkpoint"),
        (["--sft-data", "x.jsonl", "--eval-interval", "5"], "--valid-data"),
        (["--mock-data", "--dft-min-prob", "2"], "--dft-min-prob: dft_min_prob must be in"),
        (["--mock-data", "--loss-type", "sft", "--sft-mix", "0.5"], "--loss-type sft / --sft-mix"),
        (["--mock-data", "--loss-type", "chord", "--eaft-topk", "5"], "eaft_topk only applies"),
        (["--mock-data", "--loss-type", "eaft", "--eaft-topk", "1"], "--eaft-topk: eaft_topk"),
        (["--mock-data", "--loss-type", "asft", "--asft-kl-coeff", "-1"], "--asft-kl-coeff"),
        (["--mock-data", "--loss-type", "asft", "--cross-entropy-loss-fusion"],
         "asft with --cross-entropy-loss-fusion"),
        (["--mock-data", "--loss-type", "asft", "--dft-chunked-output-layer"],
         "asft with --dft-chunked-output-layer"),
        (["--mock-data", "--loss-type", "asft", "--mtp-num-layers", "1"],
         "asft with --mtp-num-layers"),
        (["--mock-data", "--ref-load", "x"], "--ref-load applies to --loss-type asft only"),
        (["--mock-data", "--sft-mix-decay-iters", "10"], "give --sft-mix > 0"),
        (["--mock-data", "--sft-mix", "0.5", "--sft-mix-decay-iters", "0"], ">= 1 iteration"),
        (["--mock-data", "--token-weights", "missing.json"], "--token-weights missing.json"),
        (["--mock-data", "--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "te"],
         "--cross-entropy-fusion-impl te"),
        (["--mock-data", "--dft-chunked-output-layer", "--dft-output-chunk-tokens", "0"],
         "--dft-output-chunk-tokens 0"),
        (["--mock-data", "--dft-chunked-output-layer", "--mtp-num-layers", "1"],
         "--dft-chunked-output-layer with --mtp-num-layers"),
    ],
)  # fmt: skip
def test_refusal(flags, named):
    problems = refusals(parse_only([*BASE, *flags]))
    assert any(named in p for p in problems), problems


def test_required_flags():
    flags = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"]
    problems = refusals(parse_only([*flags, "--mock-data"]))
    assert any("--lr is required" in p for p in problems)
    assert any("--micro-batch-size is required" in p for p in problems)


@pytest.mark.parametrize(
    ("tp", "heads", "groups", "named"),
    [(3, 4, None, "does not divide --num-attention-heads"), (4, 8, 3, "--num-query-groups (3)")],
)
def test_layout_refusal(tp, heads, groups, named):
    flags = [*BASE, "--mock-data", "--tensor-model-parallel-size", str(tp)]
    flags += ["--num-attention-heads", str(heads), "--hidden-size", "96"]
    if groups:
        flags += ["--group-query-attention", "--num-query-groups", str(groups)]
    assert any(named in p for p in layout_refusals(parse_only(flags)))
    assert layout_refusals(parse_only([*BASE, "--tensor-model-parallel-size", "2"])) == []


def test_moe_with_tensor_parallelism_needs_sequence_parallelism():
    """Megatron-Core's MoELayer raises at the first training step without it (every rank,
    a traceback); refused in one line before anything starts. Evaluation runs without."""
    moe = [*BASE, "--mock-data", "--num-experts", "4", "--tensor-model-parallel-size", "2"]
    (problem,) = layout_refusals(parse_only(moe))
    assert "--num-experts 4" in problem and "--sequence-parallel" in problem
    assert layout_refusals(parse_only([*moe, "--sequence-parallel"])) == []
    assert layout_refusals(parse_only([*moe, "--eval-only"])) == []


def test_a_runnable_command_line_has_no_refusal():
    flags = [*LLAMA3_MODEL, *LLAMA3_TRAINING, *LLAMA3_PARALLEL, *LLAMA3_DATA, *LLAMA3_LOGGING]
    assert refusals(parse_only(flags)) == []


def test_cpu_defaults_and_dft_defaults():
    args = parse_only([*BASE, "--mock-data"])
    assert args.distributed_backend == "gloo" and args.transformer_impl == "local"
    assert args.calculate_per_token_loss  # DFT's objective: the global token mean
    assert args.loss_type == "dft" and args.dft_min_prob == 0.0 and args.sft_mix == 0.0
    assert args.eval_iters == 0  # no --eval-interval: no validation
    # A flag given on the command line still wins over the CPU default.
    assert parse_only([*BASE, "--mock-data", "--num-workers", "3"]).num_workers == 3
