"""Fixed-seed image generation, and the cached fp16 baseline.

Images are made one (prompt, seed) at a time with a CPU generator seeded by
`seed`, so an image never depends on what else is in the batch. The torch
thread count changes the last bits of the result, so it is pinned and recorded.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sdwork import paths, validate
from sdwork.io import digest, json_default
from sdwork.weights import round_weights_to_fp16, weights_hash

# One thread: the tiny UNet's ops are too small to gain from two, and on a busy 2-core machine
# two OpenMP threads wait on each other at every op (measured 50-80x slower under load).
DEFAULT_THREADS = 1
_EXAMPLE_PROMPTS = "['a small red circle on a gray background']"


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
    threads: int = DEFAULT_THREADS
    negative_prompt: str = field(default="")

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
        validate.integer("threads", self.threads, lo=1, hi=1024)
        validate.text("negative_prompt", self.negative_prompt)

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

    @property
    def pairs(self) -> list[tuple[str, int]]:
        """(prompt, seed) in output order: prompt-major."""
        return [(p, s) for p in self.prompts for s in self.seeds]


def native_size(pipe) -> int:
    return pipe.unet.config.sample_size * pipe.vae_scale_factor


@torch.no_grad()
def generate(pipe, settings: GenSettings, progress: bool = True) -> np.ndarray:
    """uint8 images (len(prompts) * len(seeds), H, W, 3), prompt-major."""
    torch.set_num_threads(settings.threads)
    size = native_size(pipe)
    h, w = settings.height or size, settings.width or size
    pipe.set_progress_bar_config(disable=True)
    out = []
    for prompt, seed in tqdm(settings.pairs, desc="generate", disable=not progress):
        g = torch.Generator("cpu").manual_seed(seed)
        img = pipe(
            prompt,
            negative_prompt=settings.negative_prompt or None,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            height=h,
            width=w,
            generator=g,
            output_type="np",
        ).images[0]
        out.append(to_uint8(img))
    return np.stack(out)


def to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def baseline_key(pipe, settings: GenSettings) -> str:
    return digest(dict(
        model=getattr(pipe, "model_spec", "?"),
        weights=weights_hash(pipe),
        scheduler=type(pipe.scheduler).__name__,
        scheduler_config=dict(pipe.scheduler.config),
        torch=torch.__version__,
        **asdict(settings),
    ), n=20)


def fp16_baseline(pipe, settings: GenSettings, cache_dir: Path | None | str = "default",
                  progress: bool = True) -> np.ndarray:
    """Images of the fp16-rounded pipeline, generated once and cached (under the sdwork cache,
    `paths.cache_dir("baselines")`) by everything they depend on; cache_dir=None: no cache.

    Rounds `pipe`'s weights to fp16 in place (the baseline every variant is scored against).
    """
    round_weights_to_fp16(pipe)
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
