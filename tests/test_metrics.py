"""PSNR, SSIM and CLIP similarity against hand-computed values."""
import math

import numpy as np
import pytest

from sdwork.evaluate.metrics import ClipScorer, expand_prompts, psnr, score_images, ssim


def _images(n=2, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def scorer():
    return ClipScorer("tiny-random")


def test_identical_images_give_infinite_psnr_and_ssim_one():
    img = _images(1)[0]
    with np.errstate(all="raise"):  # no divide-by-zero warning on the way
        assert psnr(img, img.copy()) == math.inf
    assert ssim(img, img.copy()) == pytest.approx(1.0, abs=1e-12)


def test_psnr_of_a_known_error_matches_the_formula():
    ref = np.full((16, 16, 3), 128, np.uint8)
    img = ref.copy()
    img[::2] += 5  # half the pixels off by +5, half by -5: MSE is exactly 25
    img[1::2] -= 5
    assert psnr(ref, img) == pytest.approx(20 * math.log10(255 / 5), abs=1e-9)  # 34.151 dB


def test_psnr_of_random_noise_matches_the_formula():
    rng = np.random.default_rng(1)
    ref = rng.integers(20, 236, (32, 32, 3), dtype=np.uint8)
    img = (ref.astype(int) + rng.integers(-10, 11, ref.shape)).astype(np.uint8)
    mse = np.mean((ref.astype(float) - img) ** 2)
    assert psnr(ref, img) == pytest.approx(10 * math.log10(255**2 / mse), abs=1e-9)


def _ssim_by_hand(x, y):
    """Wang et al. 2004 on every pixel whose 11x11 Gaussian window lies inside the image."""
    r = 5
    t = np.arange(-r, r + 1)
    g = np.exp(-(t**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for ch in range(x.shape[2]):
        a, b = x[..., ch].astype(float), y[..., ch].astype(float)
        for i in range(r, a.shape[0] - r):
            for j in range(r, a.shape[1] - r):
                pa, pb = a[i - r : i + r + 1, j - r : j + r + 1], b[i - r : i + r + 1, j - r : j + r + 1]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                cov = (w * (pa - ma) * (pb - mb)).sum()
                vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_a_direct_implementation():
    x, y = _images(2, size=15, seed=3)
    y = ((x.astype(int) + y) // 2).astype(np.uint8)  # correlated, so SSIM is far from 0 and 1
    expected = _ssim_by_hand(x, y)
    assert 0.2 < expected < 0.95
    assert ssim(x, y) == pytest.approx(expected, abs=1e-9)


def test_bad_inputs_are_named():
    img = _images(1)[0]
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(img, img[:8])
    with pytest.raises(ValueError, match="uint8"):
        psnr(img.astype(float), img.astype(float))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(img[:8, :8], img[:8, :8])
    with pytest.raises(ValueError, match="one .H, W, 3. image"):
        ssim(_images(2), _images(2))


def test_clip_cosine_of_an_image_with_itself_is_one(scorer):
    imgs = _images(3, size=64)
    same = scorer.image_image(imgs, imgs.copy())
    assert same.shape == (3,) and np.allclose(same, 1.0, atol=1e-9)
    other = scorer.image_image(imgs, imgs[::-1].copy())
    assert other[0] < 1 - 1e-6  # a different image is not a perfect match
    t = scorer.text_image(["a small red circle on a gray background"] * 3, imgs)
    assert t.shape == (3,) and np.all(np.abs(t) <= 1)
    assert "tiny-random" in scorer.name


def test_clip_scores_are_deterministic_and_batch_independent(scorer):
    imgs = _images(5, size=64, seed=9)
    a = scorer.image_image(imgs, imgs[::-1].copy())
    scorer.batch_size = 2
    try:
        b = scorer.image_image(imgs, imgs[::-1].copy())
    finally:
        scorer.batch_size = 64
    np.testing.assert_allclose(a, b, atol=1e-7)
    assert np.array_equal(a, scorer.image_image(imgs, imgs[::-1].copy()))


def test_clip_loads_from_a_saved_folder(scorer, tmp_path):
    scorer.model.save_pretrained(tmp_path, safe_serialization=True)
    scorer.tokenizer.save_pretrained(tmp_path)
    scorer.processor.save_pretrained(tmp_path)
    again = ClipScorer(tmp_path)
    imgs = _images(2, size=64, seed=4)
    prompts = ["a large blue square on a white background", "a small red circle on a gray background"]
    np.testing.assert_allclose(again.text_image(prompts, imgs), scorer.text_image(prompts, imgs), atol=1e-6)
    assert again.name == str(tmp_path)


def test_clip_errors_name_the_fix(tmp_path, monkeypatch):
    import sdwork.evaluate.metrics as m
    from sdwork.load import ModelNotFoundError

    monkeypatch.setattr(m, "TINY_CLIP", tmp_path / "missing")
    with pytest.raises(ModelNotFoundError, match="sdwork.tiny.train"):
        ClipScorer("tiny")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        ClipScorer(tmp_path)
    with pytest.raises(ModelNotFoundError, match="no CLIP model folder"):
        ClipScorer(tmp_path / "nope" / "x")
    with pytest.raises(ModelNotFoundError, match="download it first"):
        ClipScorer("sdwork-test/no-such-clip")


def test_expand_prompts_gives_seed_indices_in_grid_order():
    assert expand_prompts(["a", "b"], 6) == (["a"] * 3 + ["b"] * 3, [0, 1, 2, 0, 1, 2])
    assert expand_prompts(["a", "a", "b"], 3) == (["a", "a", "b"], [0, 1, 0])
    with pytest.raises(ValueError, match="do not fit"):
        expand_prompts(["a", "b"], 3)


def test_score_images_table(scorer):
    base = _images(4, size=64, seed=5)
    imgs = base.copy()
    imgs[1, :32] = 0
    t = score_images(base, imgs, ["p", "q"], scorer, seeds=[10, 11])
    assert list(t.columns) == ["image", "prompt", "seed_index", "seed", "psnr", "ssim",
                               "clip_image_image", "clip_text_image", "clip_model", "clip_valid", "scorer_note"]
    assert t.prompt.tolist() == ["p", "p", "q", "q"] and t.seed.tolist() == [10, 11, 10, 11]
    assert t.psnr[0] == math.inf and np.isfinite(t.psnr[1]) and t.psnr[1] < 20
    assert t.ssim[0] == pytest.approx(1.0) and t.ssim[1] < 0.9
    assert t.clip_image_image[0] == pytest.approx(1.0) and t.clip_image_image[1] < 1 - 1e-6
    no_clip = score_images(base, imgs, ["p", "q"])
    assert "clip_image_image" not in no_clip and len(no_clip) == 4
