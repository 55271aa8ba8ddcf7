"""The `uncompressed` column lists weights only: a const no torch parameter maps to (the text
encoder's causal mask) never counts as a weight left dense, whatever the engine's report says."""
import dataclasses

import pytest

from sdwork.compress.apply import compress, uncompressed_layers
from sdwork.compress.recipe import Recipe

TE = ("text_encoder",)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    from sdwork.convert.cache import fp16_packages
    from sdwork.convert.weightmap import load_weight_map
    from sdwork.load import load_pipeline
    from sdwork.weights import round_weights_to_fp16

    pipe = load_pipeline("tiny-random", progress=False)
    round_weights_to_fp16(pipe)
    packages = fp16_packages(pipe, ("text_encoder", "unet", "vae_decoder"), progress=False)
    out = compress(Recipe(nbits=4, group_size=16, components=TE), packages, tmp_path_factory.mktemp("u"),
                   progress=False)
    return out, {c: load_weight_map(p) for c, p in packages.items()}


def _mask(layers):
    return [l for l in layers if l["shape"] == [1, 1, 77, 77]]


def test_the_causal_mask_is_no_weight_even_when_the_report_blames_the_channels(done):
    result, maps = done
    report = result.reports["text_encoder"].copy()
    mask = _mask(uncompressed_layers(result, maps))[0]["name"]
    # what a pass says of a 77-channel const under group_size 16, for a package whose consts
    # were not told apart at compression time
    report.loc[report["op"] == mask, ["kind", "reason"]] = ["channels_not_divisible", "77 channels"]
    blamed = dataclasses.replace(result, reports={"text_encoder": report}, not_weights={})
    (m,) = _mask(uncompressed_layers(blamed, maps))
    assert m["kind"] == "not_a_weight" and m["torch_name"] is None and "not a module weight" in m["reason"]
    weights = [l for l in uncompressed_layers(blamed, maps) if l["kind"] != "not_a_weight"]
    assert all(l["torch_name"] for l in weights)  # every weight left dense is a torch parameter


def test_without_weight_maps_the_engine_report_is_all_there_is(done):
    result, _ = done
    assert all(l["torch_name"] is None for l in uncompressed_layers(result, None))
