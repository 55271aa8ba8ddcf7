"""Architectures of the embedded default model: Stable Diffusion's, only smaller.

64x64 RGB images, an 8x-downsampling AutoencoderKL (8x8x4 latents), a
cross-attention UNet2DConditionModel, a CLIPTextModel and a small CLIPModel
used as the offline quality scorer. All channel counts are multiples of 64 so
palettization group sizes 4, 16 and 64 divide them (except conv_out's 4
channels, as in full-size SD).
"""
from __future__ import annotations

from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig

MAX_LENGTH = 77  # CLIP's context, as in every SD checkpoint
TEXT_HIDDEN = 64

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[16, 32, 64, 64],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
)

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[64, 128, 128],
    layers_per_block=1,
    cross_attention_dim=TEXT_HIDDEN,
    attention_head_dim=8,
    norm_num_groups=32,
)

# The scheduler SD 1.x/2.x-base ship with (beta schedule), used with DPM-Solver++
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
)


def text_config(vocab_size: int, bos_id: int, eos_id: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=TEXT_HIDDEN,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(**VAE_CONFIG)


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(**UNET_CONFIG)


def build_text_encoder(vocab_size: int, bos_id: int, eos_id: int) -> CLIPTextModel:
    return CLIPTextModel(text_config(vocab_size, bos_id, eos_id))


def build_scheduler() -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(**SCHEDULER_CONFIG)


def build_clip(vocab_size: int, bos_id: int, eos_id: int) -> CLIPModel:
    vision = CLIPVisionConfig(
        image_size=64, patch_size=8, hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4
    )
    cfg = CLIPConfig(
        text_config=text_config(vocab_size, bos_id, eos_id).to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=64,
    )
    return CLIPModel(cfg)
