"""What a config dataclass says about its own fields: default, type (``Literal`` choices included) and docstring.

The command line's defaults, help, choices and --config value kinds are read from here (cli/options.py), so each
default is written once, in its dataclass. A field's docstring is the string literal right after it in the class
body (the convention every dataclass in ``config/`` follows); it is read from the class source with ``ast``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Literal, Union

MISSING = dataclasses.MISSING

KIND_RULES = {
    "int": "must be an integer",
    "float": "must be a finite number",
    "bool": "must be true or false",
    "str": "must be a text (quote it in YAML)",
    "str?": "must be a text (a path) or null",
    "triple": "must be three integers T,H,W: '3,15,16' or [3, 15, 16]",
}
"""Value kinds a --config file is checked against, and the rule each one states when refused."""


@dataclass(frozen=True)
class FieldInfo:
    """One init field of a config dataclass."""

    name: str
    type: object
    """The resolved type hint (``typing.get_type_hints``)."""
    default: object
    """The default value (a ``default_factory`` is called); ``MISSING`` for a required field."""
    doc: str
    """The field's docstring, on one line ('' when it has none)."""

    @property
    def choices(self) -> tuple | None:
        """The values of a ``Literal[...]`` type (also inside ``Optional``), else None."""
        return literal_choices(self.type)

    @property
    def kind(self) -> str | None:
        """'int' | 'float' | 'bool' | 'str' | 'str?' | 'triple', or None for a type with no simple kind."""
        return kind_of(self.type)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a class, read from its source: the string literal after each annotated field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, after in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


@functools.cache
def config_fields(cls: type) -> dict[str, FieldInfo]:
    """``{name: FieldInfo}`` of a dataclass's init fields, in declaration order."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = MISSING
        out[f.name] = FieldInfo(f.name, hints[f.name], default, docs.get(f.name, ""))
    return out


def _is_optional(tp) -> tuple[bool, object]:
    """(True, T) for ``T | None`` / ``Optional[T]``; (False, tp) otherwise."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def literal_choices(tp) -> tuple | None:
    """``Literal['a', 'b']`` (or ``Optional`` of it) -> ('a', 'b'); None for any other type."""
    _, inner = _is_optional(tp)
    return typing.get_args(inner) if typing.get_origin(inner) is Literal else None


def kind_of(tp) -> str | None:
    """The value kind of a type hint (see KIND_RULES); None when it has none of them (e.g. a schedule)."""
    optional, inner = _is_optional(tp)
    choices = literal_choices(inner)
    if choices is not None and all(isinstance(c, str) for c in choices):
        inner = str
    if optional:
        return "str?" if inner is str else None
    if inner in (bool, int, float, str):
        return inner.__name__
    if typing.get_origin(inner) is tuple and typing.get_args(inner) == (int, int, int):
        return "triple"
    return None


def is_kind(kind: str, value: object) -> bool:
    """True when ``value`` is of ``kind``; bools are not numbers, floats must be finite; a triple is three
    integers or a 'T,H,W' text (parsed, and checked, where it is used)."""
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "str?":
        return value is None or isinstance(value, str)
    if kind == "triple":
        return isinstance(value, str) or (
            isinstance(value, (list, tuple)) and len(value) == 3 and all(is_kind("int", x) for x in value)
        )
    raise ValueError(f"unknown kind {kind!r}")
