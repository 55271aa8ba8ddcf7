"""DKM training-time palettization: settings, data, resume, Core ML packages with real LUT ops."""
import json

import numpy as np
import pytest
import torch

from sdwork.experiments import distill, dkm
from sdwork.load import load_pipeline

# Only the 4 largest UNet layers (1.1 M weights) are palettized, so a run takes seconds.
SMALL = dict(weight_threshold=200_000, batch=2, kmeans_n_init=1, threads=1)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny-random", progress=False)


@pytest.fixture(scope="module")
def trained(pipe, tmp_path_factory):
    """4 steps straight, and 4 steps interrupted after the checkpoint at 2 then resumed."""
    s = dkm.DKMSettings(nbits=2, steps=4, ckpt_every=2, **SMALL)
    straight = dkm.train(pipe, s, tmp_path_factory.mktemp("straight"), progress=False)
    resumed_dir = tmp_path_factory.mktemp("resumed")
    real_step, calls = dkm._step, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    dkm._step = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            dkm.train(pipe, s, resumed_dir, progress=False)
    finally:
        dkm._step = real_step
    resumed = dkm.train(pipe, s, resumed_dir, progress=False)
    return s, straight, resumed


# ---------------------------------------------------------------- settings
@pytest.mark.parametrize("kw, match", [
    (dict(nbits=5), "nbits=5"),
    (dict(group_size=16), "only applies to granularity='per_grouped_channel'"),
    (dict(granularity="per_grouped_channel"), "needs group_size"),
    (dict(milestone=10, steps=10), "milestone must be in"),
    (dict(objective="magic"), "objective must be one of"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(lr=0.0), "lr and tau must be > 0"),
])
def test_bad_settings_are_refused_with_the_fix(kw, match):
    with pytest.raises(ValueError, match=match):
        dkm.DKMSettings(**kw)


def test_settings_name_target_and_recipe():
    s = dkm.DKMSettings(nbits=2, steps=300)
    assert s.name == "km2-pt-unet-dkm300" and s.min_target == "iOS16"
    # other training settings get a short hash, so two runs never share a folder or a row name
    other = dkm.DKMSettings(nbits=2, steps=300, lr=3e-5)
    assert other.name.startswith("km2-pt-unet-dkm300-") and other.name != dkm.DKMSettings(nbits=2, steps=300, tau=1e-5).name
    g = dkm.DKMSettings(nbits=3, granularity="per_grouped_channel", group_size=16)
    assert g.min_target == "iOS18" and g.recipe("sdwork").engine == "sdwork"
    assert dkm.DKMSettings.from_dict(json.loads(json.dumps(g.to_dict()))) == g
    with pytest.raises(ValueError, match="unknown DKM setting"):
        dkm.DKMSettings.from_dict({"nbits": 2, "bits": 2})


def test_too_old_target_is_refused_instead_of_writing_dense_fp16():
    with pytest.raises(ValueError, match="silently converts the palettized weights to dense fp16"):
        dkm.check_target("iOS15", dkm.DKMSettings(nbits=2))
    with pytest.raises(ValueError, match="target='iOS18'"):
        dkm.check_target("iOS17", dkm.DKMSettings(nbits=4, granularity="per_grouped_channel", group_size=16))
    with pytest.raises(ValueError, match="unknown deployment target"):
        dkm.check_target("iOS99", dkm.DKMSettings())
    dkm.check_target("iOS16", dkm.DKMSettings(nbits=2))
    dkm.check_target("iOS18", dkm.DKMSettings(nbits=3))


def test_dkm_config_carries_the_settings():
    cfg = dkm.dkm_config(dkm.DKMSettings(nbits=3, granularity="per_grouped_channel", group_size=16, milestone=5))
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
        with pytest.raises(ValueError, match="pass prompts="):
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
    with pytest.raises(ValueError, match="one caption per image"):
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
    other = dkm.DKMSettings(**{**s.to_dict(), "lr": 3e-4})
    with pytest.raises(ValueError, match="other settings \\(lr differ\\)"):
        dkm.train(pipe, other, run.run_dir, progress=False)


def test_skipped_layers_are_reported(pipe):
    s = dkm.DKMSettings(nbits=2, granularity="per_grouped_channel", group_size=16, weight_threshold=2048)
    _, _, skipped = dkm.prepare_student(pipe.unet, s)
    assert [x["module"] for x in skipped] == ["conv_out"]
    assert "not divisible by group_size 16" in skipped[0]["reason"]


def test_dataset_objective_trains(pipe, tmp_path):
    s = dkm.DKMSettings(nbits=4, steps=1, objective="dataset", **SMALL)
    data = distill.DatasetData(pipe, per_combo=1, batch=2)
    run = dkm.train(pipe, s, tmp_path, data=data, progress=False)
    assert len(run.losses) == 1 and run.losses["loss"].iloc[0] > 0


# ---------------------------------------------------------------- Core ML
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
    with pytest.raises(ValueError, match="Use target='iOS16'"):
        dkm.convert(pipe, run.unet, tmp_path, s, target="iOS15")
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="no palettization metadata"):
        dkm.convert(pipe, pipe.unet, tmp_path, s)
