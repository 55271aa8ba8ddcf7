"""Reading a run folder: the results table (one row per variant), images and packages.

Layout of a run folder:
  config.json     what every row depends on (model, weights, generation settings, scorer)
  variants/<n>/   each variant's compressed packages
  images/<n>.npz  each variant's images (baseline.npz: the fp16 baseline)
  results.jsonl   one JSON object per variant (pandas.read_json(lines=True) reads it)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sdwork.convert.components import spec
from sdwork.errors import ConfigError
from sdwork.io import read_rows

RESULTS = "results.jsonl"
OK, FAILED = "ok", "failed"
SUMMARY_COLUMNS = ["name", "size_bytes", "size_ratio", "bits_per_weight", "lut_count", "psnr", "ssim",
                   "clip_image_image", "clip_text_image", "compress_s", "evaluate_s"]


def rows(run_dir, failed: bool = False) -> list[dict]:
    """The rows of a run folder (or results file), the last one per key; failed ones only if asked."""
    path = Path(run_dir)
    path = path / RESULTS if path.is_dir() else path
    last = {r["key"]: r for r in read_rows(path)}
    return [r for r in last.values() if failed or r.get("status", OK) == OK]


def load_results(run_dir, failed: bool = False) -> pd.DataFrame:
    """The results table of a run folder, one row per variant."""
    return pd.DataFrame(rows(run_dir, failed))


def per_prompt_table(results: pd.DataFrame) -> pd.DataFrame:
    """Long table: one row per (variant, prompt)."""
    out = [dict(name=r["name"], size_bytes=r["size_bytes"], **p)
           for _, r in results.iterrows() for p in r["per_prompt"]]
    return pd.DataFrame(out)


def summary_table(results: pd.DataFrame, sort: str = "size_bytes") -> pd.DataFrame:
    """The columns worth reading first, smallest variant first."""
    if results.empty:
        return results
    cols = [c for c in SUMMARY_COLUMNS if c in results]
    return results[cols].sort_values(sort).reset_index(drop=True)


def uncompressed_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (variant, weight left dense that a user would expect compressed), with the reason."""
    out = [dict(variant=r["name"], **u) for _, r in results.iterrows() for u in r["uncompressed"]]
    return pd.DataFrame(out, columns=["variant", "component", "name", "torch_name", "shape", "numel", "kind", "reason"])


def variant_package(run_dir, name: str, component: str) -> Path:
    """Path of a variant's compressed package for one component."""
    path = Path(run_dir) / "variants" / name / spec(component).package
    if not path.exists():
        raise ConfigError(f"{path} does not exist: variant {name!r} did not compress {component} "
                          "or its packages were dropped (--drop-packages)")
    return path


def load_images(run_dir, name: str) -> np.ndarray:
    """A variant's images by row name (a labelled row shares its recipe's images file)."""
    row = next((r for r in rows(run_dir) if r["name"] == name), None)
    path = Path(run_dir) / (row["images"] if row and row.get("images") else f"images/{name}.npz")
    if not path.exists():
        raise ConfigError(f"no images for {name!r} in {path.parent}; is it a variant of this run?")
    return np.load(path)["images"]
