"""UNet chunking (sdwork.coreml.chunk): byte balance by on-disk size for fp16 and compressed UNets,
every weight in one chunk, Apple's chunk interface, and the composition equal to the unsplit
program. There is no Core ML runtime on Linux, so the composition is checked on the programs
themselves (same ops, same constants, values crossing the cut by name, casts only fp16 -> fp32
-> fp16) and by loading both chunks' weights into a torch UNet."""
import copy
import json

import numpy as np
import pytest
import torch

from conftest import tiny_specs
from sdwork.coreml.chunk import CHUNK_NAMES, COMPRESS_THRESHOLD, chunk_weight_bytes, imbalance, plan_cut, split_unet
from sdwork.coreml.package import metadata, open_package, package_weights
from sdwork.coreml.sizes import WEIGHTS, package_sizes
from sdwork.errors import PackageError

KINDS = ("fp16", "lut4", "int8")
# tests marked slow share a module fixture that converts and compresses the tiny UNet (about 30 s)


@pytest.fixture(scope="module")
def pipe():
    from sdwork.load import load_pipeline

    return load_pipeline(tiny_specs()[0], progress=False)


@pytest.fixture(scope="module")
def unets(pipe, tmp_path_factory):
    """{kind: Unet.mlpackage}: fp16, 4-bit palettized (per-grouped-channel LUTs) and int8 linear."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    from sdwork.compress.apply import compress
    from sdwork.compress.recipe import Recipe
    from sdwork.convert.export import convert_component

    root = tmp_path_factory.mktemp("unets")
    fp16 = convert_component(pipe, "unet", root / "fp16", progress=False)
    lut4 = compress(Recipe(nbits=4, group_size=16, components=("unet",)), {"unet": fp16}, root / "lut4",
                    progress=False).packages["unet"]
    config = cto.OptimizationConfig(cto.OpLinearQuantizerConfig(mode="linear_symmetric"))
    int8 = root / "int8" / "Unet.mlpackage"
    cto.linear_quantize_weights(ct.models.MLModel(str(fp16), skip_model_load=True), config).save(str(int8))
    return {"fp16": fp16, "lut4": lut4, "int8": int8}


@pytest.fixture(scope="module")
def chunks(unets, tmp_path_factory):
    """{kind: (chunk1, chunk2)}"""
    return {k: split_unet(p, tmp_path_factory.mktemp(f"chunks-{k}")) for k, p in unets.items()}


def _spec(path):
    return open_package(path).get_spec()


def _mixed_bit_program(path):
    """16 convs with skip connections: the first 8 palettized to 2 bits, the last 8 to 8 bits, with
    iOS18 LUTs (built in MIL directly: no torch model, under a second)."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    rng = np.random.default_rng(0)

    @mb.program(input_specs=[mb.TensorSpec((1, 32, 8, 8), types.fp32)], opset_version=ct.target.iOS18)
    def prog(x):
        skips = []
        for i in range(16):
            w = rng.standard_normal((32, 32, 3, 3)).astype(np.float32)
            x = mb.relu(x=mb.conv(x=x, weight=w, pad_type="same", name=f"conv{i}"))
            skips.append(x)
        for s in skips[:6]:
            x = mb.add(x=x, y=s)
        return x

    m = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18, skip_model_load=True)
    two_bit = {f"conv{i}_weight_0_to_fp16": cto.OpPalettizerConfig(nbits=2, mode="uniform") for i in range(8)}
    config = cto.OptimizationConfig(cto.OpPalettizerConfig(nbits=8, mode="uniform"), op_name_configs=two_bit)
    cto.palettize_weights(m, config).save(str(path))
    return path


def test_mixed_bit_program_is_cut_by_on_disk_bytes(tmp_path):
    """coremltools' bisect_model counts one byte per LUT index whatever the bits (coremltools #2320):
    here that would leave chunk 2 more than twice as heavy as chunk 1."""
    from coremltools.models.utils import _get_op_idx_split_location

    from sdwork.coreml import chunk

    package = _mixed_bit_program(tmp_path / "Unet.mlpackage")
    ops = chunk._load_program(package).functions["main"].operations
    weights = chunk._weight_spans(ops, package_sizes(package))
    theirs, _, _ = _get_op_idx_split_location(chunk._load_program(package))
    sides = [sum(w.nbytes for w in weights if w.first <= theirs), sum(w.nbytes for w in weights if w.last > theirs)]
    assert sides[1] > 2 * sides[0]
    c1, c2 = split_unet(package, tmp_path / "out")
    assert imbalance(*chunk_weight_bytes(c1, c2)) <= 0.05
    assert {l.name for l in package_sizes(c1).layers} | {l.name for l in package_sizes(c2).layers} == \
        {l.name for l in package_sizes(package).layers}


# ------------------------------------------------------------------ bytes
@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_chunks_hold_equal_weight_bytes_on_disk(unets, chunks, kind):
    c1, c2 = chunks[kind]
    files = [(c / WEIGHTS).stat().st_size for c in (c1, c2)]
    assert imbalance(*files) <= 0.10, files
    assert list(chunk_weight_bytes(c1, c2)) == files  # package_sizes accounts each file to the byte
    assert (c1.name, c2.name) == CHUNK_NAMES
    assert any(l.compressed for l in package_sizes(c1).layers) == (kind != "fp16")


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_chunk_sizes_sum_to_the_whole(unets, chunks, kind):
    whole = package_sizes(unets[kind])
    parts = [package_sizes(c) for c in chunks[kind]]
    shared = {l.name for l in parts[0].layers} & {l.name for l in parts[1].layers}
    shared_bytes = sum(l.file_bytes for l in whole.layers if l.name in shared)
    # one more 64-byte file header and the constants stored in both; the rest is padding, which a
    # file's last blob is spared (a different blob in each file): under 64 bytes per file
    extra = sum(p.weight_bin_bytes for p in parts) - whole.weight_bin_bytes - 64 - shared_bytes
    assert abs(extra) < 2 * 64
    planned = plan_cut(unets[kind]).chunk_bytes
    assert all(abs(b - (p.weight_bin_bytes - 64)) < 64 for b, p in zip(planned, parts))


@pytest.mark.slow
def test_cut_is_apples_kind_of_op(unets, chunks):
    cut = plan_cut(unets["lut4"])
    assert not cut.op_type.startswith("const")
    outputs = [o.name for o in _spec(chunks["lut4"][0]).description.output]
    assert cut.op in outputs  # the cut op's value is the last thing chunk 1 computes: it crosses


# ------------------------------------------------------------------ weights
@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_every_weight_is_in_exactly_one_chunk(unets, chunks, kind):
    whole = {l.name: l for l in package_sizes(unets[kind]).layers}
    names = [{l.name for l in package_sizes(c).layers} for c in chunks[kind]]
    assert names[0] | names[1] == set(whole)
    both = names[0] & names[1]
    # only small generated constants the converter shares across the graph (batch_norm means and
    # variances) sit in both, never a model weight or anything compression could touch
    mapped = {e.get("const") for e in json.loads(metadata(unets[kind])["weightmap"])["entries"].values()}
    assert all(whole[n].numel <= COMPRESS_THRESHOLD and not whole[n].compressed for n in both)
    assert not both & mapped
    assert set(plan_cut(unets[kind]).shared) == both


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_weight_map_is_split_by_chunk(unets, chunks, kind):
    whole = json.loads(metadata(unets[kind])["weightmap"])
    parts = [json.loads(metadata(c)["weightmap"]) for c in chunks[kind]]
    entries = [set(p["entries"]) for p in parts]
    assert entries[0] | entries[1] == set(whole["entries"]) and not entries[0] & entries[1]
    for chunk, part in zip(chunks[kind], parts):
        assert {k: v for k, v in part.items() if k != "entries"} == {k: v for k, v in whole.items() if k != "entries"}
        held = set(package_weights(chunk))
        assert all(e["const"] in held for e in part["entries"].values() if e.get("const"))
        side = chunk.with_name(chunk.name.removesuffix(".mlpackage") + ".weightmap.json")
        assert json.loads(side.read_text()) == part


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fp16", "lut4"])
def test_both_chunks_weights_rebuild_the_unsplit_torch_unet(pipe, unets, chunks, kind):
    from sdwork.convert.into_torch import load_package_into_module
    from sdwork.convert.weightmap import read_weight_map

    reference = copy.deepcopy(pipe.unet)
    load_package_into_module(reference, "unet", unets[kind], same_weights=False)
    rebuilt = copy.deepcopy(pipe.unet)
    params = dict(rebuilt.named_parameters())
    with torch.no_grad():
        for p in params.values():
            p.fill_(float("nan"))  # a weight no chunk supplies stays NaN
        for chunk in chunks[kind]:
            weights = package_weights(chunk)
            for name, e in read_weight_map(chunk).entries.items():
                if e.kind == "identity":
                    params[name].fill_(1.0 if name.endswith("weight") else 0.0)
                else:
                    params[name].copy_(torch.from_numpy(weights[e.const].astype(np.float32)).reshape(params[name].shape))
    for name, p in reference.named_parameters():
        assert torch.equal(params[name], p), name


# ------------------------------------------------------------------ interface and composition
def _features(desc):
    return {f.name: (f.type.multiArrayType.dataType, tuple(f.type.multiArrayType.shape)) for f in desc}


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_chunk_interface_is_apples(unets, chunks, kind):
    from coremltools.proto.FeatureTypes_pb2 import ArrayFeatureType

    whole = _spec(unets[kind]).description
    one, two = (_spec(c).description for c in chunks[kind])
    assert _features(one.input) == _features(whole.input)  # Swift feeds chunk 1 the UNet's inputs
    crossing = _features(one.output)
    assert crossing and all(dtype == ArrayFeatureType.FLOAT32 for dtype, _ in crossing.values())
    inputs = _features(two.input)
    # chunk 2: original inputs it uses (same type) plus every value chunk 1 outputs, by the same names
    assert set(crossing) <= set(inputs)
    assert all(inputs[n] == (_features(whole.input).get(n) or crossing.get(n)) for n in inputs)
    assert _features(two.output) == _features(whole.output)  # Swift reads the one output, noise_pred


def _ops(path):
    """(non-constant ops as [type, input bindings, outputs], input names, output names) of a package.
    A constant input is bound by its value: the loader names the parts of a LUT op afresh each time."""
    import hashlib

    from coremltools.converters.mil.frontend.milproto import load as milproto_load
    from coremltools.models.utils import _try_get_weights_dir_path

    def bind(v):
        if v.op is not None and v.op.op_type == "const":
            a = np.asarray(v.val)
            return ("=", str(a.dtype), a.shape, hashlib.sha1(a.tobytes()).hexdigest())
        return v.name

    spec = _spec(path)
    main = milproto_load.load(spec, spec.specificationVersion, _try_get_weights_dir_path(str(path))).functions["main"]
    ops = []
    for op in main.operations:
        if op.op_type != "const":
            bindings = tuple(sorted((k, tuple(bind(v) for v in (vs if isinstance(vs, (list, tuple)) else [vs])))
                                    for k, vs in op.inputs.items()))
            ops.append([op.op_type, bindings, tuple((v.name, str(v.dtype), v.shape) for v in op.outputs)])
    return ops, list(main.inputs), [v.name for v in main.outputs]


def _rename(ops, names):
    for op in ops:
        op[1] = tuple((k, tuple(names.get(n, n) if isinstance(n, str) else n for n in vs)) for k, vs in op[1])
        op[2] = tuple((names.get(n, n), *rest) for n, *rest in op[2])


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_chunk2_of_chunk1_is_the_unsplit_program(unets, chunks, kind):
    """The chunks' ops are exactly the unsplit program's ops, wired to the same values, with the
    same constants (by value) and output types; the only additions are the fp16 -> fp32 casts at
    chunk 1's outputs and the fp32 -> fp16 casts at chunk 2's inputs (lossless both ways)."""
    from coremltools.converters.mil.mil import types

    whole_ops, whole_in, _ = _ops(unets[kind])
    ops1, _, out1 = _ops(chunks[kind][0])
    ops2, in2, _ = _ops(chunks[kind][1])
    x = lambda op: dict(op[1])["x"][0]
    # chunk 1: each output is a cast of the crossing value, which was renamed <name>_1 to keep names unique
    casts1 = [op for op in ops1 if op[0] == "cast" and op[2][0][0] in out1]
    assert len(casts1) == len(out1)
    # chunk 2: each crossing input is cast back before use
    crossing = set(in2) - set(whole_in)
    casts2 = [op for op in ops2 if op[0] == "cast" and x(op) in crossing]
    assert len(casts2) == len(crossing) == len(out1)
    fp32, fp16 = str(types.fp32), str(types.fp16)
    assert all(op[2][0][1] == fp32 for op in casts1) and all(op[2][0][1] == fp16 for op in casts2)
    _rename(ops1, {x(op): op[2][0][0] for op in casts1})
    _rename(ops2, {op[2][0][0]: x(op) for op in casts2})
    added = {id(op) for op in casts1 + casts2}
    key = lambda op: repr(op)
    got = sorted(key(op) for op in ops1 + ops2 if id(op) not in added)
    assert got == sorted(map(key, whole_ops))


# ------------------------------------------------------------------ metadata, errors, reruns
@pytest.mark.slow
def test_metadata_is_carried_with_the_chunk_number(unets, chunks):
    whole = open_package(unets["lut4"])
    for i, chunk in enumerate(chunks["lut4"], 1):
        m = open_package(chunk)
        meta = metadata(chunk)
        assert meta["chunk"] == str(i) and meta["chunks"] == "2"
        for k, v in metadata(unets["lut4"]).items():
            if k != "weightmap":
                assert meta[k] == v, k
        assert m.short_description == whole.short_description
    one = _spec(chunks["lut4"][0]).description
    assert {f.name: f.shortDescription for f in one.input} == {f.name: f.shortDescription
                                                             for f in _spec(unets["lut4"]).description.input}


@pytest.mark.slow
def test_split_is_reproducible(unets, chunks, tmp_path):
    again = split_unet(unets["fp16"], tmp_path)
    for a, b in zip(chunks["fp16"], again):
        assert _spec(a).mlProgram == _spec(b).mlProgram
        assert (a / WEIGHTS).read_bytes() == (b / WEIGHTS).read_bytes()


def test_split_refuses_a_package_that_is_no_unet(tmp_path):
    import coremltools as ct

    m = ct.models.MLModel(str(_mixed_bit_program(tmp_path / "Unet.mlpackage")), skip_model_load=True)
    m.user_defined_metadata["sdwork.component"] = "vae_decoder"
    package = tmp_path / "VAEDecoder.mlpackage"
    m.save(str(package))
    with pytest.raises(PackageError, match="only the UNet"):
        split_unet(package, tmp_path / "out")
    with pytest.raises(PackageError, match="no Core ML package"):
        split_unet(tmp_path / "Missing.mlpackage", tmp_path / "out")
    assert not (tmp_path / "out").exists()
