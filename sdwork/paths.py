"""Where sdwork's files live: the embedded data (shipped inside the package), the cache, runs.

The cache (fp16 baselines, fp16 packages, generated tokenizer files) sits under
`$SDWORK_CACHE` when set, else `~/.cache/sdwork`; tests point it at a temporary folder, so
nothing is written into a checkout. Runs go where the caller says (`out=`); relative run
folders of the notebooks resolve against the current directory's repository (`runs/`).
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
DATA = PACKAGE / "data"  # package data: found by editable and regular installs alike
MODELS = DATA / "models"
TINY = MODELS / "tiny-sd"
TINY_CLIP = MODELS / "tiny-clip"
GRIDS = DATA / "grids"
CONFIGS = DATA / "configs"
CACHE_ENV = "SDWORK_CACHE"


def cache_dir(*parts: str) -> Path:
    """A folder under the cache root ($SDWORK_CACHE or ~/.cache/sdwork), not created."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sdwork"
    return Path(root).expanduser().joinpath(*parts)


def repo_root() -> Path | None:
    """The source checkout this package sits in (None for a regular install)."""
    root = PACKAGE.parent
    return root if (root / "pyproject.toml").exists() and (root / "notebooks").is_dir() else None


def run_dir(out) -> Path:
    """A run folder: absolute as given, relative ones under the checkout (else the current folder)."""
    out = Path(out).expanduser()
    if out.is_absolute():
        return out
    return (repo_root() or Path.cwd()) / out
