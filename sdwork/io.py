"""Durable files: append-only result rows, atomic writes, stable digests, stamps of what a
folder was made from.

A results file holds one JSON object per line, each written with flush + fsync, so a crash
loses at most the row being written; a torn last line is ignored on reading and cut off
before the next append.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from sdwork.errors import MismatchError, SdworkError


def json_default(o):
    """JSON for the numpy scalars and arrays and the paths that rows hold."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to a JSON file")


def as_json(obj):
    """`obj` as a JSON file holds it (tuples become lists, numpy scalars numbers)."""
    return json.loads(json.dumps(obj, default=json_default))


def digest(obj, n: int = 16) -> str:
    """A short sha256 of `obj`'s canonical JSON: the key of a cache entry or a row."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=json_default).encode()).hexdigest()[:n]


def write_json(path, obj) -> None:
    """Write `obj` as JSON atomically: readers see the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=json_default))
    tmp.replace(path)


def append_row(path, row: dict) -> None:
    """Append one JSON line durably; first cut off a torn last line left by a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _drop_torn_tail(path)
    line = json.dumps(row, default=json_default) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _drop_torn_tail(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    with open(path, "r+b") as f:
        f.truncate(data.rfind(b"\n") + 1)
        f.flush()
        os.fsync(f.fileno())


def read_rows(path) -> list[dict]:
    """Every complete row; a torn last line (a crash mid-write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8").split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # only the unterminated last line may be torn
                break
            raise SdworkError(f"{path}: line {i + 1} is not valid JSON; fix or remove that line") from None
    return rows


def differences(have: dict, want: dict) -> list[str]:
    """'key: old -> new' for every key whose value differs (missing keys count as None)."""
    return [f"{k}: {have.get(k)!r} -> {want.get(k)!r}" for k in sorted(set(have) | set(want))
            if have.get(k) != want.get(k)]


def claim(path, stamp: dict, what: str) -> None:
    """Record what a folder is made from in `path` (JSON), or refuse when it was made from
    something else, naming each difference. Both sides are compared as JSON holds them."""
    path, stamp = Path(path), as_json(stamp)
    if path.exists():
        diff = differences(json.loads(path.read_text()), stamp)
        if diff:
            raise MismatchError(f"{path.parent} holds {what} made from other inputs ({'; '.join(diff)}); "
                                "use a new folder, or delete this one to start again")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, stamp)
