"""A CLIP scorer that does not fit the images is flagged (clip_valid, scorer_note), and a
downloaded CLIP folder is used as it is."""
import numpy as np
import pytest

from sdwork.evaluate.metrics import ClipScorer, score_images, scorer_columns


@pytest.fixture(scope="module")
def tiny():
    from conftest import tiny_specs

    spec = tiny_specs()[1]
    if spec != "tiny":
        pytest.skip("the embedded CLIP scorer is not in data/models")
    return ClipScorer("tiny")


def test_the_tiny_clip_fits_its_own_64px_shapes_only(tiny):
    assert tiny.image_size == 64 and tiny.mismatch(64, 64) is None
    note = tiny.mismatch(512, 512)
    assert "64x64 CLIP trained on the embedded model's procedural shapes" in note and "512x512" in note
    assert "openai/clip-vit-base-patch32" in note and "scorer=None" in note
    assert scorer_columns(tiny, 512, 512) == dict(clip_valid=False, scorer_note=note)
    assert scorer_columns(tiny, 64, 64) == dict(clip_valid=True, scorer_note=None)
    assert scorer_columns(None, 512, 512) == dict(clip_valid=None, scorer_note=None)


def test_every_image_row_says_whether_its_clip_scores_mean_something(tiny):
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (2, 128, 128, 3), dtype=np.uint8)
    table = score_images(big, big, ["a red circle"], tiny, seeds=[0, 1])
    assert not table["clip_valid"].any() and table["scorer_note"].str.contains("128x128").all()


def test_a_random_clip_is_never_valid():
    assert "random weights" in ClipScorer("tiny-random").mismatch(64, 64)


def test_a_downloaded_clip_folder_fits_sd_sized_images(tmp_path):
    """A general CLIP (224 px, as openai/clip-vit-base-patch32) saved as safetensors: fine at
    512x512, flagged when tiny images would be upscaled more than twice."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from sdwork.load import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
                     vision_config=dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(tmp_path / "clip", safe_serialization=True)
    tok.save_pretrained(tmp_path / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
        tmp_path / "clip")
    s = ClipScorer(tmp_path / "clip")
    assert s.image_size == 224 and s.domain is None and s.mismatch(512, 512) is None
    assert "upscaled more than twice" in s.mismatch(64, 64)
    images = np.random.default_rng(0).integers(0, 256, (1, 512, 512, 3), dtype=np.uint8)
    assert score_images(images, images, ["a cat"], s)["clip_valid"].all()
