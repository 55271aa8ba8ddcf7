"""Fixed-seed image generation, and the cached fp16 baseline.

Images are made one (prompt, seed) at a time by default, each with a CPU generator seeded
by `seed`, so its starting noise never depends on the device (it is drawn on the CPU
everywhere) nor on the batch. `batch_size` > 1 runs several pairs per UNet call: faster on a
GPU, but not bit-identical to one at a time on the CPU (other kernels for another batch move
about 2 pixels in 100,000 by one level), so the batch size is part of every key when not 1.
The torch thread count changes the last bits of the result, so it is pinned and recorded. On CUDA and Apple-silicon
(MPS) devices the pipeline runs in fp16, as the baseline there promises; the device
and dtype are part of the baseline's cache key.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sdwork import paths, validate
from sdwork.errors import EngineError
from sdwork.io import digest, json_default
from sdwork.weights import round_weights_to_fp16, weights_hash

# threads=None (the default) is resolved from the model, and recorded resolved (GenSettings.resolved):
# one thread for a UNet under SMALL_UNET_PARAMS, every usable CPU for a larger one (default_threads)
DEFAULT_THREADS = None
SMALL_UNET_PARAMS = 50_000_000  # the embedded UNet has 5.8 M, SD 1.5's 860 M
_EXAMPLE_PROMPTS = "['a small red circle on a gray background']"
DEVICES = ("cpu", "cuda", "mps", "auto")


def resolve_device(device: str) -> str:
    """The device a setting names, refused when this machine has none ("auto": cuda, mps, cpu)."""
    validate.choice("device", device, DEVICES)
    have = {"cuda": torch.cuda.is_available(), "mps": _mps_available(), "cpu": True}
    if device == "auto":
        return next(d for d in ("cuda", "mps", "cpu") if have[d])
    if not have[device]:
        raise EngineError(f"device={device!r}, but this machine's torch ({torch.__version__}) sees no {device} "
                          "device; use device='cpu' or 'auto', or install a torch build for that device")
    return device


def default_threads(pipe) -> int:
    """The torch thread count `threads=None` resolves to for this pipeline.

    A UNet under SMALL_UNET_PARAMS parameters (the embedded model) gets 1: its ops are too small to
    gain from two, and on a busy 2-core machine two OpenMP threads wait on each other at every op
    (measured 50-80x slower under load); it also keeps the embedded model's images and keys as they
    were. A larger one gets every CPU this process may use (os.sched_getaffinity where there is one):
    full-size SD 1.5 at 512x512 is about 3.5x faster on two idle cores than on one. The count changes
    the last bits of an image, so it is part of the baseline's key: resolved, never "auto"."""
    unet = getattr(pipe, "unet", None)
    n = sum(p.numel() for p in unet.parameters()) if unet is not None else 0
    if n < SMALL_UNET_PARAMS:
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def compute_dtype(device: str) -> torch.dtype:
    """fp32 on the CPU (fp16 matmuls there are slow and not what the baseline measured), fp16 elsewhere."""
    return torch.float32 if device == "cpu" else torch.float16


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


@contextlib.contextmanager
def on_device(pipe, device: str):
    """pipe moved to `device` in its compute dtype inside the block, back to the CPU in fp32 after.
    Lossless for the pipelines sdwork generates with: their weights are fp16 values already."""
    if device == "cpu":
        yield pipe
        return
    pipe.to(device, compute_dtype(device))
    try:
        yield pipe
    finally:
        pipe.to("cpu", torch.float32)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to n inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class GenSettings:
    """What a set of images depends on besides the model: prompts x seeds and the sampler's settings."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int = 20
    guidance: float = 5.0
    height: int | None = None  # None: the UNet's native size
    width: int | None = None
    threads: int | None = DEFAULT_THREADS  # None: resolved from the model (default_threads)
    negative_prompt: str = field(default="")
    device: str = "cpu"  # "cpu", "cuda", "mps" or "auto" (the first of those this machine has)
    batch_size: int = 1  # (prompt, seed) pairs per pipeline call; see generate for what it changes

    def __post_init__(self):
        prompts = validate.sequence("prompts", self.prompts, lambda w, p: validate.text(w, p, empty=False),
                                    _EXAMPLE_PROMPTS)
        seeds = validate.sequence("seeds", self.seeds, lambda w, s: validate.integer(w, s, lo=0), "[0, 1]")
        object.__setattr__(self, "prompts", validate.unique("prompts", prompts))
        object.__setattr__(self, "seeds", validate.unique("seeds", seeds))
        validate.integer("steps", self.steps, lo=1, hi=1000)
        object.__setattr__(self, "guidance", validate.real("guidance", self.guidance, lo=0.0))
        for side in ("height", "width"):
            v = getattr(self, side)
            if v is not None and validate.integer(side, v, lo=8) % 8:
                raise validate.ConfigError(f"{side}={v} is not a multiple of 8 (the VAE's scale); use None for the "
                                           "model's native size or a multiple of 8")
        if self.threads is not None:
            validate.integer("threads", self.threads, lo=1, hi=1024)
        validate.text("negative_prompt", self.negative_prompt)
        validate.choice("device", self.device, DEVICES)
        validate.integer("batch_size", self.batch_size, lo=1, hi=1024)

    @classmethod
    def from_dict(cls, d: dict, what: str = "generation settings") -> "GenSettings":
        """From a grid file's `generation` section or notebook parameters; unknown keys are refused."""
        d = validate.known_keys(what, d, [f.name for f in cls.__dataclass_fields__.values()])
        for k in ("prompts", "seeds"):
            if k not in d:
                raise validate.ConfigError(f"{what}: '{k}' is missing; give e.g. {k}: "
                                           f"{_EXAMPLE_PROMPTS if k == 'prompts' else '[0, 1]'}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def key_fields(self) -> dict:
        """What keys (baseline cache, run folder stamps, rows) record: every field, batch_size only when
        it is not 1 (the default), so keys made before batching existed stay valid."""
        d = asdict(self)
        if d["batch_size"] == 1:
            del d["batch_size"]
        return d

    def resolved(self, pipe) -> "GenSettings":
        """These settings with threads=None replaced by this pipeline's default_threads: what keys
        and run folders record, so the same images always have the same key."""
        return self if self.threads is not None else replace(self, threads=default_threads(pipe))

    @property
    def pairs(self) -> list[tuple[str, int]]:
        """(prompt, seed) in output order: prompt-major."""
        return [(p, s) for p in self.prompts for s in self.seeds]


def native_size(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


@torch.no_grad()
def generate(pipe, settings: GenSettings, progress: bool = True) -> np.ndarray:
    """uint8 images (len(prompts) * len(seeds), H, W, 3), prompt-major."""
    device = resolve_device(settings.device)
    settings = settings.resolved(pipe)
    torch.set_num_threads(settings.threads)
    with on_device(pipe, device):
        return _generate(pipe, settings, progress)


def _generate(pipe, settings: GenSettings, progress: bool) -> np.ndarray:
    size = native_size(pipe)
    h, w = settings.height or size, settings.width or size
    pipe.set_progress_bar_config(disable=True)
    pairs, n = settings.pairs, settings.batch_size
    # one bar over every denoising step of every image: a full-size image takes minutes, so a bar per
    # image would sit at 0/1; tqdm's rate then gives the time left
    # leave=None: kept when alone (a baseline), cleared when under another bar (a sweep's variants)
    bar = tqdm(total=len(pairs) * settings.steps, desc="generate", unit="step", disable=not progress, leave=None)

    def tick(_pipe, _i, _t, kwargs):
        bar.update(len(chunk))
        return kwargs

    out = []
    with bar:
        for start in range(0, len(pairs), n):
            chunk = pairs[start:start + n]
            bar.set_postfix_str(f"images {start + 1}-{start + len(chunk)} of {len(pairs)}")
            images = pipe(**_call_args(chunk, settings), num_inference_steps=settings.steps,
                          guidance_scale=settings.guidance, height=h, width=w, output_type="np",
                          callback_on_step_end=tick).images
            out.extend(to_uint8(img) for img in images)
    return np.stack(out)


def _call_args(chunk: list[tuple[str, int]], settings: GenSettings) -> dict:
    """Prompts, negative prompts and generators of one pipeline call. A lone pair is passed as
    before batching existed (a string and one generator); a batch as lists, one CPU generator per
    image, so every image starts from the noise its own seed gives."""
    neg = settings.negative_prompt or None
    if len(chunk) == 1:
        (prompt, seed), = chunk
        return dict(prompt=prompt, negative_prompt=neg, generator=torch.Generator("cpu").manual_seed(seed))
    return dict(prompt=[p for p, _ in chunk], negative_prompt=neg and [neg] * len(chunk),
                generator=[torch.Generator("cpu").manual_seed(s) for _, s in chunk])


def to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def baseline_key(pipe, settings: GenSettings) -> str:
    settings = settings.resolved(pipe)
    return digest(dict(
        model=getattr(pipe, "model_spec", "?"),
        weights=weights_hash(pipe),
        scheduler=type(pipe.scheduler).__name__,
        scheduler_config=dict(pipe.scheduler.config),
        torch=torch.__version__,
        **_settings_key(settings),
    ), n=20)


def _settings_key(settings: GenSettings) -> dict:
    """The settings with the resolved device and dtype ("auto" names no device). On the CPU the key
    is what it was before devices existed, as the images are: cached baselines stay valid."""
    d = settings.key_fields()
    resolved = resolve_device(d.pop("device"))
    if resolved == "cpu":
        return d
    name = torch.cuda.get_device_name() if resolved == "cuda" else "apple-mps"
    return dict(d, device=resolved, device_name=name, dtype=str(compute_dtype(resolved)))


def fp16_baseline(pipe, settings: GenSettings, cache_dir: Path | None | str = "default",
                  progress: bool = True) -> np.ndarray:
    """Images of the fp16-rounded pipeline, generated once and cached (under the sdwork cache,
    `paths.cache_dir("baselines")`) by everything they depend on; cache_dir=None: no cache.

    Rounds `pipe`'s weights to fp16 in place (the baseline every variant is scored against).
    """
    round_weights_to_fp16(pipe)
    settings = settings.resolved(pipe)
    if cache_dir is None:
        return generate(pipe, settings, progress)
    folder = paths.cache_dir("baselines") if cache_dir == "default" else Path(cache_dir)
    path = folder / f"{baseline_key(pipe, settings)}.npz"
    if path.exists():
        return np.load(path)["images"]
    images = generate(pipe, settings, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, images=images, settings=_settings_json(settings))
    tmp.replace(path)
    return images


def _settings_json(settings: GenSettings) -> str:
    import json

    return json.dumps(asdict(settings), default=json_default)
