"""Apply a Recipe to converted fp16 packages and write the compressed packages.

A recipe of palettization alone runs on one of three engines, chosen by `recipe.engine`:
  "coremltools"  coremltools' palettize_weights pass on the Core ML program (the reference;
                 LUTs bit-identical to ct.optimize.coreml.palettize_weights);
  "sdwork"       the same pass with sdwork's exact k-means (sdwork.compress.palettize_fast);
  "torch"        coremltools.optimize.torch's PostTrainingPalettizer on the torch modules,
                 then conversion through sdwork.convert (the LUTs become constexpr ops).

Every other recipe (linear quantization, pruning, joint compression, int8 LUTs, families
mixed per layer) runs coremltools' passes stage by stage through sdwork.compress.chain, the
palettization stage on the recipe's engine ("coremltools" or "sdwork"); its report has one
row per weight with what each stage did.

coremltools skips a weight it cannot palettize with only a log warning. Both Core ML
engines run through a pass that records, per candidate const, whether it was palettized
and if not why (`palettize_fast.REPORT_COLUMNS`); `uncompressed_layers` lists every weight
the written package stores dense with the reason from that report.

Only model weights are compressed, on every engine: a const that is no torch
parameter (the text encoder's 1x1x77x77 causal mask) stays fp16. coremltools'
global config would palettize it, the torch engine cannot reach it, and a LUT
over a mask saves a few KB while counting a non-weight as a compressed layer.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sdwork.convert.components import spec
from sdwork.errors import ConfigError, EngineError, PackageError
from sdwork.quiet import coremltools_progress
from sdwork.compress.families import TARGETS
from sdwork.compress.recipe import Recipe
from sdwork.coreml.sizes import PackageSizes, package_sizes

_TARGET_OF_SPEC = {v: k for k, v in TARGETS.items()}  # specificationVersion -> deployment target
POLICY = "model-weights-only"  # what gets compressed; part of a sweep row's key


EngineUnavailableError = EngineError  # the name callers used before the errors were unified


@dataclass
class Compressed:
    recipe: Recipe
    packages: dict[str, Path]  # every component: compressed ones in out_dir, the others the fp16 originals
    sizes: dict[str, PackageSizes]
    # per component: the passes' report, one row per candidate const (palettize_fast.REPORT_COLUMNS) or, for
    # a chained recipe, per weight (chain.REPORT_COLUMNS); none for the torch engine
    reports: dict[str, pd.DataFrame] = field(default_factory=dict)
    seconds: float = 0.0  # wall clock of the engine
    cpu_seconds: float = 0.0  # CPU time of this process (all threads): comparable across machine loads
    not_weights: dict[str, tuple[str, ...]] = field(default_factory=dict)  # consts kept fp16: no model weight


def compress(recipe: Recipe, fp16_packages: dict[str, Path], out_dir, pipe=None, progress: bool = True) -> Compressed:
    """Palettize `recipe.components` of `fp16_packages` into `out_dir`; `pipe` (the fp16-rounded
    torch pipeline) is needed by the torch engine only."""
    missing = [c for c in recipe.components if c not in fp16_packages]
    if missing:
        raise ConfigError(
            f"recipe {recipe.name} compresses {missing} but no converted package was given for them; "
            f"convert them first (sdwork.convert.convert_pipeline(..., components={list(recipe.components)}))"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for comp in recipe.components:
        _check_target(fp16_packages[comp], recipe)
    _check_overrides(recipe, fp16_packages)
    not_weights = {c: non_weight_consts(fp16_packages[c]) for c in recipe.components}
    t0, c0 = time.perf_counter(), time.process_time()
    if recipe.engine == "torch":
        written, reports = _compress_torch(recipe, pipe, out_dir, progress), {}
    else:
        written, reports = {}, {}
        for comp in recipe.components:
            dst = out_dir / spec(comp).package
            reports[comp] = _compress_coreml(recipe, fp16_packages[comp], dst, progress, not_weights[comp])
            _copy_sidecars(fp16_packages[comp], dst)
            written[comp] = dst
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    packages = {**fp16_packages, **written}
    sizes = {c: package_sizes(p) for c, p in packages.items()}
    result = Compressed(recipe, packages, sizes, reports, seconds, cpu, not_weights)
    _check_something_compressed(result)
    return result


def _check_something_compressed(result: Compressed) -> None:
    """Skipping some layers is reported per layer; skipping every layer of a component is an error."""
    for comp in result.recipe.components:
        if any(l.compressed for l in result.sizes[comp].layers):
            continue
        skipped = [l for l in uncompressed_layers(result) if l["component"] == comp]
        kinds = {l["kind"] for l in skipped if l["kind"] not in ("one_d", "below_threshold", "not_a_weight")}
        if kinds and kinds != {"override"}:
            example = next(l for l in skipped if l["kind"] in kinds)
            raise ConfigError(
                f"recipe {result.recipe.name} compressed no weight of {comp}: every candidate was skipped, e.g. "
                f"{example['name']}: {example['reason']}. Pick settings that fit this model (e.g. a group_size "
                "that divides the output channels)"
            )


# --- Core ML side -------------------------------------------------------------------


def non_weight_consts(package) -> tuple[str, ...]:
    """Consts of a converted package that hold no model weight (per its weight map); () for a
    package without one (not converted by sdwork: nothing is known, coremltools decides)."""
    from sdwork.convert.weightmap import load_weight_map, sidecar

    if not sidecar(package).exists():
        return ()
    weights = set(load_weight_map(package).values())
    return tuple(sorted(l.name for l in package_sizes(package).layers if l.name not in weights))


def _compress_coreml(recipe: Recipe, src: Path, dst: Path, progress: bool, keep_dense: tuple[str, ...]) -> pd.DataFrame:
    """Write the compressed package to dst; returns the passes' report."""
    from sdwork.coreml.package import open_package
    from sdwork.paths import scratch

    # coremltools' temporary packages (one per pass, GBs for a UNet) go to sdwork's scratch folder,
    # removed once the result is saved, or when the compression fails
    with scratch(), _omp_single_thread(), coremltools_progress(progress):
        ml = open_package(src)  # read-only: the fp16 package is shared by every variant
        try:
            out, report = _run_passes(recipe, ml, keep_dense, progress)
        except NotImplementedError as e:
            raise EngineError(f"engine {recipe.engine!r} does not cover recipe {recipe.name}: {e}") from e  # e names the fix
        if dst.exists():
            shutil.rmtree(dst)
        out.save(str(dst))
    return report


def _run_passes(recipe: Recipe, ml, keep_dense: tuple[str, ...], progress: bool):
    """(compressed MLModel, report): palettization alone on its own passes (bit-identical to what
    it always wrote), anything else stage by stage."""
    if recipe.palettize_only:
        from sdwork.compress.palettize_fast import palettize_mlmodel_with_report

        config = recipe.to_coreml_config(keep_dense)
        return palettize_mlmodel_with_report(ml, config, progress=progress, engine=recipe.engine)
    from sdwork.compress.chain import compress_mlmodel

    return compress_mlmodel(ml, recipe, keep_dense, progress)


def _check_target(package: Path, recipe: Recipe) -> None:
    from coremltools.proto import Model_pb2

    from sdwork.coreml.sizes import MODEL

    spec = Model_pb2.Model()
    spec.ParseFromString((Path(package) / MODEL).read_bytes())
    version = spec.specificationVersion
    if version < TARGETS[recipe.min_target]:
        needs = [w for w, t in recipe.requirements() if TARGETS[t] > version]
        raise PackageError(
            f"recipe {recipe.name} needs deployment target {recipe.min_target} (for {', '.join(needs)}), but {package} "
            f"was converted for an older one ({_TARGET_OF_SPEC.get(version, f'spec version {version}')}); re-convert "
            f"with target='{recipe.min_target}'"
        )


def _check_overrides(recipe: Recipe, packages: dict[str, Path]) -> None:
    if not recipe.overrides:
        return
    names = {l.name for c in recipe.components for l in package_sizes(packages[c]).layers}
    unknown = [k for k, _ in recipe.overrides if k not in names]
    if unknown:
        raise ConfigError(
            f"recipe overrides name ops that are not weights of {list(recipe.components)}: {unknown[:5]}; "
            "use the Core ML const names from the weight map (sdwork.convert.load_weight_map)"
        )


def _copy_sidecars(src: Path, dst: Path) -> None:
    """Copy the files written beside a package (its weight map) next to the compressed one."""
    stem = src.name.removesuffix(".mlpackage")
    for f in src.parent.iterdir():
        if f.is_file() and f.name.startswith(stem + "."):
            shutil.copy2(f, dst.parent / f.name)


def _omp_single_thread():
    """coremltools' k-means (scikit-learn) can hang with several OpenMP threads here."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


# --- torch side ---------------------------------------------------------------------


def _compress_torch(recipe: Recipe, pipe, out_dir: Path, progress: bool) -> dict[str, Path]:
    if pipe is None:
        raise ConfigError("engine 'torch' palettizes the torch modules: pass pipe= (the fp16-rounded pipeline)")
    from coremltools.optimize.torch.palettization import PostTrainingPalettizer

    from sdwork.convert.export import convert_pipeline
    from sdwork.convert.weightmap import WeightMapError

    work = copy.deepcopy(pipe)
    with _omp_single_thread(), _quiet_torch_kmeans(progress):
        for comp in recipe.components:
            module = getattr(work, spec(comp).module)
            skip = _small_modules(module, recipe.weight_threshold, spec(comp))
            PostTrainingPalettizer(module, recipe.to_torch_config(skip)).compress(inplace=True)
        try:
            # iOS18: the lowest target that holds every recipe (grouped LUTs, 3 bits)
            written = convert_pipeline(work, out_dir, components=recipe.components, target="iOS18", progress=progress,
                                       source=pipe)
        except WeightMapError as e:
            raise EngineError(
                "engine 'torch': sdwork.convert could not map the torch-side palettized weights "
                f"(coremltools names their LUT ops <param>_cast_fp16). Cause: {e}. Use engine='coremltools' or 'sdwork'"
            ) from e
    return {c: Path(written[c]) for c in recipe.components}


@contextlib.contextmanager
def _quiet_torch_kmeans(progress: bool):
    """The torch-side k-means logs every block at INFO: keep warnings only unless progress is wanted."""
    log = logging.getLogger("coremltools.optimize.torch")
    level = log.level
    if not progress:
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def _small_modules(module, threshold: int, component) -> tuple[str, ...]:
    """Modules the component does not hold (the VAE's other half), or whose weight has <= threshold
    elements (the Core ML side leaves these dense)."""
    import torch

    return tuple(
        name for name, m in module.named_modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor)
        and (m.weight.numel() <= threshold or not component.owns(f"{name}.weight"))
    )


# --- will the recipe find weights to compress? (checked before any work) -------------


def check_fits(recipe: Recipe, pipe) -> None:
    """Refuse a recipe that can compress no weight of a component of this model (a group size or
    cluster_dim that divides no layer's output channels), naming the sizes that would work."""
    from sdwork.convert.components import owned_parameters

    for comp in recipe.components:
        channels = sorted({p.shape[0] for n, p in owned_parameters(pipe, comp).items()
                           if p.ndim >= 2 and p.numel() > recipe.weight_threshold and n.endswith("weight")})
        if not channels:
            raise ConfigError(f"recipe {recipe.name}: {comp} has no weight above weight_threshold="
                              f"{recipe.weight_threshold} elements; lower weight_threshold")
        for what, n in (("group_size", recipe.group_size), ("cluster_dim", recipe.cluster_dim)):
            if n and n > 1 and not any(c % n == 0 for c in channels):
                ok = sorted({d for c in channels for d in (2, 4, 8, 16, 32, 64) if c % d == 0})
                raise ConfigError(f"recipe {recipe.name}: {what}={n} divides the output channels of no layer of "
                                  f"{comp} (channels: {channels[:8]}), so nothing would be compressed; use a "
                                  f"{what} that divides them, e.g. one of {ok}")
        _check_input_axis(recipe, comp, pipe)


def _check_input_axis(recipe: Recipe, comp: str, pipe) -> None:
    """Per-block scales and n:m groups run along a weight's input axis (1 for linear and conv):
    a size dividing no layer's input channels would leave the component dense."""
    from sdwork.convert.components import owned_parameters

    inputs = sorted({p.shape[1] for n, p in owned_parameters(pipe, comp).items()
                     if p.ndim >= 2 and p.numel() > recipe.weight_threshold and n.endswith("weight")})
    m = recipe.n_m[1] if recipe.n_m else None
    # n:m also needs two groups per row: coremltools skips a weight with m > channels / 2
    for what, n, fits in (("block_size", recipe.block_size, lambda c, d: c % d == 0),
                          ("n_m's m", m, lambda c, d: c % d == 0 and c >= 2 * d)):
        if n and not any(fits(c, n) for c in inputs):
            ok = sorted({d for c in inputs for d in (2, 4, 8, 16, 32, 64) if fits(c, d)})
            raise ConfigError(f"recipe {recipe.name}: {what}={n} divides the input channels of no layer of {comp} "
                              f"(input channels: {inputs[:8]}), so nothing would be compressed; use one that "
                              f"divides them, e.g. one of {ok}")


# --- what stayed dense, and why ----------------------------------------------------


NOT_A_WEIGHT = "a constant, not a module weight (e.g. an attention mask): sdwork compresses model weights only"


def uncompressed_layers(result: Compressed, weight_maps: dict[str, dict[str, str]] | None = None) -> list[dict]:
    """Every weight of a compressed component still stored dense, with the kind and reason from
    the palettization pass's report; derived from the recipe where no pass report exists. With
    weight maps, a const no torch parameter maps to (the text encoder's causal mask) is kind
    not_a_weight whatever the pass says, so it never counts as a weight left dense."""
    recipe, out = result.recipe, []
    overrides = dict(recipe.overrides)
    for comp in recipe.components:
        names = {v: k for k, v in (weight_maps or {}).get(comp, {}).items()}
        report = result.reports.get(comp)
        rows = None if report is None else report.set_index("op").to_dict("index")
        not_weights = set(result.not_weights.get(comp, ()))
        for layer in result.sizes[comp].layers:
            if layer.compressed:
                continue
            if names and layer.name not in names:  # maps to no torch parameter (a causal mask): no weight
                reason, kind = NOT_A_WEIGHT, "not_a_weight"
            elif rows is None:
                reason, kind = _derived_reason(layer, recipe, overrides, layer.name in not_weights)
            else:
                reason, kind = _reported_reason(rows.get(layer.name), layer.name, overrides, not_weights)
            out.append(dict(component=comp, name=layer.name, torch_name=names.get(layer.name), shape=list(layer.shape),
                            numel=layer.numel, kind=kind, reason=reason))
    return out


def _reported_reason(row: dict | None, name: str, overrides: dict, not_weights: set) -> tuple[str, str]:
    """(reason, kind) of a dense weight from its report row; a None config is named after where
    the recipe put it (an override, or a const that is no model weight)."""
    if row is None:
        return "not a const the palettization pass considers (it palettizes float consts in the weight file)", \
            "not_a_candidate"
    if row["status"] in ("palettized", "compressed", "partial"):
        return "reported compressed by the pass, yet stored dense in the package", "engine"
    if row["kind"] == "no_config" and name in overrides:
        return "left fp16 by a recipe override", "override"
    if row["kind"] == "no_config" and name in not_weights:
        return NOT_A_WEIGHT, "not_a_weight"
    return row["reason"], row["kind"]


def _derived_reason(layer, recipe: Recipe, overrides: dict, not_weight: bool) -> tuple[str, str]:
    """(reason, kind) worked out from the recipe and the layer's shape. Used where no pass report
    exists: the torch engine palettizes in torch and a DKM package is trained, so no Core ML
    palettization pass ran over the package."""
    if layer.name in overrides and overrides[layer.name] is None:
        return "left fp16 by a recipe override", "override"
    spec = overrides.get(layer.name)
    gran, group = (recipe.granularity, recipe.group_size) if spec is None else (spec.granularity, spec.group_size)
    if len(layer.shape) <= 1:
        return "1-D tensor (coremltools never palettizes these)", "one_d"
    if layer.numel <= recipe.weight_threshold:
        return f"{layer.numel} elements <= weight_threshold {recipe.weight_threshold}", "below_threshold"
    if not_weight:
        return NOT_A_WEIGHT, "not_a_weight"
    axis = _output_axis(layer)
    channels = layer.shape[axis]
    if gran == "per_grouped_channel" and channels % group:
        return f"{channels} output channels not divisible by group_size {group}", "channels_not_divisible"
    if recipe.cluster_dim > 1 and channels % recipe.cluster_dim:
        return f"{channels} output channels not divisible by cluster_dim {recipe.cluster_dim}", "cluster_dim"
    return f"left dense by engine '{recipe.engine}' (no pass report to say why)", "engine"


def _output_axis(layer) -> int:
    """The axis coremltools groups channels along: 1 for conv_transpose, the last for matmul's y, else 0."""
    kinds = {t for t, _ in layer.consumers}
    if "conv_transpose" in kinds:
        return 1
    if ("matmul", "y") in layer.consumers:
        return len(layer.shape) - 1
    return 0


def partial_layers(result: Compressed, weight_maps: dict[str, dict[str, str]] | None = None) -> list[dict]:
    """Every weight some stage of a chained recipe compressed while a later (or earlier) one
    skipped it, e.g. pruned but not palettized: what it got, the first skipped stage and why."""
    out = []
    for comp, report in result.reports.items():
        if "planned" not in report:
            continue  # palettization alone: a weight is palettized or dense
        names = {v: k for k, v in (weight_maps or {}).get(comp, {}).items()}
        for r in report[report["status"] == "partial"].to_dict("records"):
            skipped = next(s for s in r["planned"].split("+") if r[s] != "compressed")
            out.append(dict(component=comp, name=r["op"], torch_name=names.get(r["op"]), numel=r["numel"],
                            planned=r["planned"], done=r["done"], skipped=skipped, kind=r["kind"], reason=r["reason"]))
    return out


def summarise_uncompressed(layers: list[dict]) -> dict[str, dict]:
    """Count and element total of dense weights per kind of reason."""
    out: dict[str, dict] = {}
    for l in layers:
        s = out.setdefault(l["kind"], dict(layers=0, weights=0))
        s["layers"] += 1
        s["weights"] += l["numel"]
    return out
