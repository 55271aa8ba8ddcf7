"""Linear quantization, pruning and joint compression (issue 20): recipes and their errors,
exact sizes of every on-disk form, decoding against coremltools' own, rows of a sweep, resume.

Sizes and decoding run on a four-layer model converted once here; the sweep rows on the
tiny-random text encoder (0.14 M weights), as tests/test_sweep.py does.
"""
import json

import numpy as np
import pytest
import torch

from sdwork import hooks
from sdwork.compress.apply import check_fits, compress, partial_layers, uncompressed_layers
from sdwork.compress.recipe import LayerSpec, Recipe
from sdwork.coreml import sizes as S
from sdwork.coreml.decode import decode_package
from sdwork.errors import ConfigError, PackageError
from sdwork.experiments.grids import expand, load_grid

UNET = ("unet",)


# --- recipes --------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, name, family, target", [
    (dict(linear_bits=8), "int8-pc", "linear", "iOS16"),
    (dict(linear_bits=8, linear_granularity="per_tensor"), "int8-pt", "linear", "iOS16"),
    (dict(linear_bits=4, block_size=32), "int4-b32", "linear", "iOS18"),
    (dict(linear_bits=8, block_size=64, linear_mode="linear"), "int8-b64-zp", "linear", "iOS18"),
    (dict(sparsity=0.5), "sp50", "prune", "iOS16"),
    (dict(sparsity=0.875), "sp87.5", "prune", "iOS16"),
    (dict(n_m=[2, 4]), "nm2-4", "prune", "iOS16"),
    (dict(sparsity=0.5, nbits=4, group_size=16), "sp50-km4-g16", "joint", "iOS18"),
    (dict(nbits=4, group_size=16, lut_dtype="int8"), "km4-g16-lut8", "joint", "iOS18"),
    (dict(sparsity=0.75, linear_bits=8), "sp75-int8-pc", "joint", "iOS18"),
    (dict(nbits=4, overrides={"w": {"linear_bits": 8}}), None, "mixed", "iOS16"),
    (dict(nbits=4, group_size=16), "km4-g16", "palettize", "iOS18"),
])
def test_recipe_of_each_family(kwargs, name, family, target):
    r = Recipe(**kwargs)
    assert r.family == family and r.min_target == target
    if name:
        assert r.name == name
    back = Recipe.from_json(r.to_json())
    assert back == r and back.name == r.name and hash(back) == hash(r)


def test_palettization_keeps_its_name_and_dict():
    """Earlier rows are keyed by to_dict(): palettization alone must not grow new keys."""
    r = Recipe(nbits=4, group_size=16, overrides={"p_a": (8, "per_tensor", None)})
    assert r.to_dict() == dict(nbits=4, granularity="per_grouped_channel", group_size=16, cluster_dim=1,
                               mode="kmeans", weight_threshold=2048, components=["text_encoder", "unet"],
                               engine="coremltools",
                               overrides={"p_a": dict(nbits=8, granularity="per_tensor", group_size=None)})
    assert r.name.startswith("km4-g16-ov1-")


def test_engine_is_one_name_without_palettization():
    """The engine only picks the k-means: a linear recipe is the same row whatever it says."""
    assert Recipe(linear_bits=8, engine="sdwork") == Recipe(linear_bits=8)
    assert Recipe(sparsity=0.5, nbits=4, engine="sdwork").name == "sp50-km4-pt-sdwork"


def test_overrides_mix_families_per_layer():
    r = Recipe(sparsity=0.5, nbits=4, group_size=16, overrides={"a": LayerSpec(linear_bits=4, block_size=32),
                                                                "b": {"nbits": 8}, "c": None})
    assert r.for_layer("a").stages == ("linear",) and r.for_layer("a").block_size == 32
    assert r.for_layer("b").stages == ("palettize",)  # an override is the layer's whole plan: not pruned
    assert r.for_layer("c") is None and r.for_layer("other").stages == ("prune", "palettize")
    assert r.family == "joint" and r.stages == ("prune", "palettize", "linear")
    cfg = r.for_layer("a").stage_configs()["linear"]
    assert (cfg.block_size, cfg.granularity.name, cfg.weight_threshold) == (32, "PER_BLOCK", 2048)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity=0), r"sparsity must be a fraction strictly between 0 and 1"),
    (dict(sparsity=1.0), r"strictly between 0 and 1"),
    (dict(sparsity=-0.5), r"strictly between 0 and 1"),
    (dict(sparsity="half"), r"strictly between 0 and 1"),
    (dict(sparsity=0.5, n_m=(2, 4)), "not both"),
    (dict(n_m=(4, 4)), r"needs 0 < n < m"),
    (dict(n_m=(0, 4)), r"needs 0 < n < m"),
    (dict(n_m=4), r"n_m must be two whole numbers"),
    (dict(linear_bits=6), "linear_bits=6 is not supported"),
    (dict(linear_bits=4, block_size=1), "block_size, a whole number >= 2"),
    (dict(linear_bits=4, linear_granularity="per_block"), "needs block_size"),
    (dict(linear_bits=4, linear_granularity="per_channel", block_size=32), "only applies to linear_granularity"),
    (dict(linear_bits=4, linear_mode="asymmetric"), "linear_mode must be one of"),
    (dict(block_size=32), "needs linear_bits"),
    (dict(group_size=16, sparsity=0.5), "palettization setting, which needs nbits"),
    (dict(lut_dtype="int8", sparsity=0.5), "palettization settings, which need nbits"),
    (dict(nbits=4, lut_dtype="int4"), "lut_dtype must be one of"),
    (dict(nbits=2, lut_dtype="int8"), "never quantizes it"),
    (dict(nbits=4, linear_bits=8), "pick one"),
    (dict(), "needs a compression"),
    (dict(sparsity=0.5, engine="torch"), "engine='torch'.*only palettizes"),
    (dict(nbits=4, overrides={"w": {"sparsity": 2}}), "override: sparsity"),
    (dict(nbits=4, overrides={"w": {"bits": 4}}), r"override for 'w': unknown key"),
    (dict(nbits=4, overrides={"w": {}}), "override: needs a compression.*or None"),
])
def test_invalid_family_recipes_name_the_problem(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Recipe(**kwargs)


def test_targets_lacking_a_familys_ops():
    Recipe(linear_bits=8).check_target("iOS16")
    Recipe(sparsity=0.5).check_target("iOS17")
    with pytest.raises(ConfigError, match=r"int4-b32 needs deployment target iOS18 for int4 per_block .*"
                                          r"iOS17 lacks those ops.*target='iOS18'"):
        Recipe(linear_bits=4, block_size=32).check_target("iOS17")
    with pytest.raises(ConfigError, match="joint compression"):
        Recipe(sparsity=0.5, nbits=4).check_target("iOS16")
    with pytest.raises(ConfigError, match="iOS16"):
        Recipe(linear_bits=8).check_target("iOS15")
    with pytest.raises(ConfigError, match="target must be one of"):
        Recipe(linear_bits=8).check_target("iOS99")


def test_grids_mix_families():
    g = load_grid("families")
    names = [r.name for r in g.recipes]
    assert len(names) == len(set(names)) == 12
    assert {r.family for r in g.recipes} == {"palettize", "linear", "prune", "joint"}
    for n in ("int8-pc", "int4-b32", "int4-b64", "sp50", "sp75", "nm2-4", "sp50-km4-g16-sdwork", "km4-g16-lut8-sdwork"):
        assert n in names
    rs = expand({"n_m": [2, 4], "nbits": [None, 4]})  # one n:m pair, not a product over 2 and 4
    assert [r.name for r in rs] == ["nm2-4", "nm2-4-km4-pt"]
    assert len(expand({"sparsity": [0.5, 0.75], "linear_bits": [8, None]})) == 4


# --- a small converted model: exact sizes, decoding, reasons ---------------------------


class Four(torch.nn.Module):
    """Input channels chosen per family: conv_a's 6 inputs fit no block of 32 and no 2:4 groups,
    lin's 36 outputs no LUT group of 16; head is below the 2048-element threshold."""

    def __init__(self):
        super().__init__()
        self.conv_a = torch.nn.Conv2d(6, 64, 3)  # 3456 weights
        self.conv_b = torch.nn.Conv2d(64, 64, 3)  # 36864
        self.lin = torch.nn.Linear(64, 36)  # 2304
        self.head = torch.nn.Linear(36, 8)  # 288

    def forward(self, x):
        y = self.conv_b(self.conv_a(x))
        return self.head(self.lin(y.mean((2, 3))))


def _convert(path, target):
    import coremltools as ct

    torch.manual_seed(0)
    ep = torch.export.export(Four().eval(), (torch.randn(1, 6, 12, 12),)).run_decompositions({})
    ml = ct.convert(ep, minimum_deployment_target=getattr(ct.target, target), compute_precision=ct.precision.FLOAT16,
                    convert_to="mlprogram", skip_model_load=True)
    ml.save(str(path))
    return path


@pytest.fixture(scope="module")
def fp16(tmp_path_factory):
    d = tmp_path_factory.mktemp("families")
    return {"iOS18": _convert(d / "Unet.mlpackage", "iOS18"), "iOS16": _convert(d / "old" / "Unet.mlpackage", "iOS16")}


def _compress(fp16, tmp_path, target="iOS18", **kw):
    return compress(Recipe(components=UNET, **kw), {"unet": fp16[target]}, tmp_path, progress=False)


def _layers(done):
    return {l.name.removeprefix("p_").removesuffix("_weight_to_fp16"): l for l in done.sizes["unet"].layers}


def _check_file(s):
    """Header + every blob charged to a layer = weight.bin, to the byte."""
    assert s.weight_bin_bytes == (s.path / S.WEIGHTS).stat().st_size
    assert 64 + sum(l.file_bytes for l in s.layers) + s.unreferenced_bytes == s.weight_bin_bytes
    assert s.unreferenced_bytes == 0


def _scales(layer, block):
    """Scales of a per-channel (block None) or per-block weight: blocks run along input axis 1."""
    return layer.shape[0] * (1 if block is None else layer.shape[1] // block)


FORMS = {  # recipe -> (the form each compressed layer must have, its predicted weight.bin bytes)
    "int8-pc": (dict(linear_bits=8), lambda l: S.expected_linear_bytes(l.numel, 8, _scales(l, None))),
    "int8-pc-zp": (dict(linear_bits=8, linear_mode="linear"),
                   lambda l: S.expected_linear_bytes(l.numel, 8, _scales(l, None), zero_points=True)),
    "int4-b32": (dict(linear_bits=4, block_size=32), lambda l: S.expected_linear_bytes(l.numel, 4, _scales(l, 32))),
    "sp50": (dict(sparsity=0.5), lambda l: S.expected_sparse_bytes(l.numel, l.nonzero)),
    "nm2-4": (dict(n_m=(2, 4)), lambda l: S.expected_sparse_bytes(l.numel, l.numel // 2)),
    "sp50-km4-g16": (dict(sparsity=0.5, nbits=4, group_size=16, engine="sdwork"),
                     lambda l: S.expected_sparse_lut_bytes(l.numel, l.nonzero, 4, l.shape[0] // 16)),
    "km4-g16-lut8": (dict(nbits=4, group_size=16, lut_dtype="int8"),
                     lambda l: S.expected_int8_lut_bytes(l.numel, 4, l.shape[0] // 16)),
    "sp50-km4-g16-lut8": (dict(sparsity=0.5, nbits=4, group_size=16, lut_dtype="int8", engine="sdwork"),
                          lambda l: S.expected_sparse_lut_bytes(l.numel, l.nonzero, 4, l.shape[0] // 16, lut_bits=8)),
    "sp50-int8-pc": (dict(sparsity=0.5, linear_bits=8),
                     lambda l: S.expected_sparse_linear_bytes(l.numel, l.nonzero, 8, _scales(l, None))),
}


@pytest.mark.parametrize("form", FORMS)
def test_size_formula_of_each_form_matches_the_file(fp16, tmp_path, form):
    kwargs, predict = FORMS[form]
    done = _compress(fp16, tmp_path, **kwargs)
    s = done.sizes["unet"]
    _check_file(s)
    compressed = [l for l in s.layers if l.compressed]
    assert compressed
    for l in compressed:
        if l.family == done.recipe.family:
            assert l.file_bytes == predict(l), l.name
        else:  # a joint recipe's weight whose second stage was skipped: pruned only
            assert done.recipe.family == "joint" and l.family == "prune", l.name
            assert l.file_bytes == S.expected_sparse_bytes(l.numel, l.nonzero), l.name
        if l.nonzero is not None:
            assert l.sparsity == pytest.approx(0.5, abs=0.01)
        if l.quant_bits is not None:
            assert l.quant_bits == kwargs["linear_bits"] and l.zero_points == (kwargs.get("linear_mode") == "linear")
        if l.nbits is not None:
            assert l.lut_dtype == ("int8" if "lut8" in form else "float16") and l.lut_count == l.shape[0] // 16
    assert s.weight_bin_bytes < S.package_sizes(fp16["iOS18"]).weight_bin_bytes or form in ("sp50", "nm2-4")


def test_formulas():
    # 2304 int8 values + 36 fp16 scales; the same at int4 per block of 32 inputs (72 scales)
    assert S.expected_linear_bytes(36 * 64, 8, 36) == (64 + 2304) + (64 + 128)
    assert S.expected_linear_bytes(36 * 64, 4, 72) == (64 + 1152) + (64 + 192)
    # 50% sparse: 1 mask bit and half an fp16 value per weight, 9 bits in all
    assert 8 * S.expected_sparse_bytes(10**6, 5 * 10**5) / 10**6 == pytest.approx(9.0, abs=0.01)
    assert 8 * S.expected_sparse_lut_bytes(10**6, 5 * 10**5, 4, 1) / 10**6 == pytest.approx(3.0, abs=0.01)
    assert S.part_bytes(9, 16) == 0 and S.part_bytes(10, 16) == 128  # under 10 elements: inline


def test_reasons_for_what_each_family_left_dense(fp16, tmp_path):
    kinds = lambda done: {l["name"]: l["kind"] for l in uncompressed_layers(done)}
    lin4 = kinds(_compress(fp16, tmp_path / "a", linear_bits=4, block_size=32))
    assert lin4["p_conv_a_weight_to_fp16"] == "block_not_divisible" and lin4["p_head_weight_to_fp16"] == "below_threshold"
    nm = {l["name"]: l for l in uncompressed_layers(_compress(fp16, tmp_path / "b", n_m=(2, 4)))}
    assert nm["p_conv_a_weight_to_fp16"]["kind"] == "nm_not_divisible"
    assert "6 input channels on axis 1 not divisible by m=4" in nm["p_conv_a_weight_to_fp16"]["reason"]
    # pruned, then palettized: lin's 36 channels fit no group of 16, so it is pruned only
    done = _compress(fp16, tmp_path / "c", sparsity=0.5, nbits=4, group_size=16, engine="sdwork")
    part = {l["name"]: l for l in partial_layers(done)}
    assert part["p_lin_weight_to_fp16"]["done"] == "prune" and part["p_lin_weight_to_fp16"]["skipped"] == "palettize"
    assert part["p_lin_weight_to_fp16"]["kind"] == "channels_not_divisible"
    assert _layers(done)["lin"].family == "prune"


def test_a_later_stage_never_compresses_what_an_earlier_one_skipped(fp16, tmp_path):
    """coremltools' own chaining (palettize, then linear_quantize_weights with joint_compression
    and a global config) quantizes the layer palettization skipped to per-tensor int8; sdwork's not."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    done = _compress(fp16, tmp_path, nbits=4, group_size=16, lut_dtype="int8")
    lin = _layers(done)["lin"]
    assert not lin.compressed and done.reports["unet"].set_index("op").loc[lin.name, "kind"] == "channels_not_divisible"
    ml = ct.models.MLModel(str(fp16["iOS18"]), skip_model_load=True)
    pal = cto.palettize_weights(ml, cto.OptimizationConfig(cto.OpPalettizerConfig(nbits=4, granularity="per_grouped_channel",
                                                                                 group_size=16)))
    theirs = cto.linear_quantize_weights(pal, cto.OptimizationConfig(cto.OpLinearQuantizerConfig(granularity="per_tensor")),
                                         joint_compression=True)
    theirs.save(str(tmp_path / "theirs.mlpackage"))
    assert _layers_of(tmp_path / "theirs.mlpackage")["lin"].family == "linear"  # the surprise this guards against


def _layers_of(path):
    return {l.name.removeprefix("p_").removesuffix("_weight_to_fp16"): l for l in S.package_sizes(path).layers}


def test_lut_stage_of_an_inline_lut_is_reported(fp16, tmp_path):
    # two 2-bit LUTs (8 entries, under 10): written inline, where coremltools does not quantize them
    lin = dict(nbits=2, group_size=18, lut_dtype="int8")
    done = _compress(fp16, tmp_path, nbits=4, lut_dtype="int8", overrides={"p_lin_weight_to_fp16": lin})
    part = {l["name"]: l for l in partial_layers(done)}
    assert part["p_lin_weight_to_fp16"]["kind"] == "lut_inline"


@pytest.mark.parametrize("target, kwargs", [
    ("iOS18", dict(linear_bits=8)), ("iOS18", dict(linear_bits=4, block_size=32, linear_mode="linear")),
    ("iOS18", dict(sparsity=0.5)), ("iOS18", dict(n_m=(2, 4))),
    ("iOS18", dict(sparsity=0.5, nbits=4, group_size=16, engine="sdwork")),
    ("iOS18", dict(nbits=4, group_size=16, lut_dtype="int8")),
    ("iOS18", dict(sparsity=0.5, nbits=4, group_size=16, lut_dtype="int8", engine="sdwork")),
    ("iOS18", dict(sparsity=0.5, linear_bits=4, block_size=32)),
    ("iOS18", dict(nbits=4, group_size=16)),
    ("iOS16", dict(linear_bits=8)), ("iOS16", dict(sparsity=0.75)), ("iOS16", dict(nbits=4)),
], ids=lambda v: v if isinstance(v, str) else Recipe(**v).name)
def test_decoder_agrees_with_coremltools_decompress_weights(fp16, tmp_path, target, kwargs):
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    from sdwork.coreml.package import package_weights

    done = _compress(fp16, tmp_path, target, **kwargs)
    pkg = done.packages["unet"]
    ours = decode_package(pkg)
    theirs = package_weights(cto.decompress_weights(ct.models.MLModel(str(pkg), skip_model_load=True)))
    compressed = {l.name for l in done.sizes["unet"].layers if l.compressed}
    assert compressed and set(ours) == compressed
    for name, value in ours.items():
        assert value.dtype == theirs[name].dtype and np.array_equal(value, theirs[name]), name
    # the report's per-weight error is measured on these very values
    rep = done.reports["unet"].set_index("op") if "planned" in done.reports["unet"] else None
    if rep is not None:
        ref = package_weights(fp16[target])
        for name in compressed:
            err = np.square(ours[name].astype(np.float64) - ref[name].astype(np.float64)).sum()
            assert rep.loc[name, "sq_err_sum"] == pytest.approx(err)


def test_compress_refuses_a_target_lacking_the_ops(fp16, tmp_path):
    for kw in (dict(linear_bits=4, block_size=32), dict(sparsity=0.5, nbits=4), dict(nbits=4, lut_dtype="int8", group_size=16)):
        with pytest.raises(PackageError, match=r"needs deployment target iOS18 \(for .*\), but .* was converted for "
                                               r"an older one \(iOS16\); re-convert"):
            _compress(fp16, tmp_path, "iOS16", **kw)


@pytest.fixture(scope="module")
def tiny_pipe():
    from sdwork.load import load_pipeline

    return load_pipeline("tiny-random", progress=False)


def test_check_fits_refuses_blocks_and_groups_that_fit_no_layer(tiny_pipe):
    with pytest.raises(ConfigError, match=r"block_size=48 divides the input channels of no layer of text_encoder"):
        check_fits(Recipe(linear_bits=4, block_size=48), tiny_pipe)
    with pytest.raises(ConfigError, match=r"n_m's m=3 divides the input channels of no layer"):
        check_fits(Recipe(n_m=(1, 3)), tiny_pipe)
    check_fits(Recipe(linear_bits=4, block_size=32), tiny_pipe)
    check_fits(Recipe(n_m=(2, 4)), tiny_pipe)


# --- rows of a sweep ------------------------------------------------------------------

TE = ("text_encoder",)
ROWS = [Recipe(linear_bits=8, components=TE), Recipe(linear_bits=4, block_size=32, components=TE),
        Recipe(sparsity=0.5, components=TE), Recipe(n_m=(2, 4), components=TE),
        Recipe(sparsity=0.5, nbits=4, group_size=16, components=TE, engine="sdwork"),
        Recipe(nbits=4, group_size=16, lut_dtype="int8", components=TE, engine="sdwork")]


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    from sdwork.experiments.experiment import Experiment
    from sdwork.generate import GenSettings

    settings = GenSettings(prompts=["a small red circle on a gray background"], seeds=[0], steps=2, guidance=5.0)
    return Experiment("tiny-random", settings, None, tmp_path_factory.mktemp("fam") / "shared", progress=False)


@pytest.fixture(scope="module")
def swept(exp):
    return exp.sweep(ROWS)


@pytest.mark.slow
def test_a_recipe_of_each_family_makes_a_row(exp, swept):
    from sdwork.coreml.package import package_weights
    from sdwork.evaluate.variant import load_variant

    rows = {r["name"]: r for r in swept.to_dict("records")}
    assert list(rows) == [r.name for r in ROWS] and all(r["status"] == "ok" for r in rows.values())
    assert [rows[r.name]["family"] for r in ROWS] == ["linear", "linear", "prune", "prune", "joint", "joint"]
    assert rows["sp50-km4-g16-te-sdwork"]["stages"] == "prune+palettize"
    for r in ROWS:
        row = rows[r.name]
        pkg = exp.out / row["packages"] / "TextEncoder.mlpackage"
        assert row["bytes_text_encoder"] == (pkg / S.WEIGHTS).stat().st_size
        assert np.isfinite(row["psnr"]) and row["size_ratio"] < 1.05
        json.dumps(row)
    nm = {u["torch_name"]: u["kind"] for u in rows["nm2-4-te"]["uncompressed"]}
    assert nm["embeddings.token_embedding.weight"] == "not_conv_or_linear"  # a gather, not a conv or linear
    part = {u["torch_name"]: u for u in rows["sp50-km4-g16-te-sdwork"]["partially_compressed"]}
    assert part["embeddings.token_embedding.weight"]["skipped"] == "palettize"  # 575 rows fit no group of 16
    # evaluated from the exact decompressed weights
    pkg = exp.out / rows["sp50-te"]["packages"] / "TextEncoder.mlpackage"
    pipe = load_variant(exp.pipe, {"text_encoder": pkg})
    w = dict(pipe.text_encoder.named_parameters())["encoder.layers.0.mlp.fc1.weight"]
    name = exp.weight_maps()["text_encoder"]["encoder.layers.0.mlp.fc1.weight"]  # torch name -> const
    assert np.array_equal(w.detach().numpy().astype(np.float16), decode_package(pkg)[name])
    assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert np.array_equal(decode_package(pkg)[name], package_weights(pkg)[name])


@pytest.mark.slow
def test_a_killed_sweep_resumes_across_families(exp, swept, tmp_path):
    from sdwork.experiments.experiment import Experiment

    e = Experiment(exp.model, exp.settings, None, tmp_path, pipe=exp.pipe, progress=False)
    recipes = ROWS[:2] + ROWS[4:5]  # linear, linear, joint
    seen = []

    def crash_on_second(name):
        seen.append(name)
        if len(seen) == 2:
            raise KeyboardInterrupt("simulated interruption")

    with hooks.on("variant_compressed", crash_on_second), pytest.raises(KeyboardInterrupt):
        e.sweep(recipes)
    assert [r["name"] for r in e.done().values()] == [recipes[0].name]
    seen.clear()
    with hooks.on("variant_compressed", lambda name: seen.append(name)):
        df = e.sweep(recipes)
    assert seen == [recipes[1].name, recipes[2].name]  # the finished row was not redone
    assert list(df["family"]) == ["linear", "linear", "joint"]
    # a sweep adding a family to the finished ones runs only the new one
    seen.clear()
    with hooks.on("variant_compressed", lambda name: seen.append(name)):
        e.sweep(recipes + ROWS[2:3])
    assert seen == [ROWS[2].name]
