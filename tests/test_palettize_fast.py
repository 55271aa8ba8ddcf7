"""sdwork.compress.palettize_fast: both Core ML engines as graph passes with a structured report; the
coremltools one bit-identical to coremltools' palettize_weights, the sdwork one the same form, exactly."""
import numpy as np
import pytest
import torch

pytest.importorskip("numba")
ct = pytest.importorskip("coremltools")
import coremltools.optimize.coreml as cto  # noqa: E402

from sdwork.compress import kmeans1d  # noqa: E402
from sdwork.compress.palettize_fast import (  # noqa: E402
    KINDS, REPORT_COLUMNS, palettize_mlmodel, palettize_mlmodel_with_report, read_luts,
)
from sdwork.coreml.lut import lut_to_dense  # noqa: E402
from sdwork.coreml.sizes import WEIGHTS  # noqa: E402
from sdwork.errors import ConfigError, PackageError  # noqa: E402

ENGINES = ("coremltools", "sdwork")


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(8, 64, 3, padding=1)
        self.conv_out = torch.nn.Conv2d(64, 4, 3, padding=1)  # 4 channels: not divisible by group 16
        self.lin = torch.nn.Linear(64, 48)
        self.tiny = torch.nn.Linear(4, 4)  # 16 weights: under weight_threshold

    def forward(self, x):
        y = self.conv_out(torch.relu(self.conv(x))).mean((2, 3))
        return self.lin(self.tiny(y).repeat(1, 16))


class Wide(torch.nn.Module):
    """A 12,288-value weight: coremltools clusters fp16 groups of >= 10,000 values with its kmeans1d,
    smaller ones with scikit-learn, so per tensor both of its k-means paths run."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(8, 64, 3, padding=1)
        self.lin = torch.nn.Linear(64, 192)

    def forward(self, x):
        return self.lin(torch.relu(self.conv(x)).mean((2, 3)))


def _to_coreml(module):
    ep = torch.export.export(module.eval(), (torch.randn(1, 8, 16, 16),)).run_decompositions({})
    return ct.convert(ep, minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16,
                      convert_to="mlprogram", skip_model_load=True)


@pytest.fixture(scope="module")
def small_model():
    return _to_coreml(Small())


@pytest.fixture(scope="module")
def wide_model():
    return _to_coreml(Wide())


def _fp16_weights(model):
    from coremltools.converters.mil.frontend.milproto.load import load
    from coremltools.models import utils

    prog = utils._convert_model_spec_to_pymil_prog(model, model.get_spec().specificationVersion, load)
    return {op.name: op.outputs[0].val for f in prog.functions.values() for op in f.find_ops(op_type="const")
            if op.outputs[0].val is not None and np.ndim(op.outputs[0].val) >= 2}


def _config(**kw):
    kw = {"mode": "kmeans", "nbits": 4, "granularity": "per_grouped_channel", "group_size": 16,
          "weight_threshold": 512, **kw}
    return cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(**kw))


def test_saved_package_is_bit_identical_to_solver(small_model, tmp_path):
    out = palettize_mlmodel(small_model, _config(), progress=False)
    out.save(str(tmp_path / "p.mlpackage"))
    written = read_luts(tmp_path / "p.mlpackage")
    originals = _fp16_weights(small_model)
    assert set(written) == {"p_conv_weight_to_fp16", "p_lin_weight_to_fp16"}
    for name, (lut, idx) in written.items():
        ref_lut, ref_idx = kmeans1d.palettize_weight(originals[name], 4, "per_grouped_channel", 16, 0)
        assert lut.dtype == np.float16 and np.array_equal(lut, ref_lut), name
        assert np.array_equal(idx, ref_idx), name


def test_same_form_as_coremltools_and_never_worse(small_model):
    ours = palettize_mlmodel(small_model, _config(), progress=False)
    theirs = cto.palettize_weights(small_model, _config())
    a, b = read_luts(ours), read_luts(theirs)
    assert set(a) == set(b)
    originals = _fp16_weights(small_model)
    for name in a:
        assert a[name][0].shape == b[name][0].shape and a[name][1].shape == b[name][1].shape
        w = originals[name].astype(np.float64)
        err = [np.square(lut_to_dense(*x).astype(np.float64) - w).sum() for x in (a[name], b[name])]
        assert err[0] <= err[1] * (1 + 1e-9), (name, err)


def test_report_names_every_skip(small_model):
    config = _config()
    config.set_op_name("p_lin_weight_to_fp16", None)
    _, report = palettize_mlmodel_with_report(small_model, config, progress=False)
    rows = report.set_index("op")
    assert rows.loc["p_conv_weight_to_fp16", "status"] == "palettized"
    assert rows.loc["p_conv_weight_to_fp16", "n_luts"] == 4
    assert 0 < rows.loc["p_conv_weight_to_fp16", "rel_mse"] < 0.05
    assert rows.loc["p_conv_out_weight_to_fp16", "kind"] == "channels_not_divisible"
    assert rows.loc["p_conv_out_weight_to_fp16", "reason"] == "4 channels on axis 0 not divisible by group_size 16"
    assert rows.loc["p_lin_weight_to_fp16", "kind"] == "no_config"
    assert "None for this op in op_name_configs" in rows.loc["p_lin_weight_to_fp16", "reason"]
    assert rows.loc["p_tiny_weight_to_fp16", "kind"] == "below_threshold"
    assert "weight_threshold 512" in rows.loc["p_tiny_weight_to_fp16", "reason"]
    assert rows.loc["p_conv_bias_to_fp16", "kind"] == "one_d"
    skipped = rows["status"] == "skipped"
    assert (rows["reason"] != "").sum() == skipped.sum() and set(rows.loc[skipped, "kind"]) <= set(KINDS)
    assert (rows.loc[~skipped, "kind"] == "").all()


@pytest.mark.parametrize("config", [
    dict(),
    dict(granularity="per_tensor", weight_threshold=1000),
    dict(mode="uniform", nbits=3),
    dict(nbits=2, cluster_dim=2),  # vector LUTs: coremltools' engine only
], ids=["kmeans-g16", "kmeans-pt", "uniform", "vector"])
def test_coremltools_engine_is_bit_identical_to_coremltools(wide_model, tmp_path, config):
    """The reporting pass only records: the package it writes is coremltools' own, byte for byte."""
    ours, report = palettize_mlmodel_with_report(wide_model, _config(**config), progress=False, engine="coremltools")
    theirs = cto.palettize_weights(wide_model, _config(**config))
    a, b = read_luts(ours), read_luts(theirs)
    assert set(a) == set(b) == {"p_conv_weight_to_fp16", "p_lin_weight_to_fp16"}
    assert all(np.array_equal(a[k][0], b[k][0]) and np.array_equal(a[k][1], b[k][1]) for k in a)
    ours.save(str(tmp_path / "ours.mlpackage"))
    theirs.save(str(tmp_path / "theirs.mlpackage"))
    assert (tmp_path / "ours.mlpackage" / WEIGHTS).read_bytes() == (tmp_path / "theirs.mlpackage" / WEIGHTS).read_bytes()
    assert list(report.columns) == REPORT_COLUMNS
    assert set(report.loc[report.status == "palettized", "op"]) == set(a)


def test_report_rel_mse_is_the_stored_error(wide_model):
    """sq_err_sum is the error of the LUT as stored, for the coremltools engine as for sdwork's."""
    originals = _fp16_weights(wide_model)
    for engine in ENGINES:
        model, report = palettize_mlmodel_with_report(wide_model, _config(), progress=False, engine=engine)
        rows = report.set_index("op")
        for name, (lut, idx) in read_luts(model).items():
            err = np.square(lut_to_dense(lut, idx).astype(np.float64) - originals[name].astype(np.float64)).sum()
            assert rows.loc[name, "sq_err_sum"] == pytest.approx(err, rel=1e-9), (engine, name)


def test_both_engines_report_the_same_decisions(small_model):
    config = _config()
    config.set_op_name("p_lin_weight_to_fp16", None)
    reports = [palettize_mlmodel_with_report(small_model, config, progress=False, engine=e)[1] for e in ENGINES]
    cols = ["op", "shape", "numel", "status", "kind", "reason", "nbits", "granularity", "group_size", "n_luts"]
    assert reports[0][cols].equals(reports[1][cols])
    # vector palettization (coremltools only) names the cluster_dim problem
    _, vec = palettize_mlmodel_with_report(small_model, _config(group_size=4, cluster_dim=8), progress=False,
                                           engine="coremltools")
    assert set(vec.set_index("op").loc[["p_conv_weight_to_fp16", "p_lin_weight_to_fp16"], "kind"]) == {"cluster_dim"}


def test_per_tensor_and_uniform(small_model):
    _, report = palettize_mlmodel_with_report(small_model, _config(granularity="per_tensor", nbits=2), progress=False)
    assert report.set_index("op").loc["p_conv_out_weight_to_fp16", "status"] == "palettized"
    _, uni = palettize_mlmodel_with_report(small_model, _config(mode="uniform"), progress=False)
    assert (uni["status"] == "palettized").sum() == 2


@pytest.mark.parametrize("kw", [{"cluster_dim": 2}, {"enable_per_channel_scale": True}])
def test_refuses_what_it_does_not_do(small_model, kw):
    with pytest.raises(NotImplementedError, match="engine='coremltools'"):
        palettize_mlmodel(small_model, _config(**kw), progress=False)
    with pytest.raises(NotImplementedError, match="mode='unique'"):
        palettize_mlmodel(small_model, cto.OptimizationConfig(cto.OpPalettizerConfig(mode="unique")), progress=False)


@pytest.mark.parametrize("engine", ENGINES)
def test_wrong_config_type_is_a_config_error(small_model, engine):
    """coremltools raises ValueError for these; so do we (ConfigError is one)."""
    with pytest.raises(ValueError):
        cto.palettize_weights(small_model, cto.OptimizationConfig(cto.OpLinearQuantizerConfig()))
    with pytest.raises(ConfigError, match="config must be a coremltools.optimize.coreml.OptimizationConfig"):
        palettize_mlmodel_with_report(small_model, {"nbits": 4}, progress=False, engine=engine)
    with pytest.raises(ConfigError, match="global_config is a OpLinearQuantizerConfig; palettization takes"):
        palettize_mlmodel_with_report(small_model, cto.OptimizationConfig(cto.OpLinearQuantizerConfig()),
                                      progress=False, engine=engine)


def test_multifunction_model_is_refused(small_model, tmp_path):
    """coremltools' palettize_weights refuses a multifunction model with a ValueError; both engines refuse it too."""
    from coremltools.models.utils import MultiFunctionDescriptor, save_multifunction

    small_model.save(str(tmp_path / "one.mlpackage"))
    desc = MultiFunctionDescriptor()
    desc.add_function(str(tmp_path / "one.mlpackage"), "main", "first")
    desc.add_function(str(tmp_path / "one.mlpackage"), "main", "second")
    desc.default_function_name = "first"
    save_multifunction(desc, str(tmp_path / "multi.mlpackage"))
    multi = ct.models.MLModel(str(tmp_path / "multi.mlpackage"), skip_model_load=True)
    with pytest.raises(ValueError, match="not supported for a multifunction model"):
        cto.palettize_weights(multi, _config())
    for engine in ENGINES:
        with pytest.raises(PackageError, match="does not support a multifunction model") as e:
            palettize_mlmodel_with_report(multi, _config(), progress=False, engine=engine)
        assert isinstance(e.value, ValueError)
