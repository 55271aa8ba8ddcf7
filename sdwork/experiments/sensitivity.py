"""Per-layer sensitivity of a pipeline component to palettization, cached and resumable.

Each Linear / Conv2d weight above a size threshold is palettized ALONE at each
candidate (bits x granularity) in the torch model, a short fixed-seed generation
runs, and the drift against the unmodified (fp16-rounded) pipeline is recorded:
latent PSNR at the final step (Apple's definition, averaged over images), the
latent MSE (the additive drift model of sdwork.experiments.mixedbit uses it), and the
pooled image PSNR / MSE after the VAE decoder (every PSNR from sdwork.evaluate.psnr).

The torch-side palettization is the engine's own: sdwork.compress.kmeans1d.palettize_weight
(palettizer "sdwork", the default), or coremltools' grouped_channelwise_compress, so the
weights measured here are the ones a package built from the same recipe holds.

Layout of the run folder:
  sensitivity.json     the settings every row depends on (a rerun must match them)
  sensitivity.jsonl    one row per (layer, candidate), appended durably
  cumulative.jsonl     Apple's cumulative pass: one row per (candidate, layer added)
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from sdwork.compress.recipe import DEFAULT_WEIGHT_THRESHOLD, LayerSpec
from sdwork.coreml.lut import lut_to_dense
from sdwork.coreml.sizes import expected_lut_bytes
from sdwork.errors import ConfigError, MismatchError
from sdwork.evaluate.psnr import latent_psnr, pooled_psnr
from sdwork.generate import GenSettings, native_size, on_device, resolve_device, to_uint8
from sdwork.io import append_row, as_json, claim, read_rows

COMPONENTS = ("unet", "text_encoder")
DEFAULT_PROMPTS = (
    "a small red circle on a gray background",
    "a large blue square on a white background",
)
SINGLE, CUMULATIVE, CONFIG = "sensitivity.jsonl", "cumulative.jsonl", "sensitivity.json"
FP16 = "fp16"  # the candidate name of a weight left dense


# --- candidates and layers ----------------------------------------------------------


def candidate_name(spec: LayerSpec | None) -> str:
    """'4-pt', '4-g16', or 'fp16' for a dense weight."""
    if spec is None:
        return FP16
    return f"{spec.nbits}-" + ("pt" if spec.granularity == "per_tensor" else f"g{spec.group_size}")


def parse_candidate(name: str) -> LayerSpec | None:
    if name == FP16:
        return None
    bits, gran = name.split("-")
    if gran == "pt":
        return LayerSpec(int(bits))
    if not gran.startswith("g"):
        raise ConfigError(f"bad candidate name {name!r}; expected like '4-pt', '4-g16' or 'fp16'")
    return LayerSpec(int(bits), group_size=int(gran[1:]))


def candidates(nbits=(1, 2, 3, 4, 6, 8), group_sizes=(None, 16)) -> list[LayerSpec]:
    """Every (bits, granularity) pair; group size None means per-tensor."""
    return [LayerSpec(n, group_size=g) for g in group_sizes for n in nbits]


@dataclass(frozen=True)
class Layer:
    module: str  # module name inside the component, e.g. "down_blocks.0.resnets.0.conv1"
    shape: tuple[int, ...]

    @property
    def param(self) -> str:
        """Parameter name relative to the component (the weight map's key)."""
        return f"{self.module}.weight"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def supports(self, spec: LayerSpec | None) -> bool:
        """Grouped LUTs need the output channels (axis 0) divisible by the group size."""
        return spec is None or spec.granularity == "per_tensor" or self.shape[0] % spec.group_size == 0

    def nbytes(self, spec: LayerSpec | None, last: bool = False) -> int:
        """Exact weight.bin bytes of this weight stored as `spec` (sdwork.coreml.sizes' formula).

        last: it holds the file's final blob, which is not padded to 64 bytes."""
        if spec is None:
            data = 2 * self.numel
            return 64 + (data if last else 64 * math.ceil(data / 64))
        luts = 1 if spec.granularity == "per_tensor" else self.shape[0] // spec.group_size
        full = expected_lut_bytes(self.numel, spec.nbits, luts)
        if not last:
            return full
        lut_bytes = 2 * luts * 2**spec.nbits  # written after the indices; inline below 10 entries
        data = lut_bytes if luts * 2**spec.nbits >= 10 else math.ceil(self.numel * spec.nbits / 8)
        return full - (64 * math.ceil(data / 64) - data)


def eligible_layers(module: torch.nn.Module, min_numel: int = DEFAULT_WEIGHT_THRESHOLD) -> list[Layer]:
    """Linear / Conv2d weights with more than `min_numel` elements (what the engine compresses)."""
    out = []
    for name, m in module.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.weight.numel() > min_numel:
            out.append(Layer(name, tuple(m.weight.shape)))
    return out


# --- palettizing one weight in torch ------------------------------------------------


def palettize_dense(w: np.ndarray, spec: LayerSpec, palettizer: str = "auto") -> np.ndarray:
    """`w` palettized as `spec` along output axis 0 and looked up again: fp16, shape of `w`.

    The weight is rounded to fp16 first, as the Core ML program stores it.
    """
    w = np.ascontiguousarray(w, dtype=np.float16)
    palettizer = "sdwork" if palettizer == "auto" else palettizer
    group = 0 if spec.granularity == "per_tensor" else spec.group_size
    if group and w.shape[0] % group:
        raise ConfigError(f"{w.shape[0]} output channels are not divisible by group_size {group}")
    if palettizer == "sdwork":
        from sdwork.compress.kmeans1d import palettize_weight

        kw = dict(group_size=group) if group else {}
        lut, indices = palettize_weight(w, spec.nbits, spec.granularity, channel_axis=0, **kw)
    elif palettizer == "coremltools":
        from coremltools.optimize.coreml._quantization_passes import palettize_weights

        params = palettize_weights.grouped_channelwise_compress(w, "KMEANS", spec.nbits, 0, group)
        lut, indices = params.lut, params.indices
    else:
        raise ConfigError(f"palettizer must be 'auto', 'sdwork' or 'coremltools', got {palettizer!r}")
    return lut_to_dense(np.asarray(lut), np.asarray(indices).astype(np.intp)).astype(np.float16)


# --- the drift probe ----------------------------------------------------------------


@dataclass(frozen=True)
class ProbeSettings(GenSettings):
    """The short generation every measurement repeats: few prompts and steps, fixed seeds."""

    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    seeds: tuple[int, ...] = (0,)
    # Apple: 1. Few steps are cheap but mislead on the embedded model (docs/mixed_bit.md): the
    # knapsack's comparison (sdwork.experiments.allocate.compare) probes with the experiment's steps
    steps: int = 4


@dataclass
class ProbeOutput:
    latents: np.ndarray  # float64 (N, C, h, w): the latents after the final step
    images: np.ndarray  # uint8 (N, H, W, 3)


@torch.no_grad()
def run_probe(pipe, settings: ProbeSettings) -> ProbeOutput:
    """One batched pipeline call over every (prompt, seed); latents caught at the last step.

    Every image has its own generator, so its starting noise does not depend on the batch. It runs
    on settings.device (in fp16 off the CPU, as generate does); the pipeline is back on the CPU after.
    """
    settings = settings.resolved(pipe)
    torch.set_num_threads(settings.threads)
    with on_device(pipe, resolve_device(settings.device)):
        return _probe(pipe, settings)


def _probe(pipe, settings: ProbeSettings) -> ProbeOutput:
    pairs = settings.pairs
    size = native_size(pipe)
    caught = {}

    def catch(p, i, t, kwargs):
        if i == settings.steps - 1:
            caught["latents"] = kwargs["latents"].detach().clone()
        return kwargs

    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        [p for p, _ in pairs],
        negative_prompt=[settings.negative_prompt] * len(pairs) if settings.negative_prompt else None,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        height=settings.height or size,
        width=settings.width or size,
        generator=[torch.Generator("cpu").manual_seed(s) for _, s in pairs],
        output_type="np",
        callback_on_step_end=catch,
        callback_on_step_end_tensor_inputs=["latents"],
    )
    return ProbeOutput(caught["latents"].cpu().double().numpy(), to_uint8(out.images))


def drift(ref: ProbeOutput, out: ProbeOutput) -> dict:
    """Latent and image drift of a probe output against the reference."""
    lat_mse = float(((ref.latents - out.latents) ** 2).mean())
    img_mse = float(((ref.images.astype(np.float64) - out.images.astype(np.float64)) ** 2).mean())
    return dict(
        latent_psnr=latent_psnr(ref.latents, out.latents),
        latent_mse=lat_mse,
        image_psnr=pooled_psnr(img_mse),
        image_mse=img_mse,
    )


# --- the analysis -------------------------------------------------------------------


@dataclass
class SensitivityConfig:
    model: str = "tiny"
    component: str = "unet"
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    nbits: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    group_sizes: tuple = (None, 16)  # None: per-tensor
    grouped_nbits: tuple[int, ...] | None = None  # bit widths that also get grouped LUTs (None: all)
    min_numel: int = DEFAULT_WEIGHT_THRESHOLD  # analyse weights with more elements (coremltools' threshold)
    max_layers: int | None = None  # analyse only the first n eligible layers (quick runs, CI)
    only_layers: tuple[str, ...] | None = None  # analyse only these modules (names inside the component)
    palettizer: str = "auto"

    def __post_init__(self):
        if self.component not in COMPONENTS:
            raise ConfigError(f"component must be one of {COMPONENTS}, got {self.component!r}")
        if isinstance(self.probe, dict):
            self.probe = ProbeSettings(**self.probe)
        self.nbits, self.group_sizes = tuple(self.nbits), tuple(self.group_sizes)
        self.specs = candidates(self.nbits, self.group_sizes)  # validates every pair
        if self.grouped_nbits is not None:
            self.grouped_nbits = tuple(self.grouped_nbits)
            self.specs = [s for s in self.specs if s.granularity == "per_tensor" or s.nbits in self.grouped_nbits]
        if self.palettizer == "auto":
            self.palettizer = "sdwork"  # exact k-means: the LUTs a package of the same recipe holds


class Sensitivity:
    """A sensitivity run bound to a folder: `run()` fills in missing rows, `table()` reads them.

    `pipe` (loaded from config.model when None) has its weights rounded to fp16 in place: that is
    the baseline every row is measured against. Measurements swap weights in and restore them."""

    def __init__(self, config: SensitivityConfig, out_dir, pipe=None, progress: bool = True,
                 cache_bytes: int = 1 << 30):
        from sdwork.load import load_pipeline
        from sdwork.weights import round_weights_to_fp16, weights_hash

        self.config, self.dir, self.progress = config, Path(out_dir), progress
        self._cache, self._cache_bytes = OrderedDict(), cache_bytes  # palettized weights, least recent first
        self.probes = 0  # pipeline runs of this object: what a measurement costs, counted
        self.last_run = dict(measured=0, reused=0, seconds=0.0)  # what the latest run() did
        self.pipe = pipe if pipe is not None else load_pipeline(config.model, progress=False)
        round_weights_to_fp16(self.pipe)  # the baseline every variant is scored against
        resolve_device(config.probe.device)  # a device this machine lacks: refused before any probe
        config.probe = config.probe.resolved(self.pipe)  # threads=None: this model's default, recorded
        self.module = getattr(self.pipe, config.component)
        layers = eligible_layers(self.module, config.min_numel)
        if config.only_layers is not None:
            unknown = sorted(set(config.only_layers) - {l.module for l in layers})
            if unknown:
                raise ConfigError(f"only_layers names {unknown[:3]}, which are not Linear/Conv2d weights of "
                                  f"{config.component} above {config.min_numel} elements; see eligible_layers()")
            layers = [l for l in layers if l.module in set(config.only_layers)]
        self.layers = layers[: config.max_layers] if config.max_layers else layers
        if not self.layers:
            raise ConfigError(f"no Linear/Conv2d weight in {config.component} has more than {config.min_numel} "
                              "elements; lower min_numel")
        self.weights_hash = weights_hash(self.pipe)
        # rows are only comparable under the same settings: refuse to mix them in one folder
        claim(self.dir / CONFIG, self.describe(), "a sensitivity analysis")
        self.reference = run_probe(self.pipe, config.probe)

    # -- bookkeeping

    def describe(self) -> dict:
        """What every row depends on (the stamp in sensitivity.json), as the file holds it."""
        c = self.config
        return as_json(dict(model=c.model, component=c.component, weights_hash=self.weights_hash,
                            probe=c.probe.key_fields(), min_numel=c.min_numel, palettizer=c.palettizer,
                            torch=torch.__version__))

    def _param(self, layer: Layer) -> torch.nn.Parameter:
        return self.module.get_submodule(layer.module).weight

    def palettized(self, layer: Layer, spec: LayerSpec) -> np.ndarray:
        """The layer's weight palettized as `spec` (kept in a bounded cache: recipes reuse them)."""
        key = (layer.module, candidate_name(spec))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        dense = palettize_dense(self._param(layer).detach().numpy(), spec, self.config.palettizer)
        self._cache[key] = dense
        while sum(a.nbytes for a in self._cache.values()) > self._cache_bytes and len(self._cache) > 1:
            self._cache.popitem(last=False)
        return dense

    def layer(self, module: str) -> Layer:
        for l in self.layers:
            if l.module == module:
                return l
        raise KeyError(f"{module} is not an analysed layer of {self.config.component}")

    def measure_specs(self, specs: dict[str, LayerSpec | None]) -> dict:
        """Drift of a whole recipe in torch: {layer module: spec, or None for fp16}."""
        return self.measure({self.layer(m): self.palettized(self.layer(m), s) for m, s in specs.items() if s is not None})

    def measure(self, assignment: dict[Layer, np.ndarray]) -> dict:
        """Drift with the given dense weights swapped in; the weights are restored afterwards."""
        saved = {}
        try:
            with torch.no_grad():
                for layer, dense in assignment.items():
                    p = self._param(layer)
                    saved[layer] = p.detach().clone()
                    p.copy_(torch.from_numpy(dense.astype(np.float32)).reshape(p.shape))
            self.probes += 1
            return drift(self.reference, run_probe(self.pipe, self.config.probe))
        finally:
            with torch.no_grad():
                for layer, w in saved.items():
                    self._param(layer).copy_(w)

    # -- single-layer pass

    def todo(self) -> list[tuple[Layer, LayerSpec]]:
        done = {(r["layer"], r["candidate"]) for r in read_rows(self.dir / SINGLE)}
        return [(l, s) for l in self.layers for s in self.config.specs
                if l.supports(s) and (l.module, candidate_name(s)) not in done]

    def run(self, executor=None) -> pd.DataFrame:
        """Measure every (layer, candidate) not yet in sensitivity.jsonl; return the whole table.
        Cells already there are reused, so adding a candidate measures only its cells (last_run).
        `executor`: None (here), "dask" or a sdwork.experiments.executors.Dask (each cell a task)."""
        from sdwork.experiments.executors import executor_for, run_cells

        executor = executor_for(executor)
        work = self.todo()
        start = time.perf_counter()
        if executor is not None:
            executor.check()
            run_cells(self, work, executor, self.dir / SINGLE)
        else:
            for layer, spec in tqdm(work, desc=f"sensitivity {self.config.component}", unit="run",
                                    disable=not self.progress):
                append_row(self.dir / SINGLE, self.measure_cell(layer, spec))
        table = self.table()
        self.last_run = dict(measured=len(work), reused=len(table) - len(work),
                             seconds=round(time.perf_counter() - start, 2))
        return table

    def measure_cell(self, layer: Layer, spec: LayerSpec) -> dict:
        """The row of one (layer, candidate): the weight palettized alone, the drift it causes."""
        t0 = time.perf_counter()
        dense = self.palettized(layer, spec)
        row = self._row(layer, spec, dense)
        row.update(self.measure({layer: dense}), seconds=round(time.perf_counter() - t0, 4))
        return row

    def cost(self) -> dict:
        """What the table cost when it was measured: cells and seconds summed over its rows
        (each row keeps its own time, so a table resumed over several runs is counted whole)."""
        table = self.table()
        seconds = float(table["seconds"].sum()) if "seconds" in table else 0.0
        return dict(cells=len(table), seconds=round(seconds, 1), probe_steps=self.config.probe.steps,
                    probe_images=len(self.config.probe.pairs))

    def _row(self, layer: Layer, spec: LayerSpec, dense: np.ndarray) -> dict:
        w = self._param(layer).detach().numpy().astype(np.float64)
        err = float(np.sqrt(((w - dense.astype(np.float64)) ** 2).mean()))
        return dict(layer=layer.module, param=layer.param, candidate=candidate_name(spec), nbits=spec.nbits,
                    granularity=spec.granularity, group_size=spec.group_size, shape=list(layer.shape),
                    numel=layer.numel, bytes=layer.nbytes(spec), fp16_bytes=layer.nbytes(None),
                    weight_rel_rmse=err / max(float(np.sqrt((w**2).mean())), 1e-30))

    def table(self) -> pd.DataFrame:
        """Rows of this run's layers and candidates: one per (layer, candidate), in layer order."""
        names = {candidate_name(s) for s in self.config.specs}
        return _frame([r for r in read_rows(self.dir / SINGLE) if r["candidate"] in names],
                      [l.module for l in self.layers])

    # -- Apple's cumulative pass

    def run_cumulative(self, specs=None) -> pd.DataFrame:
        """For each candidate: layers sorted from least to most harmful alone, palettized one more at
        a time (the ones before stay palettized), drift recorded after each addition."""
        single = self.table()
        specs = self.config.specs if specs is None else specs
        rows = read_rows(self.dir / CUMULATIVE)
        for spec in specs:
            name = candidate_name(spec)
            order = cumulative_order(single, name)
            have = [r for r in rows if r["candidate"] == name]
            if [r["layer"] for r in have] != order[: len(have)]:
                raise MismatchError(f"{self.dir / CUMULATIVE} has a different layer order for {name} than the "
                                    "single-layer table gives now; delete cumulative.jsonl to recompute it")
            self._cumulate(spec, order, len(have))
        return self.cumulative_table()

    def _cumulate(self, spec: LayerSpec, order: list[str], start: int) -> None:
        if start >= len(order):
            return
        by_name = {l.module: l for l in self.layers}
        # the layers added before an interruption are palettized again, then the pass goes on
        applied = {by_name[m]: self.palettized(by_name[m], spec) for m in order[:start]}
        name = candidate_name(spec)
        for k in tqdm(range(start, len(order)), desc=f"cumulative {name}", unit="run", disable=not self.progress):
            layer = by_name[order[k]]
            applied[layer] = self.palettized(layer, spec)
            row = dict(candidate=name, position=k, layer=layer.module,
                       bytes=sum(l.nbytes(spec) for l in applied),
                       fp16_bytes=sum(l.nbytes(None) for l in applied))
            row.update(self.measure(applied))
            append_row(self.dir / CUMULATIVE, row)

    def cumulative_table(self) -> pd.DataFrame:
        rows = read_rows(self.dir / CUMULATIVE)
        return pd.DataFrame(rows) if rows else pd.DataFrame(columns=["candidate", "position", "layer"])


def cumulative_order(single: pd.DataFrame, candidate: str) -> list[str]:
    """Layers from least to most harmful when palettized alone as `candidate` (Apple's order);
    ties keep the layer order, so the order is deterministic."""
    part = single[single["candidate"] == candidate].reset_index(drop=True)
    part = part.assign(_i=range(len(part))).sort_values(["latent_psnr", "_i"], ascending=[False, True], kind="stable")
    return list(part["layer"])


def _frame(rows: list[dict], layer_order: list[str]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    rank = {m: i for i, m in enumerate(layer_order)}
    df = df[df["layer"].isin(rank)]
    key = df["layer"].map(rank)
    return df.assign(_k=key).sort_values(["_k", "bytes"], kind="stable").drop(columns="_k").reset_index(drop=True)


def heatmap_table(table: pd.DataFrame, value: str = "latent_psnr") -> pd.DataFrame:
    """layer x candidate matrix of `value`, layers in analysis order, candidates by bits."""
    order = list(dict.fromkeys(table["layer"]))
    cands = sorted(set(table["candidate"]), key=lambda c: (parse_candidate(c).granularity, parse_candidate(c).nbits))
    return table.pivot(index="layer", columns="candidate", values=value).reindex(index=order, columns=cands)


# --- plots ----------------------------------------------------------------------------


def plot_heatmap(table: pd.DataFrame, value: str = "latent_psnr", max_layers: int | None = None):
    """Heatmap layer x candidate of `value` (dB): dark = harmful when palettized alone."""
    import matplotlib.pyplot as plt

    m = heatmap_table(table, value)
    if max_layers:
        m = m.iloc[:max_layers]
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * m.shape[1], 1.2 + 0.16 * m.shape[0]))
    im = ax.imshow(m.to_numpy(float), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(m.shape[1]), m.columns, rotation=90, fontsize=7)
    ax.set_yticks(range(m.shape[0]), m.index, fontsize=5)
    ax.set_xlabel("candidate (bits-granularity)")
    fig.colorbar(im, ax=ax, label=value.replace("_", " ") + (" (dB)" if "psnr" in value else ""))
    fig.tight_layout()
    return fig
