"""The checks behind the config dataclasses (ual.config): a value against its field's declared type
(the choices of a Literal, a list of them) and range (the `ge`/`gt`/`le`/`lt` of the field's metadata).

Every config dataclass derives from `Checked`, whose `__post_init__` runs these checks and then the
class's own `check()` (rules between fields), so a config is checked where it is declared, whether it
was loaded from YAML and flags or built in Python. A bad value raises `FieldError`, one line naming the
class and field (`TrainConfig.learning_rate: expected more than 0, got 0`); `load_config` turns it into
one naming the file or flag and the dotted field (`exp.yaml:train.learning_rate: ...`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import numbers
import types
import typing
from typing import Literal


class ConfigError(ValueError):
    pass


class FieldError(ConfigError):
    """One field's bad value, raised while a config dataclass is built. `field` is relative to the
    dataclass ("learning_rate", "modes[1]", "prior.gsm8k"); `problem` is the text after the colon."""

    def __init__(self, owner: str, field: str, problem: str):
        super().__init__(f"{owner}.{field}: {problem}")
        self.field, self.problem = field, problem


def close_matches(name: str, options, n: int = 3) -> list[str]:
    """What `name` may have meant: options it is a prefix of, then similar ones (difflib)."""
    found = [o for o in options if o.startswith(name)] + difflib.get_close_matches(name, options, n=n, cutoff=0.6)
    return list(dict.fromkeys(found))[:n]


def choice_problem(value, choices) -> str | None:
    """None if `value` is one of `choices`, else 'expected one of a, b, got 'x'; did you mean 'a'?'."""
    if isinstance(value, str) and value in choices:
        return None
    close = close_matches(str(value), choices, n=1)
    return f"expected one of {', '.join(choices)}, got {value!r}" + (f"; did you mean {close[0]!r}?" if close else "")


_BOUNDS = {"ge": (lambda v, b: v >= b, "at least"), "gt": (lambda v, b: v > b, "more than"),
           "le": (lambda v, b: v <= b, "at most"), "lt": (lambda v, b: v < b, "less than")}


def describe_range(bounds: dict) -> str:
    """{"ge": 0, "lt": 1} -> "a number in [0, 1)"; {"ge": 1} -> "at least 1"."""
    low = next(((k, bounds[k]) for k in ("ge", "gt") if k in bounds), None)
    high = next(((k, bounds[k]) for k in ("le", "lt") if k in bounds), None)
    if low and high:
        return f"a number in {'[' if low[0] == 'ge' else '('}{low[1]}, {high[1]}{']' if high[0] == 'le' else ')'}"
    kind, bound = low or high
    return f"{_BOUNDS[kind][1]} {bound}"


def range_problem(value, bounds: dict, integer: bool = False) -> str | None:
    """None if `value` is a number (an integer if `integer`) within `bounds`, else what was expected."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        return f"expected {'an integer' if integer else 'a number'}, got {value!r}"
    if all(_BOUNDS[k][0](value, b) for k, b in bounds.items()):  # nan compares false: out of range
        return None
    return f"expected {describe_range(bounds)}, got {value!r}"


def _optional(tp):
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def value_problem(tp, value, bounds: dict | None) -> tuple[str, str] | None:
    """(where inside the field, problem) for a value that breaks its declared choices or range, else None.
    Only choices (Literal, lists of them) and ranged numbers (and mappings to them) are checked here;
    the other types are checked when a file or flag is read (ual.config._coerce)."""
    tp, optional = _optional(tp)
    if value is None:
        required = bounds or typing.get_origin(tp) is Literal
        return ("", "expected a value, got None") if required and not optional else None
    kind = typing.get_origin(tp)
    if kind is Literal:
        problem = choice_problem(value, typing.get_args(tp))
        return ("", problem) if problem else None
    if kind is list and typing.get_origin(typing.get_args(tp)[0]) is Literal:
        if not isinstance(value, (list, tuple)):
            return "", f"expected a list, got {value!r}"
        for i, item in enumerate(value):
            problem = choice_problem(item, typing.get_args(typing.get_args(tp)[0]))
            if problem:
                return f"[{i}]", problem
        return None
    if not bounds:
        return None
    if kind is dict:
        for key, item in (value.items() if isinstance(value, dict) else []):
            problem = range_problem(item, bounds, typing.get_args(tp)[1] is int)
            if problem:
                return f".{key}", problem
        return None
    problem = range_problem(value, bounds, tp is int)
    return ("", problem) if problem else None


@functools.cache
def _declared(cls) -> list[tuple[str, object, dict | None]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name], f.metadata.get("range")) for f in dataclasses.fields(cls)]


class Checked:
    """Base of the config dataclasses: building one checks every field's choices and range, then the
    class's `check()` (rules between its fields)."""

    def __post_init__(self) -> None:
        for name, tp, bounds in _declared(type(self)):
            found = value_problem(tp, getattr(self, name), bounds)
            if found:
                self.fail(name + found[0], found[1])
        self.check()

    def check(self) -> None:
        """Rules between fields; a subclass overrides it and calls `self.fail`."""

    def fail(self, field: str, problem: str) -> typing.NoReturn:
        raise FieldError(type(self).__name__, field, problem)
