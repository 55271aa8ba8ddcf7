"""GenSettings.device through sensitivity, DKM and in-place variant evaluation. On the CPU the keys
and results are those made before devices existed; the CUDA tests skip, saying why, without a GPU."""
import json

import numpy as np
import pytest
import torch

from sdwork.errors import EngineError
from sdwork.experiments import dkm
from sdwork.experiments import sensitivity as S
from sdwork.weights import weights_hash

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
PROBE = S.ProbeSettings(prompts=S.DEFAULT_PROMPTS[:1], seeds=(0, 1), steps=2)
SMALL = dict(nbits=2, steps=2, ckpt_every=2, weight_threshold=200_000, batch=2, kmeans_n_init=1, threads=1)


def config(probe=PROBE):
    return S.SensitivityConfig(model="tiny-random", probe=probe, nbits=(2,), group_sizes=(None,), max_layers=1)


def test_dkm_settings_on_the_cpu_keep_their_stamp_and_name():
    s = dkm.DKMSettings(**SMALL)
    assert "device" not in s.to_dict() and s.name == dkm.DKMSettings.from_dict(s.to_dict()).name
    gpu = dkm.DKMSettings(**SMALL, device="cuda")
    assert gpu.to_dict()["device"] == "cuda" and gpu.name != s.name  # another run, named apart
    with pytest.raises(ValueError, match="device must be one of"):
        dkm.DKMSettings(device="gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_missing_device_is_refused_before_any_work(tmp_path):
    from sdwork.load import load_pipeline

    with pytest.raises(EngineError, match="sees no cuda device"):
        S.Sensitivity(config(S.ProbeSettings(prompts=PROBE.prompts, seeds=(0,), steps=2, device="cuda")),
                      tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()
    with pytest.raises(EngineError, match="sees no cuda device"):
        dkm.train(load_pipeline("tiny-random", progress=False), dkm.DKMSettings(**SMALL, device="cuda"),
                  tmp_path / "d", progress=False)


@NO_CUDA
def test_cuda_sensitivity_probe_is_deterministic_and_returns_the_pipeline(tmp_path):
    cuda = S.ProbeSettings(prompts=PROBE.prompts, seeds=(0, 1), steps=2, device="cuda")
    sens = S.Sensitivity(config(cuda), tmp_path, progress=False)
    before = weights_hash(sens.pipe)
    a, b = S.run_probe(sens.pipe, cuda), S.run_probe(sens.pipe, cuda)
    assert np.array_equal(a.latents, b.latents) and np.array_equal(a.images, b.images)
    assert next(sens.pipe.unet.parameters()).device.type == "cpu" and weights_hash(sens.pipe) == before
    cpu = S.run_probe(sens.pipe, PROBE)
    assert np.abs(a.images.astype(int) - cpu.images).mean() < 8  # fp16 compute: close, not equal
    table = sens.run()
    assert len(table) == 1 and np.isfinite(table["latent_psnr"]).all()
    assert json.loads((tmp_path / S.CONFIG).read_text())["probe"]["device"] == "cuda"


@NO_CUDA
def test_cuda_dkm_trains_and_returns_a_cpu_unet(tmp_path):
    from sdwork.load import load_pipeline

    pipe = load_pipeline("tiny-random", progress=False)
    s = dkm.DKMSettings(**SMALL, device="cuda")
    run = dkm.train(pipe, s, tmp_path / "a", progress=False)
    again = dkm.train(pipe, s, tmp_path / "b", progress=False)
    assert np.isfinite(run.losses["loss"]).all() and len(run.losses) == s.steps
    assert {p.device.type for p in run.unet.parameters()} == {"cpu"}
    assert np.allclose(run.losses["loss"], again.losses["loss"], rtol=1e-3)


@NO_CUDA
def test_cuda_in_place_evaluation_restores_the_weights(tmp_path):
    from sdwork.compress.recipe import Recipe
    from sdwork.experiments.experiment import Experiment
    from sdwork.generate import GenSettings

    settings = GenSettings(prompts=PROBE.prompts, seeds=(0,), steps=2, device="cuda", batch_size=1)
    exp = Experiment("tiny-random", settings, None, tmp_path / "run", progress=False)
    before = weights_hash(exp.pipe)
    v = exp.run(Recipe(nbits=4, components=("text_encoder",), engine="sdwork"))
    assert weights_hash(exp.pipe) == before and v.row["psnr"] > 10
    assert next(exp.pipe.unet.parameters()).device.type == "cpu"

