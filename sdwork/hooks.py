"""Named points in long work where a test can inject a failure (a crash after a checkpoint,
a kill between two variants) without patching private names.

    with hooks.on("checkpoint_saved", lambda **info: raise_if(info["step"] == 2)):
        train(...)

Production code calls `fire(name, **info)` at each point; with nothing registered it costs a
dictionary lookup. Points used in sdwork: "checkpoint_saved" (stage=, step=), "variant_done"
(name=), "variant_compressed" (name=), "variant_loaded" (components=: a variant's weights are
in the pipeline, about to generate).
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Callable

_registered: dict[str, list[Callable]] = defaultdict(list)


def fire(point: str, **info) -> None:
    """Call every function registered for `point` with the point's facts as keywords."""
    for fn in list(_registered.get(point, ())):
        fn(**info)


@contextlib.contextmanager
def on(point: str, fn: Callable):
    """Register `fn` for `point` inside the block."""
    _registered[point].append(fn)
    try:
        yield
    finally:
        _registered[point].remove(fn)
