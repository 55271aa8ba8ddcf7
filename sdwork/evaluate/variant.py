"""Score a compressed variant: its exact weights in the torch pipeline, images, drift metrics.

The compressed packages are the truth: their decompressed weights (every LUT looked up
exactly as Core ML would) are written, one layer at a time, into the one loaded fp16 torch
pipeline, which then generates the same fixed-seed images as the baseline; its own weights are
restored afterwards, also when the evaluation fails (`variant_weights`). No second copy of the
model exists, so a full-size pipeline is evaluated in the memory it takes once. On macOS the packages themselves can run
instead (evaluator "coreml:<compute unit>", sdwork.evaluate.coreml_pipeline); each row says which ran.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from sdwork import hooks
from sdwork.evaluate.psnr import pooled_psnr
from sdwork.generate import GenSettings, generate

METRICS = ("psnr", "ssim", "clip_image_image", "clip_text_image")


@dataclass
class Evaluation:
    images: np.ndarray  # uint8 (N, H, W, 3), prompt-major like settings.pairs
    table: pd.DataFrame  # one row per image
    per_prompt: pd.DataFrame  # one row per prompt
    means: dict[str, float]
    seconds: float
    cpu_seconds: float = 0.0  # CPU time of this process (all threads)


def load_variant(pipe_fp16, packages: dict):
    """A deep copy of the fp16 pipeline holding the packages' exact decompressed weights.

    For a caller that wants both pipelines at once: it holds the model twice. Evaluation uses
    `variant_weights`, which writes into the one pipeline in place (benchmarks/fullsize_sweep.py
    measures both)."""
    from sdwork.convert.into_torch import load_packages_into_pipeline

    return load_packages_into_pipeline(copy.deepcopy(pipe_fp16), packages)


@contextlib.contextmanager
def variant_weights(pipe, packages: dict, fp16_packages: dict | None = None):
    """`pipe` holding the packages' exact weights inside the block; its own weights back after it,
    bit for bit, also on an exception (weights_hash(pipe) is unchanged).

    A component with an fp16 package in `fp16_packages` is restored from it: exact, since the
    pipeline's weights are fp16-rounded and that package holds them. Only what it cannot restore
    exactly is kept aside: tensors under 400 elements (where coremltools keeps an underflowing
    value as the smallest subnormal) and weights that are not fp16 values. A component without
    one keeps the weights its package replaces aside, in fp16 where that is lossless."""
    fp16_packages = {**(fp16_packages or {})}
    loaded: list[tuple[str, dict]] = []
    try:
        for comp, package in packages.items():
            source = fp16_packages.get(comp)
            if source is not None:
                _check_same_source(comp, package, source)
            loaded.append((comp, _keep_aside(pipe, comp, package, full=source is None)))
            _load(pipe, comp, package)
        yield pipe
    finally:
        for comp, kept in reversed(loaded):
            if comp in fp16_packages:
                _load(pipe, comp, fp16_packages[comp], same_weights=False)  # the variant's weights are in it now
            _put_back(pipe, comp, kept)


def _load(pipe, comp: str, package, same_weights: bool = True) -> None:
    from sdwork.convert import components as C
    from sdwork.convert.into_torch import load_package_into_module

    load_package_into_module(C.torch_module(pipe, comp), comp, package, same_weights=same_weights)


@torch.no_grad()
def _keep_aside(pipe, comp: str, package, full: bool) -> dict:
    """{parameter name: its value} of what restoring from the fp16 package would not give back
    exactly (everything the package maps when full); fp16 where that is lossless."""
    from sdwork.convert import components as C
    from sdwork.convert.weightmap import COREML_UNDERFLOW_BELOW, read_weight_map

    params = dict(C.torch_module(pipe, comp).named_parameters())
    kept = {}
    for name in read_weight_map(package).entries:
        p = params[name]
        half = p.to(torch.float16)
        exact = torch.equal(half.to(p.dtype), p)
        if full or not exact or p.numel() < COREML_UNDERFLOW_BELOW:
            kept[name] = half if exact else p.clone()
    return kept


@torch.no_grad()
def _put_back(pipe, comp: str, kept: dict) -> None:
    from sdwork.convert import components as C

    params = dict(C.torch_module(pipe, comp).named_parameters())
    for name, value in kept.items():
        params[name].copy_(value)


def _check_same_source(comp: str, package, fp16_package) -> None:
    """The fp16 package restores the pipeline only if both were converted from the same weights
    (loading the variant checks those are the pipeline's)."""
    from sdwork.convert.into_torch import PackageMismatchError
    from sdwork.coreml.package import metadata

    got, ref = metadata(package).get("source_weights"), metadata(fp16_package).get("source_weights")
    if got != ref or ref is None:
        raise PackageMismatchError(f"{fp16_package} (weights {ref}) is not the fp16 package {package} was made from "
                                   f"(weights {got}); pass the fp16 packages of this pipeline as fp16_packages")


def evaluate(pipe_fp16, packages: dict, settings: GenSettings, baseline: np.ndarray, scorer=None,
             progress: bool = True, evaluator: str = "torch", fp16_packages: dict | None = None) -> Evaluation:
    """Generate with the packages' weights and score against `baseline` (the fp16 images).
    evaluator: "torch" (the exact weights in PyTorch, written into `pipe_fp16` and restored after:
    pass the pipeline's fp16 packages as `fp16_packages` to restore from them, else the weights a
    package replaces are kept aside in fp16) or "coreml:<compute unit>" (macOS)."""
    t0, c0 = time.perf_counter(), time.process_time()
    if evaluator == "torch":
        with variant_weights(pipe_fp16, packages, fp16_packages) as pipe:
            hooks.fire("variant_loaded", components=tuple(packages))
            images = generate(pipe, settings, progress=progress)
    else:
        from sdwork.evaluate.coreml_pipeline import generate_coreml

        images = generate_coreml(pipe_fp16, packages, settings, evaluator.split(":", 1)[1], progress=progress)
    table, per_prompt, means = score(baseline, images, settings, scorer)
    return Evaluation(images, table, per_prompt, means, time.perf_counter() - t0, time.process_time() - c0)


def score(baseline: np.ndarray, images: np.ndarray, settings: GenSettings, scorer=None):
    """(per-image table, per-prompt table, means). `psnr` of a prompt or of the run is pooled:
    10 log10(255^2 / mean MSE) over its images, finite unless every image is identical."""
    from sdwork.evaluate.metrics import score_images

    table = score_images(baseline, images, list(settings.prompts), scorer, seeds=settings.seeds)
    table["mse"] = ((images.astype(np.float64) - baseline.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    cols = [m for m in METRICS if m in table and m != "psnr"]
    per_prompt = table.groupby("prompt", sort=False).agg({"mse": "mean", **{c: "mean" for c in cols}}).reset_index()
    per_prompt.insert(1, "psnr", per_prompt.pop("mse").map(pooled_psnr))
    means = {"psnr": pooled_psnr(table["mse"].mean()), **{c: float(table[c].mean()) for c in cols}}
    means["identical_images"] = int((table["mse"] == 0).sum())
    return table, per_prompt, means


def variant_row(done, ev: Evaluation, fp16_bytes: int, weight_maps: dict) -> dict:
    """The measured columns of a results row: the recipe, exact sizes, the weights left dense and
    why, the metrics and the timings (the caller adds key, name and where files are). fp16_bytes:
    weight.bin bytes of the fp16 packages of the same components (the size_ratio's denominator)."""
    from sdwork.compress.apply import partial_layers, summarise_uncompressed, uncompressed_layers

    recipe = done.recipe
    layers = uncompressed_layers(done, weight_maps)
    sizes = size_columns(done)
    return dict(
        **{k: v for k, v in recipe.to_dict().items() if k != "overrides"},
        overrides=recipe.to_dict()["overrides"], min_target=recipe.min_target,
        # the compression family ('palettize', 'linear', 'prune', 'joint', 'mixed') and its stages in order
        family=recipe.family, stages="+".join(recipe.stages),
        **sizes, fp16_size_bytes=fp16_bytes, size_ratio=round(sizes["size_bytes"] / fp16_bytes, 6),
        # the weights a user would expect compressed (above threshold, >= 2-D) but left dense
        uncompressed=[l for l in layers if l["kind"] not in ("one_d", "below_threshold", "not_a_weight")],
        uncompressed_by_reason=summarise_uncompressed(layers),
        # weights a chained recipe compressed only in part (e.g. pruned, but not palettized), and why
        partially_compressed=partial_layers(done, weight_maps),
        **ev.means, per_prompt=ev.per_prompt.to_dict("records"),
        compress_s=round(done.seconds, 3), evaluate_s=round(ev.seconds, 3),
        compress_cpu_s=round(done.cpu_seconds, 3), evaluate_cpu_s=round(ev.cpu_seconds, 3),
    )


def size_columns(done) -> dict:
    """Exact weight.bin bytes: of every converted component (the same set for every variant), of
    the compressed ones, and their bits per weight."""
    s, comps = done.sizes, done.recipe.components
    comp_bytes = sum(s[c].weight_bin_bytes for c in comps)
    comp_weights = sum(s[c].n_weights for c in comps)
    cols = dict(
        size_bytes=sum(x.weight_bin_bytes for x in s.values()),
        package_bytes=sum(x.package_bytes for x in s.values()),
        compressed_bytes=comp_bytes,
        bits_per_weight=round(8 * comp_bytes / comp_weights, 4),
        lut_count=sum(s[c].lut_count for c in comps),
        sizes={c: x.summary() for c, x in s.items()},
    )
    cols.update({f"bytes_{c}": x.weight_bin_bytes for c, x in s.items()})
    return cols


# --- per-layer weight error ---------------------------------------------------------


def layer_errors(fp16_package, compressed_package) -> pd.DataFrame:
    """Per mapped weight: relative RMS error and SNR (dB) of the compressed package against the fp16 one.

    Weights are matched by torch parameter name through each package's weight map, since
    the const names differ between engines (torch-side compression names them *_cast_fp16).
    """
    from sdwork.convert.weightmap import load_weight_map
    from sdwork.coreml.package import package_weights
    from sdwork.errors import MismatchError

    ref_map, got_map = load_weight_map(fp16_package), load_weight_map(compressed_package)
    ref, got = package_weights(fp16_package), package_weights(compressed_package)
    rows, seen = [], set()
    for torch_name, const in ref_map.items():
        if torch_name not in got_map:
            raise MismatchError(f"{torch_name} is in {fp16_package} but not in {compressed_package}: not the same model")
        pair = (const, got_map[torch_name])
        if pair in seen:  # parameters sharing one const are one stored weight
            continue
        seen.add(pair)
        w, w_hat = ref[const].astype(np.float64), got[got_map[torch_name]].astype(np.float64)
        err = float(np.sqrt(((w - w_hat) ** 2).mean()))
        rms = float(np.sqrt((w**2).mean()))
        rows.append(dict(
            name=got_map[torch_name], torch_name=torch_name, numel=w.size, changed=bool(err > 0),
            rel_rmse=err / rms if rms else 0.0,
            snr_db=math.inf if err == 0 else (20 * math.log10(rms / err) if rms else -math.inf),
            max_abs=float(np.abs(w - w_hat).max()),
        ))
    return pd.DataFrame(rows)
