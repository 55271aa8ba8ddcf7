"""Magnitude pruning of a Core ML program, reporting why each weight was or was not pruned.

`ReportingPrunePass` is coremltools' own `prune_weights` graph pass (the zeros and the
constexpr_sparse_to_dense op it writes are coremltools'), with every decision recorded in a
row (sdwork.compress.decisions). Two refusals are sdwork's own, made before coremltools runs:

- n:m pruning of a weight whose input axis m does not divide: coremltools pads the last group
  with zeros, so that group is not n:m at all (the structure hardware can exploit is gone);
  sdwork keeps the weight fp16 and says so.
- n:m pruning of a const that feeds no conv or linear: coremltools refuses those itself, but
  not when the const is named in op_name_configs, which is how sdwork configures every weight.
"""
from __future__ import annotations

from coremltools.optimize.coreml import OptimizationConfig
from coremltools.optimize.coreml._quantization_passes import prune_weights as _CoremlPrunePass

from sdwork.compress import decisions as D


class ReportingPrunePass(_CoremlPrunePass):
    stage = "prune"

    def __init__(self, progress: bool = True):
        super().__init__(config=OptimizationConfig())
        self.progress = progress
        self.rows: dict[str, dict] = {}

    def transform_op(self, op):
        D.reported_transform(self, op, structural_refusal, super().transform_op, "skipped by coremltools")


def structural_refusal(op, cfg) -> tuple[str, str] | None:
    """(kind, reason) when n:m pruning cannot give true n:m groups on this const, else None."""
    if cfg.n_m_ratio is None:
        return None
    feeds = sorted({c.op_type for c in op.outputs[0].child_ops})
    if not cfg._check_const_op_is_valid(op):
        return "not_conv_or_linear", f"n:m pruning applies to conv and linear weights; this const feeds {feeds}"
    n, m = cfg.n_m_ratio
    channels = int(op.outputs[0].shape[cfg.dim])
    if channels % m:
        return "nm_not_divisible", (f"{channels} input channels on axis {cfg.dim} not divisible by m={m} (coremltools "
                                    "would pad the last group, which is then not n:m)")
    if m > channels / 2:
        return "nm_channels", (f"n:m needs at least 2m={2 * m} input channels on axis {cfg.dim}, this weight has "
                               f"{channels}")
    return None
