"""Fixed-seed image generation, and the cached fp16 baseline.

Images are made one (prompt, seed) at a time with a CPU generator seeded by
`seed`, so an image never depends on what else is in the batch. The torch
thread count changes the last bits of the result, so it is pinned and recorded.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sdwork.pipeline import ROOT, round_weights_to_fp16, weights_hash

BASELINES = ROOT / "runs" / "baselines"
# One thread: the tiny UNet's ops are too small to gain from two, and on a busy 2-core machine
# two OpenMP threads wait on each other at every op (measured 50-80x slower under load).
DEFAULT_THREADS = 1


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
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int = 20
    guidance: float = 5.0
    height: int | None = None  # None: the UNet's native size
    width: int | None = None
    threads: int = DEFAULT_THREADS
    negative_prompt: str = field(default="")

    def __post_init__(self):
        if not self.prompts or not self.seeds:
            raise ValueError("GenSettings needs at least one prompt and one seed")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))

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
    desc = dict(
        model=getattr(pipe, "model_spec", "?"),
        weights=weights_hash(pipe),
        scheduler=type(pipe.scheduler).__name__,
        scheduler_config=dict(pipe.scheduler.config),
        torch=torch.__version__,
        **asdict(settings),
    )
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:20]


def fp16_baseline(pipe, settings: GenSettings, cache_dir: Path | None = BASELINES, progress: bool = True) -> np.ndarray:
    """Images of the fp16-rounded pipeline, generated once and cached by everything they depend on.

    Rounds `pipe`'s weights to fp16 in place (the baseline every variant is scored against).
    """
    round_weights_to_fp16(pipe)
    if cache_dir is None:
        return generate(pipe, settings, progress)
    path = Path(cache_dir) / f"{baseline_key(pipe, settings)}.npz"
    if path.exists():
        return np.load(path)["images"]
    images = generate(pipe, settings, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, images=images, settings=json.dumps(asdict(settings)))
    tmp.replace(path)
    return images
