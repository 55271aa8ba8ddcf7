"""Apple's Neural Engine UNet (SPLIT_EINSUM, SPLIT_EINSUM_V2) over the diffusers UNet's own weights.

`neural_engine_unet(unet, attention)` computes what the diffusers `UNet2DConditionModel` computes,
in the layout of Apple's ml-stable-diffusion `unet.py` (shared/APPLE_IO.md):

- inside a transformer every activation is (B, C, 1, S); every nn.Linear of the UNet is a 1x1
  Conv2d, the time embedding and the ResNet time projections included (Apple makes them convs on
  a (B, C, 1, 1) embedding); ResNet, down- and upsampling convs are diffusers' own modules;
- layer norm over the channel axis, x_hat * weight + bias with diffusers' weight and bias;
- attention per head: queries (B, d, 1, Sq) against keys (B, Sk, 1, d), scores (B, Sk, 1, Sq)
  with softmax over dim 1, heads concatenated on channels; split_einsum_v2 cuts the queries into
  chunks of 512 tokens, the last one shorter when Sq is not a multiple of 512 (Apple drops it).

Nothing is copied: the module holds diffusers' submodules and parameters, a Linear weight seen as
the view (out, in, 1, 1) of the same storage, each under the diffusers UNet's own parameter name.
So the weight map (names relative to `pipe.unet`) applies to it unchanged, and weights changed
in place in either module (`copy_`, palettization) are seen by both; a dtype or device change of
the diffusers UNet (`.half()`, `.to()`) replaces its tensors: build the module again after one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdwork import validate
from sdwork.errors import ConfigError

ATTENTIONS = ("original", "split_einsum", "split_einsum_v2")
NEURAL_ENGINE = ATTENTIONS[1:]
CHUNK = 512  # query tokens per chunk in split_einsum_v2, Apple's CHUNK_SIZE

SUPPORTED = ("SD 1.x / 2.x UNets: CrossAttnDownBlock2D / DownBlock2D, UNetMidBlock2DCrossAttn, "
             "CrossAttnUpBlock2D / UpBlock2D, layer-norm transformer blocks with GEGLU feed-forward, "
             "conv or linear projections, any head count")


# ------------------------------------------------------------------ checks
def check_unet(unet, attention: str) -> None:
    """Refuse an unknown layout, or a UNet the layout cannot compute, with the reason and the fix."""
    if isinstance(attention, str) and attention not in ATTENTIONS and attention.lower() in ATTENTIONS:
        # Apple's command line spells them SPLIT_EINSUM, SPLIT_EINSUM_V2, ORIGINAL
        raise ConfigError(f"attention={attention!r}: write {attention.lower()!r} (sdwork's names are lower case: "
                          f"{', '.join(map(repr, ATTENTIONS))})")
    validate.choice("attention", attention, ATTENTIONS)
    if not _is_unet(unet):
        raise ConfigError(f"attention={attention!r} needs a diffusers UNet2DConditionModel, got "
                          f"{type(unet).__name__}; pass pipe.unet")
    extra = _needs_other_inputs(unet.config)
    if extra:
        raise ConfigError(f"this UNet has {_listed(extra)}: sdwork's UNet takes sample, timestep and "
                          "encoder_hidden_states only (SD 1.x / 2.x); convert an SD 1.x / 2.x pipeline")
    if attention == "original":
        return
    problems = [*_config_problems(unet.config), *_module_problems(unet)]
    if problems:
        raise ConfigError(f"attention={attention!r}, the Neural Engine UNet, supports {SUPPORTED}; this UNet has "
                          f"{_listed(problems)}, which it does not implement. Convert this UNet with attention='original'")


def _listed(reasons: list[str], most: int = 3) -> str:
    more = f" and {len(reasons) - most} more" if len(reasons) > most else ""
    return "; ".join(reasons[:most]) + more


def _is_unet(unet) -> bool:
    from diffusers import UNet2DConditionModel

    return isinstance(unet, UNet2DConditionModel)


def _needs_other_inputs(cfg) -> list[str]:
    """Config entries whose UNet needs inputs beyond (sample, timestep, encoder_hidden_states)."""
    found = []
    if cfg.get("addition_embed_type") is not None:
        kind = cfg["addition_embed_type"]
        what = " (SDXL's time_ids and text_embeds conditioning)" if kind == "text_time" else ""
        found.append(f"addition_embed_type={kind!r}{what}")
    if cfg.get("class_embed_type") is not None or cfg.get("num_class_embeds") is not None:
        found.append(f"class embeddings (class_embed_type={cfg.get('class_embed_type')!r}, "
                     f"num_class_embeds={cfg.get('num_class_embeds')!r}), which need class_labels")
    if cfg.get("encoder_hid_dim_type") is not None:
        found.append(f"encoder_hid_dim_type={cfg['encoder_hid_dim_type']!r} (a projected or image context)")
    return found


# the values of these config entries the restructured module implements
_CONFIG = {
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "time_cond_proj_dim": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "dual_cross_attention": (False,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
}
_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")


def _config_problems(cfg) -> list[str]:
    found = [f"{k}={cfg[k]!r}" for k, ok in _CONFIG.items() if k in cfg and cfg[k] not in ok]
    only_cross = cfg.get("only_cross_attention", False)
    if any(only_cross) if isinstance(only_cross, (list, tuple)) else only_cross:
        found.append(f"only_cross_attention={only_cross!r}")
    found += [f"a {t} down block" for t in cfg.get("down_block_types", ()) if t not in _DOWN]
    found += [f"a {t} up block" for t in cfg.get("up_block_types", ()) if t not in _UP]
    return found


# the children the top level may have; any other (class_embedding, add_embedding, encoder_hid_proj,
# time_embed_act, position_net) computes something the restructured forward would skip
_TOP = {"conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block", "up_blocks",
        "conv_norm_out", "conv_act", "conv_out"}


def _module_problems(unet) -> list[str]:
    """What the modules hold beyond the config checks: unknown children and options set on them."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention
    from diffusers.models.embeddings import TimestepEmbedding
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    found = [f"a top-level {n} ({type(m).__name__})" for n, m in unet.named_children() if n not in _TOP]
    if unet.mid_block is None:
        found.append("no mid block")
    checks = ((TimestepEmbedding, _timestep_embedding), (ResnetBlock2D, _resnet), (Transformer2DModel, _transformer),
              (BasicTransformerBlock, _block), (Attention, _attention))
    for name, m in unet.named_modules():
        for kind, check in checks:
            if isinstance(m, kind):
                found += [f"{name}: {r}" for r in check(m)]
    for i, block in enumerate(unet.up_blocks):
        if getattr(block, "s1", None):
            found.append(f"up_blocks.{i}: FreeU enabled (call unet.disable_freeu() first)")
    return found


def _timestep_embedding(m) -> list[str]:
    return ["a timestep condition projection (cond_proj)"] if m.cond_proj is not None else []


def _resnet(m) -> list[str]:
    found = []
    if m.up or m.down:
        found.append("a ResNet that resamples")
    if m.time_embedding_norm != "default" or m.skip_time_act:
        found.append(f"time_embedding_norm={m.time_embedding_norm!r}, skip_time_act={m.skip_time_act}")
    if not isinstance(m.time_emb_proj, nn.Linear):
        found.append("a ResNet without a time projection")
    return found


def _transformer(m) -> list[str]:
    return [] if m.is_input_continuous else ["a transformer over patches or discrete inputs"]


def _block(m) -> list[str]:
    from diffusers.models.activations import GEGLU

    found = []
    if m.norm_type != "layer_norm" or not isinstance(m.norm1, nn.LayerNorm):
        found.append(f"norm_type={m.norm_type!r}")
    if m.pos_embed is not None or m.only_cross_attention or m.double_self_attention:
        found.append("positional embeddings, only_cross_attention or double_self_attention in a transformer block")
    if hasattr(m, "fuser"):
        found.append("a gated (GLIGEN) transformer block")
    if type(m.ff.net[0]) is not GEGLU:
        found.append(f"a {type(m.ff.net[0]).__name__} feed-forward (GEGLU only)")
    return found


def _attention(m) -> list[str]:
    extra = [n for n in ("group_norm", "spatial_norm", "norm_q", "norm_k", "norm_cross", "add_k_proj")
             if getattr(m, n, None) is not None]
    found = [f"attention with {', '.join(extra)}"] if extra else []
    if m.residual_connection or m.rescale_output_factor != 1.0 or m.to_k is None:
        found.append("attention with a residual connection, a rescaled output or no key projection")
    if m.inner_dim != m.inner_kv_dim:
        found.append("grouped key / value heads")
    return found


# ------------------------------------------------------------------ building
def neural_engine_unet(unet, attention: str = "split_einsum") -> "NeuralEngineUNet":
    """The diffusers UNet in Apple's Neural Engine layout, sharing its parameters (see the module docstring)."""
    check_unet(unet, attention)
    if attention not in NEURAL_ENGINE:
        raise ConfigError(f"neural_engine_unet builds {' or '.join(map(repr, NEURAL_ENGINE))}, got {attention!r}; "
                          "use original_unet(unet) for attention='original'")
    return NeuralEngineUNet(unet, attention)


def original_unet(unet) -> "OriginalUNet":
    """The diffusers UNet itself behind the Neural Engine module's forward signature."""
    check_unet(unet, "original")
    return OriginalUNet(unet)


def _adopt(module: nn.Module, source: nn.Module, **replaced: nn.Module) -> None:
    """Register source's children and direct parameters on `module` under their own names, in their
    order, some replaced: parameter names stay those of `source`."""
    unknown = set(replaced) - {n for n, _ in source.named_children()}
    assert not unknown, f"{type(source).__name__} has no child {sorted(unknown)}"
    for name, p in source.named_parameters(recurse=False):
        module.register_parameter(name, p)
    for name, child in source.named_children():
        module.add_module(name, replaced.get(name, child))
    module.training = source.training  # this module's flag only: the shared children keep theirs


def conv1x1(linear: nn.Linear) -> nn.Conv2d:
    """A 1x1 Conv2d computing `linear` on channels: its weight is the view (out, in, 1, 1) of the
    Linear weight's storage, its bias the Linear's own bias."""
    conv = nn.Conv2d(linear.in_features, linear.out_features, 1, bias=linear.bias is not None, device="meta")
    w = linear.weight
    conv.weight = nn.Parameter(w.detach().view(*w.shape, 1, 1), requires_grad=w.requires_grad)
    if linear.bias is not None:
        conv.bias = linear.bias
    conv.training = linear.training
    return conv


def _as_conv(m: nn.Module) -> nn.Module:
    # use_linear_projection=True gives Linear projections, False 1x1 convs already
    return conv1x1(m) if isinstance(m, nn.Linear) else m


# ------------------------------------------------------------------ attention
def split_attention(q, k, v, heads: int, scale: float, chunk: int | None = None) -> torch.Tensor:
    """Multi-head attention in the (B, C, 1, S) layout, one head at a time.

    q (B, heads*d, 1, Sq), k and v (B, heads*d, 1, Sk) -> (B, heads*d, 1, Sq). chunk: cut the
    queries into pieces of that many tokens (split_einsum_v2), the last one shorter when Sq is
    not a multiple; None, or Sq <= chunk, computes each head in one piece (split_einsum)."""
    d = q.shape[1] // heads
    kt = k.transpose(1, 3)  # (B, Sk, 1, heads*d): keys on dim 1, the axis the softmax runs over
    outs = []
    for h in range(heads):
        c = slice(h * d, (h + 1) * d)
        outs.append(_head(q[:, c], kt[:, :, :, c], v[:, c], scale, chunk))
    return torch.cat(outs, dim=1)


def _head(q, kt, v, scale, chunk):
    sq = q.shape[3]
    if chunk is None or sq <= chunk:
        return _attend(q, kt, v, scale)
    return torch.cat([_attend(q[:, :, :, i:i + chunk], kt, v, scale) for i in range(0, sq, chunk)], dim=3)


def _attend(q, kt, v, scale):
    """One head: q (B, d, 1, Sq), kt (B, Sk, 1, d), v (B, d, 1, Sk) -> (B, d, 1, Sq)."""
    # Apple's two equations: torch.export keeps aten.einsum, and coremltools turns each into one
    # rank-4 MIL einsum ("nchw,nwhu->nchu"), no reshapes. The scale goes on the scores, not on q,
    # where coremltools would fold it into the query conv's weight under a generated name.
    scores = torch.einsum("bchq,bkhc->bkhq", q, kt) * scale  # (B, Sk, 1, Sq)
    return torch.einsum("bkhq,bchk->bchq", scores.softmax(dim=1), v)


class SplitAttention(nn.Module):
    """diffusers' Attention with 1x1 conv projections and split_attention."""

    def __init__(self, attn, chunk: int | None):
        super().__init__()
        out = nn.ModuleList([conv1x1(attn.to_out[0]), *attn.to_out[1:]])
        _adopt(self, attn, to_q=conv1x1(attn.to_q), to_k=conv1x1(attn.to_k), to_v=conv1x1(attn.to_v), to_out=out)
        self.heads, self.scale, self.chunk = attn.heads, attn.scale, chunk

    def forward(self, x, context=None):
        context = x if context is None else context
        out = split_attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, self.scale, self.chunk)
        for m in self.to_out:  # the projection, then dropout
            out = m(out)
        return out


# ------------------------------------------------------------------ transformer
class ChannelLayerNorm(nn.Module):
    """nn.LayerNorm over the channel axis of (B, C, 1, S): x_hat * weight + bias, diffusers' own tensors."""

    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        self.eps = ln.eps
        self.weight, self.bias = ln.weight, ln.bias  # Parameters (registered as such) or None

    def forward(self, x):
        centred = x - x.mean(dim=1, keepdim=True)
        out = centred * torch.rsqrt((centred * centred).mean(dim=1, keepdim=True) + self.eps)
        if self.weight is not None:
            out = out * self.weight.view(1, -1, 1, 1)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out


class GEGLU(nn.Module):
    def __init__(self, geglu):
        super().__init__()
        _adopt(self, geglu, proj=conv1x1(geglu.proj))

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, ff):
        super().__init__()
        net = [GEGLU(m) if i == 0 else _as_conv(m) for i, m in enumerate(ff.net)]
        _adopt(self, ff, net=nn.ModuleList(net))

    def forward(self, x):
        for m in self.net:
            x = m(x)
        return x


class TransformerBlock(nn.Module):
    """BasicTransformerBlock on (B, C, 1, S): self-attention, cross-attention, feed-forward."""

    def __init__(self, block, chunk):
        super().__init__()
        norms = {n: ChannelLayerNorm(getattr(block, n)) for n in ("norm1", "norm2", "norm3")
                 if getattr(block, n, None) is not None}
        attns = {n: SplitAttention(getattr(block, n), chunk) for n in ("attn1", "attn2")
                 if getattr(block, n, None) is not None}
        _adopt(self, block, **norms, **attns, ff=FeedForward(block.ff))
        if "attn2" not in attns:
            self.attn2 = None

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        if self.attn2 is not None:
            x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer2DModel: group norm and projection on (B, C, H, W), the blocks on (B, C, 1, H*W)."""

    def __init__(self, t, chunk):
        super().__init__()
        blocks = nn.ModuleList(TransformerBlock(b, chunk) for b in t.transformer_blocks)
        _adopt(self, t, proj_in=_as_conv(t.proj_in), proj_out=_as_conv(t.proj_out), transformer_blocks=blocks)

    def forward(self, x, context):
        b, _, h, w = x.shape
        residual = x
        x = self.proj_in(self.norm(x))
        x = x.view(b, x.shape[1], 1, h * w)
        for block in self.transformer_blocks:
            x = block(x, context)
        x = self.proj_out(x.view(b, x.shape[1], h, w))
        return x + residual


# ------------------------------------------------------------------ resnets and blocks
class ResnetBlock(nn.Module):
    """ResnetBlock2D with its time projection as a 1x1 conv on the (B, T, 1, 1) embedding."""

    def __init__(self, r):
        super().__init__()
        _adopt(self, r, time_emb_proj=conv1x1(r.time_emb_proj))
        self.conv_shortcut = r.conv_shortcut
        self.output_scale_factor = r.output_scale_factor

    def forward(self, x, temb):
        h = self.conv1(self.nonlinearity(self.norm1(x)))
        h = h + self.time_emb_proj(self.nonlinearity(temb))
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h))))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        # a division by 1 (every SD UNet) is left out of the graph, not computed
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor


def _resnets(block) -> nn.ModuleList:
    return nn.ModuleList(ResnetBlock(r) for r in block.resnets)


def _transformers(block, chunk) -> dict[str, nn.ModuleList]:
    if getattr(block, "attentions", None) is None:
        return {}
    return {"attentions": nn.ModuleList(SpatialTransformer(t, chunk) for t in block.attentions)}


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D or DownBlock2D: returns the output and the states the up path reuses."""

    def __init__(self, block, chunk):
        super().__init__()
        _adopt(self, block, resnets=_resnets(block), **_transformers(block, chunk))
        self.attentions = getattr(self, "attentions", None)
        self.downsamplers = block.downsamplers

    def forward(self, x, temb, context):
        states = ()
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            states += (x,)
        if self.downsamplers is not None:
            for down in self.downsamplers:
                x = down(x)
            states += (x,)
        return x, states


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D or UpBlock2D: consumes skip states from the end of `skips`."""

    def __init__(self, block, chunk):
        super().__init__()
        _adopt(self, block, resnets=_resnets(block), **_transformers(block, chunk))
        self.attentions = getattr(self, "attentions", None)
        self.upsamplers = block.upsamplers

    def forward(self, x, skips, temb, context, upsample_size=None):
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1 - i]], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                x = up(x, upsample_size)
        return x


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: a resnet, then (transformer, resnet) pairs."""

    def __init__(self, block, chunk):
        super().__init__()
        _adopt(self, block, resnets=_resnets(block), **_transformers(block, chunk))

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x, context), temb)
        return x


class TimeEmbedding(nn.Module):
    """TimestepEmbedding on (B, C, 1, 1): linear_1 and linear_2 as 1x1 convs, as Apple's."""

    def __init__(self, te):
        super().__init__()
        _adopt(self, te, linear_1=conv1x1(te.linear_1), linear_2=conv1x1(te.linear_2))
        self.act, self.post_act = te.act, te.post_act

    def forward(self, x):
        x = self.linear_1(x)
        if self.act is not None:
            x = self.act(x)
        x = self.linear_2(x)
        return x if self.post_act is None else self.post_act(x)


# ------------------------------------------------------------------ the UNets
class NeuralEngineUNet(nn.Module):
    """forward(sample (B, 4, h, w), timestep (B,), encoder_hidden_states (B, C, 1, 77)) -> noise (B, 4, h, w)."""

    def __init__(self, unet, attention: str):
        super().__init__()
        chunk = CHUNK if attention == "split_einsum_v2" else None
        _adopt(self, unet,
               time_embedding=TimeEmbedding(unet.time_embedding),
               down_blocks=nn.ModuleList(DownBlock(b, chunk) for b in unet.down_blocks),
               mid_block=MidBlock(unet.mid_block, chunk),
               up_blocks=nn.ModuleList(UpBlock(b, chunk) for b in unet.up_blocks))
        self.conv_norm_out, self.conv_act = unet.conv_norm_out, unet.conv_act
        self.attention = attention
        self.center_input_sample = unet.config.center_input_sample
        self.up_factor = 2 ** unet.num_upsamplers

    def forward(self, sample, timestep, encoder_hidden_states):
        timestep = timestep[None] if timestep.ndim == 0 else timestep
        # Timesteps returns float32 whatever the weights: cast as diffusers does
        emb = self.time_embedding(self.time_proj(timestep).to(sample.dtype)[:, :, None, None])
        if self.center_input_sample:
            sample = 2 * sample - 1.0
        x = self.conv_in(sample)
        skips = (x,)
        for block in self.down_blocks:
            x, states = block(x, emb, encoder_hidden_states)
            skips += states
        x = self.mid_block(x, emb, encoder_hidden_states)
        # as diffusers: an explicit upsampling size only where a latent side is not a multiple of 2^ups
        explicit = any(s % self.up_factor for s in sample.shape[-2:])
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[2:] if explicit and i < len(self.up_blocks) - 1 else None
            x = block(x, res, emb, encoder_hidden_states, size)
        if self.conv_norm_out is not None:
            x = self.conv_act(self.conv_norm_out(x))
        return self.conv_out(x)


class OriginalUNet(nn.Module):
    """The diffusers UNet with the context in Apple's (B, C, 1, 77) layout.

    Its children are the UNet's own, registered directly, so parameter names are the UNet's; the
    UNet itself is held outside the module tree (in a tuple) only to call its forward."""

    def __init__(self, unet):
        super().__init__()
        _adopt(self, unet)
        self._unet = (unet,)
        self.attention = "original"

    def forward(self, sample, timestep, encoder_hidden_states):
        context = encoder_hidden_states.squeeze(2).transpose(1, 2)
        return self._unet[0](sample, timestep, encoder_hidden_states=context, return_dict=False)[0]
