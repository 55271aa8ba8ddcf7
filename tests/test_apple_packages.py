"""Packages an app can ship: attention layouts through conversion and sweeps, the Core ML evaluator's
refusal off macOS, and the bad inputs of both."""
import platform
import types

import pytest

from sdwork import GenSettings, Recipe
from sdwork.convert import components as C
from sdwork.errors import ConfigError, EngineError
from sdwork.experiments.experiment import Experiment
from sdwork.load import load_pipeline

SETTINGS = GenSettings(prompts=["a small red circle on a gray background"], seeds=[0], steps=4)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny", progress=False)


def test_unknown_layouts_are_refused_with_the_choices(pipe, tmp_path):
    from sdwork.convert import convert_pipeline

    with pytest.raises(ConfigError, match=r"attention must be one of .*'split_einsum_v2'.*did you mean 'split_einsum_v2'"):
        convert_pipeline(pipe, tmp_path, attention="split_einsum_v3")
    with pytest.raises(ConfigError, match="io must be one of 'apple', 'diffusers'"):
        convert_pipeline(pipe, tmp_path, io="coreml")
    with pytest.raises(ConfigError, match="attention must be one of"):
        Experiment("tiny", SETTINGS, scorer=None, out=tmp_path / "run", pipe=pipe, attention="einsum")
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_an_sdxl_pipeline_is_refused_before_export(pipe, tmp_path):
    from sdwork.convert import convert_pipeline

    xl = types.SimpleNamespace(**{k: getattr(pipe, k) for k in ("unet", "vae", "text_encoder", "tokenizer")},
                               text_encoder_2=pipe.text_encoder)
    with pytest.raises(ConfigError, match="SDXL-style pipeline.*supports SD 1.x and 2.x"):
        convert_pipeline(xl, tmp_path / "xl")
    assert not (tmp_path / "xl").exists()


@pytest.mark.skipif(platform.system() == "Darwin", reason="on macOS the Core ML evaluator can run")
def test_the_core_ml_evaluator_is_refused_off_macos(pipe, tmp_path):
    with pytest.raises(EngineError, match=r"runs the packages with Core ML, but the Core ML runtime exists only "
                                          r"on macOS .*use evaluator='torch'"):
        Experiment("tiny", SETTINGS, scorer=None, out=tmp_path / "run", pipe=pipe, evaluator="coreml:CPU_AND_NE")
    with pytest.raises(ConfigError, match="evaluator must be one of 'torch', 'coreml:CPU_ONLY'"):
        Experiment("tiny", SETTINGS, scorer=None, out=tmp_path / "run", pipe=pipe, evaluator="ane")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_same_recipe_same_images_on_original_and_neural_engine_packages(tmp_path):
    """The layout changes the graph, not the weights: the same recipe on ORIGINAL and SPLIT_EINSUM_V2
    packages gives bit-identical images, metrics and weight bytes; each row records its layout."""
    recipe = Recipe(nbits=4, group_size=16, components=["unet"])
    rows = {}
    for attention in ("original", "split_einsum_v2"):
        exp = Experiment("tiny", SETTINGS, scorer=None, out=tmp_path / attention, attention=attention,
                         progress=False)
        v = exp.run(recipe)
        rows[attention] = (v.row, v.images)
        assert v.row["attention"] == attention and v.row["evaluator"] == "torch"
        from sdwork.coreml.package import metadata

        assert metadata(exp.fp16_packages()["unet"])["attention"] == attention
    (a, ia), (b, ib) = rows["original"], rows["split_einsum_v2"]
    assert (ia == ib).all()
    for col in ("psnr", "ssim", "size_bytes", "uncompressed"):
        assert a[col] == b[col], col


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["split_einsum", "split_einsum_v2"])
def test_neural_engine_unet_package_passes_parity(pipe, tmp_path, attention):
    """The package's exact weights back in the restructured module, against the diffusers UNet."""
    from sdwork.convert import convert_component
    from sdwork.convert.weightmap import read_weight_map
    from sdwork.evaluate.parity import parity_report

    path = convert_component(pipe, "unet", tmp_path, attention=attention, progress=False)
    wm = read_weight_map(path)
    conv_shaped = [e for e in wm.entries.values() if e.const_shape and len(e.const_shape) == 4 and len(e.shape) == 2]
    assert conv_shaped, "every Linear of the transformer blocks is a 1x1 conv in the package"
    row = parity_report(pipe, {"unet": path}, progress=False).iloc[0]
    assert row.attention == attention and row.max_weight_dev == 0 and row.linux_pass, row.to_dict()
