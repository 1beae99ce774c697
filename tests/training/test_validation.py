"""Bad flag combinations fail early with a message that names the flag and the fix."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dft_megatron.models.gpt import PrecisionConfig, resolve_transformer_impl
from dft_megatron.training.arguments import parse_args
from dft_megatron.training.trainer import ConfigError, resolve_model_config, validate

BASE = ["--mock-data", "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4"]


def check(argv, world_size=4, on_gpu=False):
    cfg, _ = parse_args([*BASE, *argv])
    return validate(cfg, world_size, on_gpu)


@pytest.mark.parametrize(
    "argv,world,match",
    [
        (
            ["--tensor-model-parallel-size", "3"],
            3,
            r"--num-attention-heads \(4\) must be divisible by --tensor-model-parallel-size \(3\)",
        ),
        (
            ["--num-query-groups", "2", "--tensor-model-parallel-size", "4"],
            4,
            r"--num-query-groups \(2\) must be divisible by --tensor-model-parallel-size \(4\)",
        ),
        (["--num-query-groups", "3"], 1, r"must be a multiple of --num-query-groups \(3\)"),
        (
            ["--pipeline-model-parallel-size", "3"],
            3,
            r"--num-layers \(4\) must be divisible by --pipeline-model-parallel-size \(3\)",
        ),
        (
            ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"],
            2,
            r"--num-layers-per-virtual-pipeline-stage \(3\) must divide the layers per",
        ),
        (
            ["--num-layers-per-virtual-pipeline-stage", "1"],
            1,
            r"needs --pipeline-model-parallel-size > 1",
        ),
        (
            ["--global-batch-size", "6", "--micro-batch-size", "2"],
            2,
            r"--global-batch-size \(6\) must be divisible by --micro-batch-size \(2\) x "
            r"data-parallel size \(2",
        ),
        (["--sequence-parallel"], 2, r"--sequence-parallel needs --tensor-model-parallel-size > 1"),
        (
            ["--tensor-model-parallel-size", "2"],
            3,
            r"world size 3 is not divisible by TP x PP x CP",
        ),
        (
            ["--context-parallel-size", "2"],
            2,
            r"--context-parallel-size 2 needs Transformer Engine",
        ),
        (["--overlap-grad-reduce"], 1, r"CUDA streams; drop them on CPU"),
        (
            ["--overlap-param-gather"],
            1,
            r"--overlap-param-gather needs --use-distributed-optimizer",
        ),
        (["--bf16", "--fp16"], 1, r"--bf16 and --fp16 exclude each other"),
        (
            [
                "--vocab-size",
                "96",
                "--padded-vocab-size",
                "98",
                "--tensor-model-parallel-size",
                "4",
                "--num-attention-heads",
                "8",
            ],
            4,
            r"padded vocabulary \(98 rows.*not divisible by --tensor-model-parallel-size \(4\)",
        ),
    ],
)
def test_layout_errors(argv, world, match):
    with pytest.raises(ConfigError, match=match):
        check(argv, world)


def test_good_layout_gives_data_parallel_size():
    assert check(["--tensor-model-parallel-size", "2", "--global-batch-size", "8"], 8) == 4


def test_no_data_is_an_error():
    cfg, _ = parse_args(BASE[1:])
    with pytest.raises(ConfigError, match="no training data: give --sft-data FILE"):
        validate(cfg, 1, False)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--mock-data", "--sft-data", "a.jsonl"], "--mock-data and --sft-data exclude each other"),
        (["--sft-data", "a.jsonl", "--valid-fraction", "1.5"], r"--valid-fraction must be in"),
        (
            ["--sft-data", "a.jsonl", "--valid-fraction", "0.1", "--valid-data", "b.jsonl"],
            "--valid-fraction and --valid-data exclude each other",
        ),
        (["--sft-data", "a.jsonl", "--eval-interval", "5"], "--eval-interval needs validation"),
        (["--sft-data", "a.jsonl", "--num-workers", "0"], "--num-workers must be >= 1"),
    ],
)
def test_data_flags(flags, message):
    cfg, _ = parse_args([*BASE[1:], *flags])
    with pytest.raises(ConfigError, match=message):
        validate(cfg, 1, False)


def test_fp8_and_te_refused_on_cpu():
    with pytest.raises(
        RuntimeError,
        match=r"--fp8-format e4m3 needs Transformer Engine .* "
        r"FP8 never falls back to bf16",
    ):
        resolve_transformer_impl(PrecisionConfig(bf16=True, fp8_format="e4m3"))
    with pytest.raises(RuntimeError, match="needs a CUDA GPU and none is visible"):
        resolve_transformer_impl(PrecisionConfig(transformer_impl="transformer_engine"))
    assert resolve_transformer_impl(PrecisionConfig()) == "local"


def test_load_errors(tmp_path):
    cfg, given = parse_args([*BASE, "--load", str(tmp_path / "missing")])
    with pytest.raises(FileNotFoundError, match="missing: no such directory"):
        resolve_model_config(cfg, given)
    cfg, given = parse_args([*BASE, "--load", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        resolve_model_config(cfg, given)


def test_load_with_other_architecture_is_refused(tmp_path):
    from dft_megatron.models.config import ModelConfig

    stored = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4)
    (tmp_path / "dft_megatron.json").write_text(
        json.dumps(
            {
                "format_version": 1,
                "iteration": 3,
                "consumed_samples": 12,
                "model": stored.to_dict(),
                "tensor_model_parallel_size": 1,
                "pipeline_model_parallel_size": 1,
                "has_optimizer": True,
            }
        )
    )
    # Flags that agree (and ones that do not change shapes) are fine; the rest is refused.
    cfg, given = parse_args(["--mock-data", "--load", str(tmp_path), "--hidden-dropout", "0"])
    assert resolve_model_config(cfg, given).iteration == 3
    assert cfg.model.hidden_size == 64 and cfg.model.hidden_dropout == 0.0
    cfg, given = parse_args(["--mock-data", "--load", str(tmp_path), "--hidden-size", "128"])
    with pytest.raises(ConfigError, match=r"different architecture .*hidden_size: 64 vs 128"):
        resolve_model_config(cfg, given)


def test_config_file_and_command_line(tmp_path):
    conf = tmp_path / "run.yaml"
    conf.write_text("num-layers: 6\nhidden_size: 96\n--lr: 3e-4\ndisable-bias-linear: true\n")
    cfg, given = parse_args(["--config", str(conf), "--num-layers", "8"])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.optim.lr) == (8, 96, 3e-4)
    assert cfg.model.add_bias_linear is False
    assert {"num_layers", "hidden_size", "lr", "add_bias_linear"} <= given
    conf.write_text("num-layayers: 6\n")
    with pytest.raises(SystemExit, match=r"run.yaml: unknown key 'num-layayers'"):
        parse_args(["--config", str(conf)])


def test_cli_prints_one_error_and_exits_2():
    proc = subprocess.run(
        [sys.executable, "-m", "dft_megatron.train", *BASE, "--sequence-parallel"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr.count("error: --sequence-parallel needs --tensor-model-parallel-size > 1") == 1
    )


def test_packing_with_context_parallel_is_refused_on_gpu():
    cfg, _ = parse_args([*BASE[1:], "--sft-data", "a.jsonl", "--context-parallel-size", "2"])
    with pytest.raises(ConfigError, match="packed SFT sequences are not split over context"):
        validate(cfg, 2, True)  # on a GPU: context parallelism itself is allowed
    cfg, _ = parse_args(
        [*BASE[1:], "--sft-data", "a.jsonl", "--context-parallel-size", "2", "--no-packing"]
    )
    assert validate(cfg, 2, True) == 1
