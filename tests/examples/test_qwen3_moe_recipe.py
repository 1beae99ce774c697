"""examples/dft_qwen3_30b_a3b.sh: the DFT recipe on Qwen3-30B-A3B with expert parallelism.

The script runs with PYTHON set to a stub that records its arguments and exits (no
conversion, training or evaluation happens); the trainer's arguments are parsed by the
trainer's own parser (Megatron-LM's plus DFT's, `parse_only`), so a misspelt flag fails, and
each parsed value is compared with what the script's header promises: the paper's recipe
(the same values as examples/dft_qwen2.5_math_1.5b.sh, tests/examples/test_recipe.py), the
MoE flags (grouped GEMM, alltoall dispatcher, fp32 router, aux loss 1e-3) and the layout
(TP, EP, ETP, PP from the environment, sequence parallelism, distributed optimizer), with
no model-shape flag: the architecture comes from the converted checkpoint.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.examples.stub import recorded_calls, run_script, torchrun_call, trainer_argv

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "dft_qwen3_30b_a3b.sh"

# Flags that set the architecture: the converted checkpoint's args carry them.
MODEL_SHAPE_FLAGS = (
    "--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads",
    "--num-query-groups", "--group-query-attention", "--kv-channels", "--qk-layernorm",
    "--num-experts", "--moe-ffn-hidden-size", "--moe-router-topk", "--moe-layer-freq",
    "--vocab-size", "--rotary-base", "--norm-epsilon", "--swiglu", "--normalization",
    "--untie-embeddings-and-output-weights", "--position-embedding-type",
)  # fmt: skip


# The script's settings: a caller's shell that exports one of them does not change the test.
SETTINGS = (
    "TP", "EP", "ETP", "PP", "NNODES", "GPUS_PER_NODE", "NODE_RANK", "DATA", "LOSS_TYPE",
    "MICRO_BATCH_SIZE", "VERIFY", "EVAL_TP", "MASTER_ADDR", "MASTER_PORT",
)  # fmt: skip


def _run(
    tmp_path: Path, name: str = "calls", extra: tuple[str, ...] = (), **env
) -> subprocess.CompletedProcess:
    """The script with the recording stub as PYTHON; `extra`: arguments for the trainer."""
    inputs = {
        "HF_MODEL": str(tmp_path / "Qwen3-30B-A3B"),
        "NUMINA": str(tmp_path / "numina.jsonl"),
        "BENCHMARKS": str(tmp_path / "benchmarks"),
        "OUT": str(tmp_path / "out"),
    }
    return run_script(SCRIPT, tmp_path, name, extra, env={**inputs, **env}, clear=SETTINGS)


def _calls(tmp_path: Path, name: str = "calls", extra: tuple[str, ...] = (), **env) -> list:
    """Every command the script runs through $PYTHON, as argument lists."""
    done = _run(tmp_path, name, extra, **env)
    assert done.returncode == 0, done.stderr
    return recorded_calls(tmp_path / name)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("qwen3_moe_recipe")
    calls = _calls(tmp_path)
    from dft_megatron.training.arguments import parse_only

    return calls, parse_only(trainer_argv(calls)), tmp_path


def test_the_script_converts_trains_exports_and_evaluates(recipe):
    calls, _, tmp_path = recipe
    tools = [Path(c[0]).name if c[0] != "-m" else c[1] for c in calls]
    assert tools == [
        "convert_hf_to_megatron.py",
        "torch.distributed.run",
        "convert_megatron_to_hf.py",
        "eval_math.py",
    ]
    convert = dict(zip(calls[0][1::2], calls[0][2::2], strict=False))
    assert convert["--hf-dir"] == str(tmp_path / "Qwen3-30B-A3B")
    assert convert["--megatron-dir"] == str(tmp_path / "out" / "hf_import")
    assert convert["--dtype"] == "bf16" and "--verify" not in calls[0]  # VERIFY=1 adds it
    export = dict(zip(calls[2][1::2], calls[2][2::2], strict=False))
    assert export["--megatron-dir"] == str(tmp_path / "out" / "checkpoints")


def test_verify_checks_the_conversion(tmp_path):
    calls = _calls(tmp_path, VERIFY="1")
    assert calls[0][0].endswith("convert_hf_to_megatron.py") and "--verify" in calls[0]


def test_two_nodes_of_eight_gpus_by_default(recipe):
    calls, _, _ = recipe
    launch = torchrun_call(calls)
    launch = launch[: launch.index("dft_megatron.train")]
    flags = dict(zip(launch[2::2], launch[3::2], strict=False))
    assert flags["--nproc-per-node"] == "8" and flags["--nnodes"] == "2"


@pytest.mark.parametrize(
    ("dest", "value"),
    [
        # The layout (defaults: TP2, EP8, ETP1, PP1 on 16 GPUs).
        ("tensor_model_parallel_size", 2),
        ("expert_model_parallel_size", 8),
        ("expert_tensor_parallel_size", 1),
        ("pipeline_model_parallel_size", 1),
        ("sequence_parallel", True),
        ("use_distributed_optimizer", True),
        # Mixture of experts: Megatron-LM's flags for a GPU run, Qwen3-MoE's balancing loss.
        ("moe_grouped_gemm", True),
        ("moe_token_dispatcher_type", "alltoall"),
        ("moe_router_dtype", "fp32"),
        ("moe_aux_loss_coeff", [1e-3]),  # nargs="+": a list until Megatron-LM validates
        ("moe_router_load_balancing_type", ["aux_loss"]),  # nargs="+" too
        # The DFT paper's recipe (as in examples/dft_qwen2.5_math_1.5b.sh).
        ("lr", 5e-5),
        ("optimizer", "adam"),  # Megatron-LM's adam is AdamW (tests/examples/test_recipe.py)
        ("adam_beta1", 0.9),
        ("adam_beta2", 0.95),
        ("weight_decay", 0.01),
        ("lr_warmup_fraction", 0.1),
        ("clip_grad", 1.0),
        ("lr_decay_style", "cosine"),
        ("min_lr", 0.0),
        ("global_batch_size", 256),
        ("micro_batch_size", 1),
        ("seq_length", 2048),
        ("train_epochs", 1.0),
        ("bf16", True),
        ("fp16", False),
        ("loss_type", "dft"),
        ("calculate_per_token_loss", True),
        ("prompt_key", "problem"),
        ("response_key", "solution"),
        ("packing", False),
        ("finetune", True),
    ],
)
def test_flag_reaches_the_trainer(recipe, dest, value):
    _, args, _ = recipe
    assert getattr(args, dest) == value, (dest, getattr(args, dest), value)


def test_the_architecture_comes_from_the_checkpoint(recipe):
    calls, args, tmp_path = recipe
    argv = trainer_argv(calls)
    repeated = [a for a in argv if a.split("=")[0] in MODEL_SHAPE_FLAGS]
    assert repeated == []
    assert args.load == str(tmp_path / "out" / "hf_import")  # the conversion's output
    assert args.sft_data == [str(tmp_path / "numina.jsonl")]


def test_nothing_overrides_the_schedule(recipe):
    _, args, _ = recipe
    assert args.train_iters is None and args.train_samples is None
    assert args.lr_warmup_iters == 0 and args.lr_warmup_samples == 0
    assert args.lr_decay_iters is None and args.lr_decay_samples is None
    assert args.dft_min_prob == 0.0 and args.dft_alpha == 1.0 and args.sft_mix == 0.0


def test_layout_from_the_environment(tmp_path):
    from dft_megatron.training.arguments import parse_only

    env = dict(TP="4", EP="4", ETP="2", PP="2", NNODES="4", DATA="", MICRO_BATCH_SIZE="2")
    calls = _calls(tmp_path, **env)
    args = parse_only(trainer_argv(calls))
    assert args.tensor_model_parallel_size == 4 and args.expert_model_parallel_size == 4
    assert args.expert_tensor_parallel_size == 2 and args.pipeline_model_parallel_size == 2
    assert args.micro_batch_size == 2
    launch = torchrun_call(calls)
    assert launch[launch.index("--nnodes") + 1] == "4"


def test_data_is_another_name_for_numina(tmp_path):
    from dft_megatron.training.arguments import parse_only

    rows = tmp_path / "rows.jsonl"
    rows.parent.mkdir(parents=True, exist_ok=True)
    rows.write_text('{"problem": "2+2?", "solution": "\\\\boxed{4}"}\n')
    calls = _calls(tmp_path, NUMINA="", DATA=str(rows))
    assert parse_only(trainer_argv(calls)).sft_data == [str(rows)]


@pytest.mark.parametrize(
    ("env", "named"),
    [({"EP": "3"}, "EP=3"), ({"TP": "3"}, "TP=3"), ({"ETP": "4", "EP": "8"}, "ETP=4")],
)
def test_a_layout_the_gpus_cannot_hold_stops_before_anything_runs(tmp_path, env, named):
    done = _run(tmp_path, **env)
    assert done.returncode == 2 and named in done.stderr, done.stderr
    assert not (tmp_path / "calls").exists()  # no conversion, no training


def test_a_misspelt_flag_would_fail(recipe):
    from dft_megatron.training.arguments import parse_only

    calls, _, _ = recipe
    argv = trainer_argv(calls)
    misspelt = [a.replace("--moe-aux-loss-coeff", "--moe-aux-loss-coef") for a in argv]
    assert misspelt != argv
    with pytest.raises(SystemExit):
        parse_only(misspelt)


def test_extra_arguments_reach_the_trainer(tmp_path):
    from dft_megatron.training.arguments import parse_only

    calls = _calls(tmp_path, extra=("--lr", "1e-5", "--moe-aux-loss-coeff", "1e-2"))
    args = parse_only(trainer_argv(calls))
    assert args.lr == 1e-5 and args.moe_aux_loss_coeff == [1e-2]  # given last, they win


def test_the_sft_baseline_changes_only_the_loss(tmp_path):
    dft = trainer_argv(_calls(tmp_path, "dft"))
    sft = trainer_argv(_calls(tmp_path, "sft", LOSS_TYPE="sft"))
    assert [a for a in dft if a != "dft"] == [a for a in sft if a != "sft"]


def test_paper_evaluation_protocol(recipe):
    calls, _, _ = recipe
    (ev,) = [c for c in calls if c[0].endswith("eval_math.py")]
    flags = dict(zip(ev[1::2], ev[2::2], strict=False))
    assert flags["--num-samples"] == "16"
    assert float(flags["--temperature"]) == 1.0 and float(flags["--top-p"]) == 1.0
    assert flags["--max-new-tokens"] == "4096"
    assert flags["--prompt-template"] == "qwen-boxed"
    assert flags["--tensor-parallel-size"] == "2"  # a 30B model in bf16 on vLLM


def test_on_cpu_only_the_grouped_gemm_is_refused(recipe):
    from dft_megatron.training.arguments import refusals

    _, args, _ = recipe
    problems = refusals(args)
    # Everything else in the recipe parses and passes the checks here; grouped GEMM is
    # Transformer Engine's (the GPU run this script is for).
    assert len(problems) == 1 and "--moe-grouped-gemm" in problems[0], problems
