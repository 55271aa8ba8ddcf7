"""Training-time palettization of the UNet with differentiable k-means (DKM).

Below 4 bits, post-training k-means palettization breaks images. DKM
(coremltools.optimize.torch's DKMPalettizer, arXiv 2108.12659) fine-tunes the
weights while they are softly assigned to their LUT entries, so the network
learns to live with its palette. Here the UNet is fine-tuned by distillation
from its own frozen fp16 copy (no dataset needed, see sdwork.experiments.distill), or
with the standard noise-prediction loss on the embedded model's own images.

    s = DKMSettings(nbits=2, steps=100)
    c = compare(exp, s)                         # exp: an Experiment; the post-training row and the DKM row
    c.table                                     # the two rows side by side (method column)

    run = train(pipe, s, "runs/dkm/km2")        # by hand: checkpoints, resume, loss.csv
    pkg = convert(pipe, run.unet, "runs/dkm/km2/package", s)   # LUT ops kept
    check_luts(pkg, run)                        # really palettized, as expected

A run folder belongs to one set of settings and inputs (model, weights, training data): train()
stamps settings.json with them and refuses a folder made from others, so a run trained on other
prompts or images is never resumed or reused. The hook point "checkpoint_saved" (stage="dkm",
step=) fires after each checkpoint (sdwork.hooks: where a test injects a crash).

Memory: DKM keeps an (N x 2^nbits) attention matrix per layer in autograd, for
N weights. That is fine for the embedded UNet (5.8 M weights) on a CPU; a
full-size SD UNet (860 M weights) at 2-4 bits needs tens of GiB and a GPU.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import resource
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sdwork import hooks
from sdwork.compress.recipe import DEFAULT_WEIGHT_THRESHOLD, Recipe, check_lut, implied_granularity
from sdwork.errors import ConfigError, MismatchError, PackageError
from sdwork import validate
from sdwork.generate import DEVICES, resolve_device, torch_threads
from sdwork.io import as_json, digest, write_json

OBJECTIVES = ("distill", "dataset")
INITS = ("auto", "exact", "kmeans++")
CHECKPOINT = "checkpoint.pt"
LOSSES = "loss.csv"
SETTINGS = "settings.json"


# ---------------------------------------------------------------- settings
@dataclass(frozen=True)
class DKMSettings:
    nbits: int = 2
    granularity: str | None = None  # None: per_grouped_channel when group_size is given, else per_tensor
    group_size: int | None = None  # output channels per LUT (per_grouped_channel)
    cluster_dim: int = 1
    weight_threshold: int = DEFAULT_WEIGHT_THRESHOLD  # weights with more elements are palettized
    milestone: int = 0  # optimizer step at which palettization starts
    steps: int = 100
    lr: float = 1e-4
    batch: int = 32
    objective: str = "distill"  # "distill" (teacher's prediction) or "dataset" (noise-prediction loss)
    uncond_prob: float = 0.2  # share of empty prompts: guidance runs the UNet on "" every step
    kmeans_iters: int = 1  # DKM iterations per forward; coremltools' default 3 costs twice the time
    init: str = "auto"  # starting LUTs: "exact" 1-D k-means (sdwork.kmeans1d, the post-training optimum),
    # coremltools' own "kmeans++", or "auto" (exact for scalar LUTs, kmeans++ for cluster_dim > 1)
    kmeans_n_init: int = 3  # restarts of coremltools' kmeans++ start
    tau: float = 1e-5  # soft-assignment temperature; coremltools defaults to 1e-4, too soft for 3 bits here:
    # the snapped (deployed) weights then drift from the soft ones trained (measured: benchmarks/dkm_vs_ptq.py)
    seed: int = 0
    threads: int = 2  # torch threads: the last bits of the result depend on it
    ckpt_every: int = 50
    # where student and teacher train, in fp32 ("cpu", "cuda", "mps" or "auto"); batches are drawn on
    # the CPU everywhere. Off the CPU the run is another run: its settings (and name) say the device
    device: str = "cpu"

    def __post_init__(self):
        object.__setattr__(self, "granularity", implied_granularity(self.granularity, self.group_size))
        check_lut(self.nbits, self.granularity, self.group_size, self.cluster_dim, what="DKM settings")
        for name in ("steps", "batch", "kmeans_iters", "kmeans_n_init", "threads", "ckpt_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if not 0 <= self.milestone < self.steps:
            raise ConfigError(f"milestone must be in [0, steps={self.steps}), got {self.milestone}: "
                              "palettization has to start before training ends")
        if not (self.lr > 0 and self.tau > 0):
            raise ConfigError(f"lr and tau must be > 0, got lr={self.lr}, tau={self.tau}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {self.init!r}")
        if self.init == "exact" and self.cluster_dim > 1:
            raise ConfigError("init='exact' is 1-D k-means: use init='kmeans++' (or 'auto') with cluster_dim > 1")
        validate.choice("device", self.device, DEVICES)
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")

    def recipe(self, engine: str = "coremltools") -> Recipe:
        """The post-training recipe with the same LUTs: what DKM is compared against."""
        return Recipe(nbits=self.nbits, granularity=self.granularity, group_size=self.group_size,
                      cluster_dim=self.cluster_dim, weight_threshold=self.weight_threshold,
                      components=("unet",), engine=engine)

    @property
    def name(self) -> str:
        """e.g. 'km2-pt-unet-dkm100': the recipe's name plus the training length, and a short
        hash of the other training settings when they differ from the defaults ('...-dkm100-3f9a1c')."""
        base = f"{self.recipe().name}-dkm{self.steps}"
        lut = {"nbits", "granularity", "group_size", "cluster_dim", "weight_threshold", "steps", "threads", "ckpt_every"}
        changed = {k: v for k, v in self.to_dict().items() if k not in lut and v != _DEFAULTS[k]}
        if not changed:
            return base
        return f"{base}-{digest(changed, n=6)}"

    @property
    def min_target(self) -> str:
        return self.recipe().min_target

    def to_dict(self) -> dict:
        """The settings; device only off the CPU, so CPU run folders, names and keys stay as they were."""
        d = asdict(self)
        if d["device"] == "cpu":
            del d["device"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DKMSettings":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown DKM setting(s) {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        return cls(**d)


_DEFAULTS = {f.name: f.default for f in fields(DKMSettings)}


def dkm_config(s: DKMSettings):
    """coremltools' DKMPalettizerConfig for these settings (applied to every Linear / Conv2d)."""
    from coremltools.optimize.torch.palettization import DKMPalettizerConfig, ModuleDKMPalettizerConfig

    kw = dict(group_size=s.group_size) if s.granularity == "per_grouped_channel" else {}
    return DKMPalettizerConfig(global_config=ModuleDKMPalettizerConfig(
        n_bits=s.nbits, weight_threshold=s.weight_threshold, granularity=s.granularity,
        cluster_dim=s.cluster_dim, milestone=s.milestone, kmeans_max_iter=s.kmeans_iters,
        kmeans_n_init=s.kmeans_n_init, palett_tau=s.tau, **kw,
    ))


# ---------------------------------------------------------------- student
def prepare_student(unet: torch.nn.Module, s: DKMSettings, device: str = "cpu"):
    """(student, palettizer, skipped): a copy of `unet` with fake palettization inserted.

    `skipped` lists the weights one would expect palettized (Linear / Conv2d above
    the threshold) that coremltools declined, with the reason: it only logs those.
    """
    from coremltools.optimize.torch.palettization import DKMPalettizer

    student = copy.deepcopy(unet).float().to(device).train()  # coremltools' LUT lists follow the weights
    expected = _expected_layers(student, s)
    with _quiet_coremltools():
        palettizer = DKMPalettizer(student, dkm_config(s))
        student = palettizer.prepare(inplace=True)
    if s.init == "exact" or (s.init == "auto" and s.cluster_dim == 1):
        _exact_kmeans_start(student, s)
    prepared = {n for n, m in student.named_modules() if hasattr(m, "weight_fake_quant")}
    skipped = [dict(module=n, shape=list(shape), reason=_skip_reason(shape, s))
               for n, shape in expected.items() if n not in prepared]
    if not prepared:
        raise ConfigError(f"no layer of the UNet is palettized with {s}: check weight_threshold and group_size")
    return student, palettizer, skipped


def _exact_kmeans_start(student: torch.nn.Module, s: DKMSettings) -> None:
    """Start every LUT at the exact 1-D k-means optimum of its fp16 weights: step 0 is then the
    post-training palettization itself (coremltools' kmeans++ start is approximate and slow here)."""
    from sdwork.compress.kmeans1d import cluster_rows

    threads = torch.get_num_threads()  # numba's OpenMP pool resets torch's thread count: pin it back after
    for m in student.modules():
        fq = getattr(m, "weight_fake_quant", None)
        if fq is None:
            continue
        w = m.weight.detach()
        fq.create_partitions(w)  # contiguous runs of group_size output channels (all of them per tensor)
        rows = w.to(torch.float16).reshape(len(fq.partitions), -1).cpu().numpy()
        lut, _ = cluster_rows(rows, s.nbits)
        fq.centroids = [torch.from_numpy(row.astype(np.float32)).view(-1, 1).to(w.device) for row in lut]
        fq.labels = [None] * len(lut)
    torch.set_num_threads(threads)


def _expected_layers(model: torch.nn.Module, s: DKMSettings) -> dict[str, tuple]:
    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.weight.numel() > s.weight_threshold}


def _skip_reason(shape: tuple, s: DKMSettings) -> str:
    if s.granularity == "per_grouped_channel" and shape[0] % s.group_size:
        return f"{shape[0]} output channels not divisible by group_size {s.group_size}"
    if s.cluster_dim > 1 and shape[0] % s.cluster_dim:
        return f"{shape[0]} output channels not divisible by cluster_dim {s.cluster_dim}"
    return "declined by coremltools' DKMPalettizer (see its log)"


@contextlib.contextmanager
def _quiet_coremltools():
    """coremltools logs every skipped layer at WARNING; we report them as data instead."""
    import logging

    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# ---------------------------------------------------------------- training
@dataclass
class DKMRun:
    settings: DKMSettings
    run_dir: Path
    unet: torch.nn.Module  # finalized: LUT-valued weights plus coremltools' _COREML_ metadata buffers
    losses: pd.DataFrame  # step, loss, seconds
    skipped: list[dict]
    seconds: float  # training wall time of this call (0 when the run was already complete)
    cpu_seconds: float  # CPU time of the same: what the run costs on a machine shared with other jobs
    peak_rss_bytes: int  # the process's resident-memory high-water mark after training
    resumed_from: int = 0
    inputs: dict = field(default_factory=dict)  # what the run depends on besides settings: model, weights, data


def train(pipe, s: DKMSettings, run_dir, prompts: list[str] | None = None, data=None,
          progress: bool = True, model: str | None = None) -> DKMRun:
    """Fine-tune pipe.unet under DKM; resumes from run_dir/checkpoint.pt when present.

    Rounds pipe's weights to fp16 in place (the baseline every variant is scored
    against): the student starts from, and the teacher is, that fp16 UNet.
    `data` overrides the batches: an object with .batch(step) -> distill.Batch and .describe()
    -> what the batches depend on. The run folder is claimed for the settings, the model, its
    weights and that description (see _claim_run_dir) before any training.
    """
    from sdwork.weights import round_module_to_fp16, round_weights_to_fp16

    device = resolve_device(s.device)  # a device this machine lacks: refused before any work
    run_dir = Path(run_dir)
    round_weights_to_fp16(pipe)
    data = data or _make_data(pipe, s, prompts)
    inputs = _inputs(pipe, data, model)
    _claim_run_dir(run_dir, s, inputs)
    teacher = copy.deepcopy(pipe.unet).float().to(device).eval().requires_grad_(False)
    with torch_threads(s.threads), _forked_rng(s.seed):
        student, palettizer, skipped = prepare_student(pipe.unet, s, device)
        opt = torch.optim.AdamW(student.parameters(), lr=s.lr, weight_decay=0.0)
        start, losses = _resume(run_dir, student, opt, palettizer)
        t0, c0 = time.perf_counter(), time.process_time()
        bar = tqdm(range(start, s.steps), desc=f"DKM {s.name}", initial=start, total=s.steps, disable=not progress)
        for step in bar:
            losses.append(_step(student, teacher, palettizer, opt, _to(data.batch(step), device), _lr_at(step, s), t0))
            bar.set_postfix(loss=f"{losses[-1][1]:.4g}")
            if (step + 1) % s.ckpt_every == 0 or step + 1 == s.steps:
                _save_checkpoint(run_dir, student, opt, step + 1, losses)
                hooks.fire("checkpoint_saved", stage="dkm", step=step + 1)
        seconds = time.perf_counter() - t0 if start < s.steps else 0.0
        cpu = time.process_time() - c0 if start < s.steps else 0.0
        with _quiet_coremltools():
            # LUTs and the rest snapped to fp16, as the package holds them: torch then computes what it does
            unet = round_module_to_fp16(palettizer.finalize(inplace=True).eval().to("cpu"))
    table = pd.DataFrame(losses, columns=["step", "loss", "seconds"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return DKMRun(s, run_dir, unet, table, skipped, seconds, cpu, peak, resumed_from=start, inputs=inputs)


def _make_data(pipe, s: DKMSettings, prompts):
    from sdwork.experiments import distill

    if s.objective == "distill":
        return distill.DistillData(pipe, prompts, batch=s.batch, seed=s.seed, uncond_prob=s.uncond_prob)
    if prompts:
        raise ConfigError("objective='dataset' trains on the dataset's captions; prompts= only applies to 'distill'")
    return distill.DatasetData(pipe, batch=s.batch, seed=s.seed, uncond_prob=s.uncond_prob)


def _to(b, device: str):
    """A batch (drawn on the CPU, so the same everywhere) on the training device."""
    if device == "cpu":
        return b
    import dataclasses

    return dataclasses.replace(b, **{f.name: getattr(b, f.name).to(device) for f in dataclasses.fields(b)
                                     if isinstance(getattr(b, f.name), torch.Tensor)})


def _step(student, teacher, palettizer, opt, b, lr: float, t0: float) -> tuple[int, float, float]:
    for g in opt.param_groups:
        g["lr"] = lr
    target = b.target
    if target is None:
        with torch.no_grad():
            target = teacher(b.noisy, b.timesteps, b.context).sample
    pred = student(b.noisy, b.timesteps, b.context).sample
    loss = F.mse_loss(pred, target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    palettizer.step()
    return palettizer._step_count, float(loss.item()), round(time.perf_counter() - t0, 3)


def _lr_at(step: int, s: DKMSettings) -> float:
    """Short linear warm-up, then cosine decay to a tenth: the last steps settle the clusters."""
    warm = max(1, min(20, s.steps // 10))
    if step < warm:
        return s.lr * (step + 1) / warm
    p = (step - warm) / max(1, s.steps - warm)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


# ---------------------------------------------------------------- checkpoints
def _inputs(pipe, data, model: str | None) -> dict:
    """What a run's weights depend on besides its settings: the model, its weights and the data
    (the prompts or images the batches come from, as the data object describes itself)."""
    from sdwork.weights import weights_hash

    if not callable(getattr(data, "describe", None)):
        raise ConfigError(f"data= ({type(data).__name__}) has no describe(): give it one returning what its batches "
                          "depend on (a DKM run folder is keyed by it), as sdwork.experiments.distill's data do")
    return as_json(dict(model=model or getattr(pipe, "model_spec", None), weights_hash=weights_hash(pipe),
                        data=data.describe()))


def _claim_run_dir(run_dir: Path, s: DKMSettings, inputs: dict) -> None:
    """A run folder belongs to one set of settings, model, weights and data: resuming (or reading
    back) a run made from others would mix two runs, so it is refused, naming each difference
    (e.g. 'inputs.data.prompts'). Only ckpt_every may change; steps only before the first
    checkpoint (the learning-rate schedule depends on the total)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / SETTINGS
    want = as_json(dict(s.to_dict(), inputs=inputs))
    if path.exists():
        free = ("ckpt_every",) if (run_dir / CHECKPOINT).exists() else ("ckpt_every", "steps")
        have, new = _flat(json.loads(path.read_text())), _flat(want)
        diff = [f"{k}: {_brief(have.get(k))} -> {_brief(new.get(k))}" for k in sorted(set(have) | set(new))
                if k not in free and have.get(k) != new.get(k)]
        if diff:
            raise MismatchError(f"{run_dir} holds a DKM run made with other settings, model or data "
                                f"({'; '.join(diff)}); pass a new run_dir, or delete this one to start over")
    write_json(path, want)


def _flat(d: dict, prefix: str = "") -> dict:
    """{'inputs.data.prompts': [...], ...}: nested stamps flattened, so a difference names its field."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _brief(v, width: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= width else text[: width - 3] + "..."


def _save_checkpoint(run_dir: Path, student, opt, step: int, losses: list) -> None:
    state = dict(student=student.state_dict(), opt=opt.state_dict(), step=step,
                 losses=torch.tensor(losses, dtype=torch.float64))
    tmp = run_dir / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    tmp.replace(run_dir / CHECKPOINT)  # atomic: an interruption never leaves half a checkpoint
    pd.DataFrame(losses, columns=["step", "loss", "seconds"]).to_csv(run_dir / LOSSES, index=False)


def _resume(run_dir: Path, student, opt, palettizer) -> tuple[int, list]:
    path = run_dir / CHECKPOINT
    if not path.exists():
        return 0, []
    state = torch.load(path, weights_only=True, map_location="cpu")  # loading copies onto the student's device
    _load_student(student, state["student"])
    opt.load_state_dict(state["opt"])
    palettizer._step_count = state["step"]  # the milestone is counted in palettizer steps
    return state["step"], [(int(a), float(b), float(c)) for a, b, c in state["losses"].tolist()]


def _load_student(student, state: dict) -> None:
    """Load a prepared student's state. coremltools saves the LUTs and partitions but not
    two lists create_partitions() sets up: rebuild them as it would."""
    student.load_state_dict(state)
    for m in student.modules():
        fq = getattr(m, "weight_fake_quant", None)
        if fq is not None and fq.partitions and not fq.enable_partition:
            n = len(fq.partitions)
            on = max(1, int(fq.percentage_palett_enable * n))
            fq.enable_partition = [True] * on + [False] * (n - on)
            fq.cum_inertia = [1e9] * n  # running statistic only, never read back


def plot_losses(losses: pd.DataFrame, title: str = "", smooth: float = 0.9):
    """The training loss per step (log scale) with an exponential moving average."""
    import matplotlib.pyplot as plt

    if losses.empty:
        raise ConfigError("no losses to plot: the run has no training step yet")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(losses["step"], losses["loss"], color="tab:blue", alpha=0.3, lw=0.8, label="per step")
    ax.plot(losses["step"], losses["loss"].ewm(alpha=1 - smooth).mean(), color="tab:blue", label="moving average")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MSE")
    ax.set_title(title or "DKM fine-tuning loss", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def load_losses(run_dir) -> pd.DataFrame:
    """The loss curve of a run folder (written at every checkpoint)."""
    path = Path(run_dir) / LOSSES
    if not path.exists():
        raise FileNotFoundError(f"no loss curve at {path}: train first (sdwork.experiments.dkm.train)")
    return pd.read_csv(path)


@contextlib.contextmanager
def _forked_rng(seed: int):
    """Seed torch's and numpy's global RNGs (coremltools' k-means++ start draws from both), then restore them."""
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)


# ---------------------------------------------------------------- Core ML
def check_target(target: str, s: DKMSettings) -> None:
    """Refuse a deployment target too old for the LUTs: coremltools would write dense fp16 silently."""
    import coremltools as ct

    known = [t.name for t in ct.target if t.name.startswith("iOS")]
    if target not in known:
        raise ConfigError(f"unknown deployment target {target!r}; choose from {', '.join(known)}")
    need = s.min_target
    if getattr(ct.target, target).value < getattr(ct.target, need).value:
        why = "per-grouped-channel LUTs, 3-bit or vector LUTs need iOS18" if need == "iOS18" else "LUT ops need iOS16"
        raise ConfigError(
            f"target {target} cannot hold the DKM palettes: below {need} coremltools silently converts the "
            f"palettized weights to dense fp16 ({why}). Use target='{need}' or later"
        )


def convert(pipe, unet: torch.nn.Module, out_dir, s: DKMSettings, target: str | None = None,
            progress: bool = True) -> Path:
    """Convert a finalized DKM UNet to <out_dir>/Unet.mlpackage through sdwork.convert, LUTs kept."""
    from sdwork.convert import convert_pipeline

    target = target or s.min_target
    check_target(target, s)
    if not any("_COREML_" in k for k, _ in unet.named_buffers()):
        raise ConfigError("this UNet carries no palettization metadata: pass DKMRun.unet (finalized by "
                          "sdwork.experiments.dkm.train)")
    source = copy.copy(pipe)  # the packages are tied to the fp16 model, not to the DKM weights
    with _swapped(pipe, "unet", unet):
        paths = convert_pipeline(pipe, out_dir, components=("unet",), target=target, progress=progress, source=source)
    return Path(paths["unet"])


@contextlib.contextmanager
def _swapped(obj, attr: str, value):
    before = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, before)


def check_luts(package, run: DKMRun) -> pd.DataFrame:
    """Per weight of the package: is it the LUT op DKM promised? Raises when one is not.

    Every layer DKM palettized must be a constexpr_lut_to_dense with nbits and
    LUT count as set; a dense const where a LUT was due is the silent fallback
    this guards against.
    """
    from sdwork.convert import load_weight_map
    from sdwork.coreml.sizes import package_sizes

    s = run.settings
    sizes = package_sizes(package)
    by_const = {l.name: l for l in sizes.layers}
    consts = load_weight_map(package)
    rows, bad = [], []
    for name, m in run.unet.named_modules():
        if not any(k.startswith("_COREML_/weight/") for k, _ in m.named_buffers(recurse=False)):
            continue
        const = consts.get(f"{name}.weight")
        layer = by_const.get(const)
        luts = m.weight.shape[0] // s.group_size if s.granularity == "per_grouped_channel" else 1
        ok = layer is not None and layer.op_type == "constexpr_lut_to_dense" and layer.nbits == s.nbits \
            and layer.lut_count == luts and layer.cluster_dim == s.cluster_dim
        rows.append(dict(module=name, const=const, op_type=getattr(layer, "op_type", None),
                         nbits=getattr(layer, "nbits", None), lut_count=getattr(layer, "lut_count", None),
                         expected_luts=luts, numel=m.weight.numel(), file_bytes=getattr(layer, "file_bytes", None),
                         ok=ok))
        if not ok:
            bad.append(name)
    if bad:
        raise PackageError(f"{package}: {len(bad)} DKM-palettized weight(s) are not stored as the expected LUT "
                           f"(e.g. {bad[0]}); the conversion dropped the palettization metadata")
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- results row
def run_variant(exp, s: DKMSettings, prompts: list[str] | None = None, target: str | None = None):
    """Train (or resume) on `exp`'s fp16 pipeline in exp.out/dkm/<s.name>, convert with LUTs, verify
    them, and score the package like every variant of `exp` (sdwork.Experiment): (Variant, DKMRun).
    A row already in the results (same key) is read back; the training run resumes or is complete
    either way."""
    run = train(exp.pipe, s, exp.out / "dkm" / s.name, prompts=prompts, progress=exp.progress, model=exp.model)
    key = row_key(exp, run)
    if key in exp.done():
        return exp.recorded(key), run
    package = convert(exp.pipe, run.unet, exp.out / "variants" / s.name, s, target, exp.progress)
    check_luts(package, run)
    return exp.evaluate(compressed(exp, run, package), s.name, key, columns=_columns(run)), run


def compressed(exp, run: DKMRun, package: Path):
    """The DKM package with the experiment's other fp16 packages, as a compression result."""
    from sdwork.compress.apply import Compressed
    from sdwork.coreml.sizes import package_sizes

    packages = {**exp.fp16_packages(("unet",)), "unet": Path(package)}
    return Compressed(run.settings.recipe(), packages, {c: package_sizes(p) for c, p in packages.items()}, {},
                      run.seconds, run.cpu_seconds)


def _columns(run: DKMRun) -> dict:
    return dict(method="dkm", engine="dkm", overrides={}, dkm=run.settings.to_dict(), dkm_data=run.inputs.get("data"),
                train_s=round(run.seconds, 3), train_cpu_s=round(run.cpu_seconds, 3),
                peak_rss_bytes=run.peak_rss_bytes,
                final_loss=float(run.losses["loss"].tail(10).mean()) if len(run.losses) else None)


def row_key(exp, run: DKMRun) -> str:
    """The experiment's row key with what the DKM weights depend on: the training settings and the
    data they were trained on (the run's own description of its prompts or images)."""
    return exp.key(run.settings.recipe(), dkm=run.settings.to_dict(), data=run.inputs.get("data"))


# ---------------------------------------------------------------- DKM vs post-training
COMPARE_COLUMNS = ("name", "method", "bits_per_weight", "size_bytes", "size_ratio", "lut_count", "psnr", "ssim",
                   "clip_image_image", "clip_text_image", "train_s")


@dataclass
class Comparison:
    """DKM against post-training palettization with the same LUTs, both rows of one experiment."""

    table: pd.DataFrame  # the two rows side by side: method 'post-training', then 'dkm'
    run: DKMRun  # the training run (losses, time, memory, layers DKM left dense)
    ptq: object  # the post-training Variant (images, row)
    dkm: object  # the DKM Variant
    luts: pd.DataFrame  # check_luts of the DKM package: every palettized weight a LUT op as set


def compare(exp, s: DKMSettings, ptq_engine: str = "sdwork", prompts: list[str] | None = None,
            target: str | None = None) -> Comparison:
    """The post-training recipe of `s` (s.recipe(ptq_engine)) through exp.run, then DKM trained or
    resumed (run_variant), its package's LUTs checked: what notebook 04 and benchmarks/dkm_vs_ptq.py
    compare. `prompts`: the distillation prompts (None: the embedded model's captions)."""
    from sdwork.convert.components import spec

    ptq = exp.run(s.recipe(ptq_engine), columns=dict(method="post-training"))
    variant, run = run_variant(exp, s, prompts, target)
    luts = check_luts(Path(exp.out) / variant.row["packages"] / spec("unet").package, run)
    # the post-training recipe may have been measured before under another method (a sweep, a study)
    table = pd.DataFrame([dict(ptq.row, method="post-training"), dict(variant.row, method="dkm")])
    table = table[[c for c in COMPARE_COLUMNS if c in table]]
    return Comparison(table, run, ptq, variant, luts)
