"""Palettize a Core ML model with sdwork's exact k-means: a drop-in for
`coremltools.optimize.coreml.palettize_weights(mlmodel, config)`.

Route, and why: we subclass coremltools' own `palettize_weights` MIL graph
pass and replace only the step that computes one op's LUTs and indices
(`blockwise_compress`). Everything else is coremltools' code: which consts
are eligible, per-op / per-op-type / global configs (None skips an op),
weight_threshold, channel-axis inference, and the `constexpr_lut_to_dense`
op it writes, so the package has exactly the form coremltools writes. The
alternatives were slower or less exact: `mode="custom"` calls a Python
function once per LUT group (thousands per layer) with no access to the
group structure, and the torch route (`_COREML_` buffers + ct.convert) needs
a fresh conversion per recipe (~80 s for a full SD UNet).

coremltools only logs a warning when it leaves a weight uncompressed (channels
not divisible by group_size, weight_threshold, unknown channel axes, ...).
We record every candidate const with its outcome and reason; the report is
returned by `palettize_mlmodel_with_report` and attached to the model returned
by `palettize_mlmodel` as `.palettize_report` (a pandas DataFrame).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

import coremltools as ct
from coremltools import _logger as ct_logger
from coremltools.converters.mil.mil import types
from coremltools.converters.mil.mil.block import is_current_opset_version_compatible_with
from coremltools.converters.mil.mil.passes.helper import block_context_manager
from coremltools.converters.mil._deployment_compatibility import AvailableTarget
from coremltools.models import utils as ct_model_utils
from coremltools.converters.mil.frontend.milproto.load import load as _milproto_load
from coremltools.optimize import _utils as ct_optimize_utils
from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig
from coremltools.optimize.coreml._quantization_passes import palettize_weights as _CoremlPalettizePass

from sdwork.compress import kmeans1d

NATIVE_MODES = ("KMEANS",)
DELEGATED_MODES = ("UNIFORM",)  # coremltools' own per-group code: already cheap, identical output
REPORT_COLUMNS = ["op", "shape", "numel", "status", "reason", "nbits", "granularity", "group_size",
                  "channel_axis", "n_luts", "weight_sq_sum", "sq_err_sum", "rel_mse"]


def palettize_mlmodel(mlmodel, config: OptimizationConfig, progress: bool = True, joint_compression: bool = False):
    """Same call and result form as ct.optimize.coreml.palettize_weights; `.palettize_report` lists every const."""
    model, report = palettize_mlmodel_with_report(mlmodel, config, progress, joint_compression)
    model.palettize_report = report
    return model


def palettize_mlmodel_with_report(mlmodel, config: OptimizationConfig, progress: bool = True,
                                  joint_compression: bool = False):
    """(palettized mlmodel, report DataFrame with one row per candidate weight const)."""
    if joint_compression:
        raise NotImplementedError("joint compression (palettizing already pruned/quantized weights) is not "
                                  "implemented by sdwork's palettizer; use engine='coremltools'")
    check_config(config)
    graph_pass = SdworkPalettizePass(config, progress=progress)
    model = ct_model_utils._apply_graph_pass(mlmodel, graph_pass)
    return model, graph_pass.report()


def read_luts(model) -> dict:
    """{const name: (lut, indices uint8)} of every constexpr_lut_to_dense op in a model or saved package.

    Reads the program back from the package, so a test can check what was
    written is bit-identical to what the solver produced. Keys drop the
    "_palettized" suffix coremltools appends, giving the original const name.
    """
    if not isinstance(model, ct.models.MLModel):
        model = ct.models.MLModel(str(model), skip_model_load=True)
    spec_version = model.get_spec().specificationVersion
    prog = ct_model_utils._convert_model_spec_to_pymil_prog(model, spec_version, _milproto_load)
    out = {}
    for f in prog.functions.values():
        for op in f.find_ops(op_type="constexpr_lut_to_dense"):
            name = op.name[: -len("_palettized")] if op.name.endswith("_palettized") else op.name
            out[name] = (np.asarray(op.lut.val), np.asarray(op.indices.val).astype(np.uint8))
    return out


def check_config(config: OptimizationConfig) -> None:
    """Refuse, before any work, what this engine does not do (never a silent substitute)."""
    if not isinstance(config, OptimizationConfig):
        raise TypeError(f"config must be a coremltools.optimize.coreml.OptimizationConfig, got {type(config).__name__}")
    named = [("global_config", config.global_config)]
    named += [(f"op_type_configs[{k!r}]", v) for k, v in config.op_type_configs.items()]
    named += [(f"op_name_configs[{k!r}]", v) for k, v in config.op_name_configs.items()]
    for where, op_config in named:
        if op_config is None:
            continue
        if not isinstance(op_config, OpPalettizerConfig):
            raise TypeError(f"{where} is a {type(op_config).__name__}; palettization takes OpPalettizerConfig")
        if op_config.cluster_dim > 1:
            raise NotImplementedError(
                f"{where}: cluster_dim={op_config.cluster_dim} (vector palettization) is not implemented by "
                "sdwork's palettizer; use engine='coremltools'")
        if op_config.enable_per_channel_scale:
            raise NotImplementedError(
                f"{where}: enable_per_channel_scale is not implemented by sdwork's palettizer; "
                "use engine='coremltools'")
        if op_config.mode not in NATIVE_MODES + DELEGATED_MODES:
            raise NotImplementedError(
                f"{where}: mode={op_config.mode.lower()!r} is not implemented by sdwork's palettizer "
                "(kmeans and uniform are); use engine='coremltools'")
        kmeans1d.check_nbits(op_config.nbits)


class SdworkPalettizePass(_CoremlPalettizePass):
    """coremltools' palettize_weights pass with exact k-means and a report of every decision."""

    def __init__(self, config: OptimizationConfig, progress: bool = True):
        super().__init__(config=config)
        self.progress = progress
        self._rows: dict[str, dict] = {}
        self._op = None

    # the base class's apply, with a progress bar we can turn off
    def apply(self, prog):
        @block_context_manager
        def apply_block(block):
            if not is_current_opset_version_compatible_with(self._MINIMUM_OPSET_VERSION):
                raise ValueError("palettization needs a model converted with minimum_deployment_target >= iOS16 "
                                 "(iOS18 for per_grouped_channel or 3-bit); re-convert it")
            candidates = []
            for op in list(block.operations):
                for b in op.blocks:
                    apply_block(b)
                if self.is_valid_op(op) and (self.op_selector is None or self.op_selector(op)):
                    candidates.append(op)
            for op in tqdm(candidates, desc="palettize (sdwork)", unit="op", disable=not self.progress):
                self.transform_op(op)

        for f in prog.functions.values():
            apply_block(f)

    def transform_op(self, op):
        self._op = op
        row = self._rows[op.name] = _row(op)
        op_config = self.config._get_const_op_config(op)
        if op_config is None:
            row["reason"] = "no config for this op (None in the config, or the const only feeds the output)"
            return
        row.update(nbits=op_config.nbits, granularity=op_config.granularity.name.lower(),
                   group_size=op_config.group_size, channel_axis=op_config.channel_axis)
        if not self.need_compress_const(op, self.config._is_deprecated, op_config.weight_threshold):
            row["reason"] = _why_not_eligible(op, op_config)
            return
        super().transform_op(op)
        if row["status"] != "palettized" and not row["reason"]:
            row["reason"] = ("channel axes unknown for this op type (coremltools cannot infer block sizes)"
                             if ct_optimize_utils.infer_block_sizes(op, op_config, op.outputs[0].val) is None
                             else "skipped by coremltools")

    def blockwise_compress(self, original_data, mode, nbits, block_sizes, lut_function=None,
                           cluster_dim=1, channel_axis=None, num_kmeans_workers=1):
        row = self._rows[self._op.name]
        axis, group = _channel_axis_and_group(original_data.shape, block_sizes, channel_axis)
        channels = original_data.shape[axis]
        if channels % group:
            # the same log line coremltools writes, for callers that parse its log
            ct_logger.warning(f"Can't perform palettization: The number of channels at {axis}th axis "
                              f"({channels}) is not divisible by channel_group_size ({group}).")
            row["reason"] = (f"{channels} channels on axis {axis} not divisible by group_size {group} "
                             "(left in full precision, like coremltools)")
            return None
        w = original_data.astype(np.float64)
        if mode in DELEGATED_MODES:
            params = _CoremlPalettizePass.blockwise_compress(
                original_data, mode, nbits, block_sizes, lut_function, cluster_dim, channel_axis, 1)
            sse = float(np.square(_CoremlPalettizePass.decompress(params).astype(np.float64) - w).sum())
        else:
            granularity = "per_tensor" if group == channels else "per_grouped_channel"
            lut, indices, sse = kmeans1d.palettize_weight(original_data, nbits, granularity, group, axis,
                                                          return_sse=True)
            dtype = types.nptype_from_builtin(types.string_to_builtin(f"uint{nbits}"))
            params = ct_optimize_utils.LutParams(indices.astype(dtype), lut, None)
        row.update(status="palettized", reason="", n_luts=int(np.prod(params.lut.shape[:-2])),
                   weight_sq_sum=float(np.square(w).sum()), sq_err_sum=sse)
        return params

    def report(self) -> pd.DataFrame:
        df = pd.DataFrame(list(self._rows.values()), columns=REPORT_COLUMNS)
        df["rel_mse"] = df["sq_err_sum"] / df["weight_sq_sum"]
        return df


def _row(op) -> dict:
    shape = tuple(int(s) for s in op.outputs[0].shape)
    return dict(op=op.name, shape=shape, numel=int(np.prod(shape)), status="skipped", reason="",
                nbits=None, granularity=None, group_size=None, channel_axis=None, n_luts=0,
                weight_sq_sum=np.nan, sq_err_sum=np.nan, rel_mse=np.nan)


def _why_not_eligible(op, op_config) -> str:
    numel = int(np.prod(op.outputs[0].shape))
    if any(c.op_type.startswith("constexpr_") for c in op.outputs[0].child_ops):
        return "already feeds a compression op"
    if op.outputs[0].rank <= 1:
        return "1-D tensor (coremltools never compresses those)"
    if numel <= op_config.weight_threshold:
        return f"numel {numel} <= weight_threshold {op_config.weight_threshold}"
    return "not eligible for compression (coremltools need_compress_const)"


def _channel_axis_and_group(shape, block_sizes, channel_axis):
    """The channel axis and group size coremltools' blockwise_compress infers from block_sizes."""
    group = 0
    for axis, size in enumerate(block_sizes):
        if size != 0 and size != shape[axis]:
            if channel_axis is not None and channel_axis != axis:
                raise NotImplementedError("general block-wise palettization is not supported; "
                                          "use per_grouped_channel or per_tensor")
            channel_axis, group = axis, size
    if channel_axis is None:
        channel_axis = 0  # per-tensor: any axis
    channel_axis %= len(shape)
    return channel_axis, group or shape[channel_axis]
