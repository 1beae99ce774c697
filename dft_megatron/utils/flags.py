"""Command-line flags from config dataclasses: one flag per field, its help the docstring
written right under the field, so the dataclass is the one place a flag is described."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing

# Fields whose flag, in Megatron-LM's spelling, turns them off (store_false).
INVERTED = {"add_bias_linear": "disable-bias-linear", "packing": "no-packing"}


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


def add_fields(
    group,
    cls: type,
    only: set[str] | None = None,
    choices: dict[str, tuple] | None = None,
    renamed: dict[str, str] | None = None,
) -> None:
    """One flag per field of the dataclass `cls` (or of the fields named in `only`), with the
    field's default. `renamed` maps a field to another flag name (its dest follows the flag)."""
    docs = field_docs(cls)
    defaults = cls()
    choices = choices or {}
    renamed = renamed or {}
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        help_text = docs.get(f.name, "")
        kind = _scalar_type(cls, f)
        default = getattr(defaults, f.name)
        name = renamed.get(f.name, f.name.replace("_", "-"))
        dest = name.replace("-", "_")
        if f.name in INVERTED:
            group.add_argument(
                "--" + INVERTED[f.name],
                dest=f.name,
                action="store_false",
                help=f"turn off: {help_text}",
            )
        elif kind is bool:
            group.add_argument("--" + name, dest=dest, action="store_true", help=help_text)
        elif kind is list:
            group.add_argument(
                "--" + name,
                dest=dest,
                nargs="+",
                metavar="VALUE",
                default=default,
                help=f"{help_text} (default: {default})",
            )
        else:
            group.add_argument(
                "--" + name,
                dest=dest,
                type=kind,
                default=default,
                choices=choices.get(f.name),
                metavar=None if f.name in choices else kind.__name__.upper(),
                help=f"{help_text} (default: {default})",
            )
