"""Does a package hold the same model as its source? Checked on Linux, and on macOS also by Core ML.

Linux: the package's weights (decompressed if compressed) go into a copy of the torch
module whose parameters were first set to NaN, so a weight the package does not
supply poisons the output. Weights and outputs are compared with the fp16-rounded
source, on random inputs and on real ones (a dataset caption, a rendered image).
macOS: `MLModel.predict` against the same source; elsewhere that row says skipped and why.
PSNR is Apple's definition (ml-stable-diffusion): peak = max |reference|.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from sdwork.convert import components as C
from sdwork.evaluate.coreml_pipeline import no_runtime_reason
from sdwork.evaluate.psnr import signal_psnr
from sdwork.convert.into_torch import check_belongs, load_package_into_module
from sdwork.coreml.package import metadata, package_size
from sdwork.errors import ConfigError

LINUX_MIN_DB = 60.0  # weights equal up to fp16 rounding give far more
MACOS_MIN_DB = 35.0  # Apple's --check-output-correctness threshold
PROMPTS = ("a small red circle on a gray background", "a large blue square on a white background")


def parity_report(pipe, packages: dict[str, Path], prompts=PROMPTS, seed: int = 0, progress: bool = True
                  ) -> pd.DataFrame:
    """One row per component: weight deviation and output PSNR against the fp16-rounded source."""
    rows = []
    for component, package in tqdm(packages.items(), desc="parity", disable=not progress):
        rows.append(component_parity(pipe, component, package, prompts, seed))
    return pd.DataFrame(rows)


@torch.no_grad()
def component_parity(pipe, component: str, package, prompts=PROMPTS, seed: int = 0) -> dict:
    sp = C.spec(component)
    module = C.torch_module(pipe, component)
    wm = check_belongs(module, component, package)
    shapes = _shapes(pipe, package)
    inputs = {"random": random_inputs(sp, shapes, pipe, seed), "real": real_inputs(pipe, component, shapes, prompts)}
    # the reference is always the diffusers graph: a Neural Engine package is checked against it
    reference = dataclasses.replace(shapes, attention="original")
    # one copy of the module at a time (a full-size UNet is 3.4 GB): the fp16 source's outputs first
    source = _fp16_copy(module)
    src_out = {k: _run(sp.wrap(source, reference), v) for k, v in inputs.items()}
    del source
    test = _nan_copy(module, sp)
    load_package_into_module(test, component, package, same_weights=False)  # a blank copy
    row = dict(component=component, package=Path(package).name, size_mb=package_size(package) / 2**20,
               **{f"params_{k}": v for k, v in wm.counts().items()},
               io=shapes.io, attention=shapes.attention,
               max_weight_dev=_max_dev(module, test, sp), **_psnrs(sp, shapes, test, inputs, src_out))
    row["linux_pass"] = bool(min(row["psnr_random"], row["psnr_real"]) >= LINUX_MIN_DB)
    row.update(macos_parity(package, sp, inputs["random"], src_out["random"]))
    return row


def _psnrs(sp, shapes, test, inputs, src_out) -> dict:
    out = {}
    for kind, args in inputs.items():
        got = _run(sp.wrap(test, shapes), args)
        out[f"psnr_{kind}"] = min(signal_psnr(r, g) for r, g in zip(src_out[kind], got))
    return out


def macos_parity(package, sp: C.Component, args: list[torch.Tensor], ref: list[np.ndarray]) -> dict:
    """Core ML's own prediction against the fp16-rounded source: only where Core ML runs."""
    reason = no_runtime_reason()
    if reason:
        return dict(macos_psnr=float("nan"), macos_pass=None, macos_status=f"skipped: {reason}")
    import coremltools as ct

    model = ct.models.MLModel(str(package), compute_units=ct.ComputeUnit.ALL)
    shapes = _shapes_from_meta(package)
    pred = model.predict({t.name: a.numpy().astype(t.dtype) for t, a in zip(sp.inputs(shapes), args)})
    outs = [np.asarray(pred[t.name]) for t in sp.outputs(shapes)]
    db = min(signal_psnr(r, o) for r, o in zip(ref, outs))
    return dict(macos_psnr=db, macos_pass=bool(db >= MACOS_MIN_DB), macos_status="ran MLModel.predict")


# ------------------------------------------------------------------ inputs
def random_inputs(sp: C.Component, shapes: C.Shapes, pipe, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in sp.inputs(shapes):
        if t.name == "input_ids":
            vocab = pipe.text_encoder.config.vocab_size
            out.append(torch.randint(0, vocab, t.shape, generator=g, dtype=torch.int32))
        elif t.name == "timestep":
            out.append(torch.randint(0, 1000, t.shape, generator=g).float())
        elif t.name in ("image", "x"):
            out.append(torch.rand(t.shape, generator=g) * 2 - 1)
        else:
            out.append(torch.randn(t.shape, generator=g))
    return out


def real_inputs(pipe, component: str, shapes: C.Shapes, prompts=PROMPTS) -> list[torch.Tensor]:
    """What the component sees in a real generation: a caption, a rendered image, its latents."""
    if component == "text_encoder":
        return [_ids(pipe, prompts[0])]
    needs = ("vae", "text_encoder") if component == "unet" else ("vae",)
    missing = [m for m in needs if getattr(pipe, m, None) is None]
    if missing:
        raise ConfigError(f"real inputs for {component} are made with the pipeline's {' and '.join(needs)}, "
                         f"but it has no {', '.join(missing)}; load the full pipeline")
    image = real_image(shapes.image_size)
    if component == "vae_encoder":
        return [image]
    mean = pipe.vae.encode(image).latent_dist.mean
    if component == "vae_decoder":
        return [mean]
    # unet: the real latents noised half-way, with [unconditional, conditional] context
    t = torch.full((shapes.unet_batch,), 500.0)
    latents = mean * pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    a = pipe.scheduler.alphas_cumprod[500].float()  # DDPM forward process, any SD scheduler has the table
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    texts = ["", prompts[0]][-shapes.unet_batch:]
    context = torch.cat([pipe.text_encoder(_ids(pipe, p).long()).last_hidden_state for p in texts])
    if shapes.io == "apple":
        context = context.transpose(1, 2).unsqueeze(2)  # (B, C, 1, 77)
    return [noisy.repeat(shapes.unet_batch, 1, 1, 1), t, context]


def real_image(size: int) -> torch.Tensor:
    """A dataset image (red circle on gray), resized to the VAE's input size, in [-1, 1]."""
    from PIL import Image

    from sdwork.tiny import dataset

    img = dataset.render(dataset.Attrs("large", "red", "circle", "gray"), np.random.default_rng(0))
    if img.shape[0] != size:
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 127.5 - 1


def _ids(pipe, prompt: str) -> torch.Tensor:
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return ids.to(torch.int32)


# ------------------------------------------------------------------ helpers
def _run(wrapper: torch.nn.Module, args) -> list[np.ndarray]:
    out = wrapper.eval()(*args)
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _fp16_copy(module):
    # plain round-to-nearest, as the project's fp16 baseline (round_weights_to_fp16); an fp16 package
    # can differ from it by 6e-8 where coremltools keeps underflowing values (weightmap.coreml_fp16)
    from sdwork.weights import round_module_to_fp16

    return round_module_to_fp16(copy.deepcopy(module).eval())


def _nan_copy(module, sp: C.Component):
    """A copy of module whose owned parameters are NaN, filled while copying: never a second full copy."""
    memo = {id(p): torch.nn.Parameter(torch.full_like(p, float("nan")), requires_grad=p.requires_grad)
            for n, p in module.named_parameters() if sp.owns(n)}
    return copy.deepcopy(module, memo).eval()


def _max_dev(module, test, sp: C.Component) -> float:
    """Largest deviation of the test copy from the fp16-rounded source (round_weights_to_fp16's
    plain rounding), computed one parameter at a time instead of on a rounded copy."""
    src = dict(module.named_parameters())
    devs = [(p - src[n].to(torch.float16).to(src[n].dtype)).abs().max()
            for n, p in test.named_parameters() if sp.owns(n)]
    return float(torch.stack(devs).max())  # NaN (a weight the package lacks) propagates


def _shapes(pipe, package) -> C.Shapes:
    meta = _shapes_from_meta(package)
    return meta if meta is not None else C.Shapes.of(pipe)


def _shapes_from_meta(package) -> C.Shapes | None:
    raw = metadata(package).get("shapes")
    return C.Shapes.from_json(raw) if raw else None
