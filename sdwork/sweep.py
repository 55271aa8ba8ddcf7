"""Sweep a grid of recipes: one results row per variant, appended as it finishes.

Layout of a run folder runs/<name>/:
  config.json     the sweep as given (model, generation settings, recipes)
  variants/<n>/   each variant's compressed packages
  images/<n>.npz  each variant's images (baseline.npz: the fp16 baseline)
  results.jsonl   one JSON object per finished variant (pandas.read_json(lines=True))

The fp16 packages every variant starts from are converted once per model
weights and cached under runs/cache/fp16-packages/.

A row is keyed by everything its numbers depend on (recipe, model weights,
generation settings, scorer); a rerun skips keys already in the file. Each
row is written as one line followed by flush + fsync, so an interruption
loses at most the variant that was running.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from sdwork.generate import GenSettings
from sdwork.pipeline import ROOT
from sdwork.recipe import Recipe

GENERATION_COMPONENTS = ("text_encoder", "unet", "vae_decoder")  # what txt2img runs: the size total covers them
RESULTS = "results.jsonl"
FP16_CACHE = ROOT / "runs" / "cache" / "fp16-packages"
GRIDS = ROOT / "data" / "grids"


# --- configuration --------------------------------------------------------------------


@dataclass
class SweepConfig:
    model: str
    recipes: list[Recipe]
    settings: GenSettings
    scorer: str | None = "tiny"  # CLIP scorer spec for sdwork.metrics.ClipScorer; None: PSNR/SSIM only
    extra: dict = field(default_factory=dict)


def expand_grid(grid: dict, **defaults) -> list[Recipe]:
    """Cartesian product of the listed Recipe fields; group_size null means per-tensor."""
    keys = list(grid)
    values = [v if isinstance(v, (list, tuple)) else [v] for v in grid.values()]
    recipes: dict[str, Recipe] = {}
    for combo in itertools.product(*values):
        d = {**defaults, **dict(zip(keys, combo))}
        d.setdefault("granularity", "per_tensor" if d.get("group_size") is None else "per_grouped_channel")
        r = Recipe.from_dict(d)
        recipes.setdefault(r.name, r)
    return list(recipes.values())


def load_config(grid, model: str | None = None, engine: str | None = None, components=None,
                scorer: str | None = None, limit: int | None = None) -> SweepConfig:
    """A sweep from a grid YAML file (or the dict it holds). The keyword arguments, when given,
    override the file: model, engine, components, scorer, and `limit` keeps the first recipes."""
    import yaml

    if isinstance(grid, dict):
        d = dict(grid)
    else:
        path = grid_path(grid)
        if not path.exists():
            raise FileNotFoundError(f"no grid file at {path}; see data/grids/default.yaml for the format")
        d = yaml.safe_load(path.read_text()) or {}
    known = {"model", "engine", "components", "scorer", "generation", "grid", "recipes", "name", "description"}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown grid key(s) {sorted(unknown)}; known keys: {sorted(known)}")
    if "generation" not in d:
        raise ValueError("the grid needs a 'generation' section (prompts, seeds, steps, guidance, threads)")
    defaults = {"components": components} if components else {k: d[k] for k in ("components",) if k in d}
    defaults["engine"] = engine or d.get("engine", "coremltools")
    recipes = expand_grid(d["grid"], **defaults) if d.get("grid") else []
    for r in d.get("recipes") or []:
        r = Recipe.from_dict({**defaults, **r})
        if r.name not in {x.name for x in recipes}:
            recipes.append(r)
    if not recipes:
        raise ValueError("the grid defines no recipe: give a 'grid' section and/or a 'recipes' list")
    if limit is not None:
        recipes = recipes[:limit]
    settings = GenSettings(**d["generation"])
    return SweepConfig(model or d.get("model", "tiny"), recipes, settings, scorer or d.get("scorer", "tiny"),
                       {k: d[k] for k in ("name", "description") if k in d})


def grid_path(grid) -> Path:
    """A grid name ("default", "ci") means data/grids/<name>.yaml; anything else is a path."""
    g = str(grid)
    if "/" not in g and os.sep not in g and not g.endswith((".yaml", ".yml")):
        return GRIDS / f"{g}.yaml"
    return Path(g)


# --- context: what every variant shares -----------------------------------------------


@dataclass
class SweepContext:
    config: SweepConfig
    out_dir: Path
    pipe: object  # fp16-rounded torch pipeline
    baseline: np.ndarray
    weights_hash: str
    fp16_packages: dict[str, Path]
    weight_maps: dict[str, dict[str, str]]
    scorer: object | None
    scorer_hash: str | None = None  # the scorer's weights: a retrained scorer must not reuse old rows

    @property
    def fp16_bytes(self) -> int:
        from sdwork.sizes import package_sizes

        return sum(package_sizes(p).weight_bin_bytes for p in self.fp16_packages.values())

    def key(self, recipe: Recipe, **extra) -> str:
        """The row key: everything a variant's row depends on (plus what other producers, such as
        DKM's training settings, add in `extra`)."""
        from sdwork.compress import POLICY

        desc = dict(recipe=recipe.to_dict(), policy=POLICY, model=self.config.model, weights=self.weights_hash,
                    settings=asdict(self.config.settings), scorer=self.config.scorer, scorer_weights=self.scorer_hash,
                    **extra)
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def prepare(config: SweepConfig, out_dir, progress: bool = True) -> SweepContext:
    """Load the model, make (or reuse) the fp16 baseline images and fp16 packages."""
    from sdwork.generate import fp16_baseline
    from sdwork.metrics import ClipScorer
    from sdwork.pipeline import load_pipeline, module_hash, weights_hash

    from sdwork.convert import load_weight_map

    out_dir = Path(out_dir)
    pipe = load_pipeline(config.model, progress=False)
    baseline = fp16_baseline(pipe, config.settings, progress=progress)  # also rounds pipe to fp16
    digest = weights_hash(pipe)
    scorer = ClipScorer(config.scorer) if config.scorer else None
    scorer_digest = module_hash(scorer.model) if scorer else None
    _init_run_dir(config, out_dir, baseline, digest, scorer_digest)
    fp16 = _fp16_packages(pipe, digest, _needed_components(config.recipes), progress)
    maps = {c: load_weight_map(p) for c, p in fp16.items()}
    return SweepContext(config, out_dir, pipe, baseline, digest, fp16, maps, scorer, scorer_digest)


def _init_run_dir(config: SweepConfig, out_dir: Path, baseline: np.ndarray, digest: str,
                  scorer_digest: str | None = None) -> None:
    """Record the setup; a run folder holds one model, weights, generation settings and scorer, so
    variant names (and image files) never mix across setups."""
    setup = dict(model=config.model, weights_hash=digest, scorer=config.scorer, scorer_hash=scorer_digest,
                 generation=json.loads(json.dumps(asdict(config.settings))))
    path = out_dir / "config.json"
    if path.exists():
        old = json.loads(path.read_text())
        if {k: old.get(k) for k in setup} != setup:
            raise ValueError(f"{out_dir} holds a sweep of another model, weights, generation settings or scorer "
                             f"({ {k: old.get(k) for k in setup if old.get(k) != setup[k]} }); use a new run folder")
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    _write_json(path, dict(setup, **config.extra, recipes=[r.to_dict() for r in config.recipes]))
    np.savez(out_dir / "images" / "baseline.npz", images=baseline, prompts=[p for p, _ in config.settings.pairs])


def _needed_components(recipes) -> tuple[str, ...]:
    from sdwork.recipe import COMPONENTS

    wanted = set(GENERATION_COMPONENTS).union(*(r.components for r in recipes))
    return tuple(c for c in COMPONENTS if c in wanted)


def _fp16_packages(pipe, digest: str, components, progress: bool, cache: Path | None = None) -> dict[str, Path]:
    """The fp16 packages of these weights, converted once and cached by everything they depend on."""
    import coremltools

    from sdwork.convert import convert_pipeline

    cache = Path(cache or FP16_CACHE)
    desc = dict(weights=digest, components=list(components), coremltools=coremltools.__version__, target="iOS18")
    folder = cache / hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]
    stamp = folder / "source.json"
    if not stamp.exists():
        tmp = cache / f".tmp-{folder.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        paths = convert_pipeline(pipe, tmp, components=components, target="iOS18", progress=progress)
        _write_json(tmp / "source.json", dict(desc, packages={c: Path(p).name for c, p in paths.items()}))
        try:
            tmp.rename(folder)  # whole folder or nothing: an interrupted conversion is never reused
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    have = json.loads(stamp.read_text())
    return {c: folder / name for c, name in have["packages"].items()}


# --- one variant ------------------------------------------------------------------------


def run_variant(ctx: SweepContext, recipe: Recipe, progress: bool = False, out_dir=None) -> tuple[dict, np.ndarray]:
    """Compress, account, evaluate one recipe into out_dir (default ctx.out_dir): (results row, images)."""
    from sdwork.compress import compress

    out_dir = Path(out_dir or ctx.out_dir)
    done = compress(recipe, ctx.fp16_packages, out_dir / "variants" / recipe.name, pipe=ctx.pipe, progress=progress)
    return evaluate_variant(ctx, done, recipe.name, ctx.key(recipe), out_dir, progress)


def evaluate_variant(ctx: SweepContext, done, name: str, key: str, out_dir=None,
                     progress: bool = False) -> tuple[dict, np.ndarray]:
    """Score compressed packages (a sdwork.compress.Compressed) like every variant: (results row, images).

    The row holds the recipe, exact sizes, the weights left dense, the metrics and the timings;
    other producers of packages (DKM) add their own columns to it.
    """
    from sdwork.compress import summarise_uncompressed, uncompressed_layers
    from sdwork.evaluate import evaluate

    out_dir, recipe = Path(out_dir or ctx.out_dir), done.recipe
    ev = evaluate(ctx.pipe, done.packages, ctx.config.settings, ctx.baseline, ctx.scorer, progress=progress)
    layers = uncompressed_layers(done, ctx.weight_maps)
    images_file = out_dir / "images" / f"{name}.npz"
    images_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez(images_file, images=ev.images)
    folder = Path(done.packages[recipe.components[0]]).parent
    row = dict(
        key=key, name=name, model=ctx.config.model, weights_hash=ctx.weights_hash,
        **{k: v for k, v in recipe.to_dict().items() if k != "overrides"},
        overrides=recipe.to_dict()["overrides"], min_target=recipe.min_target,
        **_size_columns(done, recipe),
        fp16_size_bytes=ctx.fp16_bytes,
        size_ratio=round(sum(s.weight_bin_bytes for s in done.sizes.values()) / ctx.fp16_bytes, 6),
        # the weights a user would expect compressed (above threshold, >= 2-D) but left dense
        uncompressed=[l for l in layers if l["kind"] not in ("one_d", "below_threshold")],
        uncompressed_by_reason=summarise_uncompressed(layers),
        **{k: v for k, v in ev.means.items()},
        per_prompt=ev.per_prompt.to_dict("records"),
        clip_model=getattr(ctx.scorer, "name", None),
        compress_s=round(done.seconds, 3), evaluate_s=round(ev.seconds, 3),
        compress_cpu_s=round(done.cpu_seconds, 3), evaluate_cpu_s=round(ev.cpu_seconds, 3),
        coreml_predict=ev.coreml_predict, images=str(images_file.relative_to(out_dir)),
        packages=_relative(folder, out_dir), settings=asdict(ctx.config.settings),
    )
    return row, ev.images


def _relative(path: Path, folder: Path) -> str:
    """path relative to folder when inside it (rows stay valid when the run folder moves), else absolute."""
    try:
        return str(Path(path).resolve().relative_to(Path(folder).resolve()))
    except ValueError:
        return str(path)


def _size_columns(done, recipe: Recipe) -> dict:
    s = done.sizes
    gen = list(s)  # every converted component, compressed or not: the same set for every variant
    comp_bytes = sum(s[c].weight_bin_bytes for c in recipe.components)
    comp_weights = sum(s[c].n_weights for c in recipe.components)
    cols = dict(
        size_bytes=sum(s[c].weight_bin_bytes for c in gen),
        package_bytes=sum(s[c].package_bytes for c in gen),
        compressed_bytes=comp_bytes,
        bits_per_weight=round(8 * comp_bytes / comp_weights, 4),
        lut_count=sum(s[c].lut_count for c in recipe.components),
        sizes={c: s[c].summary() for c in gen},
    )
    for c in gen:
        cols[f"bytes_{c}"] = s[c].weight_bin_bytes
    return cols


# --- the sweep -------------------------------------------------------------------------


def run_sweep(config: SweepConfig, out_dir, progress: bool = True, keep_packages: bool = True,
              ctx: SweepContext | None = None) -> pd.DataFrame:
    """Run every recipe not yet in out_dir/results.jsonl; return this config's rows, in grid order."""
    out_dir = Path(out_dir)
    if ctx is None:
        ctx = prepare(config, out_dir, progress)
    else:
        _check_same_setup(ctx, config)
        _init_run_dir(config, out_dir, ctx.baseline, ctx.weights_hash, ctx.scorer_hash)
    results = out_dir / RESULTS
    done = {r["key"] for r in read_rows(results)}
    todo = [r for r in config.recipes if ctx.key(r) not in done]
    bar = tqdm(todo, desc="variants", unit="variant", disable=not progress)
    for recipe in bar:
        bar.set_postfix_str(recipe.name)
        row, _ = run_variant(ctx, recipe, out_dir=out_dir)
        append_row(results, row)
        if not keep_packages:
            shutil.rmtree(out_dir / row["packages"], ignore_errors=True)
    df = load_results(out_dir)
    order = {ctx.key(r): i for i, r in enumerate(config.recipes)}
    df = df[df["key"].isin(order)]
    return df.iloc[df["key"].map(order).argsort()].reset_index(drop=True)


def _check_same_setup(ctx: SweepContext, config: SweepConfig) -> None:
    same = (ctx.config.model, ctx.config.settings, ctx.config.scorer) == (config.model, config.settings, config.scorer)
    if not same:
        raise ValueError("the context was prepared for another model, generation settings or scorer; "
                         "call sdwork.sweep.prepare(config, out_dir) for this config")
    needed = set(_needed_components(config.recipes))
    if not needed <= set(ctx.fp16_packages):
        raise ValueError(f"the context has no fp16 package for {sorted(needed - set(ctx.fp16_packages))}; prepare it "
                         "with a config that includes those components")


# --- results file ---------------------------------------------------------------------


def append_row(path, row: dict) -> None:
    """Append one JSON line durably; first cut off a torn last line left by a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _drop_torn_tail(path)
    line = json.dumps(row, default=_json_default) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _drop_torn_tail(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())


def read_rows(path) -> list[dict]:
    """Every complete row; a torn last line (a crash mid-write) is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8").split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # only the unterminated last line may be torn
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON; fix or remove it") from None
    return rows


def load_results(run_dir) -> pd.DataFrame:
    """The results table of a run folder (or results file), one row per variant."""
    path = Path(run_dir)
    path = path / RESULTS if path.is_dir() else path
    rows = read_rows(path)
    return pd.DataFrame(rows)


def per_prompt_table(results: pd.DataFrame) -> pd.DataFrame:
    """Long table: one row per (variant, prompt)."""
    out = []
    for _, r in results.iterrows():
        for p in r["per_prompt"]:
            out.append(dict(name=r["name"], size_bytes=r["size_bytes"], **p))
    return pd.DataFrame(out)


SUMMARY_COLUMNS = ["name", "size_bytes", "size_ratio", "bits_per_weight", "lut_count", "psnr", "ssim",
                   "clip_image_image", "clip_text_image", "compress_s", "evaluate_s"]


def summary_table(results: pd.DataFrame, sort: str = "size_bytes") -> pd.DataFrame:
    """The columns worth reading first, smallest variant first."""
    if results.empty:
        return results
    cols = [c for c in SUMMARY_COLUMNS if c in results]
    return results[cols].sort_values(sort).reset_index(drop=True)


def uncompressed_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (variant, weight left dense that a user would expect compressed), with the reason."""
    rows = [dict(variant=r["name"], **u) for _, r in results.iterrows() for u in r["uncompressed"]]
    return pd.DataFrame(rows, columns=["variant", "component", "name", "torch_name", "shape", "numel", "kind", "reason"])


def variant_package(run_dir, name: str, component: str) -> Path:
    """Path of a variant's compressed package for one component."""
    from sdwork.compress import PACKAGE_NAMES

    path = Path(run_dir) / "variants" / name / f"{PACKAGE_NAMES[component]}.mlpackage"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: variant {name!r} did not compress {component} "
                                "or its packages were dropped (--drop-packages)")
    return path


def load_images(run_dir, name: str) -> np.ndarray:
    path = Path(run_dir) / "images" / f"{name}.npz"
    if not path.exists():
        raise FileNotFoundError(f"no images for {name!r} in {path.parent}; is it a variant of this run?")
    return np.load(path)["images"]


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default))
    tmp.replace(path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.ndarray,)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to the results file")
