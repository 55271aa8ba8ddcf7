"""Plots of a sweep, drawn from its results file: size vs quality with the Pareto
front, baseline-vs-variant image grids, and per-layer weight error."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from sdwork.errors import ConfigError

METRIC_LABELS = {
    "psnr": "PSNR vs fp16 (dB, pooled)",
    "ssim": "SSIM vs fp16",
    "clip_image_image": "CLIP image-image cosine",
    "clip_text_image": "CLIP text-image cosine",
}


def pareto_front(df: pd.DataFrame, x: str = "size_bytes", y: str = "psnr") -> pd.Series:
    """True for variants no other variant beats: smaller (or equal) size and better (or equal) metric,
    strictly better in one. Smaller x and larger y are better."""
    xs, ys = df[x].to_numpy(float), df[y].to_numpy(float)
    keep = []
    for i in range(len(df)):
        dominated = np.any((xs <= xs[i]) & (ys >= ys[i]) & ((xs < xs[i]) | (ys > ys[i])))
        keep.append(not dominated and not math.isnan(ys[i]))
    return pd.Series(keep, index=df.index)


def size_vs_metrics(results: pd.DataFrame, metrics=None, x: str = "size_bytes"):
    """One panel per metric: every variant (colour = method or granularity, label = name), front joined."""
    import matplotlib.pyplot as plt

    metrics = [m for m in (metrics or METRIC_LABELS) if m in results]
    if results.empty or not metrics:
        raise ConfigError("no results to plot: run the sweep first (Experiment.sweep)")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    groups = _variant_kind(results)
    for ax, m in zip(axes[0], metrics):
        df = results.assign(_y=_finite(results[m]), _x=results[x] / 1e6, _g=groups)
        for g, part in df.groupby("_g", sort=True):
            ax.scatter(part["_x"], part["_y"], s=22, label=g)
        front = df[pareto_front(df, "_x", "_y")].sort_values("_x")
        ax.plot(front["_x"], front["_y"], "k--", lw=1, label="Pareto front")
        for _, r in front.iterrows():
            ax.annotate(_short(r["name"], results), (r["_x"], r["_y"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel(f"{x} (MB)")
        ax.set_ylabel(METRIC_LABELS.get(m, m))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _short(name: str, results: pd.DataFrame) -> str:
    """Drop the engine suffix when every variant shares the engine (it only clutters the labels)."""
    engines = set(results["engine"]) if "engine" in results else set()
    return name.removesuffix(f"-{engines.pop()}") if len(engines) == 1 else name


def _variant_kind(df: pd.DataFrame) -> pd.Series:
    """Legend group of each row: its method (mixed-bit, DKM) if it has one, else its granularity,
    so that mixed-bit and DKM rows stand out among the uniform post-training ones."""
    def kind(r):
        method = r.get("method")
        if isinstance(method, str) and method:
            return method
        return "per-tensor" if r["granularity"] == "per_tensor" else f"group {int(r['group_size'])}"
    return df.apply(kind, axis=1)


def _finite(s: pd.Series) -> pd.Series:
    """Identical images give PSNR inf: draw them just above the largest finite value."""
    s = s.astype(float)
    finite = s[np.isfinite(s)]
    top = (finite.max() + 5) if len(finite) else 100.0
    return s.where(np.isfinite(s), top)


def image_grid(run_dir, names, max_cols: int = 8):
    """The fp16 baseline above the chosen variants' images (same prompts and seeds)."""
    from sdwork.experiments.results import load_images, load_results
    from sdwork.report.images import image_grid as grid

    results = load_results(run_dir).set_index("name")
    base = np.load(f"{run_dir}/images/baseline.npz")
    rows = {"fp16 baseline": base["images"]}
    for n in names:
        label = n
        if n in results.index:
            r = results.loc[n]
            label = f"{n}\n{r['size_bytes'] / 1e6:.2f} MB, {r['psnr']:.1f} dB"
        rows[label] = load_images(run_dir, n)
    titles = [str(p)[:28] for p in base["prompts"]] if "prompts" in base else None
    return grid(rows, titles, max_cols=max_cols)


def layer_errors(errors: pd.DataFrame, title: str = "", top: int = 40):
    """Horizontal bars of each weight's SNR (dB) against fp16; the worst `top` layers."""
    import matplotlib.pyplot as plt

    if errors.empty:
        raise ConfigError("no layers to plot")
    df = errors[errors["changed"]].sort_values("snr_db").head(top)
    if df.empty:
        raise ConfigError("no weight differs from fp16: nothing was compressed in this variant")
    labels = [(t or n) for t, n in zip(df["torch_name"], df["name"])]
    fig, ax = plt.subplots(figsize=(7, 0.18 * len(df) + 1.2))
    ax.barh(range(len(df)), df["snr_db"], color="tab:blue")
    ax.set_yticks(range(len(df)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("weight SNR vs fp16 (dB), lower is worse")
    ax.set_title(title or f"per-layer weight error, worst {len(df)}", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def front_names(results: pd.DataFrame, metric: str = "psnr", n: int = 4) -> list[str]:
    """Up to n variants on the size/metric Pareto front, spread from smallest to best."""
    front = results[pareto_front(results, "size_bytes", metric)].sort_values("size_bytes")
    if len(front) <= n:
        return list(front["name"])
    picks = np.linspace(0, len(front) - 1, n).round().astype(int)
    return list(front["name"].iloc[sorted(set(picks))])


def compare(variant, max_cols: int = 8):
    """One variant (sdwork.Variant) under the fp16 baseline, its size and mean metrics in the row label."""
    from sdwork.report.images import image_grid as grid

    baseline, images, row = variant.baseline, variant.images, variant.row
    label = (f"{row['name']}\n{row['size_bytes'] / 1e6:.2f} MB ({row['size_ratio']:.2f}x)\n"
             f"PSNR {row['psnr']:.1f} dB, SSIM {row['ssim']:.3f}")
    return grid({"fp16 baseline": baseline, label: images}, max_cols=max_cols)


def metrics_table(row: dict) -> pd.DataFrame:
    """A one-variant row as a small table: mean metrics, then per prompt."""
    per = pd.DataFrame(row["per_prompt"])
    mean = {k: row.get(k) for k in per.columns if k in row}
    return pd.concat([pd.DataFrame([{"prompt": "(mean)", **mean}]), per], ignore_index=True)
