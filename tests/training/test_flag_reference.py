"""README.md's flag reference is the parser's: regenerate it with
`python tools/make_flag_reference.py` when a config field or its docstring changes."""

from __future__ import annotations

import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_flag_reference_is_current():
    tool = runpy.run_path(str(ROOT / "tools" / "make_flag_reference.py"))
    text = (ROOT / "README.md").read_text()
    assert tool["with_reference"](text) == text, (
        "README.md's flag reference is out of date: run python tools/make_flag_reference.py"
    )


def test_every_flag_is_listed():
    from dft_megatron.training.arguments import build_parser

    text = (ROOT / "README.md").read_text()
    for action in build_parser()._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                assert f"`{flag}`" in text, flag
