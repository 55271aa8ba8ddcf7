"""Compress a Core ML program with a recipe of chained stages (prune, palettize, linear, lut),
one coremltools pass per stage, and report per weight what each stage did.

Why not coremltools' passes with a global config, one after the other (its documented way to
chain them): a later pass then compresses whatever an earlier one left dense. Measured on
coremltools 9.0: with palettize (group 16) then an int8-LUT pass, a layer whose 36 channels
group 16 does not divide was silently linear-quantized to per-tensor int8 by the LUT pass, and
the same for sparse + palettize + int8 LUT. A recipe must not change family behind the user's
back, so before each stage this module names, per const, the config the weight it belongs to
gets from the recipe (`Recipe.for_layer`), and gives every other const none:

    prune      dense weight consts
    palettize  dense weight consts, and the nonzero values of a pruned weight
    linear     the same
    lut        the LUT of a palettized weight (consts feeding a LUT op's `lut`)

After the last stage every compressed weight is decoded (sdwork.coreml.decode) and compared
with its fp16 original, so the report gives each weight's error whatever its family.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from coremltools.converters.mil.backend.mil.load import should_use_weight_file
from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
from coremltools.models import utils as ct_model_utils
from coremltools.optimize.coreml import OptimizationConfig

from sdwork.compress.families import STAGES
from sdwork.compress.palettize_fast import PASSES, check_model
from sdwork.compress.prune import ReportingPrunePass
from sdwork.compress.quantize import ReportingLinearPass
from sdwork.coreml.decode import final_output, is_constexpr, iter_decoded
from sdwork.coreml.package import base_name

REPORT_COLUMNS = ["op", "shape", "numel", "status", "kind", "reason", "planned", "done", *STAGES,
                  "weight_sq_sum", "sq_err_sum", "rel_mse"]


def compress_mlmodel(mlmodel, recipe, keep_dense: tuple[str, ...] = (), progress: bool = True):
    """(compressed MLModel, report: one row per weight const, columns REPORT_COLUMNS).
    `keep_dense`: consts left fp16 whatever the recipe says (those that hold no model weight)."""
    check_model(mlmodel)
    chain = Chain(recipe, set(keep_dense), progress)
    return ct_model_utils._apply_graph_pass(mlmodel, chain), chain.report()


class Chain(AbstractGraphPass):
    """One graph pass running each stage's coremltools pass in order on the same program."""

    def __init__(self, recipe, keep_dense: set, progress: bool):
        super().__init__()
        self.recipe, self.keep_dense, self.progress = recipe, keep_dense, progress
        self.originals: dict[str, np.ndarray] = {}  # weight name -> fp16 values before any stage
        self.rows: dict[str, dict[str, dict]] = {}  # weight name -> stage -> the stage pass's row
        self.errors: dict[str, tuple[float, float]] = {}
        self._configs: dict = {}  # layer plan -> its op configs (a recipe has only a few distinct plans)

    def apply(self, prog):
        self.originals = {op.name: op.outputs[0].val for op in _consts(prog) if _is_weight_const(op)}
        for i, stage in enumerate(s for s in STAGES if s in self.recipe.stages):
            self._run(stage, prog, joint=i > 0)
        self._measure(prog)

    def _run(self, stage: str, prog, joint: bool) -> None:
        chosen = {op.name: _weight_of(op) for op in _consts(prog) if SELECT[stage](op)}
        config = OptimizationConfig(op_name_configs={c: self._config(w, stage) for c, w in chosen.items()})
        graph_pass = _make_pass(stage, self.recipe.engine, self.progress, joint)
        if stage == "palettize":
            type(graph_pass).check(config, joint)
        graph_pass.config = config
        graph_pass.apply(prog)
        for const, weight in chosen.items():
            if const in graph_pass.rows:
                self.rows.setdefault(weight, {})[stage] = graph_pass.rows[const]

    def _config(self, weight: str, stage: str):
        plan = None if weight in self.keep_dense else self.recipe.for_layer(weight)
        if plan is None:
            return None
        if plan not in self._configs:
            self._configs[plan] = plan.stage_configs()
        return self._configs[plan].get(stage)

    def _measure(self, prog) -> None:
        for out, value in iter_decoded(prog):
            name = base_name(out)
            if name in self.originals:
                ref = self.originals[name].astype(np.float64)
                err = np.square(value.astype(np.float64) - ref).sum()
                self.errors[name] = (float(np.square(ref).sum()), float(err))

    def report(self) -> pd.DataFrame:
        rows = [self._summary(name) for name in self.originals]
        return pd.DataFrame(rows, columns=REPORT_COLUMNS)

    def _summary(self, name: str) -> dict:
        """One weight's row: its planned stages, what each did, the first skip's kind and reason."""
        plan = None if name in self.keep_dense else self.recipe.for_layer(name)
        planned = [s for s in STAGES if plan is not None and s in plan.stages]
        value = self.originals[name]
        row = dict(op=name, shape=tuple(value.shape), numel=int(value.size), planned="+".join(planned))
        outcome, first = {}, None
        stage_rows = self.rows.get(name, {})
        for s in planned:
            r = stage_rows.get(s) or _not_reached(s, outcome)
            outcome[s] = "compressed" if r["status"] in ("compressed", "palettized") else r["kind"]
            if outcome[s] != "compressed" and first is None:
                first = r
        done = [s for s in planned if outcome[s] == "compressed"]
        if not planned:  # kept fp16 by an override None, or as no model weight (apply.py names which)
            first = dict(kind="no_config", reason="None for this op in op_name_configs: kept dense on purpose")
        status = "compressed" if planned and len(done) == len(planned) else ("partial" if done else "skipped")
        sq, err = self.errors.get(name, (np.nan, np.nan))
        row.update(status=status, kind="" if first is None else first["kind"],
                   reason="" if first is None else first["reason"], done="+".join(done),
                   **{s: outcome.get(s) for s in STAGES}, weight_sq_sum=sq, sq_err_sum=err,
                   rel_mse=err / sq if sq else np.nan)
        return row


def _not_reached(stage: str, outcome: dict) -> dict:
    """A planned stage with no row: it had nothing of this weight to compress."""
    if stage == "lut" and outcome.get("palettize") == "compressed":
        return dict(status="skipped", kind="lut_inline", reason="the LUT has under 10 entries, so it is written "
                    "inline in model.mlmodel, and coremltools quantizes only LUTs in weight.bin")
    before = [s for s, o in outcome.items() if o != "compressed"]
    return dict(status="skipped", kind="not_reached",
                reason=f"the {before[-1] if before else 'earlier'} stage this one chains on was skipped")


def _make_pass(stage: str, engine: str, progress: bool, joint: bool):
    if stage == "prune":
        return ReportingPrunePass(progress)
    if stage == "palettize":
        p = PASSES[engine](OptimizationConfig(), progress=progress, joint_compression=joint)
        p.rows = p._rows  # the palettization passes keep their rows under this name
        return p
    return ReportingLinearPass(stage, progress, joint_compression=joint)


# --- which consts each stage sees ------------------------------------------------------


def _consts(prog):
    for fn in prog.functions.values():
        yield from (op for op in list(fn.operations) if op.op_type == "const")


def _is_weight_const(op) -> bool:
    """A float const in weight.bin (10 elements or more) feeding a compute op: what the
    compression passes consider, the same set as the palettization report's rows."""
    val = op.outputs[0].val
    return should_use_weight_file(val) and np.issubdtype(val.dtype, np.floating) and \
        any(not is_constexpr(c) for c in op.outputs[0].child_ops)


def _only_child(op):
    children = op.outputs[0].child_ops
    return children[0] if len(children) == 1 else None


def _feeds(op, op_types: tuple[str, ...], key: str) -> bool:
    child = _only_child(op)
    return child is not None and child.op_type in op_types and child.inputs.get(key) is op.outputs[0]


def _dense(op) -> bool:
    return op.outputs[0].child_ops and not any(is_constexpr(c) for c in op.outputs[0].child_ops) \
        and _is_weight_const(op)


def _weight_values(op) -> bool:
    """A dense weight, or the nonzero values of a pruned one."""
    return _dense(op) or _feeds(op, ("constexpr_sparse_to_dense",), "nonzero_data")


def _lut(op) -> bool:
    return _feeds(op, ("constexpr_lut_to_dense", "constexpr_lut_to_sparse"), "lut")


SELECT = dict(prune=_dense, palettize=_weight_values, linear=_weight_values, lut=_lut)


def _weight_of(op) -> str:
    """The weight a const is part of: the name its chain's last output had before compression."""
    out = final_output(op)
    return op.name if out is None else base_name(out.name)
