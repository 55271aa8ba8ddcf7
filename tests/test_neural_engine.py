"""The Neural Engine UNet: parity with diffusers, shared parameters, V2 chunking, refusals, conversion."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdwork.convert.neural_engine import (
    ATTENTIONS, CHUNK, check_unet, neural_engine_unet, original_unet, split_attention,
)
from sdwork.errors import ConfigError
from sdwork.evaluate.psnr import signal_psnr
from sdwork.load import load_pipeline

NE = ("split_einsum", "split_einsum_v2")
MIN_PSNR = 60.0
CAPTION = "a large red circle on a white background"

# reduced widths, the full configs' structure (SD 1.5: conv projections, 8 heads everywhere, 768-wide
# context; SD 2.1-base: linear projections, 5 / 10 / 20 heads, 1024-wide context)
REDUCED = {
    "sd15": {"unet": dict(block_out_channels=[32, 64, 64, 64], norm_num_groups=8, layers_per_block=1, sample_size=8),
             "text_encoder": dict(hidden_size=768, intermediate_size=64, num_hidden_layers=1, vocab_size=600),
             "vae": dict(block_out_channels=[8, 8, 16, 16], norm_num_groups=8, layers_per_block=1)},
    "sd21-base": {"unet": dict(block_out_channels=[40, 80, 160, 160], norm_num_groups=8, layers_per_block=1,
                               sample_size=8),
                  "text_encoder": dict(hidden_size=1024, intermediate_size=64, num_hidden_layers=1, vocab_size=600),
                  "vae": dict(block_out_channels=[8, 8, 16, 16], norm_num_groups=8, layers_per_block=1)},
}


def trained_like(unet):
    """Norm scales and shifts moved off 1 / 0, as in a trained model: with ones and zeros a layer
    norm that mixed up its weight and bias would still pass."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in unet.parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return unet


def reduced(arch, **unet):
    import diffusers

    from sdwork.convert.fullsize import random_pipeline

    over = copy.deepcopy(REDUCED[arch])
    # StableDiffusionPipeline resets sample_size < 64 to 64 for UNet configs written before diffusers
    # 0.9 (SD 1.5's says 0.6.0): stamped with today's version, the reduced size stays
    over["unet"].update(unet, _diffusers_version=diffusers.__version__)
    pipe = random_pipeline(arch, overrides=over)
    assert pipe.unet.config.sample_size == over["unet"]["sample_size"]
    trained_like(pipe.unet)
    return pipe


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These small models run ten times slower on two threads of a shared 2-core machine than on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipes():
    return {"tiny": load_pipeline("tiny", progress=False), "sd15": reduced("sd15"), "sd21-base": reduced("sd21-base")}


def apple_context(ctx):
    """(B, 77, C) -> Apple's (B, C, 1, 77)."""
    return ctx.transpose(1, 2).unsqueeze(2)


def random_inputs(unet, batch=2, size=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = size or (unet.config.sample_size,) * 2
    sample = torch.randn(batch, unet.config.in_channels, h, w, generator=g)
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    return sample, torch.tensor([981.0, 1.0][:batch]), ctx


@torch.no_grad()
def real_inputs(pipe):
    """Classifier-free guidance's batch: the empty prompt and a caption through the text encoder,
    the latents of a rendered dataset image noised to timesteps 700 and 100."""
    from sdwork.tiny.dataset import parse_caption, render

    tok = pipe.tokenizer(["", CAPTION], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    ctx = pipe.text_encoder(tok.input_ids).last_hidden_state
    img = render(parse_caption(CAPTION), np.random.default_rng(0))
    image = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
    size = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    image = F.interpolate(image, size=(size, size), mode="bilinear") if size != image.shape[-1] else image
    latents = pipe.vae.encode(image).latent_dist.mean * pipe.vae.config.scaling_factor
    t = torch.tensor([700, 100])
    a = pipe.scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    noise = torch.randn(latents.expand(2, -1, -1, -1).shape, generator=torch.Generator().manual_seed(0))
    return a.sqrt() * latents + (1 - a).sqrt() * noise, t.float(), ctx


@torch.no_grad()
def psnr_against_diffusers(unet, module, sample, t, ctx):
    ref = unet(sample, t, encoder_hidden_states=ctx, return_dict=False)[0]
    out = module(sample, t, apple_context(ctx))
    assert out.shape == ref.shape == sample.shape
    return signal_psnr(ref.numpy(), out.numpy())


def build(unet, attention):
    return original_unet(unet) if attention == "original" else neural_engine_unet(unet, attention)


# ------------------------------------------------------------------ parity
@pytest.mark.parametrize("model", ["tiny", "sd15", "sd21-base"])
@pytest.mark.parametrize("inputs", ["random", "real"])
def test_parity_with_diffusers(pipes, model, inputs):
    pipe = pipes[model]
    unet = pipe.unet.eval()
    args = random_inputs(unet) if inputs == "random" else real_inputs(pipe)
    for attention in ATTENTIONS:
        psnr = psnr_against_diffusers(unet, build(unet, attention), *args)
        print(f"{model} {inputs} {attention}: {psnr:.1f} dB")
        assert psnr >= MIN_PSNR, (attention, psnr)


def test_reduced_configs_keep_the_full_size_features(pipes):
    assert not pipes["sd15"].unet.config.use_linear_projection and pipes["sd15"].unet.config.cross_attention_dim == 768
    cfg = pipes["sd21-base"].unet.config
    assert cfg.use_linear_projection and cfg.cross_attention_dim == 1024 and list(cfg.attention_head_dim) == [5, 10, 20, 20]


def test_latent_sides_that_need_explicit_upsampling_sizes(pipes):
    """10 x 6 latents are not multiples of 2^upsamplers: the up path takes the skips' sizes, as diffusers."""
    unet = pipes["tiny"].unet.eval()
    for attention in NE:
        assert psnr_against_diffusers(unet, build(unet, attention), *random_inputs(unet, size=(10, 6))) >= MIN_PSNR


def test_v2_keeps_every_query_when_the_length_is_not_a_multiple_of_512():
    """24 x 24 latents: 576 tokens at the top level. Apple's V2 computes 576 // 512 = 1 chunk and
    returns 512 tokens; here the second chunk holds the last 64."""
    pipe = reduced("sd15", block_out_channels=[16, 32, 32, 32], attention_head_dim=2, sample_size=24)
    unet = pipe.unet.eval()
    sample, t, ctx = random_inputs(unet, batch=1)
    tokens = sample.shape[2] * sample.shape[3]
    assert tokens == 576 and tokens % CHUNK and unet.config.down_block_types[0] == "CrossAttnDownBlock2D"
    for attention in NE:
        psnr = psnr_against_diffusers(unet, build(unet, attention), sample, t, ctx)
        print(f"576 tokens {attention}: {psnr:.1f} dB")
        assert psnr >= MIN_PSNR


@pytest.mark.parametrize("sq", [64, 512, 576, 1100])
def test_split_attention_against_sdpa(sq):
    g = torch.Generator().manual_seed(sq)
    heads, d, sk = 3, 8, 77
    q, k, v = (torch.randn(2, heads * d, 1, n, generator=g) for n in (sq, sk, sk))
    # diffusers' layout: (B, heads, S, d)
    split = lambda x: x.squeeze(2).view(2, heads, d, -1).transpose(2, 3)  # noqa: E731
    ref = F.scaled_dot_product_attention(split(q), split(k), split(v))
    ref = ref.transpose(2, 3).reshape(2, heads * d, 1, sq)
    for chunk in (None, CHUNK):
        out = split_attention(q, k, v, heads, d ** -0.5, chunk)
        assert out.shape == q.shape
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sq, chunks", [(64, 1), (512, 1), (576, 2), (1100, 3)])
def test_v2_graph_has_one_einsum_pair_per_chunk_and_head(sq, chunks):
    """What Core ML sees: per head, ceil(Sq / 512) query chunks (one below 512: V1's graph)."""

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return split_attention(q, k, v, 2, 0.5, CHUNK)

    q, k = torch.randn(1, 8, 1, sq), torch.randn(1, 8, 1, 77)
    ep = torch.export.export(Attn(), (q, k, k)).run_decompositions({})
    einsums = [n for n in ep.graph.nodes if n.target == torch.ops.aten.einsum.default]
    assert len(einsums) == 2 * 2 * chunks


def test_v2_below_512_tokens_is_v1(pipes):
    unet = pipes["tiny"].unet.eval()
    sample, t, ctx = random_inputs(unet)
    with torch.no_grad():
        v1, v2 = (build(unet, a)(sample, t, apple_context(ctx)) for a in NE)
    assert torch.equal(v1, v2)


# ------------------------------------------------------------------ parameters
@pytest.mark.parametrize("model", ["tiny", "sd21-base"])
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_parameters_are_the_unets_own_under_the_same_names(pipes, model, attention):
    unet = pipes[model].unet
    module = build(unet, attention)
    ours, theirs = dict(module.named_parameters()), dict(unet.named_parameters())
    assert list(ours) == list(theirs)
    assert [n for n, _ in module.named_buffers()] == [n for n, _ in unet.named_buffers()]
    for name, p in ours.items():
        q = theirs[name]
        assert isinstance(p, torch.nn.Parameter)
        assert p.data_ptr() == q.data_ptr() and p.numel() == q.numel(), name
        # a Linear's (out, in) weight seen as a 1x1 conv's (out, in, 1, 1); everything else as is
        assert p.shape == q.shape or (q.ndim == 2 and p.shape == (*q.shape, 1, 1)), name
        assert torch.equal(p.reshape(q.shape), q)


def test_linear_layers_became_1x1_convs(pipes):
    m = neural_engine_unet(pipes["sd21-base"].unet, "split_einsum")
    assert not [n for n, x in m.named_modules() if isinstance(x, torch.nn.Linear)]
    blk = m.down_blocks[0].attentions[0]
    for conv in (blk.proj_in, blk.transformer_blocks[0].attn2.to_k, m.time_embedding.linear_1,
                 m.down_blocks[0].resnets[0].time_emb_proj):
        assert isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (1, 1)


def test_weights_changed_in_place_reach_the_module(pipes):
    """A blank UNet filled through the module's own parameters (the views) computes the same."""
    from diffusers import UNet2DConditionModel

    unet = pipes["tiny"].unet.eval()
    blank = UNet2DConditionModel.from_config(unet.config).eval()
    ours, theirs = neural_engine_unet(unet, "split_einsum_v2"), neural_engine_unet(blank, "split_einsum_v2")
    src = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(src[name])
    assert all(torch.equal(a, b) for a, b in zip(blank.state_dict().values(), unet.state_dict().values()))
    sample, t, ctx = random_inputs(unet)
    with torch.no_grad():
        assert torch.equal(ours(sample, t, apple_context(ctx)), theirs(sample, t, apple_context(ctx)))


# ------------------------------------------------------------------ refusals
def small_unet(**config):
    from diffusers import UNet2DConditionModel

    base = dict(sample_size=8, block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, norm_num_groups=8,
                layers_per_block=1, attention_head_dim=2)
    return UNet2DConditionModel(**{**base, **config})


def test_clear_errors(pipes):
    unet = pipes["tiny"].unet
    with pytest.raises(ConfigError, match="did you mean 'split_einsum_v2'"):
        check_unet(unet, "split_einsum_v3")
    with pytest.raises(ConfigError, match="write 'split_einsum'"):
        check_unet(unet, "SPLIT_EINSUM")  # Apple's spelling, from its command line
    with pytest.raises(ConfigError, match="use original_unet"):
        neural_engine_unet(unet, "original")
    with pytest.raises(ConfigError, match="needs a diffusers UNet2DConditionModel, got AutoencoderKL"):
        check_unet(pipes["tiny"].vae, "split_einsum")
    sdxl = small_unet(addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=64)
    for attention in ATTENTIONS:  # the three-input forward has no time_ids / text_embeds: refused in every layout
        with pytest.raises(ConfigError, match="addition_embed_type='text_time' .SDXL's time_ids"):
            check_unet(sdxl, attention)
    with pytest.raises(ConfigError, match="class embeddings .* need class_labels"):
        neural_engine_unet(small_unet(num_class_embeds=10), "split_einsum")


@pytest.mark.parametrize("config, reason", [
    (dict(resnet_time_scale_shift="scale_shift"), "resnet_time_scale_shift='scale_shift'"),
    (dict(only_cross_attention=True), "only_cross_attention=True"),
    (dict(time_cond_proj_dim=8), "time_cond_proj_dim=8"),
    (dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), "mid_block_type='UNetMidBlock2DSimpleCrossAttn'"),
    (dict(time_embedding_act_fn="silu"), "time_embedding_act_fn='silu'"),
])
def test_unsupported_configs_are_refused_before_export(config, reason):
    unet = small_unet(**config)
    check_unet(unet, "original")  # diffusers computes them: the original layout stays available
    with pytest.raises(ConfigError, match=f"this UNet has {reason}.*Convert this UNet with attention='original'"):
        neural_engine_unet(unet, "split_einsum_v2")


def test_module_level_options_are_refused():
    unet = small_unet()
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    with pytest.raises(ConfigError, match="FreeU enabled"):
        check_unet(unet, "split_einsum")
    unet.disable_freeu()
    check_unet(unet, "split_einsum")


# ------------------------------------------------------------------ Core ML
def convert(pipe, module):
    """torch.export + coremltools as convert_component does, Apple's fp16 inputs; the weight map."""
    from sdwork.convert import components as C
    from sdwork.convert.export import export, to_coreml
    from sdwork.convert.weightmap import build_weight_map
    from sdwork.coreml.package import package_weights, set_metadata

    sp, shapes = C.spec("unet"), C.Shapes.of(pipe, 1, "apple", "original")
    with torch.no_grad():
        ep = export(module, sp.inputs(shapes))
    mlmodel = to_coreml(ep, sp.inputs(shapes), sp.outputs(shapes), "iOS18", progress=False)
    # parameter names are the UNet's own: the signature maps placeholders to them directly
    placeholders = dict(ep.graph_signature.inputs_to_parameters)
    wm = build_weight_map("unet", "unet", dict(pipe.unet.named_parameters()), placeholders, package_weights(mlmodel))
    set_metadata(mlmodel, {"component": "unet", "weightmap": wm.to_json(indent=None)})
    return mlmodel, placeholders, wm


def assert_convs_keep_their_names(unet, mlmodel, placeholders, wm):
    from sdwork.coreml.package import package_weights
    from sdwork.convert.weightmap import compressible

    by_name = {v: k for k, v in placeholders.items()}
    consts = package_weights(mlmodel)
    for name, p in unet.named_parameters():
        e = wm.entries[name]
        if compressible(p):  # what compression touches: the const carries the placeholder's name
            assert e.kind == "name" and e.const == by_name[name] + "_to_fp16", (name, e)
            assert consts[e.const].size == p.numel()
    ops = {op.op_type for f in mlmodel._mil_program.functions.values() for op in f.operations}
    assert {"einsum", "conv", "softmax"} <= ops and "linear" not in ops and "scaled_dot_product_attention" not in ops


@pytest.mark.slow
def test_converts_and_loads_back_exactly(pipes):
    """The tiny model's V2 UNet through ct.convert: every conv weight keeps its placeholder name,
    and the package's weights loaded into a blank UNet compute what the fp16-rounded UNet computes."""
    from diffusers import UNet2DConditionModel

    from sdwork.convert.into_torch import load_package_into_module
    from sdwork.convert.weightmap import coreml_fp16

    unet = pipes["tiny"].unet.eval()
    mlmodel, placeholders, wm = convert(pipes["tiny"], neural_engine_unet(unet, "split_einsum_v2"))
    assert_convs_keep_their_names(unet, mlmodel, placeholders, wm)
    assert mlmodel.get_spec().description.input[2].type.multiArrayType.shape == [1, 64, 1, 77]

    blank = UNet2DConditionModel.from_config(unet.config).eval()
    load_package_into_module(blank, "unet", mlmodel, same_weights=False)
    rounded = copy.deepcopy(unet)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(torch.from_numpy(coreml_fp16(p.numpy()).astype(np.float32)))
    sample, t, ctx = random_inputs(unet)
    with torch.no_grad():
        got = neural_engine_unet(blank, "split_einsum_v2")(sample, t, apple_context(ctx))
        want = neural_engine_unet(rounded, "split_einsum_v2")(sample, t, apple_context(ctx))
    assert torch.equal(got, want)


@pytest.mark.slow
def test_reduced_sd21_base_converts():
    """Linear projections, a 1024-wide context and per-block head counts through ct.convert; a
    quarter of SD 2.1's heads (each head is two einsums in the graph: this halves the test's time)."""
    pipe = reduced("sd21-base", attention_head_dim=[1, 2, 4, 4])
    mlmodel, placeholders, wm = convert(pipe, neural_engine_unet(pipe.unet.eval(), "split_einsum"))
    assert_convs_keep_their_names(pipe.unet, mlmodel, placeholders, wm)
