"""Turning coremltools' own progress bars off (it draws tqdm bars with no switch)."""
from __future__ import annotations

import contextlib
import functools


@contextlib.contextmanager
def coremltools_progress(progress: bool):
    """With progress=False, swap the tqdm that coremltools' converter, pass pipeline and
    compression passes use for a disabled one; with progress=True, change nothing."""
    if progress:
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
