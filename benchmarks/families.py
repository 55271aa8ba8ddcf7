"""Compression families side by side at equal bytes on the embedded model (issue 20).

    python benchmarks/families.py [--grid families] [--out runs/families-bench]
    python benchmarks/families.py --report-only        # print the report of the rows already measured

Runs the families grid (sdwork/data/grids/families.yaml: k-means palettization at 4 and 3
bits, int8 per-channel and int4 per-block linear quantization, 50%/75% magnitude and 2:4
pruning, sparse + 4-bit palettized, 4-bit palettized with int8 LUTs) through one Experiment,
each variant sized exactly from its packages and scored against the fp16 baseline on the
grid's held-out prompts. Prints every row, then per family the best PSNR, SSIM and CLIP
image-image similarity among its rows at about 4 and about 3 bits per weight (within half a
bit, of the compressed components' weight.bin), and the winner at each budget. A finished
sweep resumes: a rerun only prints. Writes <out>/report.json beside results.jsonl.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # coremltools' k-means can hang with several OpenMP workers
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

from sdwork import Experiment  # noqa: E402
from sdwork.experiments.results import load_results  # noqa: E402

BUDGETS = (4.0, 3.0)  # bits per weight
WINDOW = 0.5  # "about b bits": within half a bit of b
METRICS = ("psnr", "ssim", "clip_image_image")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", default="families")
    p.add_argument("--out", type=Path, default=Path("runs/families-bench"))
    p.add_argument("--limit", type=int, default=None, help="run only the first n recipes (dry runs)")
    p.add_argument("--report-only", action="store_true", help="print the report of the rows already in --out")
    a = p.parse_args()
    t0 = time.perf_counter()
    if a.report_only:
        df = load_results(a.out)
    else:
        exp, recipes = Experiment.from_grid(a.grid, a.out, limit=a.limit)
        df = exp.sweep(recipes)
        df = df[df["status"] == "ok"]
    report = summarise(df)
    print_report(df, report)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    (Path(a.out) / "report.json").write_text(json.dumps(report, indent=2))
    print(f"\n{len(df)} variants, {report['wall_s']:.0f} s (sweep and report); report in {a.out / 'report.json'}")


def summarise(df: pd.DataFrame) -> dict:
    """{budget: {family: {metric: (best value, the row's name)}}, winners: {budget: {metric: family}}}."""
    df = df.assign(family=df["family"].fillna("palettize") if "family" in df else "palettize")
    out = {"budgets": {}, "winners": {}}
    for b in BUDGETS:
        near = df[(df["bits_per_weight"] - b).abs() <= WINDOW]
        best = {fam: {} for fam in sorted(set(df["family"]))}  # a family with no row this size: empty
        for fam, rows in near.groupby("family"):
            best[fam] = {m: _best(rows, m) for m in METRICS if m in rows}
        out["budgets"][str(b)] = best
        out["winners"][str(b)] = {m: max((f for f in best if m in best[f]), key=lambda f: best[f][m][0])
                                  for m in METRICS if any(m in v for v in best.values())}
    return out


def _best(rows: pd.DataFrame, metric: str) -> tuple[float, str, float]:
    """(best value, its variant, its bits per weight)."""
    r = rows.loc[rows[metric].idxmax()]
    return float(r[metric]), str(r["name"]), float(r["bits_per_weight"])


def print_report(df: pd.DataFrame, report: dict) -> None:
    cols = ["name", "family", "stages", "bits_per_weight", "size_ratio", *METRICS]
    print(df[[c for c in cols if c in df]].sort_values("bits_per_weight").to_string(index=False, float_format="%.4g"))
    for b, families in report["budgets"].items():
        print(f"\nabout {float(b):g} bits per weight (within {WINDOW} bit):")
        print(f"  {'family':10s} " + " ".join(f"{m:>30s}" for m in METRICS))
        for fam, best in sorted(families.items()):
            cells = [_cell(best.get(m)) for m in METRICS]
            print(f"  {fam:10s} " + " ".join(f"{c:>30s}" for c in cells))
        winners = report["winners"][b]
        print("  winner:  " + (", ".join(f"{m} {f}" for m, f in winners.items()) or "no variant this size"))


def _cell(v) -> str:
    if v is None:
        return "-"
    value, name, bits = v
    return f"{value:.4g} ({name}, {bits:.2f}b)" if math.isfinite(value) else f"inf ({name})"


if __name__ == "__main__":
    main()
