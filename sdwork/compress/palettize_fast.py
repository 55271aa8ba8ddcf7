"""Palettize a Core ML model, with a structured report of why each weight was or was not
compressed: what `coremltools.optimize.coreml.palettize_weights(mlmodel, config)` does, and a
faster drop-in for it.

Both engines are subclasses of coremltools' own `palettize_weights` MIL graph pass, so which
consts are eligible, per-op / per-op-type / global configs (None skips an op),
weight_threshold, channel-axis inference and the `constexpr_lut_to_dense` op written are
coremltools' code:
  "coremltools"  `ReportingPalettizePass`: coremltools' LUT computation unchanged (the LUTs
                 are bit-identical to `palettize_weights`'); it only records each decision.
  "sdwork"       `SdworkPalettizePass`: the same, with the step that computes one op's LUTs
                 and indices (`blockwise_compress`) replaced by sdwork's exact k-means.

Why the sdwork engine replaces only that step: the alternatives were slower or less exact.
`mode="custom"` calls a Python function once per LUT group (thousands per layer) with no
access to the group structure, and the torch route (`_COREML_` buffers + ct.convert) needs a
fresh conversion per recipe (~80 s for a full SD UNet).

coremltools only logs a warning when it leaves a weight dense. The passes record every
candidate const with its status, a `kind` from a fixed vocabulary (KINDS) and a readable
reason; `palettize_mlmodel_with_report` returns that report (a pandas DataFrame, columns
REPORT_COLUMNS) and `palettize_mlmodel` attaches it to the model as `.palettize_report`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

import coremltools as ct
from coremltools.converters.mil.mil import types
from coremltools.converters.mil.mil.block import is_current_opset_version_compatible_with
from coremltools.converters.mil.mil.passes.helper import block_context_manager
from coremltools.converters.mil._deployment_compatibility import AvailableTarget
from coremltools.models import utils as ct_model_utils
from coremltools.converters.mil.frontend.milproto.load import load as _milproto_load
from coremltools.optimize import _utils as ct_optimize_utils
from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig
from coremltools.optimize.coreml._quantization_passes import palettize_weights as _CoremlPalettizePass

from sdwork.compress import decisions as D
from sdwork.compress import kmeans1d
from sdwork.coreml.lut import lut_to_dense
from sdwork.errors import ConfigError, PackageError

NATIVE_MODES = ("KMEANS",)
DELEGATED_MODES = ("UNIFORM",)  # coremltools' own per-group code: already cheap, identical output
REPORT_COLUMNS = ["op", "shape", "numel", "status", "kind", "reason", "nbits", "granularity", "group_size",
                  "channel_axis", "n_luts", "weight_sq_sum", "sq_err_sum", "rel_mse"]
# why a candidate const stayed dense ("" when it was palettized)
KINDS = {
    "no_config": "no config applies to the op (None for it, or the const only feeds the output)",
    "already_compressed": "the const already feeds a compression (constexpr) op",
    "one_d": "a 1-D tensor: coremltools never compresses those",
    "below_threshold": "numel <= weight_threshold",
    "not_eligible": "another reason of coremltools' need_compress_const",
    "channel_axis_unknown": "coremltools cannot infer the channel axis for the op consuming it",
    "channels_not_divisible": "the channels are not divisible by group_size",
    "cluster_dim": "the channels of a group are not divisible by cluster_dim",
    "engine": "the LUT computation returned nothing",
}


def palettize_mlmodel(mlmodel, config: OptimizationConfig, progress: bool = True, joint_compression: bool = False):
    """Same call and result form as ct.optimize.coreml.palettize_weights; `.palettize_report` lists every const."""
    model, report = palettize_mlmodel_with_report(mlmodel, config, progress, joint_compression)
    model.palettize_report = report
    return model


def palettize_mlmodel_with_report(mlmodel, config: OptimizationConfig, progress: bool = True,
                                  joint_compression: bool = False, engine: str = "sdwork"):
    """(palettized mlmodel, report DataFrame with one row per candidate weight const).

    engine "sdwork": exact k-means; "coremltools": coremltools' own LUT computation, so the
    model is bit-identical to ct.optimize.coreml.palettize_weights(mlmodel, config)."""
    if engine not in PASSES:
        raise ConfigError(f"engine must be one of {', '.join(map(repr, PASSES))}, got {engine!r}")
    check_model(mlmodel)
    PASSES[engine].check(config, joint_compression)
    graph_pass = PASSES[engine](config, progress=progress, joint_compression=joint_compression)
    model = ct_model_utils._apply_graph_pass(mlmodel, graph_pass)
    return model, graph_pass.report()


def check_model(mlmodel) -> None:
    """Refuse what coremltools' palettize_weights refuses (there a plain ValueError)."""
    if not isinstance(mlmodel, ct.models.MLModel):
        raise ConfigError(f"mlmodel must be a coremltools MLModel, got {type(mlmodel).__name__}; open a package "
                          "with ct.models.MLModel(path, skip_model_load=True)")
    if mlmodel._is_multifunction():
        raise PackageError("palettization does not support a multifunction model (coremltools' palettize_weights "
                           "refuses it too): palettize each function's model, then combine them with "
                           "ct.utils.save_multifunction")


def read_luts(model) -> dict:
    """{const name: (lut, indices uint8)} of every constexpr_lut_to_dense op in a model or saved package.

    Reads the program back from the package, so a test can check what was
    written is bit-identical to what the solver produced. Keys drop the
    "_palettized" suffix coremltools appends, giving the original const name.
    """
    if not isinstance(model, ct.models.MLModel):
        from sdwork.coreml.package import open_package

        model = open_package(model)  # read-only
    spec_version = model.get_spec().specificationVersion
    prog = ct_model_utils._convert_model_spec_to_pymil_prog(model, spec_version, _milproto_load)
    out = {}
    for f in prog.functions.values():
        for op in f.find_ops(op_type="constexpr_lut_to_dense"):
            name = op.name[: -len("_palettized")] if op.name.endswith("_palettized") else op.name
            out[name] = (np.asarray(op.lut.val), np.asarray(op.indices.val).astype(np.uint8))
    return out


def check_config_types(config: OptimizationConfig) -> list[tuple[str, OpPalettizerConfig | None]]:
    """[(where, op config)] of an OptimizationConfig holding palettizer configs only; a ConfigError
    (a ValueError, as coremltools raises) for anything else."""
    if not isinstance(config, OptimizationConfig):
        raise ConfigError(f"config must be a coremltools.optimize.coreml.OptimizationConfig, got {type(config).__name__}")
    named = [("global_config", config.global_config)]
    named += [(f"op_type_configs[{k!r}]", v) for k, v in config.op_type_configs.items()]
    named += [(f"op_name_configs[{k!r}]", v) for k, v in config.op_name_configs.items()]
    for where, op_config in named:
        if op_config is not None and not isinstance(op_config, OpPalettizerConfig):
            raise ConfigError(f"{where} is a {type(op_config).__name__}; palettization takes OpPalettizerConfig")
    return named


def check_config(config: OptimizationConfig) -> None:
    """Refuse, before any work, what the sdwork engine does not do (never a silent substitute)."""
    for where, op_config in check_config_types(config):
        if op_config is None:
            continue
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


class ReportingPalettizePass(_CoremlPalettizePass):
    """coremltools' palettize_weights pass, unchanged in what it computes, recording every decision."""

    engine = "coremltools"

    def __init__(self, config: OptimizationConfig, progress: bool = True, joint_compression: bool = False):
        super().__init__(config=config)
        self.joint_compression = joint_compression
        self.progress = progress
        self._rows: dict[str, dict] = {}
        self._op, self._decodable = None, False

    @staticmethod
    def check(config: OptimizationConfig, joint_compression: bool) -> None:
        check_config_types(config)

    # the base class's apply, with a progress bar we can turn off and an error (not a skipped
    # pass) for a program too old to hold LUTs
    def apply(self, prog):
        @block_context_manager
        def apply_block(block):
            _check_opset(self.joint_compression)
            candidates = []
            for op in list(block.operations):
                for b in op.blocks:
                    apply_block(b)
                if self.is_valid_op(op) and (self.op_selector is None or self.op_selector(op)):
                    candidates.append(op)
            for op in tqdm(candidates, desc=f"palettize ({self.engine})", unit="op", disable=not self.progress):
                self.transform_op(op)

        for f in prog.functions.values():
            apply_block(f)

    def transform_op(self, op):
        self._op = op
        row = self._rows[op.name] = _row(op)
        op_config = self.config._get_const_op_config(op)
        if op_config is None:
            return _skip(row, "no_config", _why_no_config(op, self.config))
        row.update(nbits=op_config.nbits, granularity=op_config.granularity.name.lower(),
                   group_size=op_config.group_size, channel_axis=op_config.channel_axis)
        # the LUT decodes to the weight itself (no vector LUT, no per-channel scale on top)
        self._decodable = op_config.cluster_dim == 1 and not op_config.enable_per_channel_scale
        if not self.need_compress_const(op, self.config._is_deprecated, op_config.weight_threshold):
            return _skip(row, *_why_not_eligible(op, op_config))
        super().transform_op(op)
        if row["status"] != "palettized" and not row["kind"]:
            _skip(row, *_why_transform_skipped(op, op_config))

    def blockwise_compress(self, original_data, mode, nbits, block_sizes, lut_function=None,
                           cluster_dim=1, channel_axis=None, num_kmeans_workers=1):
        row = self._rows[self._op.name]
        params, sse = self.lut_params(original_data, mode, nbits, block_sizes, lut_function, cluster_dim,
                                      channel_axis, num_kmeans_workers)
        if params is None:
            _skip(row, *_why_blockwise_refused(original_data.shape, block_sizes, channel_axis, cluster_dim))
            return None
        if sse is None:
            sse = _sse(original_data, params) if self._decodable else np.nan
        row.update(status="palettized", kind="", reason="", n_luts=int(np.prod(params.lut.shape[:-2])),
                   weight_sq_sum=float(np.square(original_data.astype(np.float64)).sum()), sq_err_sum=sse)
        return params

    def lut_params(self, original_data, mode, nbits, block_sizes, lut_function, cluster_dim, channel_axis,
                   num_kmeans_workers):
        """(LutParams or None, the float64 squared error or None): here coremltools' own computation."""
        params = _CoremlPalettizePass.blockwise_compress(original_data, mode, nbits, block_sizes, lut_function,
                                                         cluster_dim, channel_axis, num_kmeans_workers)
        return params, None

    def report(self) -> pd.DataFrame:
        df = pd.DataFrame(list(self._rows.values()), columns=REPORT_COLUMNS)
        df["rel_mse"] = df["sq_err_sum"] / df["weight_sq_sum"]
        return df


class SdworkPalettizePass(ReportingPalettizePass):
    """coremltools' palettize_weights pass with exact k-means and a report of every decision."""

    engine = "sdwork"

    @staticmethod
    def check(config: OptimizationConfig, joint_compression: bool) -> None:
        # joint compression needs nothing of the LUT step: coremltools' transform_op hands it the
        # pruned weight restored to dense (zeros included) and keeps only the nonzero indices
        check_config(config)

    def lut_params(self, original_data, mode, nbits, block_sizes, lut_function, cluster_dim, channel_axis,
                   num_kmeans_workers):
        if mode in DELEGATED_MODES:
            return super().lut_params(original_data, mode, nbits, block_sizes, lut_function, cluster_dim,
                                      channel_axis, 1)
        axis, group = _channel_axis_and_group(original_data.shape, block_sizes, channel_axis)
        channels = original_data.shape[axis]
        if channels % group:
            return None, None
        granularity = "per_tensor" if group == channels else "per_grouped_channel"
        lut, indices, sse = kmeans1d.palettize_weight(original_data, nbits, granularity, group, axis, return_sse=True)
        dtype = types.nptype_from_builtin(types.string_to_builtin(f"uint{nbits}"))
        return ct_optimize_utils.LutParams(indices.astype(dtype), lut, None), sse


PASSES = {"coremltools": ReportingPalettizePass, "sdwork": SdworkPalettizePass}


def _check_opset(joint_compression: bool) -> None:
    if not is_current_opset_version_compatible_with(AvailableTarget.iOS16):
        raise PackageError("palettization needs a model converted with minimum_deployment_target >= iOS16 "
                           "(iOS18 for per_grouped_channel or 3-bit); re-convert it")
    if joint_compression and not is_current_opset_version_compatible_with(AvailableTarget.iOS18):
        raise PackageError("joint compression needs a model converted with minimum_deployment_target >= iOS18; "
                           "re-convert it")


# the row helpers are shared with the other families' passes (sdwork.compress.decisions)
_row, _skip, _why_no_config, _why_not_eligible = D.row, D.skip, D.why_no_config, D.why_not_eligible


def _why_transform_skipped(op, op_config) -> tuple[str, str]:
    """Why coremltools' transform_op returned before computing LUTs (it only logs a warning)."""
    block_sizes, axis = ct_optimize_utils.infer_block_sizes(op, op_config, op.outputs[0].val, return_channel_axis=True)
    if block_sizes is None:
        consumers = sorted({c.op_type for c in op.outputs[0].child_ops})
        return "channel_axis_unknown", f"coremltools cannot infer the channel axis for the consuming op(s) {consumers}"
    if op_config.cluster_dim > 1 and not ct_optimize_utils.is_cluster_dim_valid(op, op_config.cluster_dim, axis):
        return "cluster_dim", (f"cluster_dim {op_config.cluster_dim} does not divide the channels on axis {axis} "
                               "of each conv group")
    return "engine", "skipped by coremltools"


def _why_blockwise_refused(shape, block_sizes, channel_axis, cluster_dim) -> tuple[str, str]:
    axis, group = _channel_axis_and_group(shape, block_sizes, channel_axis)
    if shape[axis] % group:
        return "channels_not_divisible", f"{shape[axis]} channels on axis {axis} not divisible by group_size {group}"
    if group % cluster_dim:
        return "cluster_dim", f"a group of {group} channels on axis {axis} is not divisible by cluster_dim {cluster_dim}"
    return "engine", "the LUT computation returned nothing (e.g. mode 'unique' with too many distinct values)"


def _sse(original_data: np.ndarray, params) -> float:
    """Squared error of a scalar LUT as stored (decoded in O(numel), unlike coremltools' decompress)."""
    dense = lut_to_dense(params.lut, params.indices.astype(np.uint8))
    return float(np.square(dense.astype(np.float64) - original_data.astype(np.float64)).sum())


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
