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


X_LABELS = {
    "size_bytes": "package size (MB)",
    "bytes_unet": "UNet package size (MB)",
    "bytes_text_encoder": "text encoder package size (MB)",
    "bytes_vae_decoder": "VAE decoder package size (MB)",
}
FAMILY = "family"  # compression family column ("palettize", "linear", "prune", "joint"), when present
MARKERS = "osD^vP*Xh<>"


def size_vs_metrics(results: pd.DataFrame, metrics=None, x: str = "size_bytes"):
    """One panel per metric (two per row, a notebook column wide): every variant, the Pareto front
    joined and labelled. Colour is the compression family when results have one, else the kind
    of variant (granularity or method); with families, the marker is the kind."""
    from sdwork.report.figure import WIDTH_IN, new_figure

    metrics = [m for m in (metrics or METRIC_LABELS) if m in results]
    if results.empty or not metrics:
        raise ConfigError("no results to plot: run the sweep first (Experiment.sweep)")
    ncols = min(2, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig = new_figure(WIDTH_IN, 2.7 * nrows + 0.6, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    df = _plot_frame(results, x)
    for ax, m in zip(axes, metrics):
        _metric_panel(ax, df.assign(_y=_finite(results[m])), results)
        ax.set_xlabel(X_LABELS.get(x, f"{x.replace('_', ' ')} (MB)"))
        ax.set_ylabel(METRIC_LABELS.get(m, m.replace("_", " ")))
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    handles = _legend(df)
    # below the panels, not over them: a legend inside a panel hid the points it named
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), fontsize=8, frameon=False)
    return fig


def _plot_frame(results: pd.DataFrame, x: str) -> pd.DataFrame:
    """The columns a panel draws: x in MB, colour group and marker group of each row."""
    kind = _variant_kind(results)
    has_family = FAMILY in results and results[FAMILY].notna().any()
    colour = results[FAMILY].fillna("other").astype(str) if has_family else kind
    marker = kind if has_family else pd.Series("", index=results.index)
    return results.assign(_x=results[x] / 1e6, _c=colour, _m=marker)


def _styles(df: pd.DataFrame) -> tuple[dict, dict]:
    """Colour per colour group and marker per marker group, the same in every panel."""
    colours = {c: f"C{i}" for i, c in enumerate(sorted(set(df["_c"]), key=_kind_order))}
    markers = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(sorted(set(df["_m"]), key=_kind_order))}
    return colours, markers


def _metric_panel(ax, df: pd.DataFrame, results: pd.DataFrame) -> None:
    colours, markers = _styles(df)
    for (c, m), part in df.groupby(["_c", "_m"], sort=True):
        ax.scatter(part["_x"], part["_y"], s=26, color=colours[c], marker=markers[m], zorder=3)
    front = df[pareto_front(df, "_x", "_y")].sort_values("_x")
    ax.plot(front["_x"], front["_y"], "k--", lw=1, zorder=2)
    _label_front(ax, front, results)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)


# a front label's size in axes fractions (7 pt text in a panel about 3.3 x 2.2 inches)
LABEL_CHAR_W, LABEL_H = 0.0165, 0.055
OFFSETS = [(1, 1), (1, -1), (-1, 1), (-1, -1)]  # right/left, above/below the point


def _label_front(ax, front: pd.DataFrame, results: pd.DataFrame) -> None:
    """Name the front's points where a label fits: each tries the four corners around its point
    and is left out when all of them would cover a label already placed (a dense front stays
    readable; every point is still drawn, and named in the summary table)."""
    if front.empty:
        return
    ax.autoscale_view()
    to_axes = ax.transData + ax.transAxes.inverted()
    placed: list[tuple[float, float, float, float]] = []
    for _, r in front.iterrows():
        name = _short(r["name"], results)
        x, y = to_axes.transform((r["_x"], r["_y"]))
        w = LABEL_CHAR_W * len(name) + 0.01
        for dx, dy in OFFSETS:
            box = (x if dx > 0 else x - w, y if dy > 0 else y - LABEL_H, w, LABEL_H)
            inside = 0 <= box[0] and box[0] + w <= 1 and 0 <= box[1] and box[1] + LABEL_H <= 1
            if inside and not any(_overlap(box, b) for b in placed):
                placed.append(box)
                ax.annotate(name, (r["_x"], r["_y"]), fontsize=7, textcoords="offset points",
                            xytext=(4 * dx, 3 if dy > 0 else -3), ha="left" if dx > 0 else "right",
                            va="bottom" if dy > 0 else "top")
                break


def _overlap(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _kind_order(kind: str):
    """per-tensor, then group sizes from small to large, then methods by name."""
    digits = "".join(ch for ch in kind if ch.isdigit())
    return (kind != "per-tensor", not kind.startswith("group "), int(digits) if kind.startswith("group ") else 0, kind)


def _legend(df: pd.DataFrame) -> list:
    """Legend entries: one per colour, one per marker (grey), and the front."""
    from matplotlib.lines import Line2D

    colours, markers = _styles(df)
    plain = markers.get("", "o")
    out = [Line2D([], [], ls="", marker=plain, color=col, label=c) for c, col in colours.items()]
    out += [Line2D([], [], ls="", marker=mk, color="grey", label=m) for m, mk in markers.items() if m]
    return out + [Line2D([], [], ls="--", color="k", lw=1, label="Pareto front")]


def _short(name: str, results: pd.DataFrame) -> str:
    """Drop the engine suffix when every variant shares the engine (it only clutters the labels)."""
    engines = set(results["engine"].dropna()) if "engine" in results else set()
    return name.removesuffix(f"-{engines.pop()}") if len(engines) == 1 else name


def _variant_kind(df: pd.DataFrame) -> pd.Series:
    """Legend group of each row: its method (mixed-bit, DKM) if it has one, else its granularity,
    so that mixed-bit and DKM rows stand out among the uniform post-training ones."""
    def kind(r):
        method = r.get("method")
        if isinstance(method, str) and method:
            return method
        if r.get("granularity") == "per_tensor":
            return "per-tensor"
        group = r.get("group_size")
        return f"group {int(group)}" if pd.notna(group) else "other"
    return df.apply(kind, axis=1)


def _finite(s: pd.Series) -> pd.Series:
    """Identical images give PSNR inf: draw them just above the largest finite value."""
    s = s.astype(float)
    finite = s[np.isfinite(s)]
    top = (finite.max() + 5) if len(finite) else 100.0
    return s.where(np.isfinite(s), top)


def image_grid(run_dir, names, max_cols: int = 8):
    """The fp16 baseline above the chosen variants' images (same prompts and seeds), each column
    titled with its prompt and seed."""
    from sdwork.experiments.results import load_images, load_results
    from sdwork.report.images import image_grid as grid, pair_titles

    results = load_results(run_dir).set_index("name")
    base = np.load(f"{run_dir}/images/baseline.npz")
    rows = {"fp16 baseline": base["images"]}
    for n in names:
        label = _short(n, results.reset_index())
        if n in results.index:
            r = results.loc[n]
            label = f"{label}\n{r['size_bytes'] / 1e6:.2f} MB, {r['psnr']:.1f} dB"
        rows[label] = load_images(run_dir, n)
    titles = None
    if "prompts" in base:
        seeds = base["seeds"] if "seeds" in base else [""] * len(base["prompts"])
        titles = pair_titles(zip(base["prompts"], seeds))
    return grid(rows, titles, max_cols=max_cols)


def layer_errors(errors: pd.DataFrame, title: str = "", top: int = 40):
    """Horizontal bars of each weight's SNR (dB) against fp16; the worst `top` layers."""
    from sdwork.report.figure import WIDTH_IN, new_figure

    if errors.empty:
        raise ConfigError("no layers to plot")
    df = errors[errors["changed"]].sort_values("snr_db").head(top)
    if df.empty:
        raise ConfigError("no weight differs from fp16: nothing was compressed in this variant")
    labels = [(t or n) for t, n in zip(df["torch_name"], df["name"])]
    fig = new_figure(WIDTH_IN, 0.17 * len(df) + 1.1, layout="constrained")
    ax = fig.subplots()
    ax.barh(range(len(df)), df["snr_db"], color="tab:blue")
    ax.set_yticks(range(len(df)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("weight SNR vs fp16 (dB), lower is worse")
    ax.set_title(title or f"per-layer weight error, worst {len(df)}", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    return fig


def front_names(results: pd.DataFrame, metric: str = "psnr", n: int = 4) -> list[str]:
    """Up to n variants on the size/metric Pareto front, spread from smallest to best."""
    front = results[pareto_front(results, "size_bytes", metric)].sort_values("size_bytes")
    if len(front) <= n:
        return list(front["name"])
    picks = np.linspace(0, len(front) - 1, n).round().astype(int)
    return list(front["name"].iloc[sorted(set(picks))])


def compare(variant, max_cols: int = 8):
    """One variant (sdwork.Variant) under the fp16 baseline, its size and mean metrics in the row
    label, each column titled with its prompt and seed."""
    from sdwork.report.images import image_grid as grid

    baseline, images, row = variant.baseline, variant.images, variant.row
    label = (f"{row['name']}\n{row['size_bytes'] / 1e6:.2f} MB ({row['size_ratio']:.2f}x)\n"
             f"PSNR {row['psnr']:.1f} dB\nSSIM {row['ssim']:.3f}")
    return grid({"fp16 baseline": baseline, label: images}, _titles(row, len(images)), max_cols=max_cols)


def _titles(row: dict, n: int) -> list[str] | None:
    """(prompt, seed) titles from the generation settings a row was made with."""
    from sdwork.generate import GenSettings
    from sdwork.report.images import pair_titles

    try:
        pairs = GenSettings.from_dict(row["settings"]).pairs
    except (KeyError, TypeError, ConfigError):  # a row from before settings were stored: no titles
        return None
    return pair_titles(pairs) if len(pairs) == n else None


def metrics_table(row: dict) -> pd.DataFrame:
    """A one-variant row as a small table: mean metrics, then per prompt (short column names)."""
    from sdwork.report.tables import rename

    per = pd.DataFrame(row["per_prompt"])
    mean = {k: row.get(k) for k in per.columns if k in row}
    table = pd.concat([pd.DataFrame([{"prompt": "(mean)", **mean}]), per], ignore_index=True)
    return rename(table)
