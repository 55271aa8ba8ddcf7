"""Read .mlpackage files on any platform: open with clear errors, and get the exact weights.

`package_weights` decompresses every constexpr op (LUTs, per-grouped-channel
LUTs, vector LUTs, affine / blockwise quantization, sparsity, and chains of
them) with coremltools' own op definitions, so the values are the ones the
Core ML runtime computes with. No runtime is needed, so this works on Linux.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from sdwork.errors import PackageError

META_PREFIX = "sdwork."
# suffixes coremltools' compression passes append to the name of the const they replace
_COMPRESSION_SUFFIX = re.compile(r"(_(palettized|quantized|sparsified|pcs))+$")


def open_package(package):
    """An MLModel from a path (weights readable without the Core ML runtime) or an MLModel as is."""
    import coremltools as ct

    if isinstance(package, ct.models.MLModel):
        return package
    path = Path(package)
    if not path.exists():
        raise PackageError(f"no Core ML package at {path}; convert first with sdwork.convert.convert_pipeline")
    if path.suffix != ".mlpackage" or not (path / "Manifest.json").exists():
        raise PackageError(f"{path} is not an .mlpackage (no Manifest.json); pass the .mlpackage folder itself")
    try:
        return read_only(path)
    except Exception as e:  # coremltools raises several types for a damaged package
        raise PackageError(f"cannot read the Core ML package {path}: {e}. It is damaged; convert it again") from e


def read_only(path):
    """MLModel(path, skip_model_load=True) without writing to the package. coremltools' package
    reader rewrites Manifest.json on every open (new bytes and mtime: a bundle's digest changes, a
    read-only mount fails), so it opens a shadow: a copy of the manifest beside a link to the
    package's Data/, in sdwork's scratch folder; the model then points at the package itself."""
    import coremltools as ct

    from sdwork.paths import scratch_dir

    path = Path(path).resolve()
    shadow = Path(tempfile.mkdtemp(prefix="read-", dir=scratch_dir())).resolve() / path.name
    try:
        shadow.mkdir()
        shutil.copyfile(path / "Manifest.json", shadow / "Manifest.json")
        (shadow / "Data").symlink_to(path / "Data", target_is_directory=True)
        ml = ct.models.MLModel(str(shadow), skip_model_load=True)
    finally:
        shutil.rmtree(shadow.parent, ignore_errors=True)  # removes the link, never what it points to
    if ml.weights_dir is not None and Path(ml.weights_dir).is_relative_to(shadow):
        ml._weights_dir = str(path / Path(ml.weights_dir).relative_to(shadow))
    ml.package_path = str(path)
    return ml


def metadata(package) -> dict[str, str]:
    """The package's sdwork metadata (component, model, weight map, ...), prefix stripped."""
    user = open_package(package).user_defined_metadata
    return {k[len(META_PREFIX):]: v for k, v in user.items() if k.startswith(META_PREFIX)}


def set_metadata(mlmodel, values: dict[str, str]) -> None:
    for k, v in values.items():
        mlmodel.user_defined_metadata[META_PREFIX + k] = v if isinstance(v, str) else json.dumps(v)


def base_name(const_name: str) -> str:
    """The const op name at conversion time (as in op_name_configs): compression suffixes removed."""
    return _COMPRESSION_SUFFIX.sub("", const_name)


def package_weights(package) -> dict[str, np.ndarray]:
    """{const name: exact values} of every float constant an op of the package computes with.

    Names are those of the freshly converted package (compression suffixes removed), so
    they match the weight map for fp16 and compressed packages alike. Compressed weights
    are decompressed to their dense values in the LUT's / scale's dtype (fp16 normally).
    """
    prog = _load_program(open_package(package))
    out: dict[str, np.ndarray] = {}
    for fn in prog.functions.values():
        for op in fn.operations:
            if op.op_type != "const" or not op.outputs[0].child_ops:
                continue  # dead consts (inputs of a decompressed constexpr) are not weights
            val = op.outputs[0].val
            if isinstance(val, np.ndarray) and np.issubdtype(val.dtype, np.floating):
                name = base_name(op.outputs[0].name)
                if name in out and not np.array_equal(out[name], val):
                    raise PackageError(f"two different constants share the name {name!r} in the package")
                out[name] = val
    return out


def iter_package_weights(package):
    """(const name, exact values) of every float constant an op of the package computes with, as
    package_weights gives them, but one weight at a time: an uncompressed package's straight from
    weight.bin, a compressed one's constexpr chains decoded by sdwork.coreml.decode (bit-identical
    to coremltools' definitions) as they are reached."""
    mlmodel = open_package(package)
    spec = mlmodel.get_spec()
    if not any(op.type.startswith("constexpr_") for op in _spec_ops(spec)):
        yield from _stored_consts(mlmodel, spec)
        return
    from sdwork.coreml.decode import is_constexpr, iter_decoded, package_program

    prog = package_program(mlmodel)
    for fn in prog.functions.values():
        for op in fn.operations:
            out = op.outputs[0] if op.op_type == "const" else None
            if out is None or not any(not is_constexpr(c) for c in out.child_ops):
                continue  # inputs of a constexpr chain (indices, LUTs) are not weights
            if isinstance(out.val, np.ndarray) and np.issubdtype(out.val.dtype, np.floating):
                yield base_name(out.name), out.val
    for name, value in iter_decoded(prog):
        yield base_name(name), value


def _spec_ops(spec):
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            yield from block.operations


def _stored_consts(mlmodel, spec):
    """Float consts read from weight.bin one by one, as coremltools' program loader reads each. A
    reader per const: its memory map (and the pages it touched) goes with it, so the RSS holds one
    weight, not the file."""
    from coremltools.converters.mil.frontend.milproto.load import TranscriptionContext, _load_value

    for op in _spec_ops(spec):
        if op.type != "const":
            continue
        value = _load_value(TranscriptionContext(mlmodel.weights_dir), op.attributes["val"])
        if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
            yield base_name(op.outputs[0].name), value


def _load_program(mlmodel):
    """The package as a pymil Program with every constexpr op replaced by its dense const."""
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load
    from coremltools.models.utils import _convert_model_spec_to_pymil_prog
    from coremltools.optimize.coreml._quantization_passes import WeightDecompressor

    spec = mlmodel.get_spec()
    if spec.WhichOneof("Type") != "mlProgram":
        raise PackageError("the package is not an ML Program (neural network packages are not supported); "
                           "convert with convert_to='mlprogram'")
    try:
        prog = _convert_model_spec_to_pymil_prog(mlmodel, spec.specificationVersion, milproto_load)
    except Exception as e:
        raise PackageError(f"cannot read the weights of the package: {e}. Its weight file is missing or damaged; "
                           "convert it again") from e
    # ops are visited in program order, so a chain (e.g. an int8 LUT dequantized by a
    # blockwise_shift_scale, then the LUT expanded) is resolved from its inputs upwards
    WeightDecompressor(op_selector=lambda op: True).apply(prog)
    return prog


def package_size(path) -> int:
    """Bytes on disk of a package folder (weights and program)."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def weight_file_size(path) -> int:
    blob = Path(path) / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    return os.path.getsize(blob) if blob.exists() else 0
