"""Core ML conversion: packages, names, verified weight maps, Linux parity, compressed packages, errors."""
import copy
import shutil

import numpy as np
import pytest
import torch

from sdwork.convert import (
    COMPONENTS, PackageError, PackageMismatchError, WeightMapError, convert_component, convert_pipeline, io_table,
    load_packages_into_pipeline, load_weight_map, package_table, package_weights, read_weight_map,
)
from sdwork.convert import components as C
from sdwork.convert.weightmap import compressible, coreml_fp16
from sdwork.coreml.package import metadata
from sdwork.evaluate.parity import parity_report
from sdwork.load import ModelNotFoundError, load_pipeline
from sdwork.weights import components, fp16_hash

NAMES = {"text_encoder": "TextEncoder", "unet": "Unet", "vae_decoder": "VAEDecoder", "vae_encoder": "VAEEncoder"}


def trained_like(pipe):
    """tiny-random with every norm scale / bias moved off 1 / 0, as in a trained model: otherwise
    coremltools drops them as no-ops and the folded path (GroupNorm -> batch_norm) goes untested."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in components(pipe).values():
            for p in m.parameters():
                if p.ndim == 1:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
        # trained CLIP k_proj biases are ~1e-6 and below (softmax ignores them): in fp16 they underflow,
        # and coremltools stores such values of small tensors as the smallest subnormal, not 0
        pipe.text_encoder.encoder.layers[0].self_attn.k_proj.bias.copy_(torch.randn(64, generator=g) * 3e-8)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return trained_like(load_pipeline("tiny-random", progress=False))


# about a minute (four conversions) on a 2-core machine: every test using it is marked slow
@pytest.fixture(scope="module")
def converted(pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("convert")
    return convert_pipeline(pipe, out, progress=False)


@pytest.mark.slow
def test_writes_every_package_weight_map_and_tokenizer(converted, pipe):
    out = converted["unet"].parent
    assert {c: p.name for c, p in converted.items()} == {c: f"{n}.mlpackage" for c, n in NAMES.items()}
    for c, n in NAMES.items():
        assert (out / f"{n}.mlpackage" / "Manifest.json").exists() and (out / f"{n}.weightmap.json").exists()
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"))
    text = "a large purple triangle on a black background"
    assert tok(text).input_ids == pipe.tokenizer(text).input_ids
    sizes = package_table(converted)
    assert (sizes.target == "iOS18").all() and (sizes.weights_mb > 0).all()


# Apple's contract, written out from shared/APPLE_IO.md (Apple's torch2coreml.py and the Swift
# pipeline): the tiny model's C = 64, h = w = 8, 64x64 images
APPLE = {
    ("text_encoder", "input", "input_ids"): ((1, 77), "float32"),
    ("text_encoder", "output", "last_hidden_state"): ((1, 77, 64), "float32"),
    ("text_encoder", "output", "pooled_outputs"): ((1, 64), "float32"),
    ("unet", "input", "sample"): ((2, 4, 8, 8), "float16"),
    ("unet", "input", "timestep"): ((2,), "float16"),
    ("unet", "input", "encoder_hidden_states"): ((2, 64, 1, 77), "float16"),
    ("unet", "output", "noise_pred"): ((2, 4, 8, 8), "float32"),
    ("vae_decoder", "input", "z"): ((1, 4, 8, 8), "float16"),
    ("vae_decoder", "output", "image"): ((1, 3, 64, 64), "float32"),
    ("vae_encoder", "input", "x"): ((1, 3, 64, 64), "float16"),
    ("vae_encoder", "output", "latent"): ((1, 8, 8, 8), "float32"),
}
DIFFUSERS = {
    ("text_encoder", "input", "input_ids"): ((1, 77), "int32"),
    ("text_encoder", "output", "last_hidden_state"): ((1, 77, 64), "float32"),
    ("text_encoder", "output", "pooler_output"): ((1, 64), "float32"),
    ("vae_encoder", "input", "image"): ((1, 3, 64, 64), "float32"),
    ("vae_encoder", "output", "latent"): ((1, 4, 8, 8), "float32"),
}


def assert_io(packages, expected):
    io = io_table(packages).set_index(["component", "io", "name"])
    assert set(io.index) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert (io.loc[key, "shape"], io.loc[key, "dtype"]) == (shape, dtype), key
        assert io.loc[key, "description"]


@pytest.mark.slow
def test_inputs_and_outputs_follow_apples_contract(converted):
    assert_io(converted, APPLE)
    from sdwork.coreml.contract import contract_table

    table = contract_table(converted)
    assert table.matches.all(), table[~table.matches]


@pytest.mark.slow
def test_diffusers_layout_stays_available(pipe, tmp_path):
    packages = convert_pipeline(pipe, tmp_path, components=["text_encoder", "vae_encoder"], io="diffusers",
                                progress=False)
    assert_io(packages, DIFFUSERS)
    from sdwork.coreml.contract import contract_table

    table = contract_table(packages).set_index("name")
    assert not table.loc["input_ids", "matches"] and "int32" in table.loc["input_ids", "got"]
    assert parity_report(pipe, packages, progress=False).linux_pass.all()


def test_wrappers_compute_what_the_pipeline_computes(pipe):
    """The exported wrappers are the pipeline's own computation (positions from cumsum included)."""
    g = torch.Generator().manual_seed(3)
    ids = pipe.tokenizer("a small green square on a white background", padding="max_length",
                         return_tensors="pt").input_ids
    z, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 900.0]), torch.randn(2, 77, 64, generator=g)
    img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        for ids_as in (ids.int(), ids.float()):  # diffusers' int32 ids, Apple's float ids
            hidden, pooled = C.TextEncoder(pipe.text_encoder)(ids_as)
            ref = pipe.text_encoder(ids)
            assert torch.equal(hidden, ref.last_hidden_state) and torch.equal(pooled, ref.pooler_output)
        expected = pipe.unet(z, t, encoder_hidden_states=ctx).sample
        assert torch.equal(C.Unet(pipe.unet, io="diffusers")(z, t, ctx), expected)
        assert torch.equal(C.Unet(pipe.unet, io="apple")(z, t, ctx.transpose(1, 2).unsqueeze(2)), expected)
        assert torch.equal(C.VAEDecoder(pipe.vae)(z[:1]), pipe.vae.decode(z[:1]).sample)
        posterior = pipe.vae.encode(img).latent_dist
        assert torch.equal(C.VAEEncoder(pipe.vae, io="diffusers")(img), posterior.mean)
        assert torch.equal(C.VAEEncoder(pipe.vae, io="apple")(img), posterior.parameters)


@pytest.mark.slow
def test_weight_map_accounts_for_every_parameter(converted, pipe):
    for comp, path in converted.items():
        wm = read_weight_map(path)
        params = C.owned_parameters(pipe, comp)
        assert set(wm.entries) == set(params)
        weights = package_weights(path)
        for name, e in wm.entries.items():
            if compressible(params[name], wm.weight_threshold):
                assert e.kind in ("name", "shared"), (comp, name, e)
            if e.const is not None:  # values equal to the fp16-rounded parameter, bit for bit
                ref = coreml_fp16(params[name].detach().numpy())
                assert np.array_equal(weights[e.const].reshape(ref.shape), ref), (comp, name)
        assert load_weight_map(path) == wm.consts()
    # trained-like norms: the VAE's and UNet's GroupNorms are folded into batch_norm consts
    assert read_weight_map(converted["vae_decoder"]).counts()["folded"] > 0
    assert read_weight_map(converted["unet"]).counts()["folded"] > 0


def test_weight_map_rules():
    """The classification on hand-made cases, including full-size ones (1-D norms over 2048 channels)."""
    from sdwork.convert.weightmap import build_weight_map

    g = torch.Generator().manual_seed(0)
    w, gamma = torch.randn(64, 64, generator=g), torch.randn(2560, generator=g)
    params = {"conv.weight": w, "conv2.weight": w.clone(), "norm.weight": torch.ones(2560),
              "norm.bias": torch.zeros(2560), "gn.weight": gamma}
    placeholders = {f"p_m_{n.replace('.', '_')}": n for n in params}
    weights = {"p_m_conv_weight_to_fp16": w.half().numpy(), "add_3_gamma_0_to_fp16": gamma.half().numpy()}
    wm = build_weight_map("unet", "unet", params, placeholders, weights)
    kinds = {n: (e.kind, e.const) for n, e in wm.entries.items()}
    assert kinds == {"conv.weight": ("name", "p_m_conv_weight_to_fp16"),
                     "conv2.weight": ("shared", "p_m_conv_weight_to_fp16"),
                     "norm.weight": ("identity", None), "norm.bias": ("identity", None),
                     "gn.weight": ("folded", "add_3_gamma_0_to_fp16")}
    with pytest.raises(WeightMapError, match="folded into the generated const"):  # a 2-D weight without its name
        build_weight_map("unet", "unet", {"a.weight": w}, {}, {"linear_0_to_fp16": w.half().numpy()})
    with pytest.raises(WeightMapError, match="not in the package by name or by value"):
        build_weight_map("unet", "unet", {"gn.weight": gamma}, {}, {})
    with pytest.raises(WeightMapError, match="not its values"):
        build_weight_map("unet", "unet", {"a.weight": w}, {"p_a_weight": "a.weight"},
                         {"p_a_weight_to_fp16": (2 * w).half().numpy()})


@pytest.mark.slow
def test_parity_on_linux(converted, pipe):
    report = parity_report(pipe, converted, progress=False).set_index("component")
    assert list(report.index) == list(COMPONENTS)
    # against plain fp16 rounding: only the underflowed k_proj bias differs, by one subnormal step
    tiny = float(np.nextafter(np.float16(0), np.float16(1)))
    assert report.max_weight_dev.to_dict() == {"text_encoder": tiny, "unet": 0, "vae_decoder": 0, "vae_encoder": 0}
    assert (report[["psnr_random", "psnr_real"]] >= 60).all().all() and report.linux_pass.all()
    import platform

    if platform.system() != "Darwin":
        assert report.macos_status.str.startswith("skipped: the Core ML runtime exists only on macOS").all()
        assert report.macos_psnr.isna().all() and report.macos_pass.isna().all()


@pytest.mark.slow
def test_parity_refuses_a_changed_source(converted, pipe):
    """The source changed after conversion: the package's fp16 hash no longer matches, so parity is
    refused up front (a package that differs from its own source is caught by max_weight_dev, see
    test_compressed_packages_decompress_exactly)."""
    other = copy.deepcopy(pipe)
    with torch.no_grad():
        other.unet.conv_in.weight.mul_(1.5)
    with pytest.raises(PackageMismatchError, match="converted from other weights than this model's unet"):
        parity_report(other, {"unet": converted["unet"]}, progress=False)


@pytest.mark.slow
def test_compressed_packages_decompress_exactly(converted, pipe, tmp_path):
    """Grouped LUTs, vector LUTs and sparse+LUT packages: package_weights returns what coremltools'
    own decompress_weights computes, under the fp16 const names, and the weights load into torch."""
    import coremltools.optimize.coreml as cto

    from sdwork.coreml.package import open_package

    variants = {
        ("vae_decoder", "lut4_g16"): lambda m: cto.palettize_weights(m, cto.OptimizationConfig(cto.OpPalettizerConfig(
            mode="uniform", nbits=4, granularity="per_grouped_channel", group_size=16))),
        ("text_encoder", "kmeans_cd2"): lambda m: cto.palettize_weights(m, cto.OptimizationConfig(cto.OpPalettizerConfig(
            mode="kmeans", nbits=3, cluster_dim=2, num_kmeans_workers=1))),
        ("text_encoder", "sparse_lut"): lambda m: cto.palettize_weights(
            cto.prune_weights(m, cto.OptimizationConfig(cto.OpMagnitudePrunerConfig(target_sparsity=0.5))),
            cto.OptimizationConfig(cto.OpPalettizerConfig(mode="uniform", nbits=4)), joint_compression=True),
    }
    for (comp, tag), compress in variants.items():
        path = tmp_path / tag / f"{NAMES[comp]}.mlpackage"
        compress(open_package(converted[comp])).save(str(path))  # metadata (and weight map) survive
        dense = tmp_path / tag / "dense" / path.name
        cto.decompress_weights(open_package(path)).save(str(dense))
        got, ref = package_weights(path), package_weights(dense)
        assert set(got) == set(ref) and all(np.array_equal(got[k], ref[k]) for k in got)
        fp16 = package_weights(converted[comp])
        changed = [k for k in got if not np.array_equal(got[k], fp16[k])]
        assert changed and set(changed) <= set(load_weight_map(path).values())  # only weights were compressed
        if tag == "lut4_g16":  # 16 values per group of 16 output channels
            w = got[load_weight_map(path)["decoder.up_blocks.0.resnets.0.conv1.weight"]]
            # float32 first: numpy's float16 sort is wrong on AVX-512 machines (REFERENCE.md)
            assert all(len(np.unique(w[i:i + 16].astype(np.float32))) <= 16 for i in range(0, w.shape[0], 16))
        variant = load_packages_into_pipeline(copy.deepcopy(pipe), {comp: path})
        module = C.torch_module(variant, comp)
        for name, const in load_weight_map(path).items():
            p = dict(module.named_parameters())[name]
            assert np.array_equal(p.detach().numpy().reshape(-1), got[const].astype(np.float32).reshape(-1))
        row = parity_report(pipe, {comp: path}, progress=False).iloc[0]
        assert row.max_weight_dev > 0 and 5 < row.psnr_random < 120


@pytest.mark.slow
def test_conversion_is_deterministic(pipe, converted, tmp_path):
    again = convert_component(pipe, "text_encoder", tmp_path, progress=False)
    blob = "Data/com.apple.CoreML/weights/weight.bin"
    assert (again / blob).read_bytes() == (converted["text_encoder"] / blob).read_bytes()
    assert read_weight_map(again) == read_weight_map(converted["text_encoder"])


def test_full_size_configs_have_the_published_sizes():
    """The configs in data/configs build the published architectures (parameter counts, on the meta device)."""
    from sdwork.convert import fullsize

    expected = {("sd15", "unet"): 859_520_964, ("sd21-base", "unet"): 865_910_724,
                ("sd15", "vae"): 83_653_863, ("sd21-base", "vae"): 83_653_863,
                ("sd15", "text_encoder"): 123_060_480, ("sd21-base", "text_encoder"): 340_387_840}
    for (arch, part), n in expected.items():
        with torch.device("meta"):
            module = fullsize.random_module(arch, part)
        assert sum(p.numel() for p in module.parameters()) == n, (arch, part)


@pytest.mark.slow
def test_reduced_sd21_base_unet_converts_unchanged(tmp_path):
    """SD 2.1-base's UNet features (linear projections, per-block head counts, 4 levels, 1024-wide
    context) at reduced width: same code path as the full-size benchmark, seconds not minutes."""
    from sdwork.convert.fullsize import random_pipeline

    pipe = random_pipeline("sd21-base", overrides={
        "unet": dict(block_out_channels=[40, 80, 160, 160], sample_size=8, norm_num_groups=8, layers_per_block=1),
        "text_encoder": dict(hidden_size=1024, intermediate_size=64, num_hidden_layers=1, vocab_size=600),
        "vae": dict(block_out_channels=[8, 8, 16, 16], norm_num_groups=8, layers_per_block=1),
    })
    assert pipe.unet.config.use_linear_projection and pipe.unet.config.cross_attention_dim == 1024
    path = convert_component(pipe, "unet", tmp_path, unet_batch=1, progress=False)
    wm = read_weight_map(path)
    assert wm.counts()["identity"] > 0  # random init: norms of ones / zeros, removed by coremltools
    row = parity_report(pipe, {"unet": path}, progress=False).iloc[0]
    assert row.max_weight_dev == 0 and row.linux_pass
    assert io_table({"unet": path}).set_index("name").loc["encoder_hidden_states", "shape"] == (1, 1024, 1, 77)


@pytest.mark.slow
def test_clear_errors(converted, pipe, tmp_path):
    with pytest.raises(ValueError, match="unknown component 'safety_checker'"):
        convert_pipeline(pipe, tmp_path, components=["unet", "safety_checker"], progress=False)
    with pytest.raises(ValueError, match="unknown or unsupported target 'iOS15'"):
        convert_component(pipe, "unet", tmp_path, target="iOS15")
    with pytest.raises(ValueError, match="unet_batch must be 1 or 2"):
        convert_component(pipe, "unet", tmp_path, unet_batch=4)
    with pytest.raises(ModelNotFoundError, match="no model folder"):
        load_pipeline("./no/such/model")
    with pytest.raises(PackageError, match="no Core ML package"):
        package_weights(tmp_path / "Missing.mlpackage")
    # damaged: the weight file is gone
    broken = tmp_path / "broken" / "Unet.mlpackage"
    shutil.copytree(converted["unet"], broken)
    (broken / "Data/com.apple.CoreML/weights/weight.bin").unlink()
    with pytest.raises(PackageError, match="damaged"):
        package_weights(broken)
    # a package passed under another component's key
    with pytest.raises(PackageMismatchError, match="holds the unet component, not vae_decoder"):
        load_packages_into_pipeline(copy.deepcopy(pipe), {"vae_decoder": converted["unet"]})
    # a package of another model (the reduced SD 2.1-base architecture)
    from sdwork.convert.fullsize import random_pipeline

    other = random_pipeline("sd21-base", parts=("unet",), overrides={"unet": dict(
        block_out_channels=[40, 80, 160, 160], sample_size=8, norm_num_groups=8, layers_per_block=1)})
    with pytest.raises(PackageMismatchError, match="does not belong to this model's unet"):
        load_packages_into_pipeline(other, {"unet": converted["unet"]})
    # a weight map JSON beside the package that belongs to another package
    odd = tmp_path / "odd"
    shutil.copytree(converted["unet"], odd / "Unet.mlpackage")
    shutil.copy(converted["text_encoder"].parent / "TextEncoder.weightmap.json", odd / "Unet.weightmap.json")
    with pytest.raises(PackageError, match="does not match"):
        load_weight_map(odd / "Unet.mlpackage")
    with pytest.raises(ValueError, match="float32"):
        convert_component(load_pipeline("tiny-random", dtype=torch.float16), "vae_decoder", tmp_path)


@pytest.mark.slow
def test_a_package_of_other_weights_is_refused(converted, pipe):
    """Same architecture, other weights (a tiny-random package into the tiny pipeline): the fp16 hash
    the package carries says so, and the error names both."""
    from conftest import tiny_specs

    spec = tiny_specs()[0]  # the trained tiny model; without it, plain tiny-random (pipe is trained_like)
    other = load_pipeline(spec, progress=False)
    package_hash = metadata(converted["unet"])["source_weights"]
    assert package_hash == fp16_hash(C.owned_parameters(pipe, "unet"))
    own_hash = fp16_hash(C.owned_parameters(other, "unet"))
    assert own_hash != package_hash
    with pytest.raises(PackageMismatchError, match=rf"converted from other weights than this model's unet "
                                                   rf"\(package: model 'tiny-random', weights {package_hash}; "
                                                   rf"this model: weights {own_hash}\)"):
        load_packages_into_pipeline(other, {"unet": converted["unet"]})
    load_packages_into_pipeline(copy.deepcopy(pipe), {"unet": converted["unet"]})  # its own weights: accepted


@pytest.mark.slow
def test_notebook_converts_and_reports(tmp_path):
    import pandas as pd
    from nbrun import run_notebook

    out = tmp_path / "out"
    run_notebook("01_convert.ipynb", tmp_path, model="tiny-random", components=["text_encoder", "vae_decoder"],
                 out_dir=str(out), progress=False)
    folder = out / "tiny-random"
    parity = pd.read_csv(folder / "parity.csv")
    assert parity.component.tolist() == ["text_encoder", "vae_decoder"] and parity.linux_pass.all()
    assert set(pd.read_csv(folder / "io.csv").name) == {"input_ids", "last_hidden_state", "pooled_outputs", "z", "image"}
    assert (folder / "TextEncoder.mlpackage").is_dir() and (folder / "vocab.json").exists()
    assert len(pd.read_csv(folder / "sizes.csv")) == 2
