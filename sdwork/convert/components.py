"""What each Core ML package holds: the torch wrapper, its static inputs and its outputs.

Two I/O layouts. "apple" (the default) is the contract of Apple's ml-stable-diffusion packages,
which the Swift StableDiffusion package loads (shared/APPLE_IO.md): float token ids, fp16 inputs,
the UNet context as (B, C, 1, 77), the VAE encoder's full moments. "diffusers" keeps diffusers'
own layout (int32 ids, (B, 77, C) context, the posterior mean) for running packages from Python.
The UNet's attention layout ("original", or the Neural Engine's "split_einsum" /
"split_einsum_v2") changes the graph, never the weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from sdwork import validate
from sdwork.errors import ConfigError

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
IO_LAYOUTS = ("apple", "diffusers")
ATTENTIONS = ("original", "split_einsum", "split_einsum_v2")


# ------------------------------------------------------------------ wrappers
# Each wrapper holds the pipeline's own submodules under their pipeline names, so
# torch.export names a parameter p_<attr>_<param>: the weight map reads the exact
# placeholder -> parameter mapping from the exported program's signature.

class TextEncoder(torch.nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        ids = input_ids.long()
        # positions computed from the input, not the position_ids buffer: with the buffer,
        # coremltools folds gather(position_embedding, arange) into a new constant with a
        # generated name, and the position embedding weight could no longer be mapped by name
        positions = torch.cumsum(torch.ones_like(ids), dim=1) - 1
        out = self.text_encoder(ids, position_ids=positions, return_dict=True)
        return out.last_hidden_state, out.pooler_output


class Unet(torch.nn.Module):
    """The diffusers UNet ("original" attention) or its Neural Engine restructuring, taking the
    context in the package's layout: (B, C, 1, 77) for Apple's, (B, 77, C) for diffusers'."""

    def __init__(self, unet, io: str = "apple", attention: str = "original"):
        super().__init__()
        self.io, self.attention = io, attention
        if attention == "original":
            self.unet = unet
        else:
            from sdwork.convert.neural_engine import neural_engine_unet

            self.unet = neural_engine_unet(unet, attention)

    def forward(self, sample, timestep, encoder_hidden_states):
        if self.attention == "original":
            if self.io == "apple":
                encoder_hidden_states = encoder_hidden_states.squeeze(2).transpose(1, 2)
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        if self.io == "diffusers":
            encoder_hidden_states = encoder_hidden_states.transpose(1, 2).unsqueeze(2)
        return self.unet(sample, timestep, encoder_hidden_states)


class VAEDecoder(torch.nn.Module):
    """z (unscaled: latents / scaling_factor, as Apple's) -> image in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder

    def forward(self, z):
        return self.decoder(self.post_quant_conv(z))


class VAEEncoder(torch.nn.Module):
    """image in [-1, 1] -> the posterior's moments (Apple's layout: mean and log-variance, the Swift
    side samples) or its mean (diffusers' layout); unscaled: multiply by scaling_factor for the UNet."""

    def __init__(self, vae, io: str = "apple"):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv
        self.io = io

    def forward(self, image):
        moments = self.quant_conv(self.encoder(image))
        if self.io == "apple":
            return moments
        mean, _logvar = moments.chunk(2, dim=1)
        return mean


# ------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class Shapes:
    """Static shapes of every package, from the pipeline's configs, and the layout they follow."""

    unet_batch: int
    latent_channels: int
    latent_size: int
    image_size: int
    seq_len: int
    text_hidden: int  # UNet cross_attention_dim == text encoder hidden size
    io: str = "apple"  # see the module docstring
    attention: str = "original"

    @classmethod
    def of(cls, pipe, unet_batch: int = 2, io: str = "apple", attention: str = "original") -> "Shapes":
        check_layout(io, attention)
        if unet_batch not in (1, 2):
            raise ConfigError(f"unet_batch must be 1 or 2 (2 runs classifier-free guidance in one call), got {unet_batch}")
        unet, vae, text, tok = (getattr(pipe, k, None) for k in ("unet", "vae", "text_encoder", "tokenizer"))
        if unet is None and vae is None and text is None:
            raise ConfigError("the pipeline has no unet, vae or text_encoder to convert")
        check_not_sdxl(pipe)
        if tok is not None:
            seq_len = tok.model_max_length
        elif text is not None:
            seq_len = text.config.max_position_embeddings
        else:
            raise ConfigError("the pipeline has neither a tokenizer nor a text encoder: the 77-token context is unknown")
        scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        latent_size = unet.config.sample_size if unet is not None else vae.config.sample_size // scale
        hidden = unet.config.cross_attention_dim if unet is not None else (text.config.hidden_size if text else 0)
        channels = unet.config.in_channels if unet is not None else vae.config.latent_channels
        return cls(unet_batch, channels, latent_size, latent_size * scale, seq_len, hidden, io, attention)

    @classmethod
    def from_json(cls, raw: str) -> "Shapes":
        d = json.loads(raw)
        d.setdefault("io", "diffusers")  # packages written before layouts existed used diffusers'
        return cls(**d)


def check_not_sdxl(pipe) -> None:
    unet = getattr(pipe, "unet", None)
    extra = getattr(getattr(unet, "config", None), "addition_embed_type", None)
    if getattr(pipe, "text_encoder_2", None) is not None or extra is not None:
        raise ConfigError(
            f"{type(pipe).__name__} is an SDXL-style pipeline (a second text encoder or {extra!r} added "
            "conditioning): conversion supports SD 1.x and 2.x pipelines (one CLIP text encoder) so far")


def check_layout(io: str, attention: str) -> None:
    validate.choice("io", io, IO_LAYOUTS)
    validate.choice("attention", attention, ATTENTIONS)


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: type  # numpy dtype of the Core ML feature
    description: str


@dataclass(frozen=True)
class Component:
    name: str
    package: str  # file name of the .mlpackage
    module: str  # pipeline attribute holding the torch module
    prefixes: tuple[str, ...]  # parameter name prefixes of that module the package holds ("" = all)
    description: str

    def wrap(self, module: torch.nn.Module, s: Shapes) -> torch.nn.Module:
        """The module the package is exported from, in the package's layout."""
        return _WRAPPERS[self.name](module, s)

    def inputs(self, s: Shapes) -> list[Tensor]:
        return _INPUTS[s.io][self.name](s)

    def outputs(self, s: Shapes) -> list[Tensor]:
        return _OUTPUTS[s.io][self.name](s)

    def owns(self, param_name: str) -> bool:
        return any(param_name.startswith(p) for p in self.prefixes)


SPECS = {
    "text_encoder": Component(
        "text_encoder", "TextEncoder.mlpackage", "text_encoder", ("",),
        "CLIP text encoder: token ids -> per-token hidden states (UNet context) and pooled output",
    ),
    "unet": Component(
        "unet", "Unet.mlpackage", "unet", ("",),
        "Denoising UNet: noisy latents, timestep and text context -> predicted noise (epsilon)",
    ),
    "vae_decoder": Component(
        "vae_decoder", "VAEDecoder.mlpackage", "vae", ("post_quant_conv.", "decoder."),
        "VAE decoder: unscaled latents z = latents / scaling_factor -> image in [-1, 1]",
    ),
    "vae_encoder": Component(
        "vae_encoder", "VAEEncoder.mlpackage", "vae", ("encoder.", "quant_conv."),
        "VAE encoder: image in [-1, 1] -> unscaled posterior (multiply by scaling_factor for the UNet)",
    ),
}

_WRAPPERS = {
    "text_encoder": lambda m, s: TextEncoder(m),
    "unet": lambda m, s: Unet(m, s.io, s.attention),
    "vae_decoder": lambda m, s: VAEDecoder(m),
    "vae_encoder": lambda m, s: VAEEncoder(m, s.io),
}


def _latents(s: Shapes, batch: int) -> tuple[int, ...]:
    return (batch, s.latent_channels, s.latent_size, s.latent_size)


def _image(s: Shapes) -> tuple[int, ...]:
    return (1, 3, s.image_size, s.image_size)


# Apple's contract (shared/APPLE_IO.md): fp16 inputs, float32 outputs, float token ids
_INPUTS = {"apple": {
    "text_encoder": lambda s: [
        Tensor("input_ids", (1, s.seq_len), np.float32,
               "token ids padded to the context length, as floats (the Swift package feeds Float32)"),
    ],
    "unet": lambda s: [
        Tensor("sample", _latents(s, s.unet_batch), np.float16,
               "noisy latents, already scaled by the scheduler (scale_model_input)"),
        Tensor("timestep", (s.unet_batch,), np.float16, "diffusion timestep per batch item"),
        Tensor("encoder_hidden_states", (s.unet_batch, s.text_hidden, 1, s.seq_len), np.float16,
               "text encoder last_hidden_state as (batch, hidden, 1, tokens), the Neural Engine layout"),
    ],
    "vae_decoder": lambda s: [
        Tensor("z", _latents(s, 1), np.float16, "latents divided by vae.config.scaling_factor"),
    ],
    "vae_encoder": lambda s: [
        Tensor("x", _image(s), np.float16, "RGB image scaled to [-1, 1]"),
    ],
}, "diffusers": {
    "text_encoder": lambda s: [
        Tensor("input_ids", (1, s.seq_len), np.int32, "token ids padded to the context length (int32)"),
    ],
    "unet": lambda s: [
        Tensor("sample", _latents(s, s.unet_batch), np.float32,
               "noisy latents, already scaled by the scheduler (scale_model_input)"),
        Tensor("timestep", (s.unet_batch,), np.float32, "diffusion timestep per batch item"),
        Tensor("encoder_hidden_states", (s.unet_batch, s.seq_len, s.text_hidden), np.float32,
               "text encoder last_hidden_state, (batch, tokens, hidden) as diffusers"),
    ],
    "vae_decoder": lambda s: [
        Tensor("z", _latents(s, 1), np.float32, "latents divided by vae.config.scaling_factor"),
    ],
    "vae_encoder": lambda s: [
        Tensor("image", _image(s), np.float32, "RGB image scaled to [-1, 1]"),
    ],
}}

_NOISE = "predicted noise (epsilon); with batch 2: [unconditional, conditional]"
_OUTPUTS = {"apple": {
    "text_encoder": lambda s: [
        Tensor("last_hidden_state", (1, s.seq_len, s.text_hidden), np.float32, "UNet encoder_hidden_states"),
        Tensor("pooled_outputs", (1, s.text_hidden), np.float32, "hidden state at the end-of-text token"),
    ],
    "unet": lambda s: [Tensor("noise_pred", _latents(s, s.unet_batch), np.float32, _NOISE)],
    "vae_decoder": lambda s: [Tensor("image", _image(s), np.float32, "RGB image in [-1, 1]")],
    "vae_encoder": lambda s: [
        Tensor("latent", _latents(s, 1)[:1] + (2 * s.latent_channels,) + _latents(s, 1)[2:], np.float32,
               "posterior mean and log-variance (quant_conv output), not scaled by scaling_factor"),
    ],
}, "diffusers": {
    "text_encoder": lambda s: [
        Tensor("last_hidden_state", (1, s.seq_len, s.text_hidden), np.float32, "UNet encoder_hidden_states"),
        Tensor("pooler_output", (1, s.text_hidden), np.float32, "hidden state at the end-of-text token"),
    ],
    "unet": lambda s: [Tensor("noise_pred", _latents(s, s.unet_batch), np.float32, _NOISE)],
    "vae_decoder": lambda s: [Tensor("image", _image(s), np.float32, "RGB image in [-1, 1]")],
    "vae_encoder": lambda s: [
        Tensor("latent", _latents(s, 1), np.float32, "posterior mean (not sampled), not scaled by scaling_factor"),
    ],
}}


def spec(component: str) -> Component:
    if component not in SPECS:
        raise ConfigError(f"unknown component {component!r}; choose from {', '.join(COMPONENTS)}")
    return SPECS[component]


def check_components(components) -> tuple[str, ...]:
    if isinstance(components, str):
        components = (components,)
    components = tuple(components)
    if not components:
        raise ConfigError(f"no component to convert; choose from {', '.join(COMPONENTS)}")
    for c in components:
        spec(c)
    return components


def torch_module(pipe, component: str) -> torch.nn.Module:
    sp = spec(component)
    module = getattr(pipe, sp.module, None)
    if module is None:
        raise ConfigError(f"the pipeline has no {sp.module} (needed for {component}); load a full pipeline")
    return module


def owned_parameters(pipe, component: str) -> dict[str, torch.nn.Parameter]:
    """The parameters of the pipeline module that this component's package holds, by module-relative name."""
    sp = spec(component)
    return {n: p for n, p in torch_module(pipe, component).named_parameters() if sp.owns(n)}
