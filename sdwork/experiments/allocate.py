"""A mixed-bit allocator under an exact byte budget: a multiple-choice knapsack on the measured
sensitivity table, corrected for interaction between layers by measuring whole recipes.

    alloc = Allocator(sens, sizes)                      # a Sensitivity (run) and the package's SizeModel
    result = alloc.allocate(sizes.budget(3.0))          # exact weight.bin bytes of the component
    result.allocation, result.predicted, result.measured

1. `knapsack`: per layer one option (bits x granularity, or fp16) minimising the summed drift of
   the single-layer table under the budget, solved exactly by dynamic programming over 64-byte
   units (every blob of weight.bin but the file's last is a whole number of them).
2. `refine`: the drift of a whole recipe is not the sum of its layers' drifts alone. Each round
   measures the recipe, then each group of layers (a UNet block part: `block_of`) alone and the
   recipe without it; the Shapley share of the group in the measured drift, exact when layers
   interact in pairs, over its additive prediction scales the group's options, and the knapsack
   is solved again. Every round's recipe is a proposal.
3. `Allocator.allocate` runs both for each objective, adds the greedy's recipe of the same table
   per objective, and returns every proposal with its predicted drift and the drift the joint
   probe measured on seeds the experiment never scores; the least measured drift first is the pick.
4. `compare` scores the pick (and, for the record, the top proposals) beside Apple's and the
   greedy's recipes through `Experiment.run`: the choice never sees the images it is judged on.

docs/mixed_bit.md explains the choices and the measured results.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from sdwork.errors import ConfigError
from sdwork.experiments.mixedbit import (OBJECTIVES, Allocation, Option, SizeModel, _allocation, _spend_slack,
                                         layer_options)
from sdwork.experiments.sensitivity import FP16, parse_candidate

UNIT = 64  # weight.bin aligns every blob to 64 bytes: the knapsack's exact resolution
MAX_UNITS = 250_000  # above this many units of the fp16 size the knapsack works on coarser units
ZERO_DRIFT = 1e-6  # a compressed option measured without drift still costs this share of the least drift seen


# --- the exact knapsack ---------------------------------------------------------------------


def resolution(options: dict[str, list[Option]]) -> int:
    """Bytes per knapsack unit: 64 (exact) unless the fp16 size has more than MAX_UNITS of them.
    It depends on the layers only, never on the budget, so a larger budget never solves worse."""
    most = sum(max(o.bytes for o in opts) for opts in options.values())
    return UNIT * max(1, math.ceil(most / UNIT / MAX_UNITS))


def smallest_bytes(options: dict[str, list[Option]]) -> int:
    return sum(min(o.bytes for o in opts) for opts in options.values())


def largest_bytes(options: dict[str, list[Option]]) -> int:
    return sum(max(o.bytes for o in opts) for opts in options.values())


def check_budget(options: dict[str, list[Option]], budget_bytes: int, sizes: SizeModel | None = None) -> None:
    """A budget below every layer at its smallest option, or above every layer in fp16, is refused."""
    lo, hi = smallest_bytes(options), largest_bytes(options)
    fixed = sizes.fixed_bytes if sizes else 0
    if budget_bytes < lo:
        raise ConfigError(f"budget of {fixed + budget_bytes} bytes is below the smallest possible package "
                          f"({fixed + lo} bytes: every layer at its smallest candidate); raise the budget")
    if budget_bytes > hi:
        raise ConfigError(f"budget of {fixed + budget_bytes} bytes is above the fp16 package ({fixed + hi} "
                          "bytes): nothing to compress; give at most the fp16 size")


def knapsack(options: dict[str, list[Option]], budget_bytes: int, unit: int | None = None) -> Allocation:
    """The options of least summed drift whose bytes fit in `budget_bytes` (exact at 64-byte units).

    Costs are rounded up to whole units, so the chosen bytes never exceed the budget; on coarse
    units the bytes left over are then spent on the upgrades that buy the most drift per byte."""
    check_budget(options, budget_bytes)
    unit = unit or resolution(options)
    layers = list(options)
    cap = budget_bytes // unit
    floor = _drift_floor(options)
    best = np.zeros(cap + 1)  # least drift of the layers so far within c units (none yet: 0)
    picks = np.empty((len(layers), cap + 1), np.int8)  # the option each capacity took, per layer
    for i, layer in enumerate(layers):
        best, picks[i] = _add_layer(best, options[layer], unit, floor)
    choice, c = {}, cap
    for i in reversed(range(len(layers))):
        opt = options[layers[i]][picks[i][c]]
        choice[layers[i]] = opt
        c -= _units(opt, unit)
    _spend_slack(options, choice, budget_bytes)
    return _allocation("knapsack", options, choice)


def _add_layer(best: np.ndarray, opts: list[Option], unit: int, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """One DP step: each capacity takes the option minimising drift + the best of what is left."""
    if len(opts) > 127:
        raise ConfigError(f"{len(opts)} options for one layer; the knapsack takes at most 127 candidates")
    new, arg = np.full(best.shape, np.inf), np.full(best.shape, -1, np.int8)
    for j, o in enumerate(opts):  # sorted by bytes: on equal drift the smaller option is kept
        w = _units(o, unit)
        if w >= len(best):
            continue
        cand = best[: len(best) - w] + _cost(o, floor)
        better = cand < new[w:]
        new[w:][better], arg[w:][better] = cand[better], j
    return new, arg


def _units(o: Option, unit: int) -> int:
    return -(-o.bytes // unit)


def _cost(o: Option, floor: float) -> float:
    """A compressed option never costs exactly nothing: when the probe saw no drift, fp16 still wins
    a tie, so a budget that allows every layer in fp16 gets the fp16 package."""
    return o.drift if o.candidate == FP16 else max(o.drift, floor)


def _drift_floor(options: dict[str, list[Option]]) -> float:
    positive = [o.drift for opts in options.values() for o in opts if o.drift > 0]
    return ZERO_DRIFT * min(positive) if positive else ZERO_DRIFT


# --- interaction between layers --------------------------------------------------------------


def block_of(layer: str) -> str:
    """The block a layer belongs to: its name up to the first index ('down_blocks.0',
    'mid_block.resnets.0', 'conv_in'). Few groups: each costs two probe runs a round."""
    parts = layer.split(".")
    idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    return ".".join(parts[: idx + 1]) if idx is not None else parts[0]


def part_of(layer: str) -> str:
    """A finer group: the block part ('down_blocks.0.attentions', 'mid_block.resnets.0')."""
    parts = layer.split(".")
    idx = next((i for i, p in enumerate(parts) if p.isdigit()), len(parts))
    return ".".join(parts[: max(1, min(idx + 2, len(parts) - 1))])


def scaled(options: dict[str, list[Option]], factors: dict[str, float]) -> dict[str, list[Option]]:
    """Every option of a layer with its drift times the layer's factor (1 when none is given)."""
    return {l: [Option(o.candidate, o.bytes, o.drift * factors.get(l, 1.0)) for o in opts]
            for l, opts in options.items()}


@dataclass
class Round:
    """One refinement round: the recipe solved on the corrected options, and what was measured."""

    allocation: Allocation
    predicted: float  # the corrected model's drift of this recipe (the additive one is allocation.predicted_drift)
    measured: float  # the probe's drift of the whole recipe
    factors: dict[str, float]  # per layer: the correction its options were solved with
    probes: int  # pipeline runs this round took


def shapley_factors(alloc: Allocation, options: dict[str, list[Option]], measure, groups) -> tuple[dict, float, int]:
    """(per-layer correction, the recipe's measured drift, probes run) from the Shapley share of
    each group of layers in the measured drift: (D(group alone) + D(all) - D(all but group)) / 2,
    exact when the drift is a sum of single-layer and pairwise terms. The factor is that share
    over the group's additive prediction; a group alone is measured too, even of one layer, since
    the probe may see other images than the table's."""
    drift = {l: next(o.drift for o in options[l] if o.candidate == c) for l, c in alloc.choice.items()}
    chosen = _compressed(alloc)
    total, probes = measure(chosen), 1
    factors = {}
    for members in _groups(chosen, groups).values():
        alone = measure({l: chosen[l] for l in members})
        without = measure({l: c for l, c in chosen.items() if l not in members})
        probes += 2
        additive = sum(drift[l] for l in members)
        share = (alone + total - without) / 2
        k = _clip(share / additive) if additive > 0 else 1.0
        factors.update({l: k for l in members})
    return factors, total, probes


def _compressed(alloc: Allocation) -> dict[str, str]:
    return {l: c for l, c in alloc.choice.items() if c != FP16}


def _groups(chosen: dict[str, str], groups) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for l in chosen:
        out.setdefault(groups(l), []).append(l)
    return out


def _clip(k: float, lo: float = 1 / 16, hi: float = 16.0) -> float:
    """A share can be negative (errors that cancel on the probe's few images): that does not carry
    over to other images, so a factor stays positive and bounded."""
    return float(min(max(k, lo), hi))


def refine(options: dict[str, list[Option]], budget_bytes: int, measure, rounds: int = 1, groups=block_of,
           damping: float = 0.5) -> list[Round]:
    """Knapsack, then `rounds` corrections: each measures the current recipe's groups, folds the
    factors into the running ones (a geometric step of `damping`, so that one noisy round cannot
    swing the recipe), and solves again. Round 0 is the plain knapsack."""
    factors: dict[str, float] = {}
    alloc = knapsack(options, budget_bytes)
    out = []
    for r in range(rounds + 1):
        predicted = sum(factors.get(l, 1.0) * _drift(options, l, c) for l, c in alloc.choice.items())
        if r == rounds:  # the last recipe is only measured whole: no further solve needs its groups
            out.append(Round(alloc, predicted, measure(_compressed(alloc)), dict(factors), 1))
            break
        step, total, probes = shapley_factors(alloc, options, measure, groups)
        out.append(Round(alloc, predicted, total, dict(factors), probes))
        factors = {l: factors.get(l, 1.0) ** (1 - damping) * step.get(l, factors.get(l, 1.0)) ** damping
                   for l in options}
        alloc = knapsack(scaled(options, factors), budget_bytes)
        alloc.predicted_drift = sum(_drift(options, l, c) for l, c in alloc.choice.items())  # additive, raw
    return out


def _drift(options, layer: str, candidate: str) -> float:
    return next(o.drift for o in options[layer] if o.candidate == candidate)


# --- the allocator ----------------------------------------------------------------------------


@dataclass
class Proposal:
    name: str  # 'knapsack image_mse r1': objective and refinement round
    allocation: Allocation
    objective: str
    round: int
    predicted: float  # drift the corrected model predicts (round 0: the additive sum)
    additive: float  # sum of the chosen options' drift alone
    measured: dict  # the probe's drift of the whole recipe (latent/image PSNR and MSE)

    def row(self, sizes: SizeModel | None = None) -> dict:
        a = self.allocation
        row = dict(proposal=self.name, objective=self.objective, round=self.round, layer_bytes=a.bytes,
                   predicted_drift=self.predicted, additive_drift=self.additive, candidates=a.histogram())
        if sizes is not None:
            row.update(predicted_bytes=sizes.fixed_bytes + a.bytes, avg_bits=round(sizes.avg_bits(a.bytes), 4))
        row.update({f"probe_{k}": v for k, v in self.measured.items()})
        return row


@dataclass
class Result:
    """What `Allocator.allocate` proposes for one budget, best (least probe image MSE) first."""

    budget_bytes: int  # bytes the allocated layers may take
    proposals: list[Proposal]
    probes: int  # pipeline runs of the refinement and ranking (the sensitivity table not included)
    seconds: float

    @property
    def best(self) -> Proposal:
        return self.proposals[0]

    @property
    def allocation(self) -> Allocation:
        return self.best.allocation

    @property
    def predicted(self) -> float:
        return self.best.predicted

    @property
    def measured(self) -> dict:
        return self.best.measured

    def table(self, sizes: SizeModel | None = None) -> pd.DataFrame:
        return pd.DataFrame([p.row(sizes) for p in self.proposals])


class Allocator:
    """Proposals for a byte budget from a Sensitivity run: its table (options) and its probe
    (the measurements of whole recipes). `sizes` turns package bytes into the layers' budget."""

    def __init__(self, sens, sizes: SizeModel, objectives=OBJECTIVES, rounds: int = 1,
                 groups=block_of, rank_by: str = "image_mse", joint=None, with_greedy: bool = True):
        bad = [o for o in objectives if o not in OBJECTIVES]
        if bad or not objectives:
            raise ConfigError(f"objectives must be among {OBJECTIVES}, got {list(objectives)}")
        if rank_by not in OBJECTIVES:
            raise ConfigError(f"rank_by must be one of {OBJECTIVES}, got {rank_by!r}")
        self.sens, self.sizes, self.rounds, self.groups, self.rank_by = sens, sizes, rounds, groups, rank_by
        self.with_greedy = with_greedy
        self.joint = joint if joint is not None else sens  # what measures whole recipes
        table = sens.table()
        self.options = {o: layer_options(table, o, last_layer=sizes.last_layer) for o in objectives}
        self._measured: dict[tuple, dict] = {}  # the probe's drift of recipes already run
        self.probes = 0

    def measure(self, chosen: dict[str, str]) -> dict:
        """The probe's drift of {layer: candidate} (others fp16), each recipe run once."""
        key = tuple(sorted((l, c) for l, c in chosen.items() if c != FP16))
        if key not in self._measured:
            self._measured[key] = self.joint.measure_specs({l: parse_candidate(c) for l, c in key})
            self.probes += 1
        return self._measured[key]

    def budget(self, avg_bits: float) -> int:
        return self.sizes.budget(avg_bits)

    def allocate(self, budget_bytes: int) -> Result:
        """Every objective's knapsack and refinement rounds for `budget_bytes` (the allocated
        layers' bytes, e.g. sizes.budget(3.0)), ranked by the probe's measured drift."""
        first = next(iter(self.options.values()))
        check_budget(first, budget_bytes, self.sizes)
        t0, p0 = time.perf_counter(), self.probes
        proposals = []
        for objective, options in self.options.items():
            metric = lambda chosen, o=objective: self.measure(chosen)[o]
            for r, rnd in enumerate(refine(options, budget_bytes, metric, self.rounds, self.groups)):
                proposals.append(Proposal(f"knapsack {objective} r{r}", rnd.allocation, objective, r,
                                          rnd.predicted, rnd.allocation.predicted_drift,
                                          self.measure(rnd.allocation.choice)))
        if self.with_greedy:  # the Lagrangian solver of the same table: one more proposal per objective
            from sdwork.experiments.mixedbit import greedy

            for objective, options in self.options.items():
                g = greedy(options, budget_bytes=budget_bytes)
                proposals.append(Proposal(f"greedy {objective}", g, objective, 0, g.predicted_drift,
                                          g.predicted_drift, self.measure(g.choice)))
        proposals = _unique(proposals)
        proposals.sort(key=lambda p: (p.measured[self.rank_by], p.round))
        return Result(budget_bytes, proposals, self.probes - p0, round(time.perf_counter() - t0, 2))


def _unique(proposals: list[Proposal]) -> list[Proposal]:
    """One proposal per recipe (objectives and rounds often agree): the first keeps its name."""
    seen, out = set(), []
    for p in proposals:
        key = tuple(sorted(p.allocation.choice.items()))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


# --- the comparison at exact budgets: knapsack against Apple's, the greedy and uniform ---------


@dataclass
class Comparison:
    """What `compare` measured; every recipe is also a row of the experiment's results."""

    results: pd.DataFrame  # every row: uniform, greedy, apple, the proposals tried, the kept one ('knapsack')
    summary: pd.DataFrame  # per budget and method: bits, bytes (predicted and written), PSNR, SSIM
    proposals: pd.DataFrame  # every proposal with its predicted and probe-measured drift
    cost: dict  # the sensitivity table's cells and seconds (and the reference's), probe runs, variants
    seconds: dict = field(default_factory=dict)  # wall time of each phase in this call

    @property
    def wins(self) -> pd.Series:
        """Per budget met: the kept recipe is at least as good as Apple's and the greedy on PSNR and
        SSIM (budgets the candidates cannot meet have an error instead, and no verdict)."""
        if "wins" not in self.summary:
            return pd.Series(dtype=bool)
        kept = self.summary[(self.summary["method"] == "knapsack") & self.summary["wins"].notna()]
        return kept.set_index("target_bits")["wins"].astype(bool)

    def rows(self, methods=("greedy", "apple", "knapsack")) -> pd.DataFrame:
        """The results rows of these methods (the proposals tried are 'knapsack-try')."""
        if self.results.empty:
            return self.results
        return self.results[self.results["method"].isin(methods)]

    def pareto(self, others: pd.DataFrame | None = None, methods=("apple", "knapsack")) -> pd.DataFrame:
        """`others`' uniform rows (e.g. a study's results) and these methods' rows: one Pareto plot's."""
        parts = [self.rows(methods)]
        if others is not None and not others.empty:
            parts.insert(0, others[others["method"] == "uniform"])
        return pd.concat(parts, ignore_index=True)

    @property
    def win_ratio(self) -> float:
        w = self.wins
        return float(w.mean()) if len(w) else math.nan


def joint_probe(settings, seeds: int = 1):
    """The probe that measures whole recipes: the experiment's prompts and sampler on other seeds
    (after the experiment's own), a validation split the experiment never scores."""
    from dataclasses import asdict

    from sdwork.experiments.sensitivity import ProbeSettings

    first = max(settings.seeds) + 1
    return ProbeSettings(**{**asdict(settings), "seeds": tuple(range(first, first + seeds))})


@dataclass
class Bound:
    """A sensitivity table bound to the experiment's package of its component: what turns an
    allocation into a Recipe whose size is known to the byte."""

    sens: object  # the Sensitivity
    table: pd.DataFrame
    cumulative: pd.DataFrame | None  # Apple's cumulative pass (None without Apple's method)
    sizes: SizeModel
    consts: dict[str, str]
    package: object
    engine: str
    rest: object  # LayerSpec of the weights not analysed (None: fp16)

    def options(self, objective: str = "latent_mse") -> dict[str, list[Option]]:
        return layer_options(self.table, objective, last_layer=self.sizes.last_layer)

    def recipe(self, alloc: Allocation):
        from sdwork.experiments.mixedbit import recipe_for

        return recipe_for(alloc, self.consts, self.package, self.sens.config.component, self.engine, self.rest)


def bind(exp, config, folder: str, apple: bool = True, apple_per_tensor: bool = True, rest=None,
         engine: str = "sdwork", progress: bool = True) -> tuple[Bound, dict]:
    """The table of `config` measured (or read back) in exp.out/folder, Apple's pass on it, and the
    size model of exp's package; with the table's cost and the seconds each part took now."""
    import dataclasses

    from sdwork.experiments import mixedbit as mb
    from sdwork.experiments.sensitivity import Sensitivity

    config = dataclasses.replace(config, model=exp.model)
    t0 = time.perf_counter()
    sens = Sensitivity(config, exp.out / folder, pipe=exp.pipe, progress=progress)
    table = sens.run()
    t1 = time.perf_counter()
    cumulative = None
    if apple:  # Apple's scripts palettize per-tensor only
        specs = [s for s in config.specs if s.granularity == "per_tensor" or not apple_per_tensor]
        cumulative = sens.run_cumulative(specs)
    t2 = time.perf_counter()
    component = config.component
    package = exp.fp16_packages((component,))[component]
    consts = mb.const_names([l.module for l in sens.layers], exp.weight_maps((component,))[component], component)
    bound = Bound(sens, table, cumulative, mb.size_model(package, consts, rest), consts, package, engine, rest)
    cost = dict(sens.cost(), measured_now=sens.last_run["measured"], reused=sens.last_run["reused"])
    return bound, dict(cost, sensitivity_s=round(t1 - t0, 1), cumulative_s=round(t2 - t1, 1))


def baselines(exp, bound: Bound, bits: float, greedy_objectives=OBJECTIVES, apple: bool = True,
              tag: str | None = None) -> list[dict]:
    """The greedy (one recipe per objective) and Apple's recipe for `bits` on `bound`'s table,
    run through `exp.run`; `tag` names the table in their labels and a `table` column."""
    from sdwork.experiments import mixedbit as mb

    budget, sizes = bound.sizes.budget(bits), bound.sizes
    base = dict(target=f"{bits:g}b", target_bits=bits, target_bytes=sizes.fixed_bytes + budget, table=tag)
    allocs = [(mb.greedy(bound.options(o), budget_bytes=budget), o) for o in greedy_objectives]
    if apple:
        allocs.append((mb.apple_for_budget(bound.options(), bound.cumulative, budget), None))
    rows = []
    for alloc, objective in allocs:
        cols = {**mb.describe(alloc, sizes), **base, **({"objective": objective} if objective else {})}
        label = mb.row_label(cols)
        rows.append(dict(exp.run(bound.recipe(alloc), label=f"{tag} {label}" if tag else label, columns=cols).row))
    return rows


def compare(exp, config, bits=(2.5, 3.0, 3.5, 4.0, 5.0), folder: str = "allocate", objectives=OBJECTIVES,
            rounds: int = 1, top_k: int = 4, greedy_objectives=OBJECTIVES, apple: bool = True,
            apple_per_tensor: bool = True, uniform=(), rest=None, joint=None, reference=None,
            engine: str = "sdwork", progress: bool = True) -> Comparison:
    """The knapsack allocator against Apple's method and the greedy at each average-bits budget
    of one component, all on one sensitivity table (`config`, measured in exp.out/folder).

    Per budget (exact weight.bin bytes of the component: floor(bits x weights / 8)): the greedy
    for each of `greedy_objectives`, Apple's recipe, and the allocator's `top_k` proposals (ranked
    by the joint probe, `joint` or `joint_probe(exp.settings)`) run through `exp.run`; the pick, the
    proposal of least drift on the joint probe's seeds, gets a row of its own, method 'knapsack'.
    `reference`: another SensitivityConfig (e.g. a shorter probe) whose greedy and Apple recipes
    are run too, for the record (table 'reference'; `wins_reference` in the summary).
    `uniform`: candidate names ('4-pt', '3-g16') also run as uniform recipes. `rest`: the LUT of
    weights not analysed (None: fp16)."""
    import dataclasses

    from sdwork.experiments import mixedbit as mb
    from sdwork.experiments.sensitivity import Sensitivity

    t0 = time.perf_counter()
    bound, table_cost = bind(exp, config, folder, apple, apple_per_tensor, rest, engine, progress)
    cost, ref = dict(sensitivity=table_cost), None
    if reference is not None:
        ref, cost["reference"] = bind(exp, reference, f"{folder}-reference", apple, apple_per_tensor, rest, engine,
                                      progress)
    t_tables = time.perf_counter()
    probe = Sensitivity(dataclasses.replace(bound.sens.config, probe=joint or joint_probe(exp.settings)),
                        exp.out / folder / "joint", pipe=exp.pipe, progress=False)
    allocator = Allocator(bound.sens, bound.sizes, objectives, rounds, joint=probe)
    component = bound.sens.config.component

    rows, proposals, summary = [], [], []
    for name in uniform:
        spec = parse_candidate(name)
        recipe = mb.uniform_recipe(spec.nbits, spec.group_size, component, engine)
        rows.append(dict(exp.run(recipe, columns=dict(method="uniform")).row))
    for b in _progress(bits, progress):
        budget = bound.sizes.budget(b)
        try:
            check_budget(allocator.options[objectives[0]], budget, bound.sizes)
        except ConfigError as e:  # a budget the candidates cannot meet is reported, not hidden
            summary.append(dict(target_bits=b, method="knapsack", error=str(e)))
            continue
        theirs = baselines(exp, bound, b, greedy_objectives, apple)
        old = baselines(exp, ref, b, greedy_objectives, apple, tag="reference") if ref else []
        result = allocator.allocate(budget)
        mine, tried = _proposals(exp, bound, result, b, top_k)
        proposals += tried
        final = _keep(exp, bound, result, theirs, old, b)
        rows += theirs + old + mine + [final]
        summary += [_summary(r, b, component) for r in theirs + old + [final]]
    t_end = time.perf_counter()
    cost.update(probes=allocator.probes, variants=len(rows))
    seconds = dict(tables=t_tables - t0, allocate_and_measure=t_end - t_tables)
    return Comparison(pd.DataFrame(rows), pd.DataFrame(summary), pd.DataFrame(proposals), cost,
                      {k: round(v, 1) for k, v in seconds.items()})


def _proposals(exp, bound: Bound, result: Result, bits: float, top_k: int) -> tuple[list[dict], list[dict]]:
    """(results rows of the top_k proposals run through exp, every proposal's row)."""
    sizes = bound.sizes
    base = dict(target=f"{bits:g}b", target_bits=bits, target_bytes=sizes.fixed_bytes + result.budget_bytes,
                probes=result.probes, allocate_s=result.seconds)
    rows = []
    for p in result.proposals[:top_k]:
        cols = {**p.row(sizes), **base, "method": "knapsack-try"}
        rows.append(dict(exp.run(bound.recipe(p.allocation), label=f"{p.name} {base['target']}", columns=cols).row))
    return rows, [{**p.row(sizes), **base, "tried": i < top_k} for i, p in enumerate(result.proposals)]


def _keep(exp, bound: Bound, result: Result, theirs: list[dict], old: list[dict], bits: float) -> dict:
    """The kept recipe's own row (method 'knapsack'): the proposal of least drift on the joint
    probe's seeds, chosen before and apart from the experiment's images, then scored on them. Its
    verdicts against Apple's and the greedy (`wins`) are on the experiment's images alone."""
    best, sizes = result.best, bound.sizes
    cols = {**best.row(sizes), "target": f"{bits:g}b", "target_bits": bits,
            "target_bytes": sizes.fixed_bytes + result.budget_bytes, "probes": result.probes,
            "allocate_s": result.seconds}
    row = dict(exp.run(bound.recipe(best.allocation), label=f"knapsack {bits:g}b", columns=cols).row)
    verdict = dict(method="knapsack", picked=best.name, wins=_beats(row, theirs))
    if old:
        verdict["wins_reference"] = _beats(row, old)
    return {**row, **cols, **verdict}  # a row read back keeps its first columns: the verdicts are this call's


def _beats(row: dict, others: list[dict], metrics=("psnr", "ssim")) -> bool:
    """At least as good as every one of `others` on every metric."""
    return all(row[m] >= o[m] for o in others for m in metrics)


def _summary(row: dict, bits: float, component: str) -> dict:
    """One line of the comparison: 'greedy/latent', 'apple', 'knapsack'; '(reference)' for the other table."""
    method = row.get("method")
    if method == "greedy":
        method = f"greedy/{str(row.get('objective')).split('_')[0]}"
    if row.get("table"):
        method += f" ({row['table']})"
    out = dict(target_bits=bits, method=method, bits=row["bits_per_weight"], bytes=row[f"bytes_{component}"],
               predicted_bytes=row.get("predicted_bytes"), psnr=row["psnr"], ssim=row["ssim"], name=row["name"])
    out.update({k: row[k] for k in ("picked", "wins", "wins_reference") if k in row})
    return out


def _progress(items, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(list(items), desc="budgets", unit="budget", disable=not progress)
