"""What each Core ML package holds: the torch wrapper, its static inputs and its outputs.

Names follow Apple's ml-stable-diffusion so a Swift app finds what it expects
(input_ids; sample, timestep, encoder_hidden_states -> noise_pred; z -> image).
Where we differ from Apple's packages, the description says so.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sdwork.errors import ConfigError

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


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
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class VAEDecoder(torch.nn.Module):
    """z (unscaled: latents / scaling_factor, as Apple's) -> image in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder

    def forward(self, z):
        return self.decoder(self.post_quant_conv(z))


class VAEEncoder(torch.nn.Module):
    """image in [-1, 1] -> posterior mean (unscaled: multiply by scaling_factor for the UNet)."""

    def __init__(self, vae):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv

    def forward(self, image):
        moments = self.quant_conv(self.encoder(image))
        mean, _logvar = moments.chunk(2, dim=1)
        return mean


# ------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class Shapes:
    """Static shapes of every package, from the pipeline's configs."""

    unet_batch: int
    latent_channels: int
    latent_size: int
    image_size: int
    seq_len: int
    text_hidden: int  # UNet cross_attention_dim == text encoder hidden size

    @classmethod
    def of(cls, pipe, unet_batch: int = 2) -> "Shapes":
        if unet_batch not in (1, 2):
            raise ConfigError(f"unet_batch must be 1 or 2 (2 runs classifier-free guidance in one call), got {unet_batch}")
        unet, vae, text, tok = (getattr(pipe, k, None) for k in ("unet", "vae", "text_encoder", "tokenizer"))
        if unet is None and vae is None and text is None:
            raise ConfigError("the pipeline has no unet, vae or text_encoder to convert")
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
        return cls(unet_batch, channels, latent_size, latent_size * scale, seq_len, hidden)


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
    wrapper: type
    description: str

    def inputs(self, s: Shapes) -> list[Tensor]:
        return _INPUTS[self.name](s)

    def outputs(self, s: Shapes) -> list[Tensor]:
        return _OUTPUTS[self.name](s)

    def owns(self, param_name: str) -> bool:
        return any(param_name.startswith(p) for p in self.prefixes)


SPECS = {
    "text_encoder": Component(
        "text_encoder", "TextEncoder.mlpackage", "text_encoder", ("",), TextEncoder,
        "CLIP text encoder: token ids -> per-token hidden states (UNet context) and pooled output",
    ),
    "unet": Component(
        "unet", "Unet.mlpackage", "unet", ("",), Unet,
        "Denoising UNet: noisy latents, timestep and text context -> predicted noise (epsilon)",
    ),
    "vae_decoder": Component(
        "vae_decoder", "VAEDecoder.mlpackage", "vae", ("post_quant_conv.", "decoder."), VAEDecoder,
        "VAE decoder: unscaled latents z = latents / scaling_factor -> image in [-1, 1]",
    ),
    "vae_encoder": Component(
        "vae_encoder", "VAEEncoder.mlpackage", "vae", ("encoder.", "quant_conv."), VAEEncoder,
        "VAE encoder: image in [-1, 1] -> posterior mean, unscaled (multiply by scaling_factor for the UNet)",
    ),
}

_INPUTS = {
    "text_encoder": lambda s: [
        Tensor("input_ids", (1, s.seq_len), np.int32,
               "token ids padded to the context length (int32; Apple's packages take float32)"),
    ],
    "unet": lambda s: [
        Tensor("sample", (s.unet_batch, s.latent_channels, s.latent_size, s.latent_size), np.float32,
               "noisy latents, already scaled by the scheduler (scale_model_input)"),
        Tensor("timestep", (s.unet_batch,), np.float32, "diffusion timestep per batch item"),
        Tensor("encoder_hidden_states", (s.unet_batch, s.seq_len, s.text_hidden), np.float32,
               "text encoder last_hidden_state, (batch, tokens, hidden) as diffusers "
               "(Apple's ANE layout is (batch, hidden, 1, tokens))"),
    ],
    "vae_decoder": lambda s: [
        Tensor("z", (1, s.latent_channels, s.latent_size, s.latent_size), np.float32,
               "latents divided by vae.config.scaling_factor"),
    ],
    "vae_encoder": lambda s: [
        Tensor("image", (1, 3, s.image_size, s.image_size), np.float32, "RGB image scaled to [-1, 1]"),
    ],
}

_OUTPUTS = {
    "text_encoder": lambda s: [
        Tensor("last_hidden_state", (1, s.seq_len, s.text_hidden), np.float32, "UNet encoder_hidden_states"),
        Tensor("pooler_output", (1, s.text_hidden), np.float32,
               "hidden state at the end-of-text token (Apple names it pooled_outputs)"),
    ],
    "unet": lambda s: [
        Tensor("noise_pred", (s.unet_batch, s.latent_channels, s.latent_size, s.latent_size), np.float32,
               "predicted noise (epsilon); with batch 2: [unconditional, conditional]"),
    ],
    "vae_decoder": lambda s: [
        Tensor("image", (1, 3, s.image_size, s.image_size), np.float32, "RGB image in [-1, 1]"),
    ],
    "vae_encoder": lambda s: [
        Tensor("latent", (1, s.latent_channels, s.latent_size, s.latent_size), np.float32,
               "posterior mean (not sampled), not scaled by scaling_factor"),
    ],
}


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
