"""Mixed-bit palettization recipes from a per-layer sensitivity table (sdwork.experiments.sensitivity).

Two ways to give every layer its own LUT (bits x granularity, or fp16):

  apple   Apple's ml-stable-diffusion method: for each candidate, layers are added
          cumulatively from least to most harmful; a layer takes the smallest
          candidate whose cumulative latent PSNR at that layer stays above a
          threshold, else fp16. The threshold is searched to meet a size budget.
  greedy  Additive drift model: the drift of a recipe is predicted as the sum of
          each layer's drift alone (latent MSE by default). Starting from fp16, we
          repeatedly take the step (one layer to its next-smaller candidate on the
          lower convex hull of its bytes-vs-drift curve) that costs the least drift
          per byte saved, until the budget is met, then spend what is left on the
          upgrades that buy the most drift per byte.

Sizes are exact weight.bin bytes (sdwork.coreml.sizes' formula per layer, plus the bytes of
everything else in the package), so "average bits" is the results' bits_per_weight.
An allocation becomes a Recipe with per-layer overrides keyed by the Core ML const names of
the conversion weight map, and runs through `Experiment.run` like any other recipe.

sdwork.experiments.allocate adds a third: an exact knapsack on the same table, corrected for
interaction between layers by measured recipes, compared with both at exact byte budgets.

`study(exp, SensitivityConfig(...))` is the whole comparison notebook 03 runs: uniform recipes,
the sensitivity analysis, Apple's cumulative pass, the recipe curve and the mixed recipes no
larger than the uniform ones, every variant a row of `exp`'s results.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from sdwork import validate
from sdwork.compress.recipe import DEFAULT_WEIGHT_THRESHOLD, NBITS, LayerSpec, Recipe
from sdwork.errors import ConfigError, MismatchError, check_type
from sdwork.experiments.sensitivity import (FP16, Layer, Sensitivity, SensitivityConfig, candidate_name,
                                            parse_candidate)

OBJECTIVES = ("latent_mse", "image_mse")
METHODS = ("greedy", "apple")
CURVE = "curve.csv"


# --- what a layer can become --------------------------------------------------------


@dataclass(frozen=True)
class Option:
    candidate: str  # '4-pt', '4-g16', 'fp16'
    bytes: int
    drift: float  # predicted drift when this layer alone takes this option


def layer_options(table: pd.DataFrame, objective: str = "latent_mse", allow_fp16: bool = True,
                  last_layer: str | None = None) -> dict[str, list[Option]]:
    """{layer: options sorted by bytes} from the single-layer table; fp16 costs no drift.

    last_layer: the layer holding the package's final blob (SizeModel.last_layer), whose last
    blob is not padded: its bytes are corrected so that sizes stay exact."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if table.empty:
        raise ConfigError("the sensitivity table is empty: run sdwork.experiments.sensitivity.Sensitivity(...).run() "
                          "first")
    out: dict[str, list[Option]] = {}
    for layer, part in table.groupby("layer", sort=False):
        opts = [Option(r.candidate, int(r.bytes), max(float(getattr(r, objective)), 0.0)) for r in part.itertuples()]
        if allow_fp16:
            opts.append(Option(FP16, int(part["fp16_bytes"].iloc[0]), 0.0))
        if layer == last_layer:
            shape = Layer(layer, tuple(part["shape"].iloc[0]))
            opts = [Option(o.candidate, shape.nbytes(parse_candidate(o.candidate), last=True), o.drift) for o in opts]
        out[layer] = sorted(opts, key=lambda o: (o.bytes, o.drift, o.candidate))
    return out


@dataclass
class Allocation:
    method: str
    choice: dict[str, str]  # layer -> candidate name
    bytes: int  # weight.bin bytes of the allocated layers
    predicted_drift: float  # sum of the chosen options' drift alone
    threshold: float | None = None  # apple: the cumulative PSNR threshold
    extra: dict = field(default_factory=dict)

    def specs(self) -> dict[str, LayerSpec | None]:
        return {layer: parse_candidate(c) for layer, c in self.choice.items()}

    def histogram(self) -> dict[str, int]:
        return dict(Counter(self.choice.values()).most_common())


def allocation(options: dict[str, list[Option]], choice: dict[str, str], method: str = "manual") -> Allocation:
    """An allocation chosen by hand: {layer: candidate name} for every layer of `options`."""
    missing = sorted(set(options) - set(choice))
    if missing:
        raise ConfigError(f"no candidate chosen for {missing[:3]}; give one for every analysed layer")
    picked = {}
    for l, c in choice.items():
        by = {o.candidate: o for o in options.get(l, [])}
        if c not in by:
            raise ConfigError(f"{c!r} is not a measured candidate of {l}; choose from {sorted(by)}")
        picked[l] = by[c]
    return _allocation(method, options, picked)


def _allocation(method: str, options: dict[str, list[Option]], choice: dict[str, Option], **kw) -> Allocation:
    return Allocation(method, {l: choice[l].candidate for l in options},
                      sum(choice[l].bytes for l in options), sum(choice[l].drift for l in options), **kw)


# --- greedy on marginal drift per byte saved ----------------------------------------


def lower_hull(options: list[Option]) -> list[Option]:
    """Options on the lower convex hull of drift against bytes, from most to fewest bytes.

    Dominated options (more bytes and no less drift) and those above the hull are
    dropped, so walking the hull the drift cost per byte saved only grows."""
    pts = []
    for o in sorted(options, key=lambda o: (o.bytes, o.drift)):
        if pts and o.drift >= pts[-1].drift:  # more bytes without less drift
            continue
        while len(pts) >= 2 and _cross(pts[-2], pts[-1], o) <= 0:
            pts.pop()
        pts.append(o)
    return pts[::-1]


def _cross(a: Option, b: Option, c: Option) -> float:
    return (b.bytes - a.bytes) * (c.drift - a.drift) - (b.drift - a.drift) * (c.bytes - a.bytes)


def greedy(options: dict[str, list[Option]], budget_bytes: int | None = None, max_drift: float | None = None,
           spend_slack: bool = True) -> Allocation:
    """Cheapest-drift-per-byte steps down each layer's hull until the allocated layers fit in
    `budget_bytes` (then spend the slack), or while the predicted drift stays within `max_drift`.

    Before the slack is spent the result is optimal for its own size (any allocation with no more
    bytes has no less predicted drift): every layer sits where its hull slope brackets one common
    price per byte, the Lagrangian argument."""
    if (budget_bytes is None) == (max_drift is None):
        raise ConfigError("give exactly one of budget_bytes or max_drift")
    hulls = {l: lower_hull(o) for l, o in options.items()}
    if budget_bytes is not None:
        smallest = sum(h[-1].bytes for h in hulls.values())
        if budget_bytes < smallest:
            raise ConfigError(f"budget of {budget_bytes} bytes is below the smallest possible allocation "
                              f"({smallest} bytes, every layer at its smallest candidate); raise the target bits")
    pos = {l: 0 for l in hulls}
    total, drift = sum(h[0].bytes for h in hulls.values()), sum(h[0].drift for h in hulls.values())
    heap = [(_slope(h, 0), i, l) for i, (l, h) in enumerate(hulls.items()) if len(h) > 1]
    heapq.heapify(heap)
    while heap and (budget_bytes is None or total > budget_bytes):
        _, i, l = heapq.heappop(heap)
        h, k = hulls[l], pos[l]
        step_drift = h[k + 1].drift - h[k].drift
        if max_drift is not None and drift + step_drift > max_drift:
            continue  # this layer's further steps cost even more drift: it stays where it is
        total += h[k + 1].bytes - h[k].bytes
        drift += step_drift
        pos[l] = k + 1
        if k + 2 < len(h):
            heapq.heappush(heap, (_slope(h, k + 1), i, l))
    choice = {l: hulls[l][pos[l]] for l in hulls}
    if budget_bytes is not None and spend_slack:
        _spend_slack(options, choice, budget_bytes)
    return _allocation("greedy", options, choice)


def _slope(hull: list[Option], k: int) -> float:
    """Drift added per byte saved by stepping from hull[k] to hull[k+1]."""
    return (hull[k + 1].drift - hull[k].drift) / (hull[k].bytes - hull[k + 1].bytes)


def _spend_slack(options: dict[str, list[Option]], choice: dict[str, Option], budget: int) -> None:
    """Upgrade layers while bytes are left: each time the one removing the most drift per extra byte."""
    slack = budget - sum(o.bytes for o in choice.values())
    while True:
        best = None
        for l, opts in options.items():
            cur = choice[l]
            for o in opts:
                extra = o.bytes - cur.bytes
                if 0 < extra <= slack and o.drift < cur.drift:
                    gain = (cur.drift - o.drift) / extra
                    if best is None or gain > best[0]:
                        best = (gain, l, o)
        if best is None:
            return
        _, l, o = best
        slack -= o.bytes - choice[l].bytes
        choice[l] = o


# --- Apple's cumulative method ------------------------------------------------------


def apple(options: dict[str, list[Option]], cumulative: pd.DataFrame, threshold: float,
          metric: str = "latent_psnr") -> Allocation:
    """Per layer the smallest candidate whose cumulative `metric` at that layer is above
    `threshold` (Apple's build_recipe), else fp16. Candidates without a cumulative pass are not used."""
    cum = _cumulative_lookup(cumulative, metric)
    choice = {}
    for l, opts in options.items():
        fp16 = next((o for o in opts if o.candidate == FP16), None)
        pick = next((o for o in opts if o.candidate != FP16 and cum.get((o.candidate, l), -math.inf) > threshold), fp16)
        if pick is None:
            raise ConfigError(f"layer {l} meets no candidate at threshold {threshold} and fp16 is not allowed")
        choice[l] = pick
    return _allocation("apple", options, choice, threshold=threshold)


def _cumulative_lookup(cumulative: pd.DataFrame, metric: str) -> dict[tuple[str, str], float]:
    if cumulative.empty:
        raise ConfigError("no cumulative pass: run Sensitivity(...).run_cumulative() first (Apple's method needs it)")
    return {(r.candidate, r.layer): float(getattr(r, metric)) for r in cumulative.itertuples()}


def apple_for_budget(options: dict[str, list[Option]], cumulative: pd.DataFrame, budget_bytes: int,
                     metric: str = "latent_psnr") -> Allocation:
    """The highest threshold whose Apple recipe fits in `budget_bytes` (bytes grow with the threshold)."""
    values = sorted(set(_cumulative_lookup(cumulative, metric).values()))
    # a layer passes when its value is strictly above the threshold: try just below each value
    thresholds = [-math.inf] + [float(np.nextafter(v, -math.inf)) for v in values]
    first = apple(options, cumulative, thresholds[0], metric)
    if first.bytes > budget_bytes:
        raise ConfigError(f"even the smallest Apple recipe takes {first.bytes} bytes, above the budget of "
                          f"{budget_bytes}; raise the target bits")
    lo, hi = 0, len(thresholds) - 1  # invariant: thresholds[lo] fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if apple(options, cumulative, thresholds[mid], metric).bytes <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return apple(options, cumulative, thresholds[lo], metric)


# --- uniform recipes on the same tables, for comparison -----------------------------


def uniform(options: dict[str, list[Option]], candidate: str) -> Allocation:
    """Every layer at `candidate`; layers that cannot take it (channels not divisible) stay fp16,
    as the engine leaves them."""
    choice = {}
    for l, opts in options.items():
        by = {o.candidate: o for o in opts}
        choice[l] = by.get(candidate) or by[FP16]
    return _allocation("uniform", options, choice, extra=dict(candidate=candidate))


# --- exact package sizes ------------------------------------------------------------


@dataclass(frozen=True)
class SizeModel:
    """weight.bin bytes of a component = fixed_bytes + the allocated layers' bytes."""

    fixed_bytes: int  # header + every weight not allocated (dense fp16 or as the recipe leaves it)
    total_weights: int  # elements of every weight in the package (the sweep's bits_per_weight divisor)
    last_layer: str | None = None  # allocated layer holding the final (unpadded) blob: see layer_options

    def avg_bits(self, layer_bytes: int) -> float:
        return 8 * (self.fixed_bytes + layer_bytes) / self.total_weights

    def budget(self, avg_bits: float) -> int:
        """Bytes the allocated layers may take for the package to average `avg_bits` bits per weight."""
        return self.layer_budget(math.floor(avg_bits * self.total_weights / 8))

    def layer_budget(self, package_bytes: int) -> int:
        """Bytes the allocated layers may take for weight.bin to hold at most `package_bytes`."""
        return int(package_bytes) - self.fixed_bytes

    @classmethod
    def layers_only(cls, table: pd.DataFrame) -> "SizeModel":
        """Without a converted package: average bits over the analysed layers alone."""
        numel = table.drop_duplicates("layer")["numel"].sum()
        return cls(0, int(numel))


def size_model(fp16_package, consts: dict[str, str], rest: LayerSpec | None = None,
               weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD) -> SizeModel:
    """From the converted fp16 package: `consts` maps each allocated layer to its const name; the
    other compressible consts (not analysed) are counted as `rest` stores them (None: fp16)."""
    from sdwork.coreml.sizes import package_sizes

    sizes = package_sizes(fp16_package)
    by_name = {l.name: l for l in sizes.layers}
    missing = [c for c in consts.values() if c not in by_name]
    if missing:
        raise MismatchError(f"consts {missing[:3]} are not weights of {fp16_package}; is it the package of this model?")
    # the file's final blob is not padded to 64 bytes: find who holds it (compression keeps the op order)
    last = max((l for l in sizes.layers if l.offsets), key=lambda l: max(l.offsets)).name
    fixed = sizes.weight_bin_bytes - sum(by_name[c].file_bytes for c in set(consts.values()))
    for l in _other_layers(sizes, consts.values(), weight_threshold):
        layer = Layer(l.name, l.shape)
        fixed += layer.nbytes(rest if layer.supports(rest) else None, last=l.name == last) - l.file_bytes
    last_layer = next((m for m, c in consts.items() if c == last), None)
    return SizeModel(fixed, sizes.n_weights, last_layer)


def _other_layers(sizes, allocated_consts, weight_threshold: int):
    """Package weights a recipe would compress (above threshold, >= 2-D) that are not allocated."""
    have = set(allocated_consts)
    return [l for l in sizes.layers if l.name not in have and len(l.shape) > 1 and l.numel > weight_threshold]


def other_consts(fp16_package, allocated_consts, weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD) -> list[str]:
    from sdwork.coreml.sizes import package_sizes

    return [l.name for l in _other_layers(package_sizes(fp16_package), allocated_consts, weight_threshold)]


# --- from an allocation to a Recipe -------------------------------------------------


def const_names(allocation_layers, weight_map: dict[str, str], component: str = "unet") -> dict[str, str]:
    """{layer module: Core ML const} from the weight map ({torch param: const}); keys may carry the
    component prefix ("unet.conv_in.weight") or not."""
    out = {}
    for layer in allocation_layers:
        for key in (f"{layer}.weight", f"{component}.{layer}.weight"):
            if key in weight_map:
                out[layer] = weight_map[key]
                break
        else:
            raise KeyError(f"{layer}.weight is not in the weight map of {component}; was the package converted "
                           "from this model?")
    return out


def to_recipe(allocation: Allocation, consts: dict[str, str], component: str = "unet", engine: str = "sdwork",
              rest_consts=(), rest: LayerSpec | None = None, weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD) -> Recipe:
    """A Recipe whose global LUT is the most common choice and every other layer an override.

    rest_consts: other consts above the threshold that the allocation does not cover; they take
    `rest` (None: fp16) by an explicit override unless it is the global one, so nothing is
    compressed otherwise than decided."""
    specs = {consts[l]: s for l, s in allocation.specs().items()}
    counts = Counter(candidate_name(s) for s in specs.values() if s is not None)
    if not counts:
        raise ConfigError("every layer of this allocation is fp16: nothing to palettize; lower the target")
    base = parse_candidate(counts.most_common(1)[0][0])
    overrides = {c: s for c, s in specs.items() if s != base}
    overrides.update({c: rest for c in rest_consts if c not in specs and rest != base})
    return Recipe(nbits=base.nbits, group_size=base.group_size, components=(component,), engine=engine,
                  weight_threshold=weight_threshold, overrides=overrides)


# --- measuring recipes in torch -------------------------------------------------------


def measure(sens, allocation: Allocation) -> dict:
    """The probe's drift with the whole allocation applied at once (not predicted: measured)."""
    return sens.measure_specs(allocation.specs())


def allocate(method: str, options, budget_bytes: int, cumulative: pd.DataFrame | None = None) -> Allocation:
    if method == "greedy":
        return greedy(options, budget_bytes=budget_bytes)
    if method == "apple":
        return apple_for_budget(options, cumulative if cumulative is not None else pd.DataFrame(), budget_bytes)
    raise ConfigError(f"method must be 'greedy' or 'apple', got {method!r}")


def describe(allocation: Allocation, sizes: SizeModel, measured: dict | None = None) -> dict:
    """One flat row: method, exact bytes and average bits, prediction, and the probe's measurement."""
    row = dict(method=allocation.method, layer_bytes=allocation.bytes,
               predicted_bytes=sizes.fixed_bytes + allocation.bytes, avg_bits=round(sizes.avg_bits(allocation.bytes), 4),
               predicted_drift=allocation.predicted_drift, threshold=allocation.threshold,
               candidates=allocation.histogram(), **allocation.extra)
    row.update({f"probe_{k}": v for k, v in (measured or {}).items()})
    return row


def recipe_curve(sens, options, sizes: SizeModel, bits=(2.5, 3.0, 3.5, 4.0, 5.0, 6.0), methods=("greedy", "apple"),
                 cumulative: pd.DataFrame | None = None, uniform_candidates=(), progress: bool = True) -> pd.DataFrame:
    """Average bits against the probe's measured drift: each method at each target, and uniform recipes."""
    from tqdm.auto import tqdm

    jobs = [(m, b) for m in methods for b in bits] + [("uniform", c) for c in uniform_candidates]
    rows = []
    for method, arg in tqdm(jobs, desc="recipe curve", unit="recipe", disable=not progress):
        if method == "uniform":
            alloc = uniform(options, arg)
        else:
            try:
                alloc = allocate(method, options, sizes.budget(arg), cumulative)
            except ConfigError as e:  # a target below what the candidates can reach: reported, not hidden
                rows.append(dict(method=method, target_bits=arg, error=str(e)))
                continue
            alloc.extra["target_bits"] = arg
        rows.append(describe(alloc, sizes, measure(sens, alloc)))
    return pd.DataFrame(rows)


def psnr_drift_budget(sens, psnr: float, metric: str = "latent_psnr") -> float:
    """The drift (MSE) a PSNR target allows: latent peak = mean over images of max|reference|."""
    if metric == "latent_psnr":
        peak = float(np.mean([np.abs(r).max() for r in sens.reference.latents]))
        return (peak / 10 ** (psnr / 20)) ** 2
    if metric == "image_psnr":
        return 255.0**2 / 10 ** (psnr / 10)
    raise ConfigError(f"metric must be 'latent_psnr' or 'image_psnr', got {metric!r}")


def greedy_for_psnr(sens, options, target: float, metric: str = "latent_psnr", tries: int = 6
                    ) -> tuple[Allocation, dict]:
    """The smallest greedy recipe whose MEASURED `metric` meets `target`: the additive prediction gives
    the first drift budget, then a bisection on it (in log scale) against real measurements."""
    budget = psnr_drift_budget(sens, target, metric)
    lo, hi, best = None, None, None  # drift budgets known to pass / fail
    for _ in range(tries):
        alloc = greedy(options, max_drift=budget)
        got = measure(sens, alloc)
        if got[metric] >= target:
            if best is None or alloc.bytes < best[0].bytes:
                best = (alloc, got)
            lo = budget
            budget = budget * 4 if hi is None else math.sqrt(budget * hi)
        else:
            hi = budget
            budget = budget / 4 if lo is None else math.sqrt(lo * budget)
    if best is None:
        raise ConfigError(f"no greedy recipe reached {metric} >= {target} in {tries} tries; lower the target")
    best[0].extra.update(target=target, target_metric=metric)
    return best


# --- through Experiment.run: exact packages, rows in the experiment's results --------


def recipe_for(allocation: Allocation, consts: dict[str, str], fp16_package, component: str = "unet",
               engine: str = "sdwork", rest: LayerSpec | None = None) -> Recipe:
    """The Recipe of an allocation; consts of the package that were not analysed take `rest`."""
    others = other_consts(fp16_package, consts.values())
    return to_recipe(allocation, consts, component, engine, rest_consts=others, rest=rest)


def uniform_recipe(nbits: int, group_size: int | None = None, component: str = "unet", engine: str = "sdwork") -> Recipe:
    """Every weight of `component` at `nbits` (group_size None: per-tensor): what mixed recipes are compared with."""
    return Recipe(nbits=nbits, group_size=group_size, components=(component,), engine=engine)


def mixed_recipes(sens, table: pd.DataFrame, fp16_package, weight_map: dict[str, str], budgets: dict,
                  methods=("greedy", "apple"), cumulative: pd.DataFrame | None = None,
                  objective: str = "latent_mse", engine: str = "sdwork") -> list[tuple[Recipe, dict]]:
    """(Recipe, extra columns) for every method and budget.

    budgets: {label: (weight.bin bytes the component may take, spec of the layers not analysed)},
    e.g. {"4-bit": (bytes of uniform 4-bit per-tensor, LayerSpec(4))}. The extra columns carry the
    method, the target, the exact predicted size and the probe's measured drift (torch)."""
    component = sens.config.component
    consts = const_names([l.module for l in sens.layers], weight_map, component)
    out = []
    for label, (package_bytes, rest) in budgets.items():
        sizes = size_model(fp16_package, consts, rest)
        options = layer_options(table, objective, last_layer=sizes.last_layer)
        for method in methods:
            alloc = allocate(method, options, sizes.layer_budget(package_bytes), cumulative)
            extra = describe(alloc, sizes, measure(sens, alloc))
            extra.update(target=label, target_bytes=int(package_bytes), objective=objective)
            out.append((recipe_for(alloc, consts, fp16_package, component, engine, rest), extra))
    return out


def add_rows(exp, entries, progress: bool = True) -> pd.DataFrame:
    """Run each (Recipe, extra columns) through `exp.run`; the extra columns (method, target,
    prediction) join the row. A mixed recipe is labelled by its method, objective and target
    (row_label), so one that equals a uniform recipe, or another method's, still gets its own row:
    measured once, the later row copies the measurement and names the first in `same_as`.
    Returns these entries' rows, in order."""
    from tqdm.auto import tqdm

    rows = []
    for recipe, extra in tqdm(entries, desc="variants", unit="variant", disable=not progress):
        rows.append(exp.run(recipe, label=row_label(extra), columns=extra).row)
    return pd.DataFrame(rows)


def row_label(extra: dict) -> str | None:
    """'greedy image_mse 4-bit', 'apple 4-bit'; None for a uniform recipe (its row is the recipe's own)."""
    method = extra.get("method")
    if method in (None, "uniform"):
        return None
    parts = [method, extra.get("objective") if method == "greedy" else None, extra.get("target")]
    return " ".join(str(p) for p in parts if p is not None)


# --- the whole study ----------------------------------------------------------------


@dataclass
class Study:
    """What `study` measured; every variant is also a row of the experiment's results file."""

    results: pd.DataFrame  # the study's rows: uniform recipes first, then the mixed ones (method column)
    sensitivity: pd.DataFrame  # one row per (layer, candidate), each layer palettized alone
    cumulative: pd.DataFrame | None  # Apple's cumulative pass (None without the 'apple' method)
    curve: pd.DataFrame  # average bits of the analysed layers against the probe's measured drift
    layers: int  # layers analysed
    seconds: dict = field(default_factory=dict)  # wall time of each phase in this call

    @property
    def same_as(self) -> pd.DataFrame:
        """Rows whose recipe was already measured under another name (copied, not measured again)."""
        if "same_as" not in self.results:
            return self.results.iloc[0:0]
        return self.results[self.results["same_as"].notna()]


def study(exp, sensitivity, match_bits=(4, 3), match_group: int | None = 16, methods=METHODS,
          objective="image_mse", curve_bits=(2.5, 3.0, 3.5, 4.0, 5.0, 6.0), apple_per_tensor: bool = True,
          engine: str = "sdwork", progress: bool = True) -> Study:
    """Mixed-bit against uniform palettization of one component (the sensitivity config's, the UNet by
    default) at equal or smaller size, in `exp`'s folder.

    1. uniform recipes of that component: `match_bits` bits, per-tensor and with group size `match_group`
       (None: per-tensor only), through `exp.run` (method 'uniform');
    2. the sensitivity analysis of `sensitivity` (a SensitivityConfig; its model is `exp`'s) on exp.pipe,
       cached in exp.out (a rerun only measures what is missing);
    3. Apple's cumulative pass when 'apple' is in `methods` (per-tensor candidates only with
       `apple_per_tensor`, as Apple's scripts);
    4. the recipe curve at `curve_bits` average bits (measured in torch by the probe; () skips it),
       written to exp.out/curve.csv;
    5. per bit width, the mixed recipes of each method no larger than the smaller uniform package
       (layers not analysed take the uniform per-tensor LUT), through `exp.run` with a label.

    `objective` (the greedy's additive drift) may name several: one greedy recipe per objective and
    budget, Apple's recipes once."""
    check_type("sensitivity", sensitivity, SensitivityConfig, "e.g. SensitivityConfig(nbits=(2, 4, 8))")
    methods = _methods(methods)
    objectives = _objectives(objective)
    match_bits = validate.sequence("match_bits", match_bits, lambda w, b: validate.choice(w, b, NBITS), "[4, 3]")
    curve_bits = tuple(validate.real(f"curve_bits[{i}]", b, lo=1.0, hi=16.0) for i, b in enumerate(curve_bits or ()))
    if match_group is not None:
        validate.integer("match_group", match_group, lo=1)
    config = dataclasses.replace(sensitivity, model=exp.model)  # the rows depend on the model exp holds
    t0 = time.perf_counter()

    component = config.component
    uniform = [uniform_recipe(b, g, component, engine) for b in match_bits for g in dict.fromkeys((None, match_group))]
    uniform_rows = add_rows(exp, [(r, dict(method="uniform")) for r in uniform], progress)
    t_uniform = time.perf_counter()

    sens = Sensitivity(config, exp.out, pipe=exp.pipe, progress=progress)
    table = sens.run()
    cumulative = None
    if "apple" in methods:
        specs = [s for s in config.specs if s.granularity == "per_tensor" or not apple_per_tensor]
        cumulative = sens.run_cumulative(specs)
    t_sens = time.perf_counter()

    curve = pd.DataFrame()
    if curve_bits:
        curve = recipe_curve(sens, layer_options(table, objectives[0]), SizeModel.layers_only(table), curve_bits,
                             methods, cumulative, sorted(set(table["candidate"])), progress=progress)
        curve.to_csv(exp.out / CURVE, index=False)
    t_curve = time.perf_counter()

    package_bytes = uniform_rows.groupby("nbits")[f"bytes_{component}"].min()
    budgets = {f"{b}-bit": (int(package_bytes[b]), LayerSpec(b)) for b in match_bits}
    package, weight_map = exp.fp16_packages((component,))[component], exp.weight_maps((component,))[component]
    entries = []
    for i, obj in enumerate(objectives):  # Apple's method does not use the objective: once
        entries += mixed_recipes(sens, table, package, weight_map, budgets,
                                 methods if i == 0 else ("greedy",), cumulative, obj, engine)
    mixed_rows = add_rows(exp, entries, progress)
    t_end = time.perf_counter()

    seconds = dict(uniform=t_uniform - t0, sensitivity=t_sens - t_uniform, curve=t_curve - t_sens,
                   mixed=t_end - t_curve)
    return Study(pd.concat([uniform_rows, mixed_rows], ignore_index=True), table, cumulative, curve,
                 len(sens.layers), {k: round(v, 1) for k, v in seconds.items()})


def _methods(methods) -> tuple[str, ...]:
    methods = validate.sequence("methods", methods, lambda w, m: validate.choice(w, m, METHODS), "['greedy', 'apple']")
    return tuple(dict.fromkeys(methods))


def _objectives(objective) -> tuple[str, ...]:
    objectives = [objective] if isinstance(objective, str) else list(objective)
    objectives = validate.sequence("objective", objectives, lambda w, o: validate.choice(w, o, OBJECTIVES),
                                   "'image_mse'")
    return tuple(dict.fromkeys(objectives))


# --- plots ----------------------------------------------------------------------------


def plot_curve(curve: pd.DataFrame, metrics=("probe_latent_psnr", "probe_image_psnr")):
    """Average bits against the measured drift, one line per method, uniform recipes as points."""
    import matplotlib.pyplot as plt

    curve = curve[curve["avg_bits"].notna()] if "avg_bits" in curve else curve
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for method, part in curve.groupby("method", sort=False):
            part = part.sort_values("avg_bits")
            if method == "uniform":
                ax.scatter(part["avg_bits"], part[m], marker="x", color="k", label="uniform")
                for _, r in part.iterrows():
                    ax.annotate(r["candidate"], (r["avg_bits"], r[m]), fontsize=6, xytext=(3, -8),
                                textcoords="offset points")
            else:
                ax.plot(part["avg_bits"], part[m], "o-", ms=4, label=f"mixed ({method})")
        ax.set_xlabel("average bits per weight (exact, weight.bin)")
        ax.set_ylabel(m.replace("probe_", "probe ").replace("_", " ") + " (dB)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig
