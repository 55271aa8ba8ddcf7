"""Size accounting agrees with the files on disk to the byte; skipped layers are reported."""
import dataclasses
import math
import os
import shutil

import pytest
import torch

from sdwork.compress.apply import check_fits, compress, summarise_uncompressed, uncompressed_layers
from sdwork.compress.recipe import Recipe
from sdwork.coreml.sizes import SizeAccountingError, WEIGHTS, expected_lut_bytes, package_sizes
from sdwork.errors import ConfigError, PackageError


class Small(torch.nn.Module):
    """Channel counts chosen so group size 16 divides conv (64) but not lin (36), out (4) or head (8)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 64, 3)  # 4608 weights
        self.lin = torch.nn.Linear(64, 36)  # 2304: above the 2048 threshold, 36 not divisible by 16
        self.out = torch.nn.Conv2d(64, 4, 1)  # 256: below the threshold
        self.head = torch.nn.Linear(36, 8)

    def forward(self, x):
        y = self.conv(x)
        return self.head(self.lin(y.mean((2, 3)))), self.out(y)


def _convert(path, target):
    import coremltools as ct

    torch.manual_seed(0)
    ep = torch.export.export(Small().eval(), (torch.randn(1, 8, 10, 10),)).run_decompositions({})
    ml = ct.convert(ep, minimum_deployment_target=getattr(ct.target, target), compute_precision=ct.precision.FLOAT16,
                    convert_to="mlprogram", skip_model_load=True)
    ml.save(str(path))
    return path


@pytest.fixture(scope="module")
def fp16(tmp_path_factory):
    d = tmp_path_factory.mktemp("sizes")
    return {"ios18": _convert(d / "Unet.mlpackage", "iOS18"), "ios16": _convert(d / "old" / "Unet.mlpackage", "iOS16")}


def _disk_bytes(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def _check_on_disk(s):
    assert s.weight_bin_bytes == os.path.getsize(s.path / WEIGHTS)
    assert s.package_bytes == _disk_bytes(s.path)
    assert 64 + sum(l.file_bytes for l in s.layers) + s.unreferenced_bytes == s.weight_bin_bytes
    assert s.unreferenced_bytes == 0


def test_fp16_package_accounts_every_byte(fp16):
    s = package_sizes(fp16["ios18"])
    _check_on_disk(s)
    t = s.table().set_index("name")
    conv = t.loc["p_conv_weight_to_fp16"]
    assert not conv["compressed"] and conv["numel"] == 4608
    assert conv["file_bytes"] == 64 + 4608 * 2  # metadata + fp16 data, already a multiple of 64
    assert s.lut_count == 0


@pytest.mark.parametrize("recipe", [
    Recipe(nbits=4, components=("unet",)),
    Recipe(nbits=3, granularity="per_grouped_channel", group_size=16, components=("unet",)),
    Recipe(nbits=2, granularity="per_grouped_channel", group_size=4, weight_threshold=100, components=("unet",)),
    Recipe(nbits=1, components=("unet",)),  # a 2-entry LUT: coremltools writes it inline in model.mlmodel
    Recipe(nbits=4, granularity="per_grouped_channel", group_size=16, cluster_dim=2, components=("unet",)),
], ids=lambda r: r.name)
def test_palettized_sizes_match_files_and_formula(fp16, tmp_path, recipe):
    done = compress(recipe, {"unet": fp16["ios18"]}, tmp_path, progress=False)
    s = done.sizes["unet"]
    _check_on_disk(s)
    for layer in s.layers:
        if not layer.compressed:
            continue
        groups = 1 if recipe.granularity == "per_tensor" else layer.shape[0] // recipe.group_size
        assert layer.nbits == recipe.nbits and layer.lut_count == groups
        assert layer.cluster_dim == recipe.cluster_dim
        predicted = expected_lut_bytes(layer.numel, recipe.nbits, groups, recipe.cluster_dim)
        assert layer.file_bytes == predicted, layer.name
        if recipe.cluster_dim == 1:  # (vector palettization also writes its vector_axis inline)
            assert (layer.inline_bytes > 0) == (groups * 2**recipe.nbits < 10)
    assert s.summary()["n_compressed"] >= 1
    assert s.weight_bin_bytes < package_sizes(fp16["ios18"]).weight_bin_bytes


@pytest.mark.parametrize("engine", ["coremltools", "sdwork"])
def test_skipped_layers_are_listed_with_the_reason(fp16, tmp_path, engine):
    """Kinds and reasons come from the palettization pass's own report, the same for both engines."""
    r = Recipe(nbits=4, group_size=16, components=("unet",), engine=engine)
    done = compress(r, {"unet": fp16["ios18"]}, tmp_path, progress=False)
    layers = {l["name"]: l for l in uncompressed_layers(done)}
    lin = layers["p_lin_weight_to_fp16"]
    assert lin["kind"] == "channels_not_divisible"
    assert lin["reason"] == "36 channels on axis 0 not divisible by group_size 16"
    assert layers["p_out_weight_to_fp16"]["kind"] == "below_threshold"
    assert layers["p_conv_bias_to_fp16"]["kind"] == "one_d"
    assert "p_conv_weight_to_fp16" not in layers
    report = done.reports["unet"].set_index("op")
    for name, layer in layers.items():
        assert (layer["kind"], layer["reason"]) == tuple(report.loc[name, ["kind", "reason"]]), name
        assert set(layer) == {"component", "name", "torch_name", "shape", "numel", "kind", "reason"}
    summary = summarise_uncompressed(list(layers.values()))
    assert summary["channels_not_divisible"] == {"layers": 1, "weights": 2304}
    # the skipped weight is counted at fp16 size in the file
    s = done.sizes["unet"].table().set_index("name")
    assert s.loc["p_lin_weight_to_fp16", "file_bytes"] == 64 + 2304 * 2


def test_reasons_without_a_pass_report_are_derived(fp16, tmp_path):
    """The torch engine and DKM packages have no pass report: the recipe gives the same kinds."""
    r = Recipe(nbits=4, group_size=16, components=("unet",), overrides={"p_head_weight_to_fp16": None})
    done = compress(r, {"unet": fp16["ios18"]}, tmp_path, progress=False)
    reported = {l["name"]: l["kind"] for l in uncompressed_layers(done)}
    derived = {l["name"]: l["kind"] for l in uncompressed_layers(dataclasses.replace(done, reports={}))}
    assert reported == derived and reported["p_head_weight_to_fp16"] == "override"


def test_ios16_package(fp16, tmp_path):
    done = compress(Recipe(nbits=4, components=("unet",)), {"unet": fp16["ios16"]}, tmp_path, progress=False)
    s = done.sizes["unet"]
    _check_on_disk(s)
    conv = next(l for l in s.layers if l.name == "p_conv_weight_to_fp16")
    assert conv.compressed and conv.nbits == 4 and conv.lut_count == 1
    assert conv.file_bytes + conv.inline_bytes > 0 and conv.bits_per_weight < 5


def test_recipe_needing_ios18_refuses_an_ios16_package(fp16, tmp_path):
    r = Recipe(nbits=4, granularity="per_grouped_channel", group_size=16, components=("unet",))
    with pytest.raises(ValueError, match="needs deployment target iOS18.*re-convert"):
        compress(r, {"unet": fp16["ios16"]}, tmp_path, progress=False)


def test_missing_package_and_unknown_override(fp16, tmp_path):
    with pytest.raises(ValueError, match=r"no converted package was given for them.*text_encoder"):
        compress(Recipe(nbits=4), {"unet": fp16["ios18"]}, tmp_path)
    bad = Recipe(nbits=4, components=("unet",), overrides={"p_nothing_weight": None})
    with pytest.raises(ValueError, match="p_nothing_weight"):
        compress(bad, {"unet": fp16["ios18"]}, tmp_path)


def test_a_recipe_that_fits_no_layer_is_an_error(fp16, tmp_path):
    r = Recipe(nbits=4, granularity="per_grouped_channel", group_size=128, components=("unet",))
    with pytest.raises(ValueError, match=r"compressed no weight of unet.*not divisible by group_size 128"):
        compress(r, {"unet": fp16["ios18"]}, tmp_path, progress=False)


def test_override_keeps_a_layer_dense(fp16, tmp_path):
    r = Recipe(nbits=4, components=("unet",), overrides={"p_conv_weight_to_fp16": None})
    done = compress(r, {"unet": fp16["ios18"]}, tmp_path, progress=False)
    layers = {l["name"]: l for l in uncompressed_layers(done)}
    assert layers["p_conv_weight_to_fp16"]["kind"] == "override"
    assert not any(l.compressed and l.name == "p_conv_weight_to_fp16" for l in done.sizes["unet"].layers)


def test_damaged_weight_file_is_an_error(fp16, tmp_path):
    copy = tmp_path / "Unet.mlpackage"
    shutil.copytree(fp16["ios18"], copy)
    with open(copy / WEIGHTS, "ab") as f:
        f.write(b"\0" * 100)  # trailing garbage: no longer header + blobs
    with pytest.raises(SizeAccountingError):
        package_sizes(copy)
    with pytest.raises(PackageError, match="not an ML program package"):
        package_sizes(tmp_path)


@pytest.fixture(scope="module")
def tiny_pipe():
    from conftest import tiny_specs
    from sdwork.load import load_pipeline

    return load_pipeline(tiny_specs()[0], progress=False)


def test_check_fits_refuses_sizes_that_divide_no_layer(tiny_pipe):
    """Before any work: a group_size or cluster_dim that divides no output channel count names the fix."""
    with pytest.raises(ConfigError, match=r"group_size=7 divides the output channels of no layer of unet"
                                          r".*use a group_size that divides them, e.g. one of \[2, 4, 8"):
        check_fits(Recipe(nbits=4, group_size=7), tiny_pipe)
    with pytest.raises(ConfigError, match="cluster_dim=3 divides the output channels of no layer"):
        check_fits(Recipe(nbits=4, cluster_dim=3), tiny_pipe)
    with pytest.raises(ConfigError, match="no weight above weight_threshold"):
        check_fits(Recipe(nbits=4, weight_threshold=10**9), tiny_pipe)
    check_fits(Recipe(nbits=4, group_size=16), tiny_pipe)  # fits: no error
    check_fits(Recipe(nbits=4, components=("unet", "vae_decoder")), tiny_pipe)


def test_formula():
    # 4608 4-bit indices = 2304 bytes (+64 metadata); 4 LUTs x 16 fp16 entries = 128 bytes (+64)
    assert expected_lut_bytes(4608, 4, 4) == 2368 + 192
    assert expected_lut_bytes(100, 1, 1) == 64 + 64  # 13 bytes of indices padded; 2-entry LUT inline
    assert math.isclose(8 * expected_lut_bytes(10**6, 4, 1) / 10**6, 4.0, rel_tol=1e-3)
