"""Megatron-LM style command line (and `--config FILE.yaml`) -> `TrainConfig`.

Every field of the config dataclasses is one flag, named as Megatron-LM names it
(`tensor_model_parallel_size` -> `--tensor-model-parallel-size`); its help text is the
docstring under the field, so the dataclasses are the one place a flag is described.
A YAML file given with `--config` holds any of them (keys spelled as flags, with or
without the dashes, or as field names); flags on the command line override the file.

`parse_args` returns the config and the set of field names the user set explicitly, so
the trainer can tell model flags that were given from defaults when it reads the
architecture stored in a checkpoint.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing

import yaml

from dft_megatron.data.config import DATA_FORMATS, TRUNCATION
from dft_megatron.loss.weights import LOSS_TYPES
from dft_megatron.models.config import FAMILIES
from dft_megatron.models.gpt import TRANSFORMER_IMPLS
from dft_megatron.training.config import TrainConfig

# Flags whose Megatron-LM spelling inverts the field (store_false).
INVERTED = {"add_bias_linear": "disable-bias-linear", "packing": "no-packing"}

CHOICES = {
    "family": FAMILIES,
    "position_embedding_type": ("rope", "learned_absolute"),
    "normalization": ("LayerNorm", "RMSNorm"),
    "lr_decay_style": ("constant", "linear", "cosine"),
    "fp8_format": ("e4m3", "hybrid"),
    "fp8_recipe": ("delayed", "tensorwise", "mxfp8", "blockwise"),
    "fp8_amax_compute_algo": ("most_recent", "max"),
    "transformer_impl": TRANSFORMER_IMPLS,
    "loss_type": LOSS_TYPES,
    "data_format": DATA_FORMATS,
    "truncation": TRUNCATION,
    "tokenizer_type": ("HuggingFaceTokenizer",),
}

GROUP_TITLES = {
    "model": "model architecture",
    "precision": "precision",
    "parallel": "parallelism",
    "optim": "optimization",
    "loss": "loss",
    "checkpoint": "checkpoints",
    "logging": "logging and evaluation",
    "data": "data",
}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: the docstring right under it} for a dataclass, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _scalar_type(cls: type, f: dataclasses.Field) -> type:
    """The field's type without None; list[str] fields (several values) give `list`."""
    hint = typing.get_type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return list
    return hint


def _sections() -> list[tuple[str, type]]:
    """[(TrainConfig field, its dataclass)] in declaration order."""
    hints = typing.get_type_hints(TrainConfig)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(TrainConfig)]


def flag_table() -> dict[str, tuple[str, str, type]]:
    """{flag without dashes: (section, field name, field type)} for every config field."""
    table = {}
    for section, cls in _sections():
        for f in dataclasses.fields(cls):
            flag = INVERTED.get(f.name, f.name.replace("_", "-"))
            table[flag] = (section, f.name, _scalar_type(cls, f))
    return table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dft_megatron.train",
        description="DFT (or SFT) training of GPT-family models on Megatron-Core. "
        "Launch with torchrun; flags are Megatron-LM's.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="YAML file of flags (keys as flag names); command-line flags override it",
    )
    for section, cls in _sections():
        add_fields(parser.add_argument_group(GROUP_TITLES[section]), cls)
    return parser


def add_fields(group, cls: type, only: set[str] | None = None) -> None:
    """One flag per field of the dataclass `cls` (or of the fields named in `only`)."""
    docs = field_docs(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        help_text = docs.get(f.name, "")
        kind = _scalar_type(cls, f)
        default = getattr(defaults, f.name)
        if f.name in INVERTED:
            group.add_argument(
                "--" + INVERTED[f.name],
                dest=f.name,
                action="store_false",
                help=f"turn off: {help_text}",
            )
        elif kind is bool:
            group.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                action="store_true",
                help=help_text,
            )
        elif kind is list:
            group.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                nargs="+",
                metavar="VALUE",
                help=f"{help_text} (default: {default})",
            )
        else:
            group.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                type=kind,
                choices=CHOICES.get(f.name),
                metavar=None if f.name in CHOICES else kind.__name__.upper(),
                help=f"{help_text} (default: {default})",
            )


def _read_yaml(path: str, table: dict) -> dict[str, object]:
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise SystemExit(f"error: --config {path}: no such file") from None
    except yaml.YAMLError as e:
        raise SystemExit(f"error: --config {path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"error: --config {path}: expected a mapping of flag: value")
    by_field = {name: flag for flag, (_, name, _) in table.items()}
    values = {}
    for key, value in data.items():
        flag = str(key).lstrip("-").replace("_", "-")
        if flag not in table:
            flag = by_field.get(str(key).lstrip("-"), flag)
        if flag not in table:
            raise SystemExit(
                f"error: --config {path}: unknown key {key!r}; keys are the trainer's flags "
                "(see --help)"
            )
        section, name, kind = table[flag]
        if flag in INVERTED.values():
            value = not value
        elif kind is list and value is not None:
            value = [str(v) for v in value] if isinstance(value, list) else str(value).split()
        elif value is not None and kind is not bool:
            value = kind(value)
        values[name] = value
    return values


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, set[str]]:
    """(config, names of the fields set by --config or on the command line)."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    table = flag_table()
    given = {}
    config_file = args.pop("config", None)
    if config_file is not None:
        given.update(_read_yaml(config_file, table))
    given.update(args)
    return config_from_values(given), set(given)


def config_from_values(values: dict[str, object]) -> TrainConfig:
    """A TrainConfig with `values` ({field name: value}) over the defaults."""
    sections = {}
    for section, cls in _sections():
        names = {f.name for f in dataclasses.fields(cls)}
        sections[section] = cls(**{k: v for k, v in values.items() if k in names})
    return TrainConfig(**sections)


def flag_reference() -> str:
    """The trainer's flags as Markdown tables, one per group, from the parser itself (the
    README's flag reference; tools/make_flag_reference.py writes it, a test compares)."""
    parser = build_parser()
    out = []
    for group in parser._action_groups:  # argparse keeps no public list of its groups
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        title = group.title if group.title not in ("options", "optional arguments") else "general"
        out += [f"**{title}**", "", "| flag | value | description |", "|---|---|---|"]
        for a in actions:
            if a.nargs == 0:
                value = "switch"
            elif a.choices:
                value = " \\| ".join(f"`{c}`" for c in a.choices)
            elif a.nargs == "+":
                value = "one or more"
            else:
                value = (a.metavar or a.dest).lower()
            text = (a.help or "").replace("|", "\\|")
            out.append(f"| `{a.option_strings[0]}` | {value} | {text} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"
