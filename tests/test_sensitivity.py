"""Per-layer sensitivity on the tiny-random UNet: real palettization, real pipeline runs,
a resumable cache whose rows are bit-identical when recomputed."""
import json
import math

import numpy as np
import pytest
import torch

from sdwork.compress.recipe import LayerSpec
from sdwork.coreml.lut import lut_to_dense
from sdwork.coreml.sizes import expected_lut_bytes
from sdwork.errors import ConfigError, MismatchError
from sdwork.evaluate.psnr import latent_psnr
from sdwork.experiments import sensitivity as S
from sdwork.weights import weights_hash

PROBE = S.ProbeSettings(prompts=S.DEFAULT_PROMPTS[:1], seeds=(0, 1), steps=2)


def config(**kw):
    base = dict(model="tiny-random", probe=PROBE, nbits=(2, 8), group_sizes=(None, 16), max_layers=3)
    return S.SensitivityConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sens")
    sens = S.Sensitivity(config(), folder, progress=False)
    before = weights_hash(sens.pipe)
    table = sens.run()
    return sens, table, before


# --- pure helpers -------------------------------------------------------------------


def test_candidate_names_round_trip():
    for spec in S.candidates((1, 3, 8), (None, 4)) + [None]:
        assert S.parse_candidate(S.candidate_name(spec)) == spec
    assert S.candidate_name(LayerSpec(4, "per_grouped_channel", 16)) == "4-g16"
    with pytest.raises(ConfigError, match="candidate name"):
        S.parse_candidate("4-x16")
    cfg = S.SensitivityConfig(nbits=(2, 4), group_sizes=(None, 16), grouped_nbits=(4,), palettizer="coremltools")
    assert [S.candidate_name(s) for s in cfg.specs] == ["2-pt", "4-pt", "4-g16"]


def test_layer_bytes_follow_the_size_formula():
    layer = S.Layer("conv", (128, 64, 3, 3))
    assert layer.nbytes(None) == 64 + 64 * math.ceil(2 * 73728 / 64)
    assert layer.nbytes(LayerSpec(4)) == expected_lut_bytes(73728, 4, 1)
    assert layer.nbytes(LayerSpec(3, "per_grouped_channel", 16)) == expected_lut_bytes(73728, 3, 8)
    assert not S.Layer("conv_out", (4, 64, 3, 3)).supports(LayerSpec(4, "per_grouped_channel", 16))
    # the final blob of weight.bin is not padded: a 4-bit LUT (32 bytes) saves 32, inline 3-bit LUTs
    # leave the indices last (864 bytes: 32 saved), fp16 and 8-bit data fill whole 64-byte lines
    out = S.Layer("conv_out", (4, 64, 3, 3))
    saved = {n: out.nbytes(LayerSpec(n)) - out.nbytes(LayerSpec(n), last=True) for n in (3, 4, 8)}
    assert saved == {3: 32, 4: 32, 8: 0} and out.nbytes(None, last=True) == out.nbytes(None)


def test_lut_lookup_matches_coremltools():
    from coremltools.optimize import _utils as U
    from coremltools.optimize.coreml._quantization_passes import palettize_weights

    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 8, 3, 3)).astype(np.float16)
    for group in (0, 8):
        p = palettize_weights.grouped_channelwise_compress(w, "KMEANS", 3, 0, group)
        assert np.array_equal(lut_to_dense(p.lut, p.indices), U.lut_to_dense(p.indices, p.lut, None))


def test_palettize_dense_is_exact_kmeans_per_group():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((32, 48)) * np.linspace(0.1, 2, 32)[:, None]).astype(np.float16)
    spec = LayerSpec(3, "per_grouped_channel", 8)
    ours = S.palettize_dense(w, spec, "sdwork")
    ref = S.palettize_dense(w, spec, "coremltools")  # scikit-learn k-means: a local optimum
    for g in range(4):  # float32 first: numpy's float16 sort is wrong on AVX-512 machines
        assert len(np.unique(ours[8 * g : 8 * g + 8].astype(np.float32))) <= 8
    err = lambda d: float(((d.astype(np.float64) - w.astype(np.float64)) ** 2).sum())
    assert err(ours) <= err(ref) * (1 + 1e-6)
    with pytest.raises(ConfigError, match="divisible"):
        S.palettize_dense(w, LayerSpec(3, "per_grouped_channel", 5), "sdwork")


def test_latent_psnr_is_apples_definition():
    ref = np.ones((2, 4, 8, 8))
    x = ref.copy()
    x[0] += 0.1  # rms 0.1 vs peak 1: 20 dB; the second image is exact: 20 log10(1/1e-10) ~ 200 dB
    assert latent_psnr(ref, x) == pytest.approx((20 + 20 * math.log10((1 + 1e-5) / 1e-10)) / 2, abs=1e-3)


# --- the analysis -------------------------------------------------------------------


def test_one_row_per_layer_and_supported_candidate(run):
    sens, table, _ = run
    assert len(sens.layers) == 3 and sens.layers[0].module == "conv_in"
    expected = sum(1 for l in sens.layers for s in sens.config.specs if l.supports(s))
    assert len(table) == expected
    assert set(table["candidate"]) == {"2-pt", "8-pt", "2-g16", "8-g16"}
    assert (table["bytes"] < table["fp16_bytes"]).all()


def test_fewer_bits_drift_more(run):
    _, table, _ = run
    t = table.set_index(["layer", "candidate"])
    for layer in table["layer"].unique():
        assert t.loc[(layer, "2-pt"), "latent_mse"] > t.loc[(layer, "8-pt"), "latent_mse"] > 0
        assert t.loc[(layer, "2-pt"), "latent_psnr"] < t.loc[(layer, "8-pt"), "latent_psnr"]
        assert t.loc[(layer, "2-pt"), "weight_rel_rmse"] > t.loc[(layer, "8-pt"), "weight_rel_rmse"]


def test_weights_are_restored_and_an_empty_recipe_has_no_drift(run):
    sens, _, before = run
    assert weights_hash(sens.pipe) == before
    d = sens.measure({})
    assert d["latent_mse"] == 0 and d["image_psnr"] == math.inf


def test_rerun_skips_done_rows_and_recomputes_bit_identically(run):
    sens, table, _ = run
    path = sens.dir / S.SINGLE
    assert sens.todo() == []
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:20])  # a crash mid-write: torn last line
    again = S.Sensitivity(config(), sens.dir, progress=False)
    assert len(again.todo()) == 1
    redo = again.run()
    cols = ["layer", "candidate", "latent_mse", "latent_psnr", "image_mse", "bytes"]
    assert redo[cols].equals(table[cols])
    assert len(path.read_text().splitlines()) == len(lines)


def test_other_settings_in_the_same_folder_are_refused(run):
    sens, _, _ = run
    with pytest.raises(MismatchError, match="other inputs.*probe: .*steps"):
        S.Sensitivity(config(probe=S.ProbeSettings(prompts=PROBE.prompts, seeds=(0, 1), steps=3)), sens.dir,
                      pipe=sens.pipe, progress=False)
    assert json.loads((sens.dir / S.CONFIG).read_text())["probe"]["steps"] == 2


def test_cumulative_pass_starts_from_the_least_harmful_layer(run):
    sens, table, _ = run
    cum = sens.run_cumulative([LayerSpec(2)])
    assert list(cum["position"]) == [0, 1, 2]
    order = S.cumulative_order(table, "2-pt")
    assert list(cum["layer"]) == order
    first = table[(table["layer"] == order[0]) & (table["candidate"] == "2-pt")].iloc[0]
    assert cum.iloc[0]["latent_mse"] == first["latent_mse"]  # one layer: the single-layer measurement
    assert cum.iloc[-1]["latent_mse"] > cum.iloc[0]["latent_mse"]
    assert sens.run_cumulative([LayerSpec(2)]).equals(cum)  # resumed: nothing to redo


def test_heatmap_table_and_plot(run):
    _, table, _ = run
    m = S.heatmap_table(table)
    assert list(m.columns) == ["2-g16", "8-g16", "2-pt", "8-pt"] and m.shape == (3, 4)
    fig = S.plot_heatmap(table)
    assert fig.axes


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="component"):
        S.SensitivityConfig(component="vae")
    with pytest.raises(ConfigError, match="steps"):
        S.ProbeSettings(steps=0)
    with pytest.raises(ConfigError, match="nbits"):
        S.SensitivityConfig(nbits=(5,))
    with pytest.raises(ConfigError, match="only_layers"):
        S.Sensitivity(config(only_layers=("nope",)), "/tmp/never-written", pipe=_tiny(), progress=False)
    with pytest.raises(ConfigError, match="no Linear/Conv2d"):
        S.Sensitivity(config(min_numel=10**9), "/tmp/never-written", pipe=_tiny(), progress=False)


def _tiny():
    from sdwork.load import load_pipeline

    return load_pipeline("tiny-random", progress=False)
