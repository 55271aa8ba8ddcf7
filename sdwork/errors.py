"""The one family of errors sdwork raises for bad input: each message names the problem,
the value and the fix. The CLI prints such an error and exits 2; anything else is a bug.

Each subclass also derives from the built-in error a caller would expect (ValueError for a
bad value, FileNotFoundError for a missing model), so `except ValueError` keeps working.
"""
from __future__ import annotations


class SdworkError(Exception):
    """Bad input or state that the user can fix; the message says how."""


class ConfigError(SdworkError, ValueError):
    """A setting, recipe, grid file or command-line option that is not valid."""


class ModelNotFoundError(SdworkError, FileNotFoundError):
    """A model folder or hub id that cannot be loaded."""


class PackageError(SdworkError, ValueError):
    """A Core ML package that is missing, damaged or not what it should be."""


class MismatchError(SdworkError, ValueError):
    """A run folder, cache or package made from other inputs than the ones given now."""


class EngineError(SdworkError, RuntimeError):
    """A compression engine that cannot do what a recipe asks."""


def check_type(what: str, value, kind, fix: str = ""):
    """`value` if it is a `kind` (bool is never an int here), else a ConfigError naming it."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise ConfigError(f"{what} must be {_article(names)}{names}, got {value!r} ({type(value).__name__})"
                          + (f"; {fix}" if fix else ""))
    return value


def _article(name: str) -> str:
    return "an " if name[0] in "aeiou" else "a "
