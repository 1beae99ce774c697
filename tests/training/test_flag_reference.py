"""README.md's flag reference is the parsers': regenerate it with
`python tools/make_flag_reference.py` when a DFT flag, its help or a changed default changes.

It lists dft_megatron's own flags (the groups `add_dft_arguments` adds) and the Megatron-LM
defaults dft_megatron changes; Megatron-LM's own flags are accepted as they are, which the
section says, with the command that lists them."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tool():
    return runpy.run_path(str(ROOT / "tools" / "make_flag_reference.py"))


def _section(tool) -> str:
    text = (ROOT / "README.md").read_text()
    return text.partition(tool["BEGIN"])[2].partition(tool["END"])[0]


def test_readme_flag_reference_is_current(tool):
    text = (ROOT / "README.md").read_text()
    assert tool["with_reference"](text) == text, (
        "README.md's flag reference is out of date: run python tools/make_flag_reference.py"
    )


def test_every_dft_flag_is_listed(tool):
    section = _section(tool)
    flags = [f for a in tool["dft_parser"]()._actions for f in a.option_strings]
    assert "--loss-type" in flags and "--sft-data" in flags and "--preprocess-workers" in flags
    for flag in flags:
        assert f"| `{flag}` |" in section, flag


def test_megatron_flags_are_accepted_as_they_are(tool):
    section = " ".join(_section(tool).split())
    assert "accepts every flag of Megatron-LM's trainer" in section
    assert "`python -m dft_megatron.train --help` lists them all" in section
    # Megatron-LM's flags are not copied into the reference (only the changed defaults are).
    assert "| `--num-layers` |" not in section and "| `--lr` |" not in section


def test_the_changed_defaults_are_the_parsers(tool):
    from dft_megatron.training.arguments import cpu_defaults

    everywhere, on_cpu = tool["changed_defaults"]()
    assert {a.dest for a, _, _ in everywhere} == {"calculate_per_token_loss", "eval_iters"}
    assert [a.dest for a, _, _ in on_cpu] == list(cpu_defaults())
    section = _section(tool)
    assert "| `--calculate-per-token-loss` | not given | given |" in section
    assert "| `--distributed-backend` | `nccl` | `gloo` without a GPU |" in section
