"""Checks for values where they enter sdwork (settings, recipes, grid files, CLI options):
exact types and ranges, and a message naming the field, the value and the fix.

Settings are frozen dataclasses whose __post_init__ calls these, so a bad value fails when the
object is built, before any model loads or any file is written.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import fields

from sdwork.errors import ConfigError


def integer(what: str, v, lo: int | None = None, hi: int | None = None, fix: str = "") -> int:
    """An int (not a bool, not a float such as 4.0) within [lo, hi]."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{what} must be a whole number, got {v!r} ({type(v).__name__})"
                          + (f"; write {int(v)}" if isinstance(v, float) and v.is_integer() else "")
                          + (f"; {fix}" if fix else ""))
    _in_range(what, v, lo, hi, fix)
    return v


def real(what: str, v, lo: float | None = None, hi: float | None = None, fix: str = "") -> float:
    """A finite int or float within [lo, hi], returned as float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{what} must be a finite number, got {v!r} ({type(v).__name__})" + (f"; {fix}" if fix else ""))
    _in_range(what, v, lo, hi, fix)
    return float(v)


def _in_range(what, v, lo, hi, fix):
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        span = f">= {lo}" if hi is None else (f"<= {hi}" if lo is None else f"from {lo} to {hi}")
        raise ConfigError(f"{what} must be {span}, got {v!r}" + (f"; {fix}" if fix else ""))


def choice(what: str, v, options) -> object:
    if v not in options:
        raise ConfigError(f"{what} must be one of {', '.join(map(repr, options))}, got {v!r}{_did_you_mean(v, options)}")
    return v


def text(what: str, v, empty: bool = True) -> str:
    if not isinstance(v, str):
        raise ConfigError(f"{what} must be a string, got {v!r} ({type(v).__name__})")
    if not empty and not v.strip():
        raise ConfigError(f"{what} must not be empty")
    return v


def sequence(what: str, v, item, example: str) -> tuple:
    """A non-empty list or tuple whose items pass `item(what[i], x)`; a lone value is refused
    with the fix (a string is not a list of one-character prompts, 3 is not [3])."""
    if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
        raise ConfigError(f"{what} must be a list, got {v!r} ({type(v).__name__}); write {what}={example}")
    if not v:
        raise ConfigError(f"{what} is empty; give at least one, e.g. {what}={example}")
    return tuple(item(f"{what}[{i}]", x) for i, x in enumerate(v))


def unique(what: str, values: tuple) -> tuple:
    seen = set()
    for x in values:
        if x in seen:
            raise ConfigError(f"{what} lists {x!r} twice; give each once")
        seen.add(x)
    return values


def known_keys(what: str, d, allowed) -> dict:
    """`d` as a dict whose keys are all in `allowed`, else an error naming the unknown ones."""
    if not isinstance(d, dict):
        raise ConfigError(f"{what} must be a mapping of names to values, got {d!r} ({type(d).__name__})")
    unknown = [k for k in d if k not in allowed]
    if unknown:
        hints = "".join(_did_you_mean(k, allowed) for k in unknown[:1])
        raise ConfigError(f"{what}: unknown key(s) {', '.join(map(repr, unknown))}{hints}; "
                          f"known keys: {', '.join(sorted(map(str, allowed)))}")
    return dict(d)


def build(cls, d, what: str):
    """`cls(**d)` for a dataclass, after refusing keys it does not have."""
    return cls(**known_keys(what, d, [f.name for f in fields(cls)]))


def _did_you_mean(v, options) -> str:
    if not isinstance(v, str):
        return ""
    close = difflib.get_close_matches(v, [str(o) for o in options], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
