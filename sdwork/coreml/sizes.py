"""Exact on-disk size accounting of an .mlpackage, read from the files themselves.

An ML program keeps its large constants in `Data/com.apple.CoreML/weights/weight.bin`:
a 64-byte header, then per blob 64 bytes of metadata followed by the data,
each blob starting on a 64-byte boundary. The program (`model.mlmodel`, a
protobuf) refers to a blob by the offset of its metadata. Small values (fewer
than 10 elements, e.g. tiny LUTs) are stored inline in the program instead.

We walk the blob chain in weight.bin and the ops of the program, charge every
blob to the weight that uses it, and check that header + blobs = file size, so
the accounting agrees with the file on disk to the byte. A weight stored as a chain
of constexpr ops (an int8 LUT dequantized then looked up; pruned values palettized
then scattered) is one layer, charged every blob of its chain once.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sdwork.coreml.package import base_name
from sdwork.errors import PackageError

HEADER_BYTES = 64
BLOB_SENTINEL = 0xDEADBEEF
WEIGHTS = Path("Data/com.apple.CoreML/weights/weight.bin")
MODEL = Path("Data/com.apple.CoreML/model.mlmodel")


class SizeAccountingError(PackageError):
    pass


@dataclass
class Layer:
    """One weight as stored: a dense const, or a constexpr op (palettized) with its parts."""

    name: str  # the const name, coremltools' suffixes ("_palettized", "_sparsified", ...) dropped
    op_type: str  # "const", "constexpr_lut_to_dense", ...; a chain joined by "+" in program order
    shape: tuple[int, ...]
    dtype: str  # of the dense weight
    file_bytes: int = 0  # bytes of weight.bin charged to it: metadata + data + padding
    inline_bytes: int = 0  # bytes of its inline values inside model.mlmodel
    nbits: int | None = None  # palettized: bits per index
    lut_count: int = 0
    lut_entries: int = 0
    cluster_dim: int = 1
    lut_dtype: str | None = None  # palettized: the dtype the LUT is stored in ("float16", "int8")
    quant_bits: int | None = None  # linearly quantized: bits per stored value
    quant_scales: int = 0  # linearly quantized: scales (one per channel or block)
    zero_points: bool = False  # linearly quantized with a zero point per scale
    nonzero: int | None = None  # sparse: values stored (the rest are zeros the mask marks)
    offsets: list[int] = field(default_factory=list)
    consumers: list[tuple[str, str]] = field(default_factory=list)  # (op type, input name)
    output: str = ""  # the program var holding the weight (after the last op of its chain)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def compressed(self) -> bool:
        return self.op_type != "const"

    @property
    def bits_per_weight(self) -> float:
        return 8 * (self.file_bytes + self.inline_bytes) / self.numel

    @property
    def sparsity(self) -> float | None:
        return None if self.nonzero is None else 1 - self.nonzero / self.numel

    @property
    def family(self) -> str | None:
        """The stored form: None (dense), 'palettize', 'linear', 'prune' or 'joint' (several)."""
        kinds = [k for k, on in (("prune", self.nonzero is not None), ("palettize", self.nbits is not None),
                                 ("linear", self.quant_bits is not None)) if on]
        if self.lut_dtype is not None and self.lut_dtype != self.dtype:
            kinds.append("lut")
        return None if not kinds else kinds[0] if len(kinds) == 1 else "joint"


@dataclass
class PackageSizes:
    path: Path
    layers: list[Layer]
    weight_bin_bytes: int
    unreferenced_bytes: int  # blobs no op refers to (should be 0)
    model_bytes: int  # model.mlmodel
    package_bytes: int  # every file in the package

    @property
    def n_weights(self) -> int:
        return sum(l.numel for l in self.layers)

    @property
    def bits_per_weight(self) -> float:
        """weight.bin bits (header, metadata, padding, LUTs included) per stored weight element."""
        return 8 * self.weight_bin_bytes / max(self.n_weights, 1)

    @property
    def lut_count(self) -> int:
        return sum(l.lut_count for l in self.layers)

    def table(self) -> pd.DataFrame:
        rows = [
            dict(name=l.name, op_type=l.op_type, shape=list(l.shape), numel=l.numel, dtype=l.dtype,
                 compressed=l.compressed, nbits=l.nbits, lut_count=l.lut_count, lut_entries=l.lut_entries,
                 cluster_dim=l.cluster_dim, lut_dtype=l.lut_dtype, quant_bits=l.quant_bits,
                 quant_scales=l.quant_scales, zero_points=l.zero_points, sparsity=l.sparsity, family=l.family,
                 file_bytes=l.file_bytes, inline_bytes=l.inline_bytes, bits_per_weight=l.bits_per_weight)
            for l in self.layers
        ]
        return pd.DataFrame(rows)

    def summary(self) -> dict:
        comp = [l for l in self.layers if l.compressed]
        return dict(
            weight_bin_bytes=self.weight_bin_bytes,
            package_bytes=self.package_bytes,
            model_bytes=self.model_bytes,
            n_weights=self.n_weights,
            bits_per_weight=round(self.bits_per_weight, 4),
            lut_count=self.lut_count,
            n_layers=len(self.layers),
            n_compressed=len(comp),
            compressed_weights=sum(l.numel for l in comp),
        )


def package_sizes(path) -> PackageSizes:
    """Account every byte of a package's weight.bin to the weight that uses it."""
    path = Path(path)
    model_file, weight_file = path / MODEL, path / WEIGHTS
    if not model_file.exists():
        raise PackageError(f"{path} is not an ML program package (no {MODEL}); pass a .mlpackage folder")
    blobs, weight_bytes = _blob_extents(weight_file)
    layers = _layers(_load_program(model_file))
    used = set()
    for layer in layers:
        for off in layer.offsets:
            if off not in blobs:
                raise SizeAccountingError(f"{layer.name} refers to offset {off}, which is no blob start in {weight_file}")
            layer.file_bytes += blobs[off]
            used.add(off)
    unreferenced = sum(n for off, n in blobs.items() if off not in used)
    charged = HEADER_BYTES * bool(blobs) + sum(blobs[o] for o in used) + unreferenced
    if charged != weight_bytes:
        raise SizeAccountingError(f"accounted {charged} bytes but {weight_file} has {weight_bytes}")
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return PackageSizes(path, layers, weight_bytes, unreferenced, model_file.stat().st_size, total)


# --- weight.bin ----------------------------------------------------------------------


def _blob_extents(weight_file: Path) -> tuple[dict[int, int], int]:
    """{metadata offset: bytes up to the next blob (or the end)}, and the file size."""
    if not weight_file.exists():
        return {}, 0
    data = weight_file.read_bytes()
    if len(data) < HEADER_BYTES:
        raise SizeAccountingError(f"{weight_file} is shorter than its 64-byte header")
    count, _version = struct.unpack_from("<II", data, 0)
    starts, off = [], HEADER_BYTES
    for i in range(count):
        if off + 24 > len(data):
            raise SizeAccountingError(f"{weight_file} is truncated: blob {i + 1} of {count} would start at byte {off} "
                                      f"but the file has {len(data)}; re-create the package (re-convert or re-compress)")
        sentinel, _dtype, size, data_off = struct.unpack_from("<IIQQ", data, off)
        if sentinel != BLOB_SENTINEL:
            raise SizeAccountingError(f"{weight_file}: no blob sentinel at offset {off}")
        starts.append(off)
        off = _align64(data_off + size)
    if starts and _align64(len(data)) != off:
        raise SizeAccountingError(f"{weight_file}: {count} blobs end at {off}, file has {len(data)} bytes")
    ends = starts[1:] + [len(data)]
    return {s: e - s for s, e in zip(starts, ends)}, len(data)


def _align64(n: int) -> int:
    return (n + 63) // 64 * 64


# --- model.mlmodel -------------------------------------------------------------------


def _load_program(model_file: Path):
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString(model_file.read_bytes())
    if not spec.HasField("mlProgram"):
        raise SizeAccountingError(f"{model_file} is not an ML program (neural networks keep weights inline)")
    return spec.mlProgram


def _operations(program):
    def walk(block):
        for op in block.operations:
            yield op
            for b in op.blocks:
                yield from walk(b)

    for fn in program.functions.values():
        for block in fn.block_specializations.values():
            yield from walk(block)


def _layers(program) -> list[Layer]:
    ops = list(_operations(program))
    by_output = {o.name: op for op in ops for o in op.outputs}
    consumers: dict[str, list] = {}  # output name -> [(consuming op, input name)]
    for op in ops:
        for key, arg in op.inputs.items():
            for b in arg.arguments:
                if b.WhichOneof("binding") == "name":
                    consumers.setdefault(b.name, []).append((op, key))
    chains: dict[int, list] = {}  # id of the op a chain ends in -> its constexpr ops, in program order
    for op in ops:
        if op.type.startswith("constexpr_"):
            chains.setdefault(id(_chain_end(op, consumers)), []).append(op)
    layers, absorbed = [], set()
    for op in ops:  # in program order, a chain where its last op is
        if id(op) in chains:
            layers.append(_constexpr_layer(chains[id(op)], by_output, absorbed))
        elif op.type == "const" and op.attributes["val"].WhichOneof("value") == "blobFileValue":
            layers.append(_const_layer(op))
    for layer in layers:
        layer.consumers = [(c.type, key) for c, key in consumers.get(layer.output, [])]
    # consts feeding a constexpr op are charged to it, not listed on their own
    return [l for l in layers if not (l.op_type == "const" and l.name in absorbed)]


def _chain_end(op, consumers):
    """The last op of a compression chain: constexpr ops feeding only constexpr ops (an int8 LUT's
    dequantization, a sparse LUT) are parts of the weight the chain computes."""
    for out in op.outputs:
        for child, _ in consumers.get(out.name, []):
            if child.type.startswith("constexpr_"):
                return _chain_end(child, consumers)
    return op


def _tensor_type(value_type):
    from coremltools.proto import MIL_pb2

    t = value_type.tensorType
    return MIL_pb2.DataType.Name(t.dataType).lower(), tuple(int(d.constant.size) for d in t.dimensions)


def _const_layer(op) -> Layer:
    dtype, shape = _tensor_type(op.outputs[0].type)
    return Layer(op.outputs[0].name, "const", shape, dtype, offsets=[op.attributes["val"].blobFileValue.offset],
                 output=op.outputs[0].name)


def _constexpr_layer(chain: list, by_output, absorbed) -> Layer:
    """One weight stored as a chain of constexpr ops (usually one): every blob and inline value
    of every op in the chain is charged to it, and its parts describe the form."""
    last = chain[-1]
    dtype, shape = _tensor_type(last.outputs[0].type)
    layer = Layer(base_name(last.outputs[0].name), "+".join(op.type for op in chain), shape, dtype,
                  output=last.outputs[0].name)
    # a dequantization feeding a LUT op's `lut` is the LUT's storage (an int8 LUT), not the weight's
    lut_feeders = {id(_bound_op(op, "lut", by_output)) for op in chain if op.type in _LUT_OPS}
    for op in chain:
        parts = _charge(op, layer, by_output, absorbed)
        if id(op) not in lut_feeders:
            _describe(op, parts, layer, by_output)
    return layer


_LUT_OPS = ("constexpr_lut_to_dense", "constexpr_lut_to_sparse")
_QUANT_OPS = ("constexpr_blockwise_shift_scale", "constexpr_sparse_blockwise_shift_scale",
              "constexpr_affine_dequantize")


def _charge(op, layer: Layer, by_output, absorbed) -> dict:
    """Charge the op's blobs and inline values to `layer`; returns {input: (dtype, shape)} of all
    its tensor inputs (given inline, as a const op, or as another op's output)."""
    parts = {}
    values = [(k, b.value) for k, arg in op.inputs.items() for b in arg.arguments if b.WhichOneof("binding") == "value"]
    values += [(k, v) for k, v in op.attributes.items() if k != "name"]  # iOS16 ops keep their parts here
    for key, arg in op.inputs.items():
        for b in arg.arguments:
            src = by_output.get(b.name) if b.WhichOneof("binding") == "name" else None
            if src is not None and src.type == "const":
                values.append((key, src.attributes["val"]))
                absorbed.add(src.outputs[0].name)
            elif src is not None:  # another constexpr op's output: charged where that op is
                out = next(o for o in src.outputs if o.name == b.name)
                parts[key] = _tensor_type(out.type)
    for key, v in values:
        if v.WhichOneof("value") == "blobFileValue":
            if v.blobFileValue.offset not in layer.offsets:  # one blob read by two ops of a chain is stored once
                layer.offsets.append(v.blobFileValue.offset)
        else:
            layer.inline_bytes += v.ByteSize()
        if v.type.WhichOneof("type") == "tensorType":
            parts[key] = _tensor_type(v.type)
    return parts


def _describe(op, parts: dict, layer: Layer, by_output) -> None:
    """What one op of the chain stores: a LUT, quantized data with its scales, or a sparse mask."""
    if op.type in _LUT_OPS:
        _describe_lut(layer, parts)
        src = _bound_op(op, "lut", by_output)
        layer.lut_dtype = parts["lut"][0] if src is None else _stored_dtype(src, by_output)
    elif op.type in _QUANT_OPS:
        data = parts.get("data") or parts.get("nonzero_data") or parts["quantized_data"]
        layer.quant_bits = _bits(data[0])
        layer.quant_scales = math.prod(parts["scale"][1])
        layer.zero_points = "offset" in parts or "zero_point" in parts
    elif op.type == "constexpr_sparse_to_dense":  # always last in a sparse chain: its values are the weight's
        layer.nonzero = math.prod(parts["nonzero_data"][1])


def _bound_op(op, key: str, by_output):
    """The constexpr op whose output feeds input `key`, or None (a const or an inline value)."""
    for b in op.inputs[key].arguments if key in op.inputs else ():
        if b.WhichOneof("binding") == "name":
            src = by_output.get(b.name)
            if src is not None and src.type.startswith("constexpr_"):
                return src
    return None


def _stored_dtype(op, by_output) -> str:
    """The dtype a LUT is stored in when a dequantization op produces it: that op's data."""
    b = op.inputs["data"].arguments[0]
    if b.WhichOneof("binding") == "value":
        return _tensor_type(b.value.type)[0]
    return _tensor_type(by_output[b.name].attributes["val"].type)[0]


def _bits(dtype: str) -> int:
    return int("".join(ch for ch in dtype if ch.isdigit()))


def _describe_lut(layer: Layer, parts: dict) -> None:
    _, lut_shape = parts["lut"]
    if len(lut_shape) == len(layer.shape) + 2:  # iOS18: [groups per axis..., entries, cluster_dim]
        layer.lut_count = math.prod(lut_shape[:-2])
        layer.lut_entries, layer.cluster_dim = lut_shape[-2], lut_shape[-1]
    else:  # iOS16: one flat per-tensor LUT, indices packed into uint8
        layer.lut_count, layer.lut_entries = 1, math.prod(lut_shape)
    layer.nbits = int(math.log2(layer.lut_entries))


def component_sizes(packages: dict[str, Path]) -> dict[str, PackageSizes]:
    return {name: package_sizes(p) for name, p in packages.items()}


# --- predicted sizes (REFERENCE.md's formula, one part at a time) ----------------------
#
# Every part of a compressed weight (indices, LUT, quantized data, scales, zero points, a
# mask, nonzero values) is one blob: 64 bytes of metadata, then the data padded to 64 bytes;
# a part under 10 elements is written inline in model.mlmodel instead (0 bytes here). The
# file's very last blob is not padded, so these hold for every weight but that one.

INLINE_BELOW = 10  # elements: coremltools' should_use_weight_file


def blob_bytes(data_bytes: int) -> int:
    return 64 + 64 * math.ceil(data_bytes / 64)


def part_bytes(elements: int, bits: int) -> int:
    """weight.bin bytes of one part of `elements` values of `bits` bits each (sub-byte packed)."""
    return blob_bytes(math.ceil(elements * bits / 8)) if elements >= INLINE_BELOW else 0


def expected_lut_bytes(numel: int, nbits: int, luts: int, cluster_dim: int = 1, entry_bytes: int = 2) -> int:
    """weight.bin bytes of one palettized weight predicted from its shape (REFERENCE.md formula):
    n-bit indices and `luts` tables of 2^nbits entries (a LUT under 10 elements is inline)."""
    return blob_bytes(math.ceil(numel * nbits / (8 * cluster_dim))) + part_bytes(luts * 2**nbits * cluster_dim,
                                                                                8 * entry_bytes)


def expected_linear_bytes(numel: int, bits: int, scales: int, zero_points: bool = False, scale_bits: int = 16) -> int:
    """A linearly quantized weight (constexpr_blockwise_shift_scale): the data, one fp16 scale per
    channel or block, and (mode 'linear') one zero point per scale in the data's dtype."""
    return part_bytes(numel, bits) + part_bytes(scales, scale_bits) + (part_bytes(scales, bits) if zero_points else 0)


def expected_sparse_bytes(numel: int, nonzero: int, value_bits: int = 16) -> int:
    """A pruned weight (constexpr_sparse_to_dense): a 1-bit mask over every element, and the
    nonzero values. At 50% sparsity that is 9 bits per weight, more than int8."""
    return part_bytes(numel, 1) + part_bytes(nonzero, value_bits)


def expected_sparse_lut_bytes(numel: int, nonzero: int, nbits: int, luts: int, lut_bits: int = 16) -> int:
    """Pruned, then palettized (constexpr_lut_to_sparse + constexpr_sparse_to_dense): the mask,
    n-bit indices of the nonzero values only, the LUTs (plus an fp16 scale, inline, when int8)."""
    return part_bytes(numel, 1) + part_bytes(nonzero, nbits) + part_bytes(luts * 2**nbits, lut_bits)


def expected_int8_lut_bytes(numel: int, nbits: int, luts: int) -> int:
    """Palettized with the LUTs quantized to int8 (one per-tensor scale, inline)."""
    return part_bytes(numel, nbits) + part_bytes(luts * 2**nbits, 8) + part_bytes(1, 16)


def expected_sparse_linear_bytes(numel: int, nonzero: int, bits: int, scales: int, zero_points: bool = False) -> int:
    """Pruned, then linearly quantized (constexpr_sparse_blockwise_shift_scale + constexpr_sparse_to_dense):
    the mask (both ops read the same blob), the quantized nonzero values, the scales (and zero points)."""
    return part_bytes(numel, 1) + part_bytes(nonzero, bits) + part_bytes(scales, 16) + \
        (part_bytes(scales, bits) if zero_points else 0)
