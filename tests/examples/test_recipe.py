"""examples/dft_qwen2.5_math_1.5b.sh has the paper's official hyperparameters.

Reference: the DFT repository's verl sft_trainer.yaml, as shared/DESIGN.md lists it ("Official
recipe"): lr 5e-5, AdamW betas (0.9, 0.95), weight decay 0.01, warm-up ratio 0.1, grad clip
1.0, cosine decay, global batch 256, max length 2048, 1 epoch, bf16, loss = token mean over
response tokens, on NuminaMath-CoT's problem -> solution rows; evaluation with 16 samples at
temperature 1.0, top-p 1.0, up to 4096 new tokens.

The script runs with PYTHON set to a stub that records its arguments and exits, so no
conversion, training or evaluation happens; the trainer's arguments are then parsed by the
trainer's own parser (Megatron-LM's plus DFT's, `parse_only`), so a misspelt flag fails too,
and each parsed value is compared with the list above.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.examples.stub import recorded_calls, run_script, trainer_argv

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "dft_qwen2.5_math_1.5b.sh"


def _calls(tmp_path: Path, name: str = "calls", **env) -> list[list[str]]:
    """Every command the script runs through $PYTHON, as argument lists."""
    done = run_script(
        SCRIPT,
        tmp_path,
        name,
        env={
            "HF_MODEL": str(tmp_path / "Qwen2.5-Math-1.5B"),
            "NUMINA": str(tmp_path / "numina.jsonl"),
            "BENCHMARKS": str(tmp_path / "benchmarks"),
            "OUT": str(tmp_path / "out"),
            **env,
        },
    )
    assert done.returncode == 0, done.stderr
    return recorded_calls(tmp_path / name)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("recipe")
    calls = _calls(tmp_path)
    from dft_megatron.training.arguments import parse_only

    return calls, parse_only(trainer_argv(calls))


def test_the_script_converts_trains_exports_and_evaluates(recipe):
    calls, _ = recipe
    tools = [Path(c[0]).name if c[0] != "-m" else c[1] for c in calls]
    assert tools == [
        "convert_hf_to_megatron.py",
        "torch.distributed.run",
        "convert_megatron_to_hf.py",
        "eval_math.py",
    ]


@pytest.mark.parametrize(
    ("dest", "official"),
    [
        ("lr", 5e-5),
        ("optimizer", "adam"),  # Megatron-LM's adam is AdamW (see the test below)
        ("adam_beta1", 0.9),
        ("adam_beta2", 0.95),
        ("weight_decay", 0.01),
        ("lr_warmup_fraction", 0.1),
        ("clip_grad", 1.0),
        ("lr_decay_style", "cosine"),
        ("min_lr", 0.0),  # verl's cosine schedule decays to 0 (min_lr_ratio 0)
        ("global_batch_size", 256),
        ("seq_length", 2048),
        ("train_epochs", 1.0),
        ("bf16", True),
        ("fp16", False),
        ("loss_type", "dft"),
        ("calculate_per_token_loss", True),  # token mean over the global batch's loss tokens
        ("prompt_key", "problem"),  # NuminaMath-CoT: the prompt carries no loss ...
        ("response_key", "solution"),  # ... the response's tokens are the targets
        ("data_format", "auto"),  # prompt/response rows: not "text" (every token a target)
        ("packing", False),  # a global batch of 256 sequences is 256 samples
        ("finetune", True),  # from the converted model's weights, a fresh schedule
    ],
)
def test_official_hyperparameter(recipe, dest, official):
    _, args = recipe
    assert getattr(args, dest) == official, (dest, getattr(args, dest), official)


def test_nothing_overrides_the_schedule(recipe):
    _, args = recipe
    # One epoch sets --train-iters from the data; nothing else may fix the length or warm-up.
    assert args.train_iters is None and args.train_samples is None
    assert args.lr_warmup_iters == 0 and args.lr_warmup_samples == 0
    assert args.lr_decay_iters is None and args.lr_decay_samples is None
    assert args.dft_min_prob == 0.0 and args.dft_alpha == 1.0 and args.sft_mix == 0.0


def test_megatron_adam_is_adamw():
    from megatron.core.optimizer import OptimizerConfig

    assert OptimizerConfig().decoupled_weight_decay  # no flag changes it in Megatron-LM


def test_paper_evaluation_protocol(recipe):
    calls, _ = recipe
    (ev,) = [c for c in calls if c[0].endswith("eval_math.py")]
    flags = dict(zip(ev[1::2], ev[2::2], strict=False))
    assert flags["--num-samples"] == "16"
    assert float(flags["--temperature"]) == 1.0 and float(flags["--top-p"]) == 1.0
    assert flags["--max-new-tokens"] == "4096"
    assert flags["--prompt-template"] == "qwen-boxed"


def test_sft_baseline_changes_only_the_loss(tmp_path):
    from dft_megatron.training.arguments import parse_only

    dft = trainer_argv(_calls(tmp_path, "dft"))
    sft = trainer_argv(_calls(tmp_path, "sft", LOSS_TYPE="sft"))
    assert [a for a in dft if a != "dft"] == [a for a in sft if a != "sft"]
    assert parse_only(sft).loss_type == "sft"


def test_the_trainer_accepts_the_recipe(recipe):
    from dft_megatron.training.arguments import refusals

    _, args = recipe
    assert refusals(args) == []  # on CPU too: nothing in the recipe needs a GPU to parse
