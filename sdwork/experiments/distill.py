"""Training batches for fine-tuning a UNet while it is compressed: teacher/student inputs.

Two sources, both seeded per step (batch `step` is the same whenever it is drawn,
so a resumed run sees exactly the batches an uninterrupted one would):

  DistillData  needs no dataset: prompt embeddings x random latents x random
               timesteps. Clean latents x0 ~ N(0, I) noised by the scheduler give
               x_t ~ N(0, I) at every t: the marginal the sampler starts from and
               the scale SD's scaled latents have. The target is the frozen
               teacher's noise prediction on the same input (computed by the caller).
  DatasetData  the embedded model's own images, encoded once with the VAE; the
               target is the noise that was added (the standard training loss).

Both mix in the empty prompt, because classifier-free guidance runs the UNet on
it at every sampling step.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from sdwork.errors import ConfigError
from sdwork.io import digest

TINY_SPECS = ("tiny", "tiny-random")


@dataclass
class Batch:
    noisy: torch.Tensor  # (B, C, H, W) noisy latents x_t
    timesteps: torch.Tensor  # (B,) int64
    context: torch.Tensor  # (B, tokens, hidden) text encoder hidden states
    target: torch.Tensor | None = None  # dataset route: what the UNet should predict; None: ask the teacher


@torch.no_grad()
def prompt_embeddings(pipe, prompts: list[str]) -> torch.Tensor:
    """Text encoder hidden states exactly as the pipeline computes them when generating."""
    if not prompts:
        raise ConfigError("no prompts: pass at least one prompt (or use the embedded model's captions)")
    embeds, _ = pipe.encode_prompt(list(prompts), "cpu", 1, False)
    return embeds.float()


def default_prompts(pipe) -> list[str]:
    """The embedded model's training captions; other models need prompts from the user."""
    spec = getattr(pipe, "model_spec", None)
    if spec not in TINY_SPECS:
        raise ConfigError(
            f"no default prompts for model {spec!r}: pass prompts=[...] (a few dozen prompts like the ones "
            "you will generate with) to distill from the teacher"
        )
    from sdwork.tiny import dataset

    train, _ = dataset.split_combinations()
    return [a.caption for a in train]


def _generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _timesteps(scheduler, b: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=g)


def _train_scheduler(pipe):
    """A DDPM scheduler with the pipeline's noise schedule: add_noise and alphas for training."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


class DistillData:
    """Random noisy latents under random prompts (or the empty prompt, with uncond_prob)."""

    def __init__(self, pipe, prompts: list[str] | None = None, batch: int = 32, seed: int = 0,
                 uncond_prob: float = 0.2):
        if batch < 1:
            raise ConfigError(f"batch must be >= 1, got {batch}")
        if not 0.0 <= uncond_prob <= 1.0:
            raise ConfigError(f"uncond_prob must be in [0, 1], got {uncond_prob}")
        self.prompts = list(prompts) if prompts else default_prompts(pipe)
        self.cond = prompt_embeddings(pipe, self.prompts)
        self.uncond = prompt_embeddings(pipe, [""])[0]
        self.scheduler = _train_scheduler(pipe)
        c = pipe.unet.config
        self.shape = (c.in_channels, c.sample_size, c.sample_size)
        self.batch_size, self.seed, self.uncond_prob = batch, seed, uncond_prob

    def describe(self) -> dict:
        """What the batches depend on (a DKM run folder is keyed by it)."""
        return dict(kind="distill", prompts=self.prompts, batch=self.batch_size, seed=self.seed,
                    uncond_prob=self.uncond_prob)

    def batch(self, step: int) -> Batch:
        g = _generator(self.seed, step)
        b = self.batch_size
        idx = torch.randint(0, len(self.prompts), (b,), generator=g)
        context = self.cond[idx].clone()
        context[torch.rand(b, generator=g) < self.uncond_prob] = self.uncond
        x0 = torch.randn((b, *self.shape), generator=g)
        noise = torch.randn((b, *self.shape), generator=g)
        t = _timesteps(self.scheduler, b, g)
        return Batch(self.scheduler.add_noise(x0, noise, t), t, context)


class DatasetData:
    """The standard noise-prediction objective on (image, caption) pairs encoded by the pipeline's VAE."""

    def __init__(self, pipe, images: np.ndarray | None = None, captions: list[str] | None = None,
                 batch: int = 32, seed: int = 0, uncond_prob: float = 0.1, per_combo: int = 8):
        if images is None:
            images, captions = tiny_dataset(pipe, per_combo, seed)
        if captions is None or len(images) != len(captions):
            raise ConfigError("pass one caption per image (images (N, H, W, 3) uint8 and N captions)")
        self.mean, self.std = encode_images(pipe, images)
        self.scale = float(pipe.vae.config.scaling_factor)
        uniq = sorted(set(captions))
        self.cond = prompt_embeddings(pipe, uniq)
        self.caption_idx = torch.tensor([uniq.index(c) for c in captions])
        self.uncond = prompt_embeddings(pipe, [""])[0]
        self.scheduler = _train_scheduler(pipe)
        self.batch_size, self.seed, self.uncond_prob = batch, seed, uncond_prob
        self._dataset = digest(dict(images=hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest(),
                                    shape=list(np.shape(images)), captions=list(captions)))

    def describe(self) -> dict:
        """What the batches depend on (a DKM run folder is keyed by it): the images and captions by hash."""
        return dict(kind="dataset", dataset=self._dataset, images=len(self.caption_idx), batch=self.batch_size,
                    seed=self.seed, uncond_prob=self.uncond_prob)

    def batch(self, step: int) -> Batch:
        g = _generator(self.seed, step)
        b = self.batch_size
        idx = torch.randint(0, len(self.caption_idx), (b,), generator=g)
        z = (self.mean[idx] + self.std[idx] * torch.randn(self.mean[idx].shape, generator=g)) * self.scale
        noise = torch.randn(z.shape, generator=g)
        t = _timesteps(self.scheduler, b, g)
        context = self.cond[self.caption_idx[idx]].clone()
        context[torch.rand(b, generator=g) < self.uncond_prob] = self.uncond
        return Batch(self.scheduler.add_noise(z, noise, t), t, context, target=self._target(z, noise, t))

    def _target(self, z, noise, t):
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.scheduler.get_velocity(z, noise, t)
        raise ConfigError(f"prediction_type {kind!r} is not supported for the dataset objective; use distillation")


def tiny_dataset(pipe, per_combo: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """The embedded model's own data: rendered shapes of its training attribute combinations."""
    if getattr(pipe, "model_spec", None) not in TINY_SPECS:
        raise ConfigError(
            f"the dataset objective without images= is only defined for the embedded model, not "
            f"{getattr(pipe, 'model_spec', None)!r}: pass images= and captions=, or use objective='distill'"
        )
    from sdwork.tiny import dataset

    train, _ = dataset.split_combinations()
    return dataset.make_dataset(train, per_combo, seed=seed)


@torch.no_grad()
def encode_images(pipe, images: np.ndarray, chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior mean and std of uint8 (N, H, W, 3) images (unscaled latents)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ConfigError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    means, stds = [], []
    for i in range(0, len(images), chunk):
        x = torch.from_numpy(images[i : i + chunk]).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        post = pipe.vae.encode(x).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)
