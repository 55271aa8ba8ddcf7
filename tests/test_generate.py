"""Generation is bit-identical across processes; the fp16 baseline cache is keyed by what it depends on."""
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sdwork.generate as sg
from sdwork.generate import GenSettings, baseline_key, fp16_baseline, generate
from sdwork.load import load_pipeline

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = GenSettings(prompts=("a small red circle on a gray background",), seeds=(0, 1), steps=2, guidance=5.0)
CHILD = """
import sys, numpy as np
from sdwork.generate import GenSettings, generate
from sdwork.load import load_pipeline
s = GenSettings(prompts=("a small red circle on a gray background",), seeds=(0, 1), steps=2, guidance=5.0)
np.save(sys.argv[1], generate(load_pipeline("tiny-random", progress=False), s, progress=False))
"""


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny-random", progress=False)


def test_images_are_bit_identical_in_a_new_process(pipe, tmp_path):
    here = generate(pipe, SETTINGS, progress=False)
    assert here.dtype == np.uint8 and here.shape == (2, 64, 64, 3)
    assert not np.array_equal(here[0], here[1])  # different seeds, different images
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "child.npy")], check=True, env=env, cwd=tmp_path)
    there = np.load(tmp_path / "child.npy")
    assert np.array_equal(here, there), "same inputs gave different images in a new process"


def test_an_image_does_not_depend_on_the_rest_of_the_grid(pipe):
    both = generate(pipe, SETTINGS, progress=False)
    one = generate(pipe, dataclasses.replace(SETTINGS, seeds=(1,)), progress=False)
    assert np.array_equal(both[1], one[0])


def test_baseline_key_changes_with_every_input(pipe):
    key = baseline_key(pipe, SETTINGS)
    assert key == baseline_key(pipe, GenSettings(**dataclasses.asdict(SETTINGS)))
    for change in (dict(seeds=(0, 2)), dict(steps=3), dict(guidance=7.0), dict(prompts=("a",)), dict(height=72)):
        assert baseline_key(pipe, dataclasses.replace(SETTINGS, **change)) != key, change
    other = load_pipeline("tiny-random", progress=False)
    with __import__("torch").no_grad():
        other.unet.conv_out.bias.add_(1.0)
    assert baseline_key(other, SETTINGS) != key  # different weights
    other.model_spec = "another-model"
    assert baseline_key(other, SETTINGS) != baseline_key(pipe, SETTINGS)


def test_fp16_baseline_is_generated_once(pipe, tmp_path, monkeypatch):
    calls = []
    real = sg.generate
    monkeypatch.setattr(sg, "generate", lambda p, s, progress=True: calls.append(s) or real(p, s, progress))
    first = fp16_baseline(pipe, SETTINGS, cache_dir=tmp_path, progress=False)
    assert len(calls) == 1 and len(list(tmp_path.glob("*.npz"))) == 1
    again = fp16_baseline(pipe, SETTINGS, cache_dir=tmp_path, progress=False)
    assert len(calls) == 1 and np.array_equal(first, again)  # a hit: read, not regenerated
    fp16_baseline(pipe, dataclasses.replace(SETTINGS, seeds=(3,)), cache_dir=tmp_path, progress=False)
    assert len(calls) == 2 and len(list(tmp_path.glob("*.npz"))) == 2  # other seeds: a miss
    fresh = load_pipeline("tiny-random", progress=False)  # not yet rounded: rounding happens inside
    assert np.array_equal(fp16_baseline(fresh, SETTINGS, cache_dir=tmp_path, progress=False), first)
    assert len(calls) == 2


def test_cpu_key_is_unchanged_by_the_device_field(pipe):
    """device='cpu' adds nothing to the baseline key: baselines cached before devices existed stay valid."""
    assert "device" not in sg._settings_key(SETTINGS)
    # batch_size=1 (the default) is left out as well: it came later and changes no image
    assert sg._settings_key(SETTINGS) == {k: v for k, v in dataclasses.asdict(SETTINGS).items()
                                          if k not in ("device", "batch_size")}


def test_a_missing_device_is_refused_before_work(pipe):
    import torch

    from sdwork.errors import ConfigError, EngineError

    with pytest.raises(ConfigError, match="device must be one of 'cpu', 'cuda', 'mps', 'auto', got 'gpu'"):
        GenSettings(prompts=("a",), seeds=(0,), device="gpu")
    assert sg.resolve_device("auto") in ("cuda", "mps", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match=r"device='cuda', but this machine's torch .* sees no cuda device"):
            generate(pipe, dataclasses.replace(SETTINGS, device="cuda"), progress=False)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_images_are_deterministic_and_keyed_apart(pipe):
    """On a GPU: fp16 compute, bit-identical reruns, a baseline key of its own, the pipeline back on
    the CPU in fp32 after."""
    import torch

    cuda = dataclasses.replace(SETTINGS, device="cuda")
    first, again = generate(pipe, cuda, progress=False), generate(pipe, cuda, progress=False)
    assert np.array_equal(first, again)
    assert baseline_key(pipe, cuda) != baseline_key(pipe, SETTINGS)
    assert next(pipe.unet.parameters()).device.type == "cpu" and pipe.unet.dtype == torch.float32
    # same initial noise (drawn on the CPU), fp16 compute: close to the CPU's images, not equal
    cpu = generate(pipe, SETTINGS, progress=False)
    assert np.abs(first.astype(int) - cpu.astype(int)).mean() < 8
