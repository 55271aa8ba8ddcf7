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

    with pytest.raises(ConfigError, match=r"attention must be one of 'original', got 'orignal'.*did you mean 'original'"):
        convert_pipeline(pipe, tmp_path, attention="orignal")
    for ne in ("split_einsum", "split_einsum_v2"):  # named, and refused with the reason
        with pytest.raises(ConfigError, match=rf"attention='{ne}', the Neural Engine UNet, is not available yet"):
            convert_pipeline(pipe, tmp_path, attention=ne)
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
def test_rows_and_packages_record_their_layout(tmp_path):
    """Each results row says which attention layout and evaluator produced it; the fp16 packages say
    their layout and I/O contract in their metadata."""
    from sdwork.coreml.package import metadata

    exp = Experiment("tiny", SETTINGS, scorer=None, out=tmp_path / "run", progress=False)
    v = exp.run(Recipe(nbits=4, group_size=16, components=["unet"]))
    assert v.row["attention"] == "original" and v.row["evaluator"] == "torch"
    meta = metadata(exp.fp16_packages()["unet"])
    assert (meta["attention"], meta["io"]) == ("original", "apple")
