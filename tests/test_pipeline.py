"""Loading a pipeline: the embedded default, folders, hub ids, and the errors that name the fix."""
import pytest
import torch

import sdwork.load as sl
from sdwork import paths
from sdwork.load import ModelNotFoundError, load_pipeline
from sdwork.weights import components, round_weights_to_fp16, weights_hash


@pytest.fixture(scope="module")
def random_pipe():
    return load_pipeline("tiny-random", progress=False)


def test_missing_folder_is_a_clear_error():
    with pytest.raises(ModelNotFoundError, match="no model folder at .*check the path"):
        load_pipeline("/nonexistent/sdwork-model")


def test_folder_without_model_index_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no model_index.json"):
        load_pipeline(tmp_path)


def test_hub_id_offline_says_to_download_or_pass_a_folder():
    with pytest.raises(ModelNotFoundError, match="offline.*download it first.*local folder"):
        load_pipeline("sdwork-test/no-such-model")


def test_missing_embedded_model_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "TINY", tmp_path / "tiny-sd")
    with pytest.raises(ModelNotFoundError, match="python -m sdwork.tiny.train"):
        load_pipeline("tiny")


def test_tiny_resolves_to_the_embedded_folder(random_pipe, tmp_path, monkeypatch):
    random_pipe.save_pretrained(tmp_path / "tiny-sd", safe_serialization=True)
    assert not list(tmp_path.rglob("*.bin"))  # safetensors only
    monkeypatch.setattr(paths, "TINY", tmp_path / "tiny-sd")
    assert sl.resolve_spec("tiny") == str(tmp_path / "tiny-sd")
    pipe = load_pipeline("tiny", progress=False)
    assert pipe.model_spec == "tiny" and weights_hash(pipe) == weights_hash(random_pipe)


@pytest.mark.skipif(not (paths.TINY / "model_index.json").exists(), reason="data/models/tiny-sd not trained yet")
def test_the_real_embedded_model_loads():
    pipe = load_pipeline("tiny", progress=False)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64


def test_tiny_random_is_reproducible_and_ignores_the_global_seed(random_pipe):
    torch.manual_seed(123)
    again = load_pipeline("tiny-random", progress=False)
    assert weights_hash(again) == weights_hash(random_pipe)


def test_fp16_rounding_makes_every_weight_exact_in_fp16():
    pipe = load_pipeline("tiny-random", progress=False)
    before = weights_hash(pipe)
    round_weights_to_fp16(pipe)
    assert weights_hash(pipe) != before
    for module in components(pipe).values():
        for t in module.state_dict().values():
            if t.is_floating_point():
                assert t.dtype == torch.float32 and torch.equal(t, t.half().float())
