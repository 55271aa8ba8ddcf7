"""Tables sized for a notebook column: few columns, short headers in words, rounded numbers.

The results rows hold everything (results.jsonl has it all); these are what a person reads.
A table wider than the column scrolls sideways and squeezes the variant names onto three
lines, so each table here keeps to about eight short columns.
"""
from __future__ import annotations

import re

import pandas as pd

HEADERS = {
    "name": "variant",
    "family": "family",
    "size_bytes": "size (MB)",
    "bytes_unet": "UNet (MB)",
    "predicted_bytes": "predicted (MB)",
    "size_ratio": "x fp16",
    "bits_per_weight": "bits/weight",
    "psnr": "PSNR (dB)",
    "ssim": "SSIM",
    "clip_image_image": "CLIP img",
    "clip_text_image": "CLIP text",
    "compress_s": "compress (s)",
    "evaluate_s": "evaluate (s)",
}
DIGITS = {"x fp16": 3, "bits/weight": 2, "PSNR (dB)": 2, "SSIM": 3, "CLIP img": 3,
          "CLIP text": 3, "compress (s)": 1, "evaluate (s)": 1}
QUALITY = ["psnr", "ssim", "clip_image_image", "clip_text_image"]
SUMMARY = ["name", "family", "size_bytes", "size_ratio", "bits_per_weight", *QUALITY]
MB = {"size_bytes", "bytes_unet", "predicted_bytes"}


def rename(table: pd.DataFrame) -> pd.DataFrame:
    """Columns in words (bytes shown as MB), numbers rounded to what the metric resolves."""
    out = table.copy()
    for c in MB & set(out.columns):
        out[c] = (out[c] / 1e6).round(3)
    out = out.rename(columns=HEADERS)
    for c, d in DIGITS.items():
        if c in out and pd.api.types.is_numeric_dtype(out[c]):
            out[c] = out[c].round(d)
    return out


def summary(results: pd.DataFrame, sort: str = "size_bytes", columns=SUMMARY) -> pd.DataFrame:
    """One line per variant, smallest first: size and quality (timings are in timings())."""
    if results.empty:
        return results
    ok = results[results.get("status", pd.Series("ok", index=results.index)).fillna("ok") == "ok"]
    cols = [c for c in columns if c in ok and (c != "family" or ok[c].notna().any())]
    table = ok[cols].sort_values(sort).reset_index(drop=True)
    table["name"] = _short_names(table["name"], ok)
    return rename(table)


def per_image(scores: pd.DataFrame) -> pd.DataFrame:
    """A score_images table (one row per image) without the columns every row shares or that only
    number the rows: prompt, seed and the metrics."""
    keep = [c for c in ["prompt", "seed", *QUALITY] if c in scores]
    return rename(scores[keep])


def timings(results: pd.DataFrame) -> pd.DataFrame:
    """Seconds each variant took to compress and to evaluate, the second table of a sweep."""
    return summary(results, columns=["name", "size_bytes", "compress_s", "evaluate_s"]).drop(columns="size (MB)")


def failed(results: pd.DataFrame) -> pd.DataFrame:
    """Variants that failed, with the error (which names the fix)."""
    if "status" not in results:
        return pd.DataFrame(columns=["variant", "error"])
    bad = results[results["status"] == "failed"]
    return pd.DataFrame({"variant": bad["name"], "error": bad.get("error")}).reset_index(drop=True)


def uncompressed(results: pd.DataFrame) -> pd.DataFrame:
    """Weights left dense, one line per (weight, reason) with the variants it applies to."""
    rows = [dict(variant=name, component=u["component"], weight=u.get("torch_name") or u["name"],
                 shape="x".join(map(str, u["shape"])), reason=re.sub(r" on axis \d+", "", u["reason"]))
            for name, us in zip(_short_names(results["name"], results), results["uncompressed"])
            if isinstance(us, list) for u in us]
    cols = ["component", "weight", "shape", "reason"]
    if not rows:
        return pd.DataFrame(columns=[*cols, "variants"])
    df = pd.DataFrame(rows)
    return df.groupby(cols, sort=False)["variant"].agg(", ".join).rename("variants").reset_index()


def per_prompt(results: pd.DataFrame, metric: str = "psnr") -> pd.DataFrame:
    """One metric, variants down and prompts across; the prompts' shared words are left out of
    the headers (they only made every header as long as the prompt)."""
    rows = [dict(variant=n, prompt=p["prompt"], value=p[metric])
            for n, pp in zip(_short_names(results["name"], results), results["per_prompt"]) for p in pp]
    df = pd.DataFrame(rows)
    prompts = list(dict.fromkeys(df["prompt"]))
    short = dict(zip(prompts, _distinct_words(prompts)))
    table = df.pivot_table(index="variant", columns="prompt", values="value", sort=False)[prompts]
    table.columns = [short[p] for p in prompts]
    table.columns.name = f"{HEADERS.get(metric, metric)} per prompt"
    return table.round(DIGITS.get(HEADERS.get(metric, metric), 3))


def _short_names(names: pd.Series, results: pd.DataFrame) -> pd.Series:
    """Variant names without the engine suffix every row shares."""
    engines = set(results["engine"].dropna()) if "engine" in results else set()
    if len(engines) != 1:
        return names
    suffix = f"-{engines.pop()}"
    return names.map(lambda n: n.removesuffix(suffix) if isinstance(n, str) else n)


def _distinct_words(texts: list[str]) -> list[str]:
    """Each text without the leading and trailing words all of them share."""
    words = [t.split() for t in texts]
    if len(words) < 2:
        return texts
    n = min(map(len, words))
    head = next((i for i in range(n) if len({w[i] for w in words}) > 1), n)
    tail = next((i for i in range(n - head) if len({w[-1 - i] for w in words}) > 1), n - head)
    out = [" ".join(w[head:len(w) - tail]) for w in words]
    return out if all(out) and len(set(out)) == len(out) else texts
