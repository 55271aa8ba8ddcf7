"""DKM training-time palettization: settings, data, resume, run folders keyed by their inputs,
Core ML packages with real LUT ops."""
import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from sdwork import hooks
from sdwork.errors import ConfigError, MismatchError
from sdwork.experiments import distill, dkm
from sdwork.load import load_pipeline

# Only the 4 largest UNet layers (1.1 M weights) are palettized, so a run takes seconds.
SMALL = dict(weight_threshold=200_000, batch=2, kmeans_n_init=1, threads=1)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny-random", progress=False)


def crash_after_checkpoint(n: int):
    """A crash (KeyboardInterrupt) right after DKM's checkpoint at step n, through the hook point."""
    def crash(stage, step):
        if stage == "dkm" and step == n:
            raise KeyboardInterrupt
    return hooks.on("checkpoint_saved", crash)


class CrashAtFirstBatch:
    """`data`'s description, but its first batch raises: the run stops before any checkpoint."""

    def __init__(self, data):
        self.data = data

    def describe(self):
        return self.data.describe()

    def batch(self, step):
        raise KeyboardInterrupt


@pytest.fixture(scope="module")
def trained(pipe, tmp_path_factory):
    """4 steps straight, and 4 steps interrupted after the checkpoint at 2 then resumed."""
    s = dkm.DKMSettings(nbits=2, steps=4, ckpt_every=2, **SMALL)
    straight = dkm.train(pipe, s, tmp_path_factory.mktemp("straight"), progress=False)
    resumed_dir = tmp_path_factory.mktemp("resumed")
    with crash_after_checkpoint(2), pytest.raises(KeyboardInterrupt):
        dkm.train(pipe, s, resumed_dir, progress=False)
    resumed = dkm.train(pipe, s, resumed_dir, progress=False)
    return s, straight, resumed


# ---------------------------------------------------------------- settings
@pytest.mark.parametrize("kw, match", [
    (dict(nbits=5), "nbits=5"),
    (dict(granularity="per_tensor", group_size=16), "only applies to granularity='per_grouped_channel'"),
    (dict(granularity="per_grouped_channel"), "needs group_size"),
    (dict(milestone=10, steps=10), "milestone must be in"),
    (dict(objective="magic"), "objective must be one of"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(lr=0.0), "lr and tau must be > 0"),
])
def test_bad_settings_are_refused_with_the_fix(kw, match):
    with pytest.raises(ConfigError, match=match):
        dkm.DKMSettings(**kw)


def test_granularity_is_implied_by_group_size():
    assert dkm.DKMSettings(nbits=4, group_size=16).granularity == "per_grouped_channel"
    assert dkm.DKMSettings(nbits=4).granularity == "per_tensor"
    assert dkm.DKMSettings(nbits=4, group_size=16) == dkm.DKMSettings(nbits=4, granularity="per_grouped_channel",
                                                                     group_size=16)


def test_settings_name_target_and_recipe():
    s = dkm.DKMSettings(nbits=2, steps=300)
    assert s.name == "km2-pt-unet-dkm300" and s.min_target == "iOS16"
    # other training settings get a short hash, so two runs never share a folder or a row name
    other = dkm.DKMSettings(nbits=2, steps=300, lr=3e-5)
    assert other.name.startswith("km2-pt-unet-dkm300-") and other.name != dkm.DKMSettings(nbits=2, steps=300, tau=1e-5).name
    g = dkm.DKMSettings(nbits=3, group_size=16)
    assert g.min_target == "iOS18" and g.recipe("sdwork").engine == "sdwork"
    assert dkm.DKMSettings.from_dict(json.loads(json.dumps(g.to_dict()))) == g
    with pytest.raises(ConfigError, match="unknown DKM setting"):
        dkm.DKMSettings.from_dict({"nbits": 2, "bits": 2})


def test_too_old_target_is_refused_instead_of_writing_dense_fp16():
    with pytest.raises(ConfigError, match="silently converts the palettized weights to dense fp16"):
        dkm.check_target("iOS15", dkm.DKMSettings(nbits=2))
    with pytest.raises(ConfigError, match="target='iOS18'"):
        dkm.check_target("iOS17", dkm.DKMSettings(nbits=4, group_size=16))
    with pytest.raises(ConfigError, match="unknown deployment target"):
        dkm.check_target("iOS99", dkm.DKMSettings())
    dkm.check_target("iOS16", dkm.DKMSettings(nbits=2))
    dkm.check_target("iOS18", dkm.DKMSettings(nbits=3))


def test_dkm_config_carries_the_settings():
    cfg = dkm.dkm_config(dkm.DKMSettings(nbits=3, group_size=16, milestone=5))
    g = cfg.global_config
    assert (g.n_bits, g.group_size, g.milestone, g.granularity.name) == (3, 16, 5, "per_grouped_channel")
    assert (g.kmeans_max_iter, g.palett_tau) == (1, 1e-5)


# ---------------------------------------------------------------- data
def test_distill_batches_are_seeded_per_step(pipe):
    data = distill.DistillData(pipe, batch=16, seed=3, uncond_prob=0.5)
    a, b, c = data.batch(7), data.batch(7), data.batch(8)
    assert a.noisy.shape == (16, 4, 8, 8) and a.context.shape == (16, 77, 64) and a.target is None
    assert torch.equal(a.noisy, b.noisy) and torch.equal(a.context, b.context) and torch.equal(a.timesteps, b.timesteps)
    assert not torch.equal(a.noisy, c.noisy)
    uncond = (a.context == data.uncond).flatten(1).all(1)
    assert 0 < int(uncond.sum()) < 16  # the empty prompt is mixed in, guidance needs it
    assert len(data.prompts) == 96  # the embedded model's training captions


def test_prompts_are_required_for_a_model_without_defaults(pipe):
    pipe.model_spec, spec = "some/other-model", pipe.model_spec
    try:
        with pytest.raises(ConfigError, match="pass prompts="):
            distill.DistillData(pipe)
        data = distill.DistillData(pipe, prompts=["a red circle"], batch=2)
        assert data.prompts == ["a red circle"]
    finally:
        pipe.model_spec = spec


def test_dataset_batches_target_the_added_noise(pipe):
    data = distill.DatasetData(pipe, per_combo=1, batch=4, seed=0)
    b = data.batch(0)
    assert b.target.shape == b.noisy.shape == (4, 4, 8, 8)
    # x_t = sqrt(acp) z + sqrt(1 - acp) eps: recover z from the target and check its scale is the VAE's
    acp = data.scheduler.alphas_cumprod[b.timesteps].view(-1, 1, 1, 1)
    z = (b.noisy - (1 - acp).sqrt() * b.target) / acp.sqrt()
    assert torch.isfinite(z).all()
    with pytest.raises(ConfigError, match="one caption per image"):
        distill.DatasetData(pipe, images=np.zeros((2, 64, 64, 3), np.uint8), captions=["x"])


# ---------------------------------------------------------------- training
def test_training_writes_losses_and_resume_is_bit_identical(trained):
    s, straight, resumed = trained
    assert resumed.resumed_from == 2 and straight.resumed_from == 0
    assert list(straight.losses["step"]) == [1, 2, 3, 4]
    assert np.isfinite(straight.losses["loss"]).all() and straight.losses["loss"].iloc[-1] > 0
    assert straight.losses["loss"].tolist() == resumed.losses["loss"].tolist()
    a, b = straight.unet.state_dict(), resumed.unet.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    on_disk = dkm.load_losses(straight.run_dir)
    assert on_disk["loss"].tolist() == pytest.approx(straight.losses["loss"].tolist())
    assert straight.peak_rss_bytes > 0


def test_finalized_weights_take_at_most_2_to_the_nbits_values(trained):
    s, run, _ = trained
    palettized = [m for m in run.unet.modules() if hasattr(m, "_COREML_/weight/lut")]
    assert len(palettized) == 4
    for m in palettized:
        assert m.weight.unique().numel() <= 2**s.nbits
        lut = getattr(m, "_COREML_/weight/lut")
        assert set(m.weight.unique().tolist()) <= set(lut.flatten().tolist())


def test_rerun_of_a_finished_run_trains_nothing(pipe, trained):
    s, run, _ = trained
    again = dkm.train(pipe, s, run.run_dir, progress=False)
    assert again.resumed_from == s.steps and again.seconds == 0.0
    assert all(torch.equal(v, again.unet.state_dict()[k]) for k, v in run.unet.state_dict().items())


def test_run_dir_with_other_settings_is_refused(pipe, trained):
    s, run, _ = trained
    with pytest.raises(MismatchError, match=r"other settings, model or data \(lr: 0\.0001 -> 0\.0003\)"):
        dkm.train(pipe, replace(s, lr=3e-4), run.run_dir, progress=False)


def test_run_dir_is_never_reused_for_other_prompts_model_or_weights(pipe, trained):
    """The folder is keyed by what the weights were trained from, not only by the settings: the same
    settings on other prompts, another model or other weights are refused, naming the field."""
    s, run, _ = trained
    stamp = (run.run_dir / dkm.SETTINGS).read_text()
    assert json.loads(stamp)["inputs"]["data"]["prompts"] == distill.default_prompts(pipe)
    with pytest.raises(MismatchError, match=r"inputs\.data\.prompts: \['a small"):
        dkm.train(pipe, s, run.run_dir, prompts=["a red circle on a gray background"], progress=False)
    with pytest.raises(MismatchError, match=r"inputs\.model: 'tiny-random' -> 'another-model'"):
        dkm.train(pipe, s, run.run_dir, model="another-model", progress=False)
    other = copy.deepcopy(pipe)
    with torch.no_grad():
        other.unet.conv_in.weight[0, 0, 0, 0] += 1.0
    with pytest.raises(MismatchError, match=r"inputs\.weights_hash: "):
        dkm.train(other, s, run.run_dir, progress=False)
    assert (run.run_dir / dkm.SETTINGS).read_text() == stamp  # refused before anything was written


def test_steps_may_change_only_before_the_first_checkpoint(pipe, tmp_path):
    prompts = ["a small red circle on a gray background"]
    s = dkm.DKMSettings(nbits=2, steps=4, ckpt_every=2, **SMALL)
    data = distill.DistillData(pipe, prompts, batch=s.batch, seed=s.seed, uncond_prob=s.uncond_prob)
    with pytest.raises(KeyboardInterrupt):
        dkm.train(pipe, s, tmp_path, data=CrashAtFirstBatch(data), progress=False)
    assert (tmp_path / dkm.SETTINGS).exists() and not (tmp_path / dkm.CHECKPOINT).exists()
    longer = replace(s, steps=6)
    with crash_after_checkpoint(2), pytest.raises(KeyboardInterrupt):
        dkm.train(pipe, longer, tmp_path, prompts=prompts, progress=False)  # no checkpoint yet: allowed
    with pytest.raises(MismatchError, match=r"steps: 6 -> 8"):
        dkm.train(pipe, replace(s, steps=8), tmp_path, prompts=prompts, progress=False)
    done = dkm.train(pipe, replace(longer, ckpt_every=3), tmp_path, prompts=prompts, progress=False)  # always free
    assert done.resumed_from == 2 and list(done.losses["step"]) == [1, 2, 3, 4, 5, 6]
    assert json.loads((tmp_path / dkm.SETTINGS).read_text())["steps"] == 6


def test_data_without_a_description_is_refused(pipe, tmp_path):
    class Bare:
        def batch(self, step):
            raise AssertionError("never drawn")

    with pytest.raises(ConfigError, match="describe"):
        dkm.train(pipe, dkm.DKMSettings(nbits=2, steps=1, **SMALL), tmp_path, data=Bare(), progress=False)
    assert not (tmp_path / dkm.SETTINGS).exists()


def test_skipped_layers_are_reported(pipe):
    s = dkm.DKMSettings(nbits=2, granularity="per_grouped_channel", group_size=16, weight_threshold=2048)
    _, _, skipped = dkm.prepare_student(pipe.unet, s)
    assert [x["module"] for x in skipped] == ["conv_out"]
    assert "not divisible by group_size 16" in skipped[0]["reason"]


def test_dataset_objective_trains_and_its_run_dir_refuses_other_images(pipe, tmp_path):
    s = dkm.DKMSettings(nbits=4, steps=1, objective="dataset", **SMALL)
    images, captions = distill.tiny_dataset(pipe, per_combo=1, seed=0)
    images, captions = images[:8], captions[:8]
    run = dkm.train(pipe, s, tmp_path, data=distill.DatasetData(pipe, images, captions, batch=2), progress=False)
    assert len(run.losses) == 1 and run.losses["loss"].iloc[0] > 0
    assert run.inputs["data"]["kind"] == "dataset" and run.inputs["data"]["images"] == 8
    other = images.copy()
    other[0, 0, 0, 0] ^= 1  # one pixel
    with pytest.raises(MismatchError, match=r"inputs\.data\.dataset: "):
        dkm.train(pipe, s, tmp_path, data=distill.DatasetData(pipe, other, captions, batch=2), progress=False)


# ---------------------------------------------------------------- Core ML
@pytest.mark.slow  # a Core ML conversion of the UNet
def test_package_holds_lut_ops_with_the_expected_size(pipe, trained, tmp_path):
    from sdwork.coreml.sizes import expected_lut_bytes, package_sizes

    s, run, _ = trained
    pkg = dkm.convert(pipe, run.unet, tmp_path, s, progress=False)
    table = dkm.check_luts(pkg, run)
    assert len(table) == 4 and table["ok"].all() and set(table["op_type"]) == {"constexpr_lut_to_dense"}
    sizes = package_sizes(pkg)
    luts = [l for l in sizes.layers if l.compressed]
    assert {l.nbits for l in luts} == {2} and len(luts) == 4
    for l in luts:
        assert l.file_bytes == expected_lut_bytes(l.numel, 2, 1)
    # everything else is dense fp16: the palettized layers cost 1/8 of their fp16 bytes (plus LUT/padding)
    dense = sum(l.file_bytes for l in sizes.layers if not l.compressed)
    assert sizes.weight_bin_bytes == 64 + dense + sum(l.file_bytes for l in luts)
    fp16_bytes_of_luts = sum(2 * l.numel for l in luts)
    assert sum(l.file_bytes for l in luts) < fp16_bytes_of_luts / 7.5
    # the package computes with exactly the finalized torch weights (rounded to the fp16 LUT)
    from sdwork.convert import load_weight_map, package_weights

    weights, names = package_weights(pkg), load_weight_map(pkg)
    w = run.unet.get_submodule(table["module"][0]).weight.detach().numpy()
    got = weights[names[table["module"][0] + ".weight"]].reshape(w.shape)
    assert np.array_equal(got, w.astype(np.float16).astype(got.dtype))


def test_convert_refuses_a_dense_target_before_any_work(pipe, trained, tmp_path):
    s, run, _ = trained
    with pytest.raises(ConfigError, match="Use target='iOS16'"):
        dkm.convert(pipe, run.unet, tmp_path, s, target="iOS15")
    assert not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="no palettization metadata"):
        dkm.convert(pipe, pipe.unet, tmp_path, s)
