"""Full-size SD 1.5 / 2.1-base architectures with random weights, from the configs in data/configs.

Nothing is downloaded: these check that conversion works unchanged at full size
(and measure it). The tokenizer is the embedded model's (CLIP's vocabulary is not
shipped); it only has to produce ids below the text encoder's vocabulary size.
"""
from __future__ import annotations

import json

import torch

from sdwork.load import tiny_tokenizer
from sdwork.paths import CONFIGS
from sdwork.errors import ConfigError

PARTS = ("text_encoder", "unet", "vae")


def architectures() -> list[str]:
    return sorted(p.name for p in CONFIGS.iterdir() if (p / "unet" / "config.json").exists())


def config(arch: str, part: str, **overrides) -> dict:
    path = CONFIGS / arch / part / "config.json"
    if not path.exists():
        raise ConfigError(f"no config {path}; architectures: {', '.join(architectures())}, "
                                f"parts: {', '.join(PARTS)}")
    return {**json.loads(path.read_text()), **overrides}


def random_module(arch: str, part: str, seed: int = 0, **overrides) -> torch.nn.Module:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = config(arch, part, **overrides)
    torch.manual_seed(seed)
    if part == "unet":
        return UNet2DConditionModel.from_config(cfg).eval()
    if part == "vae":
        return AutoencoderKL.from_config(cfg).eval()
    return CLIPTextModel(CLIPTextConfig(**cfg)).eval()


def random_pipeline(arch: str, parts=PARTS, seed: int = 0, overrides: dict[str, dict] | None = None):
    """A StableDiffusionPipeline of `arch` with random weights; parts left out are None."""
    from diffusers import StableDiffusionPipeline

    overrides = overrides or {}
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ConfigError(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    modules = {p: random_module(arch, p, seed, **overrides.get(p, {})) if p in parts else None for p in PARTS}
    pipe = StableDiffusionPipeline(**modules, tokenizer=tiny_tokenizer(), scheduler=_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.model_spec = f"{arch}-random"
    return pipe


def save_random_folder(arch: str, out, seed: int = 0):
    """The random-init `arch` pipeline saved as a diffusers folder (what `load_pipeline(out)` reads,
    as a user's downloaded checkpoint would be), in safetensors. Returns the folder.

    The configs carry the hub's `_diffusers_version` (0.6.0 for SD 1.5), and diffusers forces 64x64
    latents on a UNet of a version before 0.9 whose sample_size is below 64 (a reduced test
    architecture); save_pretrained stamps the installed version instead, checked here."""
    import json
    from pathlib import Path

    import diffusers

    out = Path(out)
    random_pipeline(arch, seed=seed).save_pretrained(out, safe_serialization=True)
    for part in PARTS:
        stamped = json.loads((out / part / "config.json").read_text()).get("_diffusers_version")
        if part != "text_encoder" and stamped != diffusers.__version__:
            raise ConfigError(f"{out / part / 'config.json'} says _diffusers_version {stamped!r}, not the installed "
                              f"{diffusers.__version__}: delete the folder and build it again")
    return out


def _scheduler():
    from sdwork.tiny import models

    return models.build_scheduler()  # SD's own beta schedule
