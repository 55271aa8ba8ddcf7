"""Batched generation, the resolved thread default and the step-level progress bar, on tiny-random."""
import numpy as np
import pytest

import sdwork.generate as G
from sdwork.generate import GenSettings, baseline_key, generate
from sdwork.load import load_pipeline
from sdwork.weights import round_weights_to_fp16

PROMPTS = ("a small red circle on a gray background", "a large blue square on a white background")


@pytest.fixture(scope="module")
def pipe():
    return round_weights_to_fp16(load_pipeline("tiny-random", progress=False))


@pytest.mark.parametrize("batch", [2, 3])
def test_batched_images_are_deterministic_and_within_one_level_of_unbatched(pipe, batch):
    """Not bit-identical on the CPU: oneDNN picks other kernels for another batch, and about 2 pixels in
    100,000 move by one level (PSNR 95 dB on the embedded model, 20 steps). Hence batch_size is keyed."""
    one = GenSettings(PROMPTS, (0, 1), steps=2, threads=1)
    many = GenSettings(PROMPTS, (0, 1), steps=2, threads=1, batch_size=batch)  # 3: a short last batch
    a, b = generate(pipe, one, progress=False), generate(pipe, many, progress=False)
    assert a.shape == b.shape == (4, *a.shape[1:])
    assert np.abs(a.astype(int) - b).max() <= 1 and (a != b).mean() < 1e-3
    assert np.array_equal(b, generate(pipe, many, progress=False))  # the same batches: the same bits
    assert baseline_key(pipe, many) != baseline_key(pipe, one)


def test_batch_size_is_validated():
    with pytest.raises(ValueError, match="batch_size"):
        GenSettings(PROMPTS, (0,), batch_size=0)


def test_default_settings_keep_the_keys_made_before_threads_and_batches_changed(pipe):
    s = GenSettings(PROMPTS, (0,))
    assert s.threads is None and s.resolved(pipe).threads == 1  # the embedded model's UNet is small
    assert s.resolved(pipe).key_fields() == dict(
        prompts=PROMPTS, seeds=(0,), steps=20, guidance=5.0, height=None, width=None, threads=1,
        negative_prompt="", device="cpu")  # the fields (and values) every key had before
    assert baseline_key(pipe, s) == baseline_key(pipe, GenSettings(PROMPTS, (0,), threads=1))
    assert "batch_size" in GenSettings(PROMPTS, (0,), batch_size=2).key_fields()


def test_a_large_unet_gets_every_usable_cpu(monkeypatch, pipe):
    monkeypatch.setattr(G, "SMALL_UNET_PARAMS", 1)
    assert GenSettings(PROMPTS, (0,)).resolved(pipe).threads == G.default_threads(pipe) >= 1
    assert GenSettings(PROMPTS, (0,), threads=1).resolved(pipe).threads == 1  # an explicit count is kept


class _Bar:
    """Records what generate tells its progress bar."""
    made = []

    def __init__(self, total=None, disable=False, **kw):
        self.total, self.disable, self.n = total, disable, 0
        _Bar.made.append(self)

    def update(self, k=1):
        self.n += k

    def set_postfix_str(self, _):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False


@pytest.mark.parametrize("batch", [1, 2])
def test_the_progress_bar_counts_every_step_of_every_image(monkeypatch, pipe, batch):
    monkeypatch.setattr(G, "tqdm", _Bar)
    _Bar.made.clear()
    generate(pipe, GenSettings(PROMPTS, (0, 1), steps=3, threads=1, batch_size=batch), progress=True)
    (bar,) = _Bar.made
    assert bar.total == 4 * 3 and bar.n == 4 * 3 and not bar.disable
    generate(pipe, GenSettings(PROMPTS, (0,), steps=1, threads=1), progress=False)
    assert _Bar.made[-1].disable
