"""Evaluating a variant writes its exact weights into the one loaded pipeline and restores them:
the images are those of the old deep-copy path, the weights hash is unchanged afterwards (also
after a failure mid-evaluation), and no second copy of the UNet exists while it generates."""
import gc

import numpy as np
import pytest
import torch

from sdwork import hooks
from sdwork.compress.apply import compress
from sdwork.compress.recipe import Recipe
from sdwork.coreml.package import iter_package_weights
from sdwork.coreml.package import package_weights
from sdwork.evaluate.variant import evaluate, load_variant
from sdwork.experiments.experiment import Experiment
from sdwork.generate import GenSettings, generate
from sdwork.weights import weights_hash

SETTINGS = GenSettings(prompts=("a small red circle on a gray background",), seeds=(0,), steps=2, threads=1)


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    return Experiment("tiny-random", SETTINGS, None, tmp_path_factory.mktemp("mem") / "run", progress=False)


@pytest.fixture(scope="module")
def done(exp, tmp_path_factory):
    recipe = Recipe(nbits=4, components=("unet", "text_encoder"), engine="sdwork")
    return compress(recipe, exp.fp16_packages(recipe.components), tmp_path_factory.mktemp("v"), progress=False)


def test_layer_by_layer_decoding_gives_package_weights_exactly(exp, done):
    """Compressed packages (constexpr chains) and fp16 ones (read from weight.bin const by const)."""
    fp16 = exp.fp16_packages(done.recipe.components)
    for package in [done.packages["unet"], done.packages["text_encoder"], *fp16.values()]:
        ref = package_weights(package)
        got = dict(iter_package_weights(package))
        assert set(got) == set(ref)
        for k, v in ref.items():
            assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k


def test_in_place_images_equal_the_deep_copy_path_and_weights_come_back(exp, done):
    before = weights_hash(exp.pipe)
    ev = evaluate(exp.pipe, done.packages, SETTINGS, exp.baseline, None, progress=False,
                  fp16_packages=exp.fp16_packages(done.recipe.components))
    assert weights_hash(exp.pipe) == before
    old = generate(load_variant(exp.pipe, done.packages), SETTINGS, progress=False)
    assert np.array_equal(ev.images, old)
    assert not np.array_equal(ev.images, exp.baseline)  # the variant really ran


def test_weights_come_back_without_fp16_packages_too(exp, done):
    before = weights_hash(exp.pipe)
    evaluate(exp.pipe, done.packages, SETTINGS, exp.baseline, None, progress=False)
    assert weights_hash(exp.pipe) == before


def test_weights_come_back_after_a_failure_mid_evaluation(exp, done):
    before = weights_hash(exp.pipe)

    def fail(**_):
        assert weights_hash(exp.pipe) != before  # the variant's weights are in the pipeline now
        raise RuntimeError("killed mid-evaluation")

    with hooks.on("variant_loaded", fail), pytest.raises(RuntimeError, match="killed"):
        evaluate(exp.pipe, done.packages, SETTINGS, exp.baseline, None, progress=False,
                 fp16_packages=exp.fp16_packages(done.recipe.components))
    assert weights_hash(exp.pipe) == before


def _extra_float_bytes(pipe) -> int:
    """Bytes of live float tensors of 400+ elements that are not the pipeline's own storage."""
    own = {t.untyped_storage().data_ptr() for m in (pipe.unet, pipe.text_encoder, pipe.vae)
           for t in list(m.parameters()) + list(m.buffers())}
    gc.collect()
    extra = 0
    for o in gc.get_objects():
        # plain tensors only: fake ones left by torch.export have no storage
        if type(o) in (torch.Tensor, torch.nn.Parameter) and o.is_floating_point() and o.numel() >= 400:
            ptr = o.untyped_storage().data_ptr()
            if ptr not in own:
                own.add(ptr)  # a storage counts once, however many views
                extra += o.untyped_storage().nbytes()
    return extra


def test_no_second_copy_of_the_unet_exists_while_a_variant_generates(exp, done):
    unet_bytes = sum(p.numel() * p.element_size() for p in exp.pipe.unet.parameters())
    seen = {}
    with hooks.on("variant_loaded", lambda **_: seen.setdefault("in_place", _extra_float_bytes(exp.pipe))):
        evaluate(exp.pipe, done.packages, SETTINGS, exp.baseline, None, progress=False,
                 fp16_packages=exp.fp16_packages(done.recipe.components))
    copy = load_variant(exp.pipe, done.packages)  # the old path: the measurement sees its copy
    seen["deep_copy"] = _extra_float_bytes(exp.pipe)
    del copy
    assert seen["deep_copy"] >= unet_bytes
    assert seen["in_place"] < 0.05 * unet_bytes, seen
