"""Grid files: a sweep as data (model, generation settings, scorer, recipes), validated whole
before anything runs.

    name: ci
    model: tiny
    engine: sdwork
    generation: {prompts: [...], seeds: [0, 1], steps: 4}
    grid: {nbits: [2, 6], group_size: [null, 16]}     # cartesian product; null = per-tensor
    recipes: [{nbits: 4, group_size: 16}]              # extra recipes, any Recipe fields

Recipes of every family mix in one grid (sdwork/data/grids/families.yaml): `recipes` may hold
{linear_bits: 4, block_size: 32}, {sparsity: 0.5}, {n_m: [2, 4]}, {sparsity: 0.5, nbits: 4,
group_size: 16} or {nbits: 4, group_size: 16, lut_dtype: int8}. In `grid`, `n_m: [2, 4]` is
one n:m pair; `n_m: [[2, 4], [1, 4]]` is a product over two.

`load_grid(..., generation={"steps": 20, "height": 512})` overrides keys of the `generation`
section (the CLI's --prompt, --seed, --steps, --size, ... options); with prompts and seeds given
that way, a grid needs no `generation` section at all.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from sdwork import paths, validate
from sdwork.compress.recipe import Recipe
from sdwork.errors import ConfigError
from sdwork.generate import GenSettings

KEYS = ("name", "description", "model", "engine", "components", "scorer", "generation", "grid", "recipes")


@dataclass
class Grid:
    recipes: list[Recipe]
    settings: GenSettings
    model: str = "tiny"
    scorer: str | None = "tiny"  # CLIP scorer spec; None: PSNR/SSIM only
    info: dict = field(default_factory=dict)  # name, description


def load_grid(grid, model: str | None = None, engine: str | None = None, components=None,
              scorer: str | None = "grid", limit: int | None = None, generation: dict | None = None) -> Grid:
    """A grid from a YAML file, a name in sdwork/data/grids/, or the dict a file holds. Keyword
    arguments override the file (scorer=None means no CLIP scorer); `limit` keeps the first recipes;
    `generation` overrides keys of the file's generation section (GenSettings fields)."""
    d = validate.known_keys(f"grid {grid if not isinstance(grid, dict) else ''}".strip(), _read(grid), KEYS)
    if limit is not None:
        validate.integer("limit", limit, lo=1, fix="give the number of recipes to run, or leave it out for all")
    settings = _settings(d.get("generation"), generation)
    defaults = {"engine": engine or d.get("engine", "coremltools")}
    comps = components or d.get("components")
    if comps is not None:
        defaults["components"] = comps
    recipes = expand(d.get("grid") or {}, **defaults)
    extra = d.get("recipes") or []
    if not isinstance(extra, list):
        raise ConfigError(f"the grid's 'recipes' must be a list of recipes, got {extra!r}")
    for i, r in enumerate(extra):
        r = Recipe.from_dict({**defaults, **validate.known_keys(f"recipes[{i}]", r, _RECIPE_FIELDS)})
        if r.name not in {x.name for x in recipes}:
            recipes.append(r)
    if not recipes:
        raise ConfigError("the grid defines no recipe: give a 'grid' section and/or a 'recipes' list")
    model = model or d.get("model", "tiny")
    validate.text("model", model, empty=False)
    scorer = d.get("scorer", "tiny") if scorer == "grid" else scorer
    if scorer is not None:
        validate.text("scorer", scorer, empty=False)
    return Grid(recipes[:limit], settings, model, scorer, {k: d[k] for k in ("name", "description") if k in d})


_RECIPE_FIELDS = [f.name for f in fields(Recipe)]
_GEN_FIELDS = [f.name for f in fields(GenSettings)]


def _settings(section, overrides: dict | None) -> GenSettings:
    """The grid's generation section with `overrides` on top; a missing section is fine when the
    overrides give prompts and seeds."""
    overrides = validate.known_keys("the generation options", overrides or {}, _GEN_FIELDS)
    if section is None and not {"prompts", "seeds"} <= set(overrides):
        raise ConfigError("the grid has no 'generation' section: add one (prompts, seeds, steps, guidance, threads) "
                          "or give the prompts and seeds as options (sdwork sweep --prompt TEXT --seed 0)")
    section = validate.known_keys("the grid's 'generation' section", section or {}, _GEN_FIELDS)
    what = "the grid's 'generation' section" + (" with the generation options" if overrides else "")
    return GenSettings.from_dict({**section, **overrides}, what=what)


def expand(grid: dict, **defaults) -> list[Recipe]:
    """Cartesian product of the listed Recipe fields (a single value is a list of one)."""
    grid = validate.known_keys("the grid's 'grid' section", grid, _RECIPE_FIELDS)
    if not grid:
        return []  # the product of no lists is one empty combination, not a recipe
    keys = list(grid)
    values = [v if isinstance(v, (list, tuple)) else [v] for v in grid.values()]
    for one in ("components", "n_m"):  # a flat list is one value of these fields, not a product
        v = grid.get(one)
        if isinstance(v, (list, tuple)) and not any(isinstance(x, (list, tuple)) for x in v):
            values[keys.index(one)] = [v]
    recipes: dict[str, Recipe] = {}
    for combo in itertools.product(*values):
        r = Recipe.from_dict({**defaults, **dict(zip(keys, combo))})
        recipes.setdefault(r.name, r)
    return list(recipes.values())


def grid_path(grid) -> Path:
    """A grid name ("default", "ci") means sdwork/data/grids/<name>.yaml; anything else is a path,
    a relative one under the checkout (paths.resolve: the rule of every path parameter)."""
    g = str(grid)
    if "/" not in g and os.sep not in g and not g.endswith((".yaml", ".yml")):
        return paths.GRIDS / f"{g}.yaml"
    return paths.resolve(g)


def available() -> list[str]:
    return sorted(p.stem for p in paths.GRIDS.glob("*.yaml"))


def _read(grid) -> dict:
    import yaml

    if isinstance(grid, dict):
        return dict(grid)
    path = grid_path(grid)
    if not path.is_file():
        raise ConfigError(f"no grid file at {path}; use one of {', '.join(available())} or a YAML path "
                          f"(see {paths.GRIDS / 'default.yaml'} for the format)")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    return d or {}
