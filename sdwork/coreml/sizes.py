"""Exact on-disk size accounting of an .mlpackage, read from the files themselves.

An ML program keeps its large constants in `Data/com.apple.CoreML/weights/weight.bin`:
a 64-byte header, then per blob 64 bytes of metadata followed by the data,
each blob starting on a 64-byte boundary. The program (`model.mlmodel`, a
protobuf) refers to a blob by the offset of its metadata. Small values (fewer
than 10 elements, e.g. tiny LUTs) are stored inline in the program instead.

We walk the blob chain in weight.bin and the ops of the program, charge every
blob to the weight that uses it, and check that header + blobs = file size, so
the accounting agrees with the file on disk to the byte.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

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

    name: str  # the const name, with coremltools' "_palettized" suffix dropped
    op_type: str  # "const" or "constexpr_lut_to_dense", ...
    shape: tuple[int, ...]
    dtype: str  # of the dense weight
    file_bytes: int = 0  # bytes of weight.bin charged to it: metadata + data + padding
    inline_bytes: int = 0  # bytes of its inline values inside model.mlmodel
    nbits: int | None = None  # palettized: bits per index
    lut_count: int = 0
    lut_entries: int = 0
    cluster_dim: int = 1
    offsets: list[int] = field(default_factory=list)
    consumers: list[tuple[str, str]] = field(default_factory=list)  # (op type, input name)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def compressed(self) -> bool:
        return self.op_type != "const"

    @property
    def bits_per_weight(self) -> float:
        return 8 * (self.file_bytes + self.inline_bytes) / self.numel


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
                 cluster_dim=l.cluster_dim, file_bytes=l.file_bytes, inline_bytes=l.inline_bytes,
                 bits_per_weight=l.bits_per_weight)
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
    consumers: dict[str, list[tuple[str, str]]] = {}
    for op in ops:
        for key, arg in op.inputs.items():
            for b in arg.arguments:
                if b.WhichOneof("binding") == "name":
                    consumers.setdefault(b.name, []).append((op.type, key))
    layers, absorbed = [], set()
    for op in ops:
        if op.type.startswith("constexpr_"):
            layer = _constexpr_layer(op, by_output, absorbed)
        elif op.type == "const" and op.attributes["val"].WhichOneof("value") == "blobFileValue":
            layer = _const_layer(op)
        else:
            continue
        layer.consumers = consumers.get(op.outputs[0].name, [])
        layers.append(layer)
    # consts feeding a constexpr op are charged to it, not listed on their own
    return [l for l in layers if not (l.op_type == "const" and l.name in absorbed)]


def _tensor_type(value_type):
    from coremltools.proto import MIL_pb2

    t = value_type.tensorType
    return MIL_pb2.DataType.Name(t.dataType).lower(), tuple(int(d.constant.size) for d in t.dimensions)


def _const_layer(op) -> Layer:
    dtype, shape = _tensor_type(op.outputs[0].type)
    return Layer(op.outputs[0].name, "const", shape, dtype, offsets=[op.attributes["val"].blobFileValue.offset])


def _constexpr_layer(op, by_output, absorbed) -> Layer:
    dtype, shape = _tensor_type(op.outputs[0].type)
    name = op.outputs[0].name.removesuffix("_palettized")
    layer = Layer(name, op.type, shape, dtype)
    parts = {}  # role -> (dtype, shape)
    values = [(k, b.value) for k, arg in op.inputs.items() for b in arg.arguments if b.WhichOneof("binding") == "value"]
    values += [(k, v) for k, v in op.attributes.items() if k != "name"]
    for key, arg in op.inputs.items():  # parts given as separate const ops
        for b in arg.arguments:
            src = by_output.get(b.name) if b.WhichOneof("binding") == "name" else None
            if src is not None and src.type == "const":
                values.append((key, src.attributes["val"]))
                absorbed.add(src.outputs[0].name)
    for key, v in values:
        if v.WhichOneof("value") == "blobFileValue":
            layer.offsets.append(v.blobFileValue.offset)
        else:
            layer.inline_bytes += v.ByteSize()
        if v.type.WhichOneof("type") == "tensorType":
            parts[key] = _tensor_type(v.type)
    if "lut" in parts:
        _describe_lut(layer, parts)
    return layer


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


def expected_lut_bytes(numel: int, nbits: int, luts: int, cluster_dim: int = 1, entry_bytes: int = 2) -> int:
    """weight.bin bytes of one palettized weight predicted from its shape (REFERENCE.md formula),
    when both parts are in the file (a LUT under 10 elements is inline instead)."""
    blob = lambda n: 64 + 64 * math.ceil(n / 64)
    lut_elems = luts * 2**nbits * cluster_dim
    idx = blob(math.ceil(numel * nbits / (8 * cluster_dim)))
    return idx + (blob(lut_elems * entry_bytes) if lut_elems >= 10 else 0)
