"""Image quality against a baseline: PSNR, SSIM and CLIP cosine similarity.

PSNR and SSIM are scikit-image's, with the settings of the original SSIM paper
(Gaussian window, sigma 1.5, population covariance). CLIP similarity is the raw
cosine of L2-normalised embeddings from a named transformers CLIPModel:
image-image against the baseline image, text-image against the prompt.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from skimage.metrics import structural_similarity

from sdwork.generate import torch_threads
from sdwork.evaluate.psnr import image_psnr
from sdwork import paths
from sdwork.paths import TINY_CLIP
from sdwork.load import ModelNotFoundError, _looks_like_path, _offline, load_error
from sdwork.errors import ConfigError

SSIM_SIGMA = 1.5
SSIM_WINDOW = 2 * int(3.5 * SSIM_SIGMA + 0.5) + 1  # 11: scikit-image's Gaussian window for sigma 1.5


# ---------------------------------------------------------------- pixels
def _check_pair(ref: np.ndarray, img: np.ndarray):
    ref, img = np.asarray(ref), np.asarray(img)
    if ref.shape != img.shape:
        raise ConfigError(f"reference and image differ in shape: {ref.shape} vs {img.shape}")
    if ref.dtype != np.uint8 or img.dtype != np.uint8:
        raise ConfigError(
            f"expected uint8 images (0..255), got {ref.dtype} and {img.dtype}; "
            "convert with sdwork.generate.to_uint8"
        )
    return ref, img


def psnr(ref: np.ndarray, img: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for uint8 images; inf when they are identical."""
    return image_psnr(*_check_pair(ref, img))


def ssim(ref: np.ndarray, img: np.ndarray) -> float:
    """Mean SSIM of two uint8 (H, W, 3) images, Gaussian-weighted as in Wang et al. 2004."""
    ref, img = _check_pair(ref, img)
    if ref.ndim != 3 or ref.shape[-1] != 3:
        raise ConfigError(f"ssim takes one (H, W, 3) image at a time, got shape {ref.shape}")
    if min(ref.shape[:2]) < SSIM_WINDOW:
        raise ConfigError(f"images must be at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels for SSIM, got {ref.shape[:2]}")
    return float(
        structural_similarity(
            ref, img, channel_axis=-1, data_range=255,
            gaussian_weights=True, sigma=SSIM_SIGMA, use_sample_covariance=False,
        )
    )


# ---------------------------------------------------------------- CLIP
class ClipScorer:
    """CLIP embeddings of images and prompts, compared by cosine similarity.

    path: "tiny" (the project's own small CLIP in data/models/tiny-clip),
    "tiny-random" (same architecture, random init, seed 0: for tests), a local
    folder written by save_pretrained, or a hub id (already downloaded when offline); weights
    are read from safetensors only. Torch runs on `threads` threads while scoring (the count
    changes the last bits). `mismatch(h, w)` says when its scores mean nothing for such images
    (the tiny CLIP knows 64x64 shapes only); results rows carry it as clip_valid / scorer_note.
    """

    def __init__(self, path: str | os.PathLike = "tiny", batch_size: int = 64, threads: int = 1):
        self.model, self.tokenizer, self.processor, self.name = _load_clip(path)
        self.model.eval()
        self.batch_size = batch_size
        self.threads = threads
        text_cfg = self.model.config.text_config
        self.max_length = min(self.tokenizer.model_max_length, text_cfg.max_position_embeddings)
        self.image_size = int(self.model.config.vision_config.image_size)  # what it was trained at
        self.domain = TINY_DOMAIN if _is_tiny(path) else None  # None: general images (a real CLIP)

    def mismatch(self, height: int, width: int) -> str | None:
        """Why this scorer's CLIP columns mean nothing for images of height x width, or None."""
        side, fix = self.image_size, ("score with a downloaded CLIP instead (scorer='openai/clip-vit-base-patch32', "
                                      "or the folder it was saved to), or with scorer=None for PSNR/SSIM only")
        if self.name.startswith("tiny-random"):
            return f"{self.name} is a CLIP with random weights (for tests): its CLIP columns measure nothing"
        if self.domain and (height, width) != (side, side):
            return (f"{self.name} is a {side}x{side} CLIP trained on {self.domain}; for {height}x{width} images "
                    f"its CLIP columns mean nothing: {fix}")
        if max(height, width) * 2 < side:
            return (f"{height}x{width} images are upscaled more than twice to the {side}x{side} {self.name} "
                    f"was trained at: its CLIP columns say little; {fix}")
        return None

    @torch.no_grad()
    def image_embeddings(self, images: np.ndarray) -> torch.Tensor:
        """L2-normalised embeddings (N, D) of uint8 (N, H, W, 3) images."""
        images = _check_images(images)
        out = []
        with torch_threads(self.threads):
            for i in range(0, len(images), self.batch_size):
                pixels = self.processor(images=list(images[i : i + self.batch_size]), return_tensors="pt").pixel_values
                out.append(_features(self.model.get_image_features(pixel_values=pixels)))
        return torch.nn.functional.normalize(torch.cat(out).double(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised embeddings (N, D) of prompts, padded as SD pads them (to max_length)."""
        out = []
        with torch_threads(self.threads):
            for i in range(0, len(prompts), self.batch_size):
                ids = self.tokenizer(
                    list(prompts[i : i + self.batch_size]), padding="max_length", max_length=self.max_length,
                    truncation=True, return_tensors="pt",
                ).input_ids
                out.append(_features(self.model.get_text_features(input_ids=ids)))
        return torch.nn.functional.normalize(torch.cat(out).double(), dim=-1)

    def image_image(self, ref_images: np.ndarray, images: np.ndarray) -> np.ndarray:
        """Cosine similarity of each image with its reference image, shape (N,)."""
        if len(ref_images) != len(images):
            raise ConfigError(f"{len(ref_images)} reference images for {len(images)} images")
        a, b = self.image_embeddings(ref_images), self.image_embeddings(images)
        return (a * b).sum(-1).numpy()

    def text_image(self, prompts: list[str], images: np.ndarray) -> np.ndarray:
        """Cosine similarity of each image with its prompt, shape (N,)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ConfigError(f"{len(prompts)} prompts for {len(images)} images: pass one prompt per image")
        unique = list(dict.fromkeys(prompts))  # embed each distinct prompt once
        emb = self.text_embeddings(unique)
        t = emb[[unique.index(p) for p in prompts]]
        return (t * self.image_embeddings(images)).sum(-1).numpy()

    def __repr__(self):
        return f"ClipScorer({self.name!r})"


TINY_DOMAIN = "the embedded model's procedural shapes"


def _is_tiny(path) -> bool:
    spec = str(path)
    return spec in ("tiny", "tiny-random") or Path(spec).expanduser().resolve() == TINY_CLIP.resolve()


def scorer_columns(scorer, height: int, width: int) -> dict:
    """clip_valid (None without a scorer) and scorer_note (why not valid) of a results row."""
    note = scorer.mismatch(height, width) if scorer is not None else None
    return dict(clip_valid=None if scorer is None else note is None, scorer_note=note)


def _features(out) -> torch.Tensor:
    # transformers 5 returns an output object from get_*_features; 4.x a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ConfigError(f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


def _load_clip(path):
    spec = str(path)
    if spec == "tiny-random":
        return _random_tiny_clip()
    if spec == "tiny":
        if not (TINY_CLIP / "config.json").exists():
            raise ModelNotFoundError(
                f"the embedded CLIP scorer is missing from {TINY_CLIP}; restore data/models from git, "
                "retrain it with `python -m sdwork.tiny.train --stages clip,save`, or pass "
                "'tiny-random' (random init, for tests), a CLIP folder or a hub id"
            )
        return _pretrained_clip(TINY_CLIP, local=True, name="tiny (data/models/tiny-clip)")
    folder = Path(paths.spec(spec))  # a relative folder: under the checkout, as every path parameter
    if folder.exists():
        if not (folder / "config.json").exists():
            raise ModelNotFoundError(f"{folder} is not a CLIP model folder (no config.json); pass the folder save_pretrained wrote")
        return _pretrained_clip(folder, local=True, name=str(folder))
    if _looks_like_path(spec):
        raise ModelNotFoundError(f"no CLIP model folder at {folder}; check the path or pass a hub id such as org/name")
    return _pretrained_clip(spec, local=False, name=spec)


def _pretrained_clip(source, local: bool, name: str):
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    try:
        model = CLIPModel.from_pretrained(source, use_safetensors=True, local_files_only=local or _offline())
        tok = AutoTokenizer.from_pretrained(source, local_files_only=local or _offline())
        # the PIL backend always, so pixels do not change when torchvision happens to be installed
        proc = CLIPImageProcessorPil.from_pretrained(source, local_files_only=local or _offline())
    except (OSError, ValueError) as e:
        raise load_error(e, source, local, "the CLIP model", hub_label="CLIP ") from e
    return model.float(), tok, proc, name


def _random_tiny_clip():
    from sdwork.load import tiny_tokenizer
    from sdwork.tiny import models

    tok = tiny_tokenizer()
    with torch.random.fork_rng():  # seed 0 without disturbing the caller's RNG
        torch.manual_seed(0)
        model = models.build_clip(len(tok), tok.bos_token_id, tok.eos_token_id)
    return model, tok, tiny_image_processor(), "tiny-random (random init, seed 0)"


def tiny_image_processor():
    """uint8 64x64 images to [-1, 1]: what the tiny CLIP scorer is trained on (see sdwork.tiny.train)."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        do_resize=True, size={"shortest_edge": 64}, do_center_crop=True, crop_size={"height": 64, "width": 64},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )


# ---------------------------------------------------------------- tables
def expand_prompts(prompts, n_images: int) -> tuple[list[str], list[int]]:
    """Per-image prompts and seed indices.

    `prompts` is either one prompt per image, or the distinct prompts of a
    prompt-major grid (GenSettings.pairs order: every seed of prompt 0, then prompt 1, ...).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) != n_images:
        if not prompts or n_images % len(prompts):
            raise ConfigError(
                f"{len(prompts)} prompts do not fit {n_images} images: pass one prompt per image, "
                "or the prompts of a prompt-major grid (len(images) a multiple of len(prompts))"
            )
        prompts = [p for p in prompts for _ in range(n_images // len(prompts))]
    seen: dict[str, int] = {}
    seed_index = []
    for p in prompts:
        seed_index.append(seen.get(p, 0))
        seen[p] = seed_index[-1] + 1
    return prompts, seed_index


def score_images(baseline: np.ndarray, images: np.ndarray, prompts, scorer: ClipScorer | None = None,
                 seeds=None) -> pd.DataFrame:
    """One row per image: prompt, seed index (and seed), PSNR, SSIM and, with a scorer, CLIP cosines.

    scorer=None leaves the CLIP columns out (no model is loaded); pass
    ClipScorer("tiny") or another to add them, with the scorer's name.
    """
    baseline, images = _check_images(baseline), _check_images(images)
    if baseline.shape != images.shape:
        raise ConfigError(f"baseline {baseline.shape} and images {images.shape} differ in shape")
    per_prompt, seed_index = expand_prompts(prompts, len(images))
    table = pd.DataFrame({"image": range(len(images)), "prompt": per_prompt, "seed_index": seed_index})
    if seeds is not None:
        seeds = list(seeds)
        if max(seed_index) >= len(seeds):
            raise ConfigError(f"{len(seeds)} seeds given, but a prompt has {max(seed_index) + 1} images")
        table["seed"] = [seeds[i] for i in seed_index]
    table["psnr"] = [psnr(a, b) for a, b in zip(baseline, images)]
    table["ssim"] = [ssim(a, b) for a, b in zip(baseline, images)]
    if scorer is not None:
        table["clip_image_image"] = scorer.image_image(baseline, images)
        table["clip_text_image"] = scorer.text_image(per_prompt, images)
        table["clip_model"] = scorer.name
        for k, v in scorer_columns(scorer, *images.shape[1:3]).items():
            table[k] = v
    return table
