"""One object for an experiment: the fp16 pipeline, its baseline images, the scorer and the fp16
packages, shared by every variant run in one folder.

    exp = Experiment("tiny", GenSettings(prompts=[...], seeds=[0, 1]), scorer="tiny", out="runs/x")
    v = exp.run(Recipe(nbits=4, group_size=16))    # images, metrics, the results row
    sdwork.report.plots.compare(v)                  # under the baseline's images
    df = exp.sweep("default")                       # one row per variant in runs/x/results.jsonl

Every row is keyed by everything its numbers depend on (recipe, compress policy, model weights,
generation settings, scorer weights, plus what another producer such as DKM adds); `run` and
`sweep` skip keys already in the results file, so an interrupted sweep resumes where it
stopped. The run folder is stamped with its model, weights, settings and scorer (config.json)
and refused for others.
"""
from __future__ import annotations

import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from sdwork import hooks, paths, validate
from sdwork.compress.recipe import COMPONENTS, Recipe
from sdwork.errors import ConfigError, SdworkError
from sdwork.generate import GenSettings
from sdwork.io import append_row, as_json, claim, digest
from sdwork.experiments import results as R

# what txt2img runs: every variant's size total covers these
GENERATION_COMPONENTS = ("text_encoder", "unet", "vae_decoder")
DEFAULT_SETTINGS = GenSettings(
    prompts=("a small green circle on a black background", "a large red square on a white background"),
    seeds=(0, 1), steps=20, guidance=5.0)


@dataclass
class Variant:
    """What one recipe gave: its images, the mean metrics and the whole results row."""

    row: dict
    images: np.ndarray
    baseline: np.ndarray = field(repr=False)
    reused: bool = False  # True: read from the results file, not computed now

    @property
    def name(self) -> str:
        return self.row["name"]

    @property
    def metrics(self) -> dict:
        from sdwork.evaluate.variant import METRICS

        return {m: self.row[m] for m in (*METRICS, "identical_images") if m in self.row}

    @property
    def per_prompt(self) -> pd.DataFrame:
        return pd.DataFrame(self.row["per_prompt"])


class Experiment:
    """The shared state of a run folder; see the module docstring."""

    def __init__(self, model="tiny", settings: GenSettings | dict | None = None, scorer: str | None = "tiny",
                 out=None, *, pipe=None, progress: bool = True, keep_packages: bool = True,
                 attention: str = "original", evaluator: str = "torch", packages=None):
        from sdwork.convert.components import check_layout
        from sdwork.evaluate.coreml_pipeline import check_evaluator
        from sdwork.evaluate.metrics import ClipScorer
        from sdwork.load import load_pipeline
        from sdwork.weights import module_hash, round_weights_to_fp16, weights_hash

        from sdwork.generate import resolve_device

        self.settings = _settings(settings)
        resolve_device(self.settings.device)  # a device this machine lacks: refused before any work
        self.out = _out_dir(out)
        check_layout("apple", attention)
        self.attention, self.evaluator = attention, check_evaluator(evaluator)
        self.model, self.progress, self.keep_packages = str(model), progress, keep_packages
        if scorer is not None:
            validate.text("scorer", scorer, empty=False)
        self.pipe = pipe if pipe is not None else load_pipeline(model, progress=False)
        round_weights_to_fp16(self.pipe)  # the fp16 baseline every variant is scored against
        self.settings = self.settings.resolved(self.pipe)  # threads=None: this model's default, recorded
        self.weights_hash = weights_hash(self.pipe)
        self.scorer_spec = scorer
        self.scorer = ClipScorer(scorer) if scorer else None
        self.scorer_hash = module_hash(self.scorer.model) if self.scorer else None
        self._note_scorer()
        self._baseline = None
        self._packages: dict[str, Path] = {}
        # fp16 packages converted before (notebook 01): checked against the pipeline now, before any work
        self.packages_from, self.packages_note = packages and paths.resolve(packages), None
        if self.packages_from:
            self.fp16_packages()
        self._facts: dict[Path, tuple[int, dict]] = {}  # fp16 package -> (weight.bin bytes, weight map)

    def _note_scorer(self) -> None:
        """Say once, up front, when the CLIP scorer does not fit the images (every row says it too)."""
        from sdwork.generate import native_size

        if self.scorer is not None:
            note = self.scorer.mismatch(self.settings.height or native_size(self.pipe),
                                        self.settings.width or native_size(self.pipe))
            if note:
                tqdm.write(f"sdwork: note: {note}", file=sys.stderr)

    # --- what every variant shares

    @property
    def setup(self) -> dict:
        """What every row of this folder depends on: the stamp in config.json."""
        return as_json(dict(model=self.model, weights_hash=self.weights_hash, scorer=self.scorer_spec,
                            scorer_hash=self.scorer_hash, generation=self.settings.key_fields(),
                            attention=self.attention, evaluator=self.evaluator))

    @property
    def baseline(self) -> np.ndarray:
        """The fp16 pipeline's images (generated once, cached by everything they depend on)."""
        if self._baseline is None:
            from sdwork.generate import fp16_baseline

            self._baseline = fp16_baseline(self.pipe, self.settings, progress=self.progress)
        return self._baseline

    def fp16_packages(self, components=GENERATION_COMPONENTS) -> dict[str, Path]:
        """{component: fp16 package} for the generation components and these (cached conversion, or
        the `packages` folder given, checked)."""
        from sdwork.convert.cache import fp16_packages, user_packages

        wanted = tuple(c for c in COMPONENTS if c in set(GENERATION_COMPONENTS) | set(components))
        if not set(wanted) <= set(self._packages) and self.packages_from:
            self._packages = user_packages(self.pipe, self.packages_from, wanted, attention=self.attention)
        elif not set(wanted) <= set(self._packages):
            self._packages = fp16_packages(self.pipe, wanted, progress=self.progress, attention=self.attention)
        if self.packages_note is None:
            from sdwork.convert.cache import describe

            self.packages_note = describe(self._packages)  # the CLI repeats it at the end
            if self.progress:
                tqdm.write(self.packages_note)
        return {c: self._packages[c] for c in wanted}

    def weight_maps(self, components=GENERATION_COMPONENTS) -> dict[str, dict[str, str]]:
        return {c: self._fp16_facts(p)[1] for c, p in self.fp16_packages(components).items()}

    def _fp16_facts(self, package: Path) -> tuple[int, dict]:
        """An fp16 package's size and weight map, read once: every variant's row needs them."""
        if package not in self._facts:
            from sdwork.convert.weightmap import load_weight_map
            from sdwork.coreml.sizes import package_sizes

            self._facts[package] = (package_sizes(package).weight_bin_bytes, load_weight_map(package))
        return self._facts[package]

    def key(self, recipe: Recipe, **extra) -> str:
        """The row key: everything a variant's row depends on, plus what a producer adds in `extra`."""
        from sdwork.compress.apply import POLICY

        return digest(dict(recipe=recipe.to_dict(), policy=POLICY, **self.setup, **extra))

    # --- results

    def results(self, failed: bool = False) -> pd.DataFrame:
        """This folder's results table (failed variants too with failed=True)."""
        return R.load_results(self.out, failed=failed)

    def done(self) -> dict[str, dict]:
        """{key: row} of the variants finished in this folder."""
        return {r["key"]: r for r in R.rows(self.out)}

    def recorded(self, key: str) -> Variant:
        """The finished variant of a row key, read back from the folder."""
        return self._recorded(self.done()[key])

    # --- the one verb

    def run(self, recipe: Recipe, *, label: str | None = None, columns: dict | None = None) -> Variant:
        """Compress with `recipe`, generate, score against the baseline and append the row; a recipe
        already in the results is read back instead. `label` (e.g. 'greedy 4-bit') keys a row of its
        own for the same recipe, whose measurements are then copied, not recomputed; `columns` join
        the row."""
        return self._run(recipe, label, columns, self._measure)

    def _run(self, recipe: Recipe, label, columns, measure) -> Variant:
        """run() with `measure(recipe, key) -> row`: an executor's adopts a row measured on a cluster."""
        if not isinstance(recipe, Recipe):
            raise ConfigError(f"run() takes a sdwork.Recipe, got {type(recipe).__name__}; e.g. Recipe(nbits=4)")
        key, done = self.key(recipe, **_label(label)), self.done()
        if key in done:
            return self._recorded(done[key])
        self._check_fits(recipe)
        self._claim()
        recipe_key = self.key(recipe)
        same = next((r for r in done.values() if r.get("recipe_key") == recipe_key), None)
        row = dict(same, key=key, same_as=same["name"]) if same else measure(recipe, key)
        row.update(label=label, recipe_key=recipe_key, **(columns or {}))
        row["name"] = _row_name(recipe.name, label)
        append_row(self.out / R.RESULTS, row)
        hooks.fire("variant_done", name=row["name"])
        return self._recorded(row, reused=bool(same))

    def sweep(self, grid, limit: int | None = None, executor=None) -> pd.DataFrame:
        """Run every recipe of `grid` (a list of Recipes, or a grid name or file whose generation
        settings must be this experiment's) not yet in the results; a variant that fails with an
        sdwork error gets a row marked failed (retried by a rerun) and the sweep goes on.
        Returns the grid's rows in grid order. `executor`: None or "serial" (here, one variant after
        another), "dask" or a sdwork.experiments.executors.Dask (each variant a task on a cluster)."""
        from sdwork.experiments.executors import executor_for, run_variants

        executor = executor_for(executor)
        recipes = self._recipes(grid, limit)
        for r in recipes:
            self._check_fits(r)
        if executor is not None:
            executor.check()  # the scheduler answers: refused before any file is written
        self._claim()
        keys = [self.key(r) for r in recipes]
        todo = [(r, k) for r, k in zip(recipes, keys) if k not in self.done()]
        if executor is not None:
            run_variants(self, [r for r, _ in todo], executor)
        else:
            self._run_here([r for r, _ in todo])
        df = self.results(failed=True)
        if df.empty:
            return df
        order = {k: i for i, k in enumerate(keys)}
        df = df[df["key"].isin(order)]
        return df.iloc[df["key"].map(order).argsort()].reset_index(drop=True)

    def _run_here(self, recipes: list[Recipe]) -> None:
        bar = tqdm(recipes, desc="variants", unit="variant", disable=not self.progress)
        for recipe in bar:
            bar.set_postfix_str(recipe.name)
            try:
                self.run(recipe)
            except SdworkError as e:
                self._record_failure(recipe, e)

    def _record_failure(self, recipe: Recipe, e: Exception) -> None:
        """The failed row of a variant (retried by a rerun)."""
        append_row(self.out / R.RESULTS, dict(key=self.key(recipe), name=recipe.name, status=R.FAILED,
                                              error=str(e), **_recipe_columns(recipe)))
        tqdm.write(f"variant {recipe.name} failed: {e}")

    def evaluate(self, compressed, name: str, key: str, columns: dict | None = None) -> Variant:
        """Score packages some other producer made (DKM) like every variant, and append the row."""
        self._claim()
        row = self._score(compressed, name, key)
        row.update(columns or {})
        append_row(self.out / R.RESULTS, row)
        return self._recorded(row)

    # --- internals

    def _measure(self, recipe: Recipe, key: str) -> dict:
        from sdwork.compress.apply import compress

        folder, images = self.out / "variants" / recipe.name, self.out / "images" / f"{recipe.name}.npz"
        try:
            done = compress(recipe, self.fp16_packages(recipe.components), folder, pipe=self.pipe,
                            progress=self.progress)
            hooks.fire("variant_compressed", name=recipe.name)
            row = self._score(done, recipe.name, key)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # never a half variant: no row, no folder
            images.unlink(missing_ok=True)
            raise
        if not self.keep_packages:
            shutil.rmtree(folder, ignore_errors=True)
        return row

    def _score(self, done, name: str, key: str) -> dict:
        from sdwork.evaluate.metrics import scorer_columns
        from sdwork.evaluate.variant import evaluate, variant_row

        # the step bar (with its time left) under the variants bar: a full-size image takes minutes
        ev = evaluate(self.pipe, done.packages, self.settings, self.baseline, self.scorer, progress=self.progress,
                      evaluator=self.evaluator, fp16_packages=self.fp16_packages(done.recipe.components))
        images_file = self.out / "images" / f"{name}.npz"
        images_file.parent.mkdir(parents=True, exist_ok=True)
        np.savez(images_file, images=ev.images)
        fp16_bytes = sum(self._fp16_facts(p)[0] for p in self.fp16_packages().values())
        row = variant_row(done, ev, fp16_bytes, self.weight_maps(done.recipe.components))
        folder = Path(done.packages[done.recipe.components[0]]).parent
        row.update(key=key, name=name, status=R.OK, model=self.model, weights_hash=self.weights_hash,
                   clip_model=getattr(self.scorer, "name", None), images=str(images_file.relative_to(self.out)),
                   packages=_relative(folder, self.out), settings=asdict(self.settings),
                   attention=self.attention, evaluator=self.evaluator)
        row.update(scorer_columns(self.scorer, *ev.images.shape[1:3]))  # clip_valid, scorer_note
        return row

    def _recorded(self, row: dict, reused: bool = True) -> Variant:
        return Variant(row, np.load(self.out / row["images"])["images"], self.baseline, reused)

    def _claim(self) -> None:
        """Stamp the run folder with this setup (or refuse one made with another), write the baseline."""
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"out={self.out} is a file, not a folder; pass a folder for the run")
        claim(self.out / "config.json", self.setup, "a sweep")
        base = self.out / "images" / "baseline.npz"
        if not base.exists():
            base.parent.mkdir(parents=True, exist_ok=True)
            np.savez(base, images=self.baseline, prompts=[p for p, _ in self.settings.pairs],
                     seeds=[s for _, s in self.settings.pairs])

    def _check_fits(self, recipe: Recipe) -> None:
        from sdwork.compress.apply import check_fits

        check_fits(recipe, self.pipe)

    def _recipes(self, grid, limit) -> list[Recipe]:
        if isinstance(grid, Recipe):
            grid = [grid]
        if isinstance(grid, (list, tuple)):
            if not grid or not all(isinstance(r, Recipe) for r in grid):
                raise ConfigError("sweep() takes a grid name or file, or a non-empty list of Recipes")
            if limit is not None:
                validate.integer("limit", limit, lo=1)
            return list(grid)[:limit]
        from sdwork.experiments.grids import load_grid

        g = load_grid(grid, model=self.model, scorer=self.scorer_spec, limit=limit)
        if g.settings.resolved(self.pipe) != self.settings:
            raise ConfigError(f"grid {grid!r} has other generation settings than this experiment; build the "
                              "experiment from the grid: Experiment.from_grid(grid, out)")
        return g.recipes

    @classmethod
    def from_grid(cls, grid, out, model: str | None = None, engine: str | None = None, components=None,
                  scorer: str | None = "grid", limit: int | None = None, generation: dict | None = None,
                  **kw) -> tuple["Experiment", list[Recipe]]:
        """(the experiment a grid file describes, its recipes): validated whole before any model loads.
        `generation` overrides keys of the grid's generation section (GenSettings fields)."""
        from sdwork.experiments.grids import load_grid

        g = load_grid(grid, model=model, engine=engine, components=components, scorer=scorer, limit=limit,
                      generation=generation)
        _out_dir(out)
        return cls(g.model, g.settings, g.scorer, out, **kw), g.recipes


def _settings(settings) -> GenSettings:
    if settings is None:
        return DEFAULT_SETTINGS
    if isinstance(settings, dict):
        return GenSettings.from_dict(settings)
    if not isinstance(settings, GenSettings):
        raise ConfigError(f"settings must be a GenSettings or a dict of its fields, got {type(settings).__name__}")
    return settings


def _out_dir(out) -> Path:
    if out is None:
        raise ConfigError("out is missing: give the run folder, e.g. out='runs/my-sweep'")
    path = paths.run_dir(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"out={str(out)!r} names an existing file ({path}); pass a folder for the run")
    return path


def _label(label) -> dict:
    if label is None:
        return {}
    return dict(label=validate.text("label", label, empty=False))


def _row_name(name: str, label: str | None) -> str:
    return name if not label else f"{name} [{label}]"


def _recipe_columns(recipe: Recipe) -> dict:
    return {**{k: v for k, v in recipe.to_dict().items() if k != "overrides"}, "family": recipe.family}


def _relative(path: Path, folder: Path) -> str:
    """path relative to folder when inside it (rows stay valid when the run folder moves), else absolute."""
    try:
        return str(Path(path).resolve().relative_to(Path(folder).resolve()))
    except ValueError:
        return str(path)
