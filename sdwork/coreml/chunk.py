"""Split a UNet package in two chunks of about equal weight bytes, as iOS needs (shared/APPLE_IO.md).

The program surgery is coremltools' own (`coremltools.models.utils.bisect_model`'s internals):
chunk 1 runs the ops up to the cut and outputs every value that crosses it, cast to fp32;
chunk 2 takes those values as inputs under the same names, casts them back to fp16, and runs
the rest with the original inputs it uses. Swift's StableDiffusion package runs
UnetChunk1 then UnetChunk2, feeding chunk 2 the original inputs merged with chunk 1's outputs.

What differs from bisect_model is the byte count. bisect_model sums the in-memory size of the
`const` ops it sees: a LUT op's indices count one byte each whatever their bits (coremltools 9.0)
or, in earlier versions, compressed weights not at all (coremltools #2320: a palettized model split
152 MB vs 0.4 MB), so a compressed, above all a mixed-bit, UNet splits unevenly. Here every
weight-bearing op is charged its exact bytes in weight.bin, as `sizes.package_sizes` accounts
them, at the ops that use it. The cut is Apple's kind of op (not a constant, one output, one
consumer) at the half-way point of those bytes: of the two candidates around the half, the one
that balances the chunks better (bisect_model always takes the one after, which left the tiny
UNet's chunks 17% apart where a large weight sits at the half).
A cut is refused where a weight coremltools could compress would be needed on both sides: it
would be stored twice. Small 1-D constants the converter shares across the graph (the
batch_norm means and variances of the GroupNorms) are stored in both chunks; they hold no model
weight and are a few hundred bytes each.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdwork.coreml.package import META_PREFIX, base_name, metadata, open_package
from sdwork.coreml.sizes import MODEL, PackageSizes, package_sizes
from sdwork.errors import PackageError

CHUNK_NAMES = ("UnetChunk1.mlpackage", "UnetChunk2.mlpackage")
COMPRESS_THRESHOLD = 2048  # coremltools compresses no weight with this many elements or fewer
_SIDECAR = ".weightmap.json"  # as sdwork.convert.weightmap writes beside a package


@dataclass(frozen=True)
class Cut:
    """Where a program is cut: the last op of chunk 1 and the weight bytes on each side."""

    index: int  # position of the op in the main block
    op: str  # its output's name
    op_type: str
    chunk_bytes: tuple[int, int]  # weight bytes each chunk holds (shared small constants in both)
    shared: tuple[str, ...]  # weight-bearing constants stored in both chunks

    @property
    def imbalance(self) -> float:
        """|b1 - b2| / max(b1, b2)."""
        return imbalance(*self.chunk_bytes)


def imbalance(a: int, b: int) -> float:
    return abs(a - b) / max(a, b, 1)


def split_unet(package, out_dir, progress: bool = False) -> tuple[Path, Path]:
    """Write <out_dir>/UnetChunk1.mlpackage and UnetChunk2.mlpackage; returns their paths.

    Each chunk carries the package's metadata with its chunk number and the part of the weight
    map whose constants it holds. Any chunks already in out_dir are replaced."""
    from sdwork.paths import scratch

    with scratch():  # coremltools' temporary chunk packages: removed once the chunks are saved
        return _split_unet(_check_package(package), Path(out_dir), progress)


def _split_unet(path: Path, out_dir: Path, progress: bool) -> tuple[Path, Path]:
    sizes = package_sizes(path)
    cut = plan_cut(path, sizes)
    models = _chunk_models(path, cut, progress)
    chunk_maps = _split_weight_map(metadata(path).get("weightmap"), [_const_names(m) for m in models])
    source = open_package(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        for i, (model, name, wm) in enumerate(zip(models, CHUNK_NAMES, chunk_maps), 1):
            _carry_metadata(source, model, i, wm)
            written.append(_save(model, out_dir / name, wm))
        _check_chunks(sizes, written)
    except BaseException:
        for name in CHUNK_NAMES:  # never a chunk without its partner, or chunks that lost a weight
            shutil.rmtree(out_dir / name, ignore_errors=True)
            _sidecar(out_dir / name).unlink(missing_ok=True)
        raise
    return written[0], written[1]


def plan_cut(package, sizes: PackageSizes | None = None) -> Cut:
    """The cut split_unet makes (see the module docstring), without writing anything."""
    path = _check_package(package)
    sizes = sizes or package_sizes(path)
    ops = _load_program(path).functions["main"].operations
    weights = _weight_spans(ops, sizes)
    return _choose_cut(ops, weights)


def chunk_weight_bytes(chunk1, chunk2) -> tuple[int, int]:
    """weight.bin bytes of the two chunks, from the files."""
    return package_sizes(chunk1).weight_bin_bytes, package_sizes(chunk2).weight_bin_bytes


# ------------------------------------------------------------------ choosing the cut
@dataclass(frozen=True)
class _Weight:
    name: str
    nbytes: int  # its bytes in weight.bin (metadata, data, padding), as package_sizes charges them
    first: int  # index of the first op that computes with it
    last: int  # index of the last one
    compressible: bool


def _weight_spans(ops, sizes: PackageSizes) -> list[_Weight]:
    """Every weight-bearing op of package_sizes, placed at the ops that use it."""
    layers = {l.name: l for l in sizes.layers}
    where = {id(op): i for i, op in enumerate(ops)}
    found = []
    for op in ops:
        layer = layers.get(_layer_name(op)) if op.op_type.startswith("const") else None
        if layer is None:
            continue  # not weight-bearing (inline scalars), or a part absorbed by its constexpr op
        uses = _uses(op, where)
        if not uses:
            raise PackageError(f"the weight {layer.name} is used by no op: the package holds dead weights; "
                               "re-convert it")
        found.append(_Weight(layer.name, layer.file_bytes, min(uses), max(uses),
                             len(layer.shape) >= 2 and layer.numel > COMPRESS_THRESHOLD))
    missing = set(layers) - {w.name for w in found}
    if missing:
        raise PackageError(f"cannot place the weights {sorted(missing)[:3]} in the program to split it: "
                           "the package was edited by hand or has more than one function")
    return found


def _layer_name(op) -> str:
    # package_sizes names a compressed weight after the const it replaced
    name = op.outputs[0].name
    return base_name(name) if op.op_type.startswith("constexpr_") else name


def _uses(op, where) -> list[int]:
    """Indices of the non-constant ops computing with op's output, through constexpr chains
    (an int8 LUT dequantized by another constexpr op, then expanded)."""
    out = []
    for child in op.outputs[0].child_ops:
        out += _uses(child, where) if child.op_type.startswith("const") else [where[id(child)]]
    return out


def _choose_cut(ops, weights: list[_Weight]) -> Cut:
    first = np.array([w.first for w in weights])
    last = np.array([w.last for w in weights])
    nbytes = np.array([w.nbytes for w in weights], dtype=np.int64)
    large = np.array([w.compressible for w in weights], dtype=bool)
    best = None
    for i, op in enumerate(ops[:-1]):
        if not _cuttable(op):
            continue
        left, right = first <= i, last > i
        if (left & right & large).any():
            continue
        b1, b2 = int(nbytes[left].sum()), int(nbytes[right].sum())
        if best is None or imbalance(b1, b2) < imbalance(*best[1]):
            best = (i, (b1, b2), left & right)
    if best is None:
        raise PackageError(f"found no op to cut the program at ({len(ops)} ops): it has no op with a single "
                           "output and a single consumer that leaves every weight on one side")
    i, chunk_bytes, both = best
    shared = tuple(w.name for w, s in zip(weights, both) if s)
    return Cut(i, ops[i].outputs[0].name, ops[i].op_type, chunk_bytes, shared)


def _cuttable(op) -> bool:
    """Apple's (bisect_model's) condition: no constant, one output, one consumer."""
    return (not op.op_type.startswith("const") and len(op.outputs) == 1
            and len(op.outputs[0].child_ops) == 1)


# ------------------------------------------------------------------ building the chunks
def _check_package(package) -> Path:
    path = Path(package)
    open_package(path)  # a clear error for a missing or damaged package
    if not (path / MODEL).exists():
        raise PackageError(f"{path} is not an ML program package; only ML programs can be chunked")
    component = metadata(path).get("component", "unet")
    if component != "unet":
        raise PackageError(f"{path} holds the {component}, not the UNet: only the UNet is chunked")
    return path


def _load_program(path: Path):
    """The package as a pymil Program whose main block's ops are a list (as bisect_model needs)."""
    from coremltools.converters.mil.frontend.milproto import load as milproto_load
    from coremltools.models.utils import _try_get_weights_dir_path, load_spec

    spec = load_spec(str(path))
    prog = milproto_load.load(spec, spec.specificationVersion, _try_get_weights_dir_path(str(path)))
    if list(prog.functions) != ["main"]:
        raise PackageError(f"{path} has the functions {list(prog.functions)}: only a single 'main' function "
                           "can be chunked")
    main = prog.functions["main"]
    main.operations = list(main.operations)
    return prog


def _chunk_models(path: Path, cut: Cut, progress: bool):
    """The two chunks as MLModels (not loaded: no Core ML runtime needed)."""
    import coremltools as ct
    from coremltools.models.utils import _make_first_chunk_prog, _make_second_chunk_prog

    with _crossing_values_in_program_order():
        prog1 = _make_first_chunk_prog(_load_program(path), cut.index)
        prog = _load_program(path)
        opset = prog.functions["main"].opset_version
        prog2 = _make_second_chunk_prog(prog, cut.index)
    # bisect_model marks chunk 2 as iOS16 (its casts need that); its ops keep the package's opset,
    # e.g. iOS18's grouped LUTs, so the function must declare the package's own
    prog2.functions["main"].opset_version = max(opset, ct.target.iOS16, key=lambda t: t.value)
    spec_version = _spec_version(path)
    return [_to_mlmodel(p, spec_version, progress) for p in (prog1, prog2)]


@contextlib.contextmanager
def _crossing_values_in_program_order():
    """bisect_model's helpers collect the values crossing the cut in a set, so chunk 1's outputs,
    chunk 2's inputs and their casts would come in another order on each run (packages differing
    byte for byte). Sorted by the position of the op computing each, they are reproducible."""
    from unittest import mock

    from coremltools.models import utils

    collect = utils._get_first_chunk_outputs

    def in_order(block, op_idx):
        where = {id(op): i for i, op in enumerate(block.operations)}
        return sorted(collect(block, op_idx), key=lambda v: (where[id(v.op)], v.name))

    with mock.patch.object(utils, "_get_first_chunk_outputs", in_order):
        yield


def _spec_version(path: Path) -> int:
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString((path / MODEL).read_bytes())
    return spec.specificationVersion


def _to_mlmodel(prog, spec_version: int, progress: bool):
    import coremltools as ct
    from coremltools.converters.mil.converter import mil_convert
    from coremltools.converters.mil.mil.passes.pass_pipeline import PassPipeline

    from sdwork.quiet import coremltools_progress

    # no optimisation pass: the chunks hold the package's ops as they are, only cut apart. Names
    # are made unique again: bisect's fp32 cast of a crossing value takes the value's own name
    passes = PassPipeline(["common::dedup_op_and_var_names"], pipeline_name="chunk")
    with coremltools_progress(progress):
        return mil_convert(prog, convert_to="mlprogram", convert_from="milinternal",
                           specification_version=spec_version, compute_units=ct.ComputeUnit.CPU_ONLY,
                           skip_model_load=True, pass_pipeline=passes)


def _const_names(mlmodel) -> set[str]:
    """Names (compression suffixes removed, as in the weight map) of every constant op in a model."""
    names = set()
    for fn in mlmodel.get_spec().mlProgram.functions.values():
        for block in fn.block_specializations.values():
            names |= {base_name(op.outputs[0].name) for op in block.operations if op.type.startswith("const")}
    return names


def _split_weight_map(raw: str | None, consts: list[set[str]]) -> list[dict | None]:
    """Each chunk's part of the weight map (JSON as sdwork.convert.weightmap writes it): the entries
    whose constant the chunk holds. An identity entry (no constant: a norm scale of ones or shift of
    zeros) goes with the other parameters of its module, so each module stays in one chunk."""
    if raw is None:
        return [None for _ in consts]
    wm = json.loads(raw)
    parts = [dict(wm, entries={}) for _ in consts]
    homes: dict[str, int] = {}
    for name, e in wm["entries"].items():
        if e.get("const") is None:
            continue
        holders = [i for i, c in enumerate(consts) if e["const"] in c]
        if not holders:
            raise PackageError(f"no chunk holds {e['const']} (for {name}): the cut lost a weight")
        for i in holders:
            parts[i]["entries"][name] = e
        homes.setdefault(_module(name), holders[0])
    for name, e in wm["entries"].items():
        if e.get("const") is None:
            parts[homes.get(_module(name), 0)]["entries"][name] = e
    return parts


def _module(param: str) -> str:
    return param.rpartition(".")[0]


def _carry_metadata(source, model, chunk: int, weight_map: dict | None) -> None:
    """The package's descriptions and metadata (sdwork's and any other), with the chunk number."""
    for attr in ("short_description", "author", "license", "version"):
        value = getattr(source, attr)
        if value:
            setattr(model, attr, value)
    # coremltools' own keys (its version, the source framework) already describe the chunk itself
    user = {k: v for k, v in source.user_defined_metadata.items() if k not in model.user_defined_metadata}
    user[META_PREFIX + "chunk"] = str(chunk)
    user[META_PREFIX + "chunks"] = str(len(CHUNK_NAMES))
    if weight_map is not None:
        user[META_PREFIX + "weightmap"] = json.dumps(weight_map, sort_keys=True)
    for k, v in user.items():
        model.user_defined_metadata[k] = v
    given = {**_descriptions(source, "input"), **_descriptions(source, "output")}
    spec = model.get_spec()
    for f in spec.description.input:
        model.input_description[f.name] = given.get(f.name, f"value computed by UnetChunk1 ({f.name})")
    for f in spec.description.output:
        model.output_description[f.name] = given.get(f.name, "value crossing the cut, input of UnetChunk2")


def _descriptions(model, io: str) -> dict[str, str]:
    features = getattr(model.get_spec().description, io)
    return {f.name: f.shortDescription for f in features if f.shortDescription}


def _save(model, path: Path, weight_map: dict | None) -> Path:
    """Save beside, then swap in: an interrupted split never leaves half a chunk."""
    tmp = path.with_name(".tmp-" + path.name)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    side = _sidecar(path)
    if weight_map is not None:
        side.write_text(json.dumps(weight_map, indent=1, sort_keys=True))
    else:
        side.unlink(missing_ok=True)
    return path


def _sidecar(package: Path) -> Path:
    return package.with_name(package.name.removesuffix(".mlpackage") + _SIDECAR)


def _check_chunks(whole: PackageSizes, chunks: list[Path]) -> None:
    """Every weight of the package is in a chunk, and only small shared constants in both."""
    names = [{l.name for l in package_sizes(c).layers} for c in chunks]
    lost = {l.name for l in whole.layers} - set.union(*names)
    if lost:
        raise PackageError(f"splitting {whole.path} lost the weights {sorted(lost)[:3]}; please report this")
    large = {l.name for l in whole.layers if len(l.shape) >= 2 and l.numel > COMPRESS_THRESHOLD}
    twice = set.intersection(*names) & large
    if twice:
        raise PackageError(f"splitting {whole.path} stored the weights {sorted(twice)[:3]} in both chunks")
