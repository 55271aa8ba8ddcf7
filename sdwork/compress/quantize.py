"""Linear quantization of a Core ML program (weights, sparse values or LUTs), reporting why
each const was or was not quantized.

`ReportingLinearPass` is coremltools' own `linear_quantize_weights` graph pass (the int8 /
int4 data, scales and constexpr_blockwise_shift_scale op are coremltools'), with every decision
recorded in a row (sdwork.compress.decisions). The same pass quantizes a palettization's LUTs
to int8 (joint compression); which consts it sees is decided by sdwork.compress.chain.
"""
from __future__ import annotations

from coremltools.optimize import _utils as ct_optimize_utils
from coremltools.optimize.coreml import OptimizationConfig
from coremltools.optimize.coreml._quantization_passes import linear_quantize_weights as _CoremlLinearPass

from sdwork.compress import decisions as D


class ReportingLinearPass(_CoremlLinearPass):
    def __init__(self, stage: str = "linear", progress: bool = True, joint_compression: bool = False):
        super().__init__(config=OptimizationConfig())
        self.stage, self.progress = stage, progress
        self.joint_compression = joint_compression
        self.rows: dict[str, dict] = {}

    def transform_op(self, op):
        D.reported_transform(self, op, lambda o, cfg: block_refusal(o, cfg, self.joint_compression),
                             super().transform_op, "skipped by coremltools (e.g. inf values, or an int const)")


def block_refusal(op, cfg, joint: bool) -> tuple[str, str] | None:
    """(kind, reason) when coremltools would skip the const for its block structure, else None."""
    weight = op.outputs[0].val
    child = op.outputs[0].child_ops[0]
    if joint and child.op_type == "constexpr_sparse_to_dense":  # the sparse values' dense layout
        weight = ct_optimize_utils.sparse_to_dense(weight, child.mask.val)
    blocks = ct_optimize_utils.infer_block_sizes(op, cfg, weight)
    if blocks is None:
        consumers = sorted({c.op_type for c in op.outputs[0].child_ops})
        return "channel_axis_unknown", ("coremltools cannot infer the input/output axes for the consuming op(s) "
                                        f"{consumers}")
    for axis, (size, block) in enumerate(zip(weight.shape, blocks)):
        if block > 1 and size % block:
            return "block_not_divisible", f"{size} input channels on axis {axis} not divisible by block_size {block}"
    return None
