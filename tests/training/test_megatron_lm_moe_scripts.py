"""Megatron-LM's own mixture-of-experts launchers with DFT's loss, on 2 CPU processes.

Two of Megatron-LM's MoE scripts (NVIDIA/Megatron-LM), by flag group, sizes shrunk (2 layers,
width 64, 4 heads in 2 query groups, 4 experts with top-2 routing, sequences of 64 tokens,
global batch 4, a few iterations) and their data replaced by mock data (`--mock-data
--tokenizer-type NullTokenizer --vocab-size 1000`: no tokenizer or corpus here), with
`pretrain_gpt.py` replaced by `-m dft_megatron.train` plus `--loss-type dft`:

- Mixtral 8x7B: examples/mixtral/train_mixtral_8x7b_distributed.sh, at EP2 (its TP1), with
  the alltoall dispatcher it names and once with Megatron-LM's other one (allgather).
- Qwen3-30B-A3B: the model flags of examples/post_training/modelopt/conf/Qwen/Qwen3-30B-A3B.sh
  (qk-layernorm, kv-channels, moe-ffn-hidden-size, fp32 router, aux loss 1e-3, alltoall) with
  the parallel, precision and optimizer flags of examples/rl/model_configs/qwen3_30b_a3b_moe.sh,
  at TP2 x EP2 with sequence parallelism.

Each run trains (iterations 1..N, finite losses); Megatron-LM's own iteration line carries
the DFT loss as "lm loss" and the router's auxiliary loss apart from it as
"load_balancing_loss" (the MoE aux loss is added to the gradient, not to the logged loss).
With the scripts' GPU-only flags kept, each is named on exactly one `error:` line and the run
stops before training (exit status 2, no traceback before the error lines).

What changed in the scripts, flag by flag:

Mixtral (train_mixtral_8x7b_distributed.sh)
  - layout: --pipeline-model-parallel-size 4 -> 1, --expert-model-parallel-size 8 -> 2 (two
    processes hold EP2 at PP1; PP4 x EP8 needs 32 GPUs). --tensor-model-parallel-size 1 and
    --use-distributed-optimizer kept and run. --sequence-parallel kept: at TP1 Megatron-LM
    itself turns it off ("Disabling sequence parallelism because tensor model parallelism is
    disabled", megatron/training/utils/common_utils.py), on GPUs as here; the Qwen3 run below
    covers sequence parallelism with MoE at TP2.
  - sizes: --seq-length 4096 -> 64, --max-position-embeddings 32768 -> 128, --num-layers
    32 -> 2, --hidden-size 4096 -> 64, --ffn-hidden-size 14336 -> 128, --num-attention-heads
    32 -> 4, --num-query-groups 8 -> 2, --num-experts 8 -> 4 (--moe-router-topk 2 kept),
    --global-batch-size 256 -> 4, --train-iters 500000 -> 4, --lr-decay-iters 320000 -> 4,
    --lr-warmup-iters 500 -> 1, --save-interval 10000 -> 4, --eval-interval 1000 -> 2,
    --eval-iters 10 -> 1.
  - data: --tokenizer-type Llama2Tokenizer, --tokenizer-model, --data-path -> mock data (no
    Llama-2 tokenizer or indexed corpus here); --split 99990,8,2 kept.
  - not flags of the trainer: the torchrun arguments (8 GPUs a node, multi-node), the
    CUDA_DEVICE_MAX_CONNECTIONS export, the wandb branch (no WANDB_API_KEY).
  - GPU-only, refused on CPU (MIXTRAL_GPU_ONLY): --moe-grouped-gemm (Transformer Engine's
    grouped GEMM), --overlap-grad-reduce and --overlap-param-gather (CUDA streams).
  Every other flag of the script is given unchanged, and runs.

Qwen3-30B-A3B (modelopt conf: model flags; rl config: layout, precision, optimizer)
  - sizes: --num-layers 48 -> 2, --hidden-size 2048 -> 64, --ffn-hidden-size 6144 -> 192,
    --num-attention-heads 32 -> 4, --num-query-groups 4 -> 2, --kv-channels 128 -> 32 (twice
    the hidden size per head, as 128 is for 2048 / 32), --num-experts 128 -> 4,
    --moe-ffn-hidden-size 768 -> 32, --moe-router-topk 8 -> 2, --seq-length 4096 / 8192 ->
    64, --max-position-embeddings 40960 / 8192 -> 128, --global-batch-size 256 -> 4,
    --save-interval 100000 -> 3; --train-iters 3 added (the rl config stops by its
    EXIT_INTERVAL).
  - layout: the rl config's --tensor-model-parallel-size 4 -> 2 with
    --expert-model-parallel-size 2 and --pipeline-model-parallel-size 1 kept. On its 8 GPUs
    the experts take TP4 x EP2 (--expert-tensor-parallel-size defaults to TP); two processes
    hold TP2 x EP2 only with --expert-tensor-parallel-size 1 (added: attention over TP2, the
    experts over EP2 on the same two ranks, Megatron-Core's MoE parallel folding).
  - --make-vocab-size-divisible-by: the two files disagree (1187, 128); the model file's 1187
    is kept (151936 = 128 x 1187: Qwen3's vocabulary with no padding). --vocab-size 151936 ->
    1000 (NullTokenizer).
  - data: --tokenizer-type HuggingFaceTokenizer, --tokenizer-model Qwen/Qwen3-30B-A3B -> mock
    data. --tokenizer-hf-include-special-tokens dropped: no such flag in Megatron-LM's parser
    (neither the installed 0.19.2 nor the mirror's HEAD; only this rl config names it), so
    pretrain_gpt.py refuses it too ("unrecognized arguments").
  - RL-only, not pretrain_gpt.py's: the --grpo-* flags, --langrl-env-config,
    --inference-max-seq-length, --inference-max-requests, --pretrained-checkpoint (and its
    checkpoint, which is not here).
  - --te-rng-tracker is kept and trains: it is not refused, since Megatron-Core's
    tensor_parallel.random.initialize_rng_tracker uses Transformer Engine's tracker only
    `if HAVE_TE and use_te_rng_tracker`; without TE it is the ordinary tracker (on a GPU
    with TE it is TE's).
  - GPU-only, refused on CPU (QWEN3_GPU_ONLY): --attention-backend flash and
    --transformer-impl transformer_engine (Transformer Engine).
  Every other flag of the two files is given unchanged, and runs.
"""

from __future__ import annotations

import math
import re

from tests.launch import errors, train

# examples/mixtral/train_mixtral_8x7b_distributed.sh, by its flag groups, shrunk.
MIXTRAL_MODEL = [
    "--use-mcore-models", "--disable-bias-linear", "--seq-length", "64",
    "--max-position-embeddings", "128", "--num-layers", "2", "--hidden-size", "64",
    "--ffn-hidden-size", "128", "--num-attention-heads", "4", "--init-method-std", "0.01",
    "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--normalization", "RMSNorm",
    "--position-embedding-type", "rope", "--swiglu", "--untie-embeddings-and-output-weights",
    "--group-query-attention", "--num-query-groups", "2", "--no-masked-softmax-fusion",
    "--no-position-embedding", "--rotary-base", "1000000",
]  # fmt: skip
MIXTRAL_MOE = [
    "--num-experts", "4", "--moe-router-topk", "2", "--moe-router-load-balancing-type",
    "aux_loss", "--moe-aux-loss-coeff", "1e-2", "--moe-token-dispatcher-type", "alltoall",
]  # fmt: skip
MIXTRAL_DATA = [
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000",
    "--split", "99990,8,2",
]  # fmt: skip
MIXTRAL_TRAINING = [
    "--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "1e-4",
    "--train-iters", "4", "--lr-decay-iters", "4", "--lr-decay-style", "cosine",
    "--min-lr", "1.0e-5", "--weight-decay", "0.1", "--lr-warmup-iters", "1",
    "--clip-grad", "1.0", "--bf16",
]  # fmt: skip
MIXTRAL_PARALLEL = [
    "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
    "--expert-model-parallel-size", "2", "--use-distributed-optimizer", "--sequence-parallel",
]  # fmt: skip
MIXTRAL_LOGGING = [
    "--log-interval", "1", "--save-interval", "4", "--eval-interval", "2", "--eval-iters", "1",
    "--no-load-optim", "--no-load-rng",
]  # fmt: skip
# The script's MOE_ARGS beyond that, which need a GPU.
MIXTRAL_GPU_ONLY = {
    "--moe-grouped-gemm": ["--moe-grouped-gemm"],
    "--overlap-param-gather": ["--overlap-param-gather"],
    "--overlap-grad-reduce": ["--overlap-grad-reduce"],
}

# examples/post_training/modelopt/conf/Qwen/Qwen3-30B-A3B.sh: MODEL_ARGS, shrunk.
QWEN3_MODEL = [
    "--save-interval", "3", "--micro-batch-size", "1", "--bf16", "--no-masked-softmax-fusion",
    "--disable-bias-linear", "--untie-embeddings-and-output-weights",
    "--position-embedding-type", "rope", "--no-rope-fusion", "--normalization", "RMSNorm",
    "--swiglu", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "192",
    "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2",
    "--kv-channels", "32", "--qk-layernorm", "--num-experts", "4",
    "--moe-ffn-hidden-size", "32", "--moe-router-topk", "2", "--moe-router-dtype", "fp32",
    "--moe-aux-loss-coeff", "1e-3", "--moe-token-dispatcher-type", "alltoall",
    "--moe-router-load-balancing-type", "aux_loss", "--seq-length", "64",
    "--max-position-embeddings", "128", "--make-vocab-size-divisible-by", "1187",
    "--use-mcore-models", "--rotary-percent", "1.0", "--rotary-base", "1000000",
    "--no-bias-swiglu-fusion", "--sequence-parallel",
]  # fmt: skip
# examples/rl/model_configs/qwen3_30b_a3b_moe.sh: MODEL_OPTIONS that pretrain_gpt.py has and
# the model file does not repeat, shrunk (GPU-only ones in QWEN3_GPU_ONLY).
QWEN3_PARALLEL = [
    "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "1",
    "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "1",
    "--te-rng-tracker",
]  # fmt: skip
QWEN3_TRAINING = [
    "--global-batch-size", "4", "--train-iters", "3",
    "--no-use-tokenizer-model-from-checkpoint-args", "--norm-epsilon", "1e-6",
    "--use-rotary-position-embeddings", "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
    "--attention-softmax-in-fp32", "--dist-ckpt-strictness", "log_unexpected",
    "--moe-layer-freq", "1", "--optimizer", "adam", "--adam-beta1", "0.9",
    "--adam-beta2", "0.999", "--adam-eps", "1e-8", "--lr", "1e-6", "--min-lr", "1e-7",
    "--lr-warmup-samples", "0", "--clip-grad", "1.0", "--weight-decay", "0.01",
    "--no-load-optim", "--ckpt-format", "torch_dist",
]  # fmt: skip
QWEN3_DATA = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000"]
QWEN3_GPU_ONLY = {
    "--attention-backend": ["--attention-backend", "flash"],
    "--transformer-impl": ["--transformer-impl", "transformer_engine"],
}

# Megatron-LM's iteration line (its training_log), one per iteration at --log-interval 1; not
# DFT's own progress line ("[dft] iteration 1/4 | loss ...").
ITERATION_LINE = re.compile(r" iteration +(\d+)/ *\d+ \| consumed samples:.*")


def _mixtral(tmp_path, dispatcher: str = "alltoall") -> list[str]:
    ckpt = tmp_path / "ckpt"
    moe = [*MIXTRAL_MOE]
    moe[moe.index("--moe-token-dispatcher-type") + 1] = dispatcher
    return [
        *MIXTRAL_MODEL, *moe, *MIXTRAL_DATA, "--data-cache-path", str(tmp_path / "cache"),
        *MIXTRAL_TRAINING, *MIXTRAL_PARALLEL, *MIXTRAL_LOGGING,
        "--save", str(ckpt), "--load", str(ckpt), "--tensorboard-dir", str(ckpt / "tensorboard"),
        "--loss-type", "dft",
    ]  # fmt: skip


def _qwen3(tmp_path) -> list[str]:
    return [
        *QWEN3_MODEL, *QWEN3_PARALLEL, *QWEN3_TRAINING, *QWEN3_DATA,
        "--data-cache-path", str(tmp_path / "cache"), "--log-interval", "1",
        "--save", str(tmp_path / "ckpt"), "--loss-type", "dft",
    ]  # fmt: skip


def _train(tmp_path, name: str, flags: list[str], expect_ok: bool = True):
    return train(tmp_path, name, 2, flags, expect_ok=expect_ok)


def _megatron_args(output: str) -> dict[str, str]:
    """Megatron-LM's printout of the validated args ("  name ........ value")."""
    found = re.findall(r"^  (\w+) \.+ (.*)$", output, flags=re.M)
    return {name: value.strip() for name, value in found}


def _check_moe_training(run, iterations: int) -> None:
    assert [r["iteration"] for r in run.train] == list(range(1, iterations + 1))
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in run.train), run.train
    assert all(math.isfinite(r["ce_loss"]) for r in run.train)
    lines = [m.group(0) for m in ITERATION_LINE.finditer(run.output)]
    assert [int(ITERATION_LINE.match(line).group(1)) for line in lines] == [
        r["iteration"] for r in run.train
    ]
    losses = [r["loss"] for r in run.train]
    router = [r["load_balancing_loss"] for r in run.train]
    for line, record in zip(lines, run.train, strict=True):
        assert "lm loss:" in line and "load_balancing_loss:" in line, line
        lm = float(re.search(r"lm loss: ([-+.\dE]+)", line).group(1))
        aux = float(re.search(r"load_balancing_loss: ([-+.\dE]+)", line).group(1))
        # "lm loss" is the DFT loss of the metrics record, the router's aux loss is apart.
        # Megatron-LM's training_log does not reset its sums after the first iteration's line
        # (megatron/training/training.py: should_reset = not is_first_iteration), so at
        # --log-interval 1 its line for iteration 2 shows the mean of iterations 1 and 2.
        i = record["iteration"]
        expected = sum(losses[:2]) / 2 if i == 2 else record["loss"]
        assert math.isclose(lm, expected, rel_tol=1e-5), (i, lm, expected)
        assert math.isfinite(aux) and aux > 0 and not math.isclose(aux, lm, rel_tol=1e-2)
        # The metrics record carries the router's loss of its iteration too (the line, the
        # same two-iteration mean at iteration 2).
        expected = sum(router[:2]) / 2 if i == 2 else record["load_balancing_loss"]
        assert math.isclose(aux, expected, rel_tol=1e-5), (i, aux, expected)


def _check_refused(run, gpu_only: dict) -> None:
    assert run.returncode != 0
    lines = errors(run)
    for flag in gpu_only:
        assert sum(flag in line for line in lines) == 1, (flag, lines)
    assert len(lines) == len(gpu_only), lines
    assert "Traceback" not in run.output.split("error:")[0]
    assert "unrecognized arguments" not in run.output and "invalid choice" not in run.output
    assert not run.train  # stopped before training
    assert not ITERATION_LINE.search(run.output)


def test_megatron_lm_mixtral_script_trains(tmp_path):
    run = _train(tmp_path, "mixtral", _mixtral(tmp_path))
    _check_moe_training(run, 4)
    assert [r["iteration"] for r in run.valid][:2] == [2, 4]  # every 2 (and at the end)
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert any((tmp_path / "ckpt" / "tensorboard").iterdir())
    args = _megatron_args(run.output)
    assert args["num_experts"] == "4" and args["expert_model_parallel_size"] == "2"
    assert args["moe_token_dispatcher_type"] == "alltoall"
    assert args["use_distributed_optimizer"] == "True"
    assert args["sequence_parallel"] == "False"  # Megatron-LM's own rule at TP1 (see above)


def test_megatron_lm_mixtral_script_trains_with_the_allgather_dispatcher(tmp_path):
    flags = _mixtral(tmp_path, "allgather")
    flags[flags.index("--train-iters") + 1] = "2"
    for flag in ("--eval-interval", "--save-interval"):  # train only: the cheap variant
        flags[flags.index(flag) + 1] = "1000"
    run = _train(tmp_path, "mixtral_allgather", flags)
    _check_moe_training(run, 2)
    assert _megatron_args(run.output)["moe_token_dispatcher_type"] == "allgather"


def test_megatron_lm_qwen3_30b_a3b_flags_train(tmp_path):
    run = _train(tmp_path, "qwen3_moe", _qwen3(tmp_path))
    _check_moe_training(run, 3)
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    args = _megatron_args(run.output)
    assert args["tensor_model_parallel_size"] == "2"
    assert args["expert_model_parallel_size"] == "2"
    assert args["expert_tensor_parallel_size"] == "1"
    assert args["sequence_parallel"] == "True"  # at TP2 it stays on
    assert args["qk_layernorm"] == "True" and args["moe_router_dtype"] == "fp32"
    assert args["moe_ffn_hidden_size"] == "32" and args["kv_channels"] == "32"
    assert args["te_rng_tracker"] == "True"


def test_mixtral_gpu_only_flags_are_named_one_line_each(tmp_path):
    extra = [flag for group in MIXTRAL_GPU_ONLY.values() for flag in group]
    run = _train(tmp_path, "mixtral_gpu", [*_mixtral(tmp_path), *extra], expect_ok=False)
    _check_refused(run, MIXTRAL_GPU_ONLY)


def test_qwen3_gpu_only_flags_are_named_one_line_each(tmp_path):
    extra = [flag for group in QWEN3_GPU_ONLY.values() for flag in group]
    run = _train(tmp_path, "qwen3_gpu", [*_qwen3(tmp_path), *extra], expect_ok=False)
    _check_refused(run, QWEN3_GPU_ONLY)
