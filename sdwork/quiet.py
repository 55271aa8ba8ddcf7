"""Third-party output a notebook user cannot act on: held back, counted and summarised in one
line, with `notices()` to see it all. Everything else is shown as before.

What is held back (each pattern below says why it means nothing here):
version notices from coremltools' import, the "Failed to load _MLModelProxy" family (no Core ML
runtime off macOS), int64-to-int32 notes from the converter, per-layer "Skipped this op" logs
(the uncompressed-weights table reports the same as data), numpy overflow warnings from inside
coremltools passes, transformers' torchvision fallback, and a torch deprecation coremltools
triggers. Warnings and logs matching none of these (a real problem) are shown untouched.

    from sdwork import quiet
    quiet.notebook()     # in a notebook's first cell: one summary line per cell that held any
    quiet.notices()      # everything held back, with counts

coremltools also draws plain tqdm bars on stderr (which JupyterLab shows as red blocks, and
papermill stores as stderr streams); `coremltools_progress` turns them off when asked and
always in a notebook, where sdwork's own bars (tqdm.auto) are widgets.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import re
import sys
import warnings
from dataclasses import dataclass

# (source, what it is, pattern): matched against a log record's or warning's message
NOISE = [
    ("coremltools", "version notice", r"version \S+ (is not supported|has not been tested with coremltools)"),
    ("coremltools", "no Core ML runtime off macOS", r"Failed to load '?_ML\w*Proxy"),
    ("coremltools", "int64 stored as int32", r"into a builtin type of int32, might lose precision"),
    ("coremltools", "per-layer skip", r"Skipped( this op)?\.\s*$|not divisible"),
    ("coremltools", "overflow in a pass", r"overflow encountered in cast"),
    ("transformers", "torchvision fallback", r"requires torchvision \(not installed\)"),
    ("torch", "deprecation inside coremltools", r"isinstance\(treespec, LeafSpec\)` is deprecated"),
]
LOGGERS = ("coremltools", "transformers", "diffusers")
_NOISE = [(src, what, re.compile(p)) for src, what, p in NOISE]


@dataclass(frozen=True)
class _Notice:
    source: str
    kind: str
    message: str


_held: list[_Notice] = []  # in the order seen; a mark is an index into it
_depth = 0
_saved: dict = {}
_in_notebook = False


def classify(message: str) -> tuple[str, str] | None:
    """(source, kind) of a message that means nothing to a user here, else None."""
    for src, what, pattern in _NOISE:
        if pattern.search(message):
            return src, what
    return None


# ---------------------------------------------------------------- capturing

class _Handler(logging.Handler):
    """Takes a library logger's records: noise is held, the rest goes where it went before."""

    def __init__(self, handlers, propagate):
        super().__init__()
        self.handlers, self.propagate = handlers, propagate

    def emit(self, record):
        msg = record.getMessage()
        hit = classify(msg)
        if hit and record.levelno < logging.ERROR:
            _held.append(_Notice(*hit, msg))
            return
        for h in self._targets(record):
            if record.levelno >= h.level:
                h.handle(record)

    def _targets(self, record):
        if self.handlers:
            return self.handlers
        root = logging.getLogger().handlers if self.propagate else []
        return root or [logging.lastResort]


def _showwarning(message, category, filename, lineno, file=None, line=None):
    text = str(message)
    hit = classify(text)
    if hit:
        _held.append(_Notice(*hit, f"{category.__name__}: {text} ({filename}:{lineno})"))
        return
    _saved["showwarning"](message, category, filename, lineno, file, line)


def _install() -> None:
    _configure_library_loggers()
    for name in LOGGERS:
        log = logging.getLogger(name)
        _saved[name] = (log.handlers[:], log.propagate)
        log.handlers = [_Handler(*_saved[name])]
        log.propagate = False
    _saved["showwarning"] = warnings.showwarning
    warnings.showwarning = _showwarning


def _uninstall() -> None:
    for name in LOGGERS:
        log = logging.getLogger(name)
        log.handlers, log.propagate = _saved.pop(name)
    warnings.showwarning = _saved.pop("showwarning")


def _configure_library_loggers() -> None:
    """transformers and diffusers add their stderr handler on first use: let them do it now, so
    it is set aside with the rest and not added beside ours later."""
    for lib in ("transformers", "diffusers"):
        with contextlib.suppress(Exception):
            __import__(f"{lib}.utils.logging", fromlist=["get_logger"]).get_logger(lib)


@contextlib.contextmanager
def capture():
    """Hold back noise inside the block; yields a mark for `summary(mark)`. Nested blocks share
    one installation."""
    global _depth
    if _depth == 0:
        _install()
    _depth += 1
    try:
        yield len(_held)
    finally:
        _depth -= 1
        if _depth == 0:
            _uninstall()


# ---------------------------------------------------------------- reporting

def summary(mark: int = 0) -> str:
    """One line for what was held back since `mark` ('' when nothing was)."""
    new = _held[mark:]
    if not new:
        return ""
    counts: dict[str, int] = {}
    for n in new:
        counts[n.kind] = counts.get(n.kind, 0) + 1
    parts = ", ".join(f"{k} x{c}" for k, c in counts.items())
    return f"[sdwork] {len(new)} library notices held back ({parts}): sdwork.quiet.notices()"


def notices():
    """Every notice held back so far: source, kind, how often, the message."""
    import pandas as pd

    df = pd.DataFrame([vars(n) for n in _held], columns=["source", "kind", "message"])
    return df.groupby(["source", "kind", "message"], sort=False).size().rename("count").reset_index()


def notebook(enabled: bool = True) -> None:
    """In an IPython kernel: hold back noise from now on and print one summary line after each
    cell that held any. notebook(False) shows everything again."""
    global _in_notebook
    ip = _ipython()
    if ip is None or enabled == _in_notebook:
        return
    if enabled:
        _saved["cell"] = _CellHook()
        ip.events.register("pre_run_cell", _saved["cell"].pre)
        ip.events.register("post_run_cell", _saved["cell"].post)
        _saved["block"] = capture()
        _saved["block"].__enter__()
    else:
        hook = _saved.pop("cell")
        ip.events.unregister("pre_run_cell", hook.pre)
        ip.events.unregister("post_run_cell", hook.post)
        _saved.pop("block").__exit__(None, None, None)
    _in_notebook = enabled


class _CellHook:
    mark = 0

    def pre(self, *_):
        self.mark = len(_held)

    def post(self, *_):
        line = summary(self.mark)
        if line:
            print(line)  # stdout, so it reads as a note, not as an error


def _ipython():
    ip = sys.modules.get("IPython")
    return ip.get_ipython() if ip else None


# ---------------------------------------------------------------- coremltools' bars

@contextlib.contextmanager
def coremltools_progress(progress: bool):
    """With progress=False, or in a notebook (where they come out as red stderr text), swap the
    tqdm that coremltools' converter, pass pipeline and compression passes use for a disabled one;
    otherwise change nothing."""
    if progress and not _in_notebook:
        yield
        return
    from unittest import mock

    from tqdm import tqdm

    from coremltools.converters.mil.frontend.torch import ops
    from coremltools.converters.mil.mil.passes import pass_pipeline
    from coremltools.optimize.coreml import _quantization_passes

    quiet = functools.partial(tqdm, disable=True)
    with mock.patch.object(ops, "_tqdm", quiet), mock.patch.object(pass_pipeline, "tqdm", quiet), \
            mock.patch.object(_quantization_passes, "tqdm", quiet):
        yield
