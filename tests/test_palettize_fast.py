"""sdwork.palettize_fast: a drop-in for coremltools' palettize_weights that writes the same form, exactly."""
import numpy as np
import pytest
import torch

pytest.importorskip("numba")
ct = pytest.importorskip("coremltools")
import coremltools.optimize.coreml as cto  # noqa: E402

from sdwork.compress import kmeans1d  # noqa: E402
from sdwork.coreml.lut import lut_to_dense
from sdwork.compress.palettize_fast import palettize_mlmodel, palettize_mlmodel_with_report, read_luts  # noqa: E402


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


@pytest.fixture(scope="module")
def small_model():
    ep = torch.export.export(Small().eval(), (torch.randn(1, 8, 16, 16),)).run_decompositions({})
    return ct.convert(ep, minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16,
                      convert_to="mlprogram", skip_model_load=True)


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
    assert "not divisible by group_size 16" in rows.loc["p_conv_out_weight_to_fp16", "reason"]
    assert "None in the config" in rows.loc["p_lin_weight_to_fp16", "reason"]
    assert "weight_threshold" in rows.loc["p_tiny_weight_to_fp16", "reason"]
    assert (rows["reason"] != "").sum() == (rows["status"] == "skipped").sum()


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
