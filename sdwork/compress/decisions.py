"""One row per candidate const of a compression pass: was it compressed, and if not, why.

coremltools only logs a warning when it leaves a weight dense. sdwork's passes (palettize_fast,
prune, quantize) record every decision in rows of this form instead, with a `kind` from a
fixed vocabulary and a readable reason, so a results row can list what stayed dense and why.
"""
from __future__ import annotations

import numpy as np


def row(op) -> dict:
    shape = tuple(int(s) for s in op.outputs[0].shape)
    return dict(op=op.name, shape=shape, numel=int(np.prod(shape)), status="skipped", kind="", reason="",
                nbits=None, granularity=None, group_size=None, channel_axis=None, n_luts=0,
                weight_sq_sum=np.nan, sq_err_sum=np.nan, rel_mse=np.nan)


def skip(r: dict, kind: str, reason: str) -> None:
    r.update(status="skipped", kind=kind, reason=reason)


def reported_transform(pass_, op, refusal, transform, engine_skip: str) -> None:
    """The decision path of a coremltools pass subclass: record in pass_.rows why the const stays
    dense (no config, not eligible, refused by `refusal(op, cfg)`, or skipped by coremltools
    inside `transform(op)`), or that it was compressed (the const was replaced)."""
    r = pass_.rows[op.name] = row(op)
    cfg = pass_.config._get_const_op_config(op)
    if cfg is None:
        return skip(r, "no_config", why_no_config(op, pass_.config))
    if not pass_.need_compress_const(op, pass_.config._is_deprecated, cfg.weight_threshold):
        return skip(r, *why_not_eligible(op, cfg))
    refused = refusal(op, cfg)
    if refused:
        return skip(r, *refused)
    transform(op)
    if op.enclosing_block is None:
        r.update(status="compressed")
    else:
        skip(r, "engine", engine_skip)


def why_no_config(op, config) -> str:
    if op.name in config.op_name_configs:
        return "None for this op in op_name_configs: kept dense on purpose"
    if not op.outputs[0].child_ops:
        return "the const only feeds the block output (coremltools never compresses those)"
    return "no config for this op (the global config is None)"


def why_not_eligible(op, op_config) -> tuple[str, str]:
    """(kind, reason) when coremltools' need_compress_const refuses the const."""
    numel = int(np.prod(op.outputs[0].shape))
    if any(c.op_type.startswith("constexpr_") for c in op.outputs[0].child_ops):
        return "already_compressed", "already feeds a compression op"
    if op.outputs[0].rank <= 1:
        return "one_d", "1-D tensor (coremltools never compresses those)"
    if numel <= op_config.weight_threshold:
        return "below_threshold", f"numel {numel} <= weight_threshold {op_config.weight_threshold}"
    return "not_eligible", "not eligible for compression (coremltools need_compress_const)"
