"""Decoding an iOS18 `constexpr_lut_to_dense`: the dense weight a LUT op computes with.

lut has shape (G_0, ..., G_r-1, 2^nbits, 1) for indices of rank r: axis i is split into G_i
equal blocks, each block reading its own table. Memory O(numel), unlike coremltools'
lut_to_dense, which repeats the whole table for every element.
"""
from __future__ import annotations

import numpy as np

from sdwork.errors import PackageError


def lut_to_dense(lut: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Dense weight from an iOS18 scalar LUT (vector size 1) and its indices."""
    lut = np.asarray(lut)
    indices = np.asarray(indices)
    if lut.ndim != indices.ndim + 2 or lut.shape[-1] != 1:
        raise PackageError(f"lut of shape {lut.shape} does not fit indices of shape {indices.shape} (scalar LUTs only)")
    groups = lut.shape[:-2]
    if any(s % g for s, g in zip(indices.shape, groups)):
        raise PackageError(f"lut of shape {lut.shape} does not tile indices of shape {indices.shape}")
    # which LUT each element reads: its block coordinate along every axis, flattened
    row = np.zeros([1] * indices.ndim, np.int64)
    for axis, (s, g) in enumerate(zip(indices.shape, groups)):
        shape = [1] * indices.ndim
        shape[axis] = s
        row = row * g + (np.arange(s) // (s // g)).reshape(shape)
    return lut.reshape(-1, lut.shape[-2])[row, indices]
