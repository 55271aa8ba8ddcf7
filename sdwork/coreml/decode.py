"""Decoding every constexpr op sdwork writes, in numpy: the dense weights a package computes with.

sdwork.coreml.package reads weights through coremltools' own op definitions (the reference);
this module is a second, independent decoder of the same ops, checked against that one in
tests/test_families.py, used where a compression pass measures its error on a program in
memory and where a dense copy of a LUT per element (coremltools' lut_to_dense) is too big:

    constexpr_lut_to_dense           LUT + n-bit indices (iOS16 flat, iOS18 grouped / vector)
    constexpr_blockwise_shift_scale  int4/int8 data, a scale (and zero point) per block   (iOS18)
    constexpr_affine_dequantize      uint8/int8 data, a scale and zero point per channel  (iOS16)
    constexpr_sparse_to_dense        a bit mask and the nonzero values (iOS16 packed, iOS18 uint1)
    constexpr_lut_to_sparse          palettized nonzero values -> (mask, values)          (iOS18)
    constexpr_sparse_blockwise_shift_scale  quantized nonzero values -> (mask, values)   (iOS18)
    constexpr_cast                   fp16 -> fp32

A chain (an int8 LUT dequantized, then looked up; pruned values palettized, then scattered)
is decoded op by op in program order, each op reading what the one before produced. The
arithmetic follows coremltools' op definitions exactly (shift-scale in the scale's dtype,
iOS16 affine dequantization in float32), so results agree to the bit.
"""
from __future__ import annotations

import numpy as np

from sdwork.coreml.lut import lut_to_dense
from sdwork.errors import PackageError


# --- one op each ------------------------------------------------------------------------


def blockwise_shift_scale(data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    """(data - offset) * scale, each scale (and offset) covering one block; in the scale's dtype."""
    blocks = [d // s for d, s in zip(data.shape, scale.shape)]
    # axis i of size d -> (d / b, b): a scale of shape (..., d / b, 1, ...) then broadcasts over its block
    split = [x for d, b in zip(data.shape, blocks) for x in (d // b, b)]
    keep = [x for s in scale.shape for x in (s, 1)]
    values = data.astype(scale.dtype).reshape(split)
    if offset is not None:
        values = values - offset.reshape(keep)
    return (scale.reshape(keep) * values).reshape(data.shape)


def affine_dequantize(data: np.ndarray, zero_point: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """iOS16: (data - zero_point) * scale along `axis`, computed in float32, stored in the scale's dtype."""
    shape = [1] * data.ndim
    if np.ndim(scale) or np.ndim(zero_point):
        shape[axis] = -1
    zp = np.asarray(zero_point).astype(np.float32).reshape(shape)
    values = (data.astype(np.float32) - zp) * np.asarray(scale).reshape(shape)
    return values.astype(np.asarray(scale).dtype)


def sparse_to_dense(nonzero: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """iOS18: zeros where the uint1 mask is 0, the nonzero values in C order elsewhere."""
    out = np.zeros(mask.shape, dtype=nonzero.dtype)
    out[mask != 0] = nonzero
    return out


def sparse_to_dense_ios16(nonzero: np.ndarray, packed_mask: np.ndarray, shape) -> np.ndarray:
    """iOS16: the mask is bit-packed (little-endian bit order) over the flattened weight."""
    n = int(np.prod(shape))
    flat = np.zeros(n, dtype=nonzero.dtype)
    flat[np.unpackbits(packed_mask, bitorder="little")[:n] != 0] = nonzero
    return flat.reshape(tuple(int(s) for s in shape))


def lut_lookup(indices: np.ndarray, lut: np.ndarray, vector_axis=None) -> np.ndarray:
    """iOS18 constexpr_lut_to_dense; scalar LUTs in O(numel), vector LUTs through coremltools' code."""
    if lut.shape[-1] == 1:
        return lut_to_dense(lut, indices)
    from coremltools.optimize._utils import lut_to_dense as vector_lut_to_dense

    return vector_lut_to_dense(indices, lut, int(vector_axis))


def lut_lookup_ios16(lut: np.ndarray, packed: np.ndarray, shape) -> np.ndarray:
    from coremltools.optimize._utils import restore_elements_from_packed_bits

    nbits = int(np.log2(lut.size))
    n = int(np.prod(shape))
    return lut[restore_elements_from_packed_bits(packed, nbits, n)].reshape(tuple(int(s) for s in shape))


def lut_to_sparse(mask: np.ndarray, indices_nonzero: np.ndarray, lut: np.ndarray, vector_axis=None):
    """(mask, values): the LUT applied to the nonzero indices only (each reads its block's table);
    a vector LUT's mask is repeated along the vector axis, one bit per value."""
    dense = lut_lookup(sparse_to_dense(indices_nonzero, mask), lut, vector_axis)
    if lut.shape[-1] > 1:
        mask = np.repeat(mask, lut.shape[-1], axis=int(vector_axis))
    return mask, dense[mask != 0]


def sparse_blockwise_shift_scale(mask: np.ndarray, nonzero: np.ndarray, scale: np.ndarray, offset=None):
    """(mask, values): shift-scale applied to the nonzero values, each with its block's scale."""
    dense = blockwise_shift_scale(sparse_to_dense(nonzero, mask), scale, offset)
    return mask, dense[mask != 0]


# --- ops of a program -------------------------------------------------------------------


def decode_op(op_type: str, a: dict):
    """The output value(s) of one constexpr op from its input values `a` (by input name)."""
    if op_type == "constexpr_blockwise_shift_scale":
        return blockwise_shift_scale(a["data"], a["scale"], a.get("offset"))
    if op_type == "constexpr_lut_to_dense":
        if "shape" in a:
            return lut_lookup_ios16(a["lut"], a["indices"], a["shape"])
        return lut_lookup(a["indices"], a["lut"], a.get("vector_axis"))
    if op_type == "constexpr_sparse_to_dense":
        if "shape" in a:
            return sparse_to_dense_ios16(a["nonzero_data"], a["mask"], a["shape"])
        return sparse_to_dense(a["nonzero_data"], a["mask"])
    if op_type == "constexpr_lut_to_sparse":
        return lut_to_sparse(a["indices_mask"], a["indices_nonzero_data"], a["lut"], a.get("vector_axis"))
    if op_type == "constexpr_sparse_blockwise_shift_scale":
        return sparse_blockwise_shift_scale(a["data_mask"], a["nonzero_data"], a["scale"], a.get("offset"))
    if op_type == "constexpr_affine_dequantize":
        return affine_dequantize(a["quantized_data"], a["zero_point"], a["scale"], int(a["axis"]))
    if op_type == "constexpr_cast":
        return np.asarray(a["source_val"]).astype(np.float32)
    raise PackageError(f"sdwork cannot decode a {op_type} op; decode the package with "
                       "sdwork.coreml.package.package_weights (coremltools' own definitions) instead")


def is_constexpr(op) -> bool:
    return op.op_type.startswith("constexpr_")


def final_output(op):
    """The var a weight's chain ends in: follow constexpr consumers from a const or constexpr op
    until an output feeds a compute op. None for a const feeding nothing."""
    for var in op.outputs:
        for child in var.child_ops:
            if is_constexpr(child):
                return final_output(child)
        if var.child_ops:
            return var
    return None


def iter_decoded(prog):
    """(output name, dense value) of every constexpr chain's final output in a pymil program, one
    weight at a time (an intermediate value is kept only until the op that reads it)."""
    env, readers = {}, {}  # intermediate values, and how many constexpr ops will still read each
    for fn in prog.functions.values():
        for op in fn.operations:
            if not is_constexpr(op):
                continue
            values = decode_op(op.op_type, {k: _read(v, env, readers) for k, v in op.inputs.items()})
            for var, val in zip(op.outputs, values if isinstance(values, tuple) else (values,)):
                n = sum(is_constexpr(c) for c in var.child_ops)
                if n:
                    env[var.name], readers[var.name] = val, n
                if len(var.child_ops) > n:
                    yield var.name, val


def _read(var, env: dict, readers: dict):
    if var.name not in env:
        return var.val
    val = env[var.name]
    readers[var.name] -= 1
    if not readers[var.name]:
        del env[var.name], readers[var.name]
    return val


def decode_program(prog) -> dict[str, np.ndarray]:
    """{output name: dense value} of every constexpr chain's final output in a pymil program."""
    return dict(iter_decoded(prog))


def package_program(package):
    """A package (path or MLModel) as a pymil program, its constexpr ops as written."""
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load
    from coremltools.models.utils import _convert_model_spec_to_pymil_prog

    from sdwork.coreml.package import open_package

    ml = open_package(package)
    return _convert_model_spec_to_pymil_prog(ml, ml.get_spec().specificationVersion, milproto_load)


def decode_package(package) -> dict[str, np.ndarray]:
    """{weight name (compression suffixes removed): dense value} of every compressed weight."""
    from sdwork.coreml.package import base_name

    return {base_name(k): v for k, v in decode_program(package_program(package)).items()}
