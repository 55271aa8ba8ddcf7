"""Generate by running the Core ML packages themselves, on a chosen compute unit (macOS only).

The torch evaluator runs a package's exact weights in PyTorch: what the weights promise. This one
asks Core ML, so a user sees what a device really computes (4-bit packages are reported to go
wrong on some Neural Engines). Same prompts, seeds, scheduler and initial noise as the torch
pipeline; the loop is Apple's Swift pipeline's: text encoder, [unconditional, conditional] UNet
batch, classifier-free guidance, scheduler step, VAE decoder.
"""
from __future__ import annotations

import platform

import numpy as np

from sdwork import validate
from sdwork.errors import EngineError

COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL")
EVALUATORS = ("torch", *(f"coreml:{u}" for u in COMPUTE_UNITS))


def check_evaluator(evaluator: str) -> str:
    """The evaluator name, refused where it cannot run (before any work)."""
    validate.choice("evaluator", evaluator, EVALUATORS)
    if evaluator != "torch":
        reason = no_runtime_reason()
        if reason:
            raise EngineError(f"evaluator {evaluator!r} runs the packages with Core ML, but {reason}; "
                              "use evaluator='torch' (the packages' exact weights in PyTorch) here")
    return evaluator


def no_runtime_reason() -> str | None:
    if platform.system() != "Darwin":
        return f"the Core ML runtime exists only on macOS (this is {platform.system()})"
    try:
        import coremltools.libcoremlpython  # noqa: F401
    except ImportError as e:
        return f"coremltools was installed without its Core ML bindings ({e})"
    return None


def generate_coreml(pipe, packages: dict, settings, compute_unit: str, progress: bool = True) -> np.ndarray:
    """uint8 images like sdwork.generate.generate, computed by Core ML from `packages`
    (text_encoder, unet with batch 2, vae_decoder in Apple's layout). macOS only."""
    import coremltools as ct
    import torch
    from tqdm.auto import tqdm

    from sdwork.generate import native_size, to_uint8

    check_evaluator(f"coreml:{compute_unit}")
    unit = getattr(ct.ComputeUnit, compute_unit)
    models = {c: ct.models.MLModel(str(packages[c]), compute_units=unit)
              for c in ("text_encoder", "unet", "vae_decoder")}
    size = settings.height or native_size(pipe)
    out = []
    for prompt, seed in tqdm(settings.pairs, desc="generate (Core ML)", disable=not progress):
        context = np.concatenate([_encode(models["text_encoder"], pipe, p)
                                  for p in (settings.negative_prompt, prompt)])
        latents = _initial_latents(pipe, size, seed)
        pipe.scheduler.set_timesteps(settings.steps)
        for t in pipe.scheduler.timesteps:
            x = pipe.scheduler.scale_model_input(torch.cat([latents] * 2), t).numpy()
            noise = models["unet"].predict({"sample": x.astype(np.float16),
                                            "timestep": np.full(2, float(t), np.float16),
                                            "encoder_hidden_states": context.astype(np.float16)})["noise_pred"]
            uncond, cond = torch.from_numpy(np.asarray(noise, np.float32)).chunk(2)
            guided = uncond + settings.guidance * (cond - uncond)
            latents = pipe.scheduler.step(guided, t, latents).prev_sample
        z = (latents / pipe.vae.config.scaling_factor).numpy().astype(np.float16)
        image = np.asarray(models["vae_decoder"].predict({"z": z})["image"], np.float32)[0]
        out.append(to_uint8(np.transpose(image / 2 + 0.5, (1, 2, 0))))
    return np.stack(out)


def _encode(model, pipe, text: str) -> np.ndarray:
    ids = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="np").input_ids.astype(np.float32)
    hidden = np.asarray(model.predict({"input_ids": ids})["last_hidden_state"], np.float32)
    return hidden.transpose(0, 2, 1)[:, :, None, :]  # (1, C, 1, 77), as the Swift side feeds the UNet


def _initial_latents(pipe, size: int, seed: int):
    import torch

    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    shape = (1, pipe.unet.config.in_channels, size // scale, size // scale)
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=g) * pipe.scheduler.init_noise_sigma  # as diffusers' prepare_latents
