"""sdwork never sorts a float16 array: numpy 2.4's float16 sort and unique return wrong results on
AVX-512 machines (REFERENCE.md, "Found on these machines"), so the compression path works on
float32 or on the uint16 bit patterns.

The guard refuses float16 input to np.sort / np.unique / np.argsort / np.partition /
np.argpartition (monkeypatched), and a profile hook records every call of the ndarray methods
sort / argsort / partition / argpartition on a float16 array, from any Python code (numpy's own
np.unique calls ar.sort() inside; a C type's methods cannot be monkeypatched)."""
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("numba")
ct = pytest.importorskip("coremltools")

from sdwork.compress import kmeans1d  # noqa: E402
from sdwork.compress.apply import compress, uncompressed_layers  # noqa: E402
from sdwork.compress.palettize_fast import read_luts  # noqa: E402
from sdwork.compress.recipe import Recipe  # noqa: E402
from sdwork.coreml.lut import lut_to_dense  # noqa: E402
from sdwork.coreml.package import package_weights  # noqa: E402

FUNCTIONS = ("sort", "unique", "argsort", "partition", "argpartition")
METHODS = ("sort", "argsort", "partition", "argpartition")


class Float16Sort(AssertionError):
    pass


def _is_float16(a) -> bool:
    return isinstance(a, np.ndarray) and a.dtype == np.float16


def _refusing(fn, name: str, seen: list):
    def wrapped(a, *args, **kwargs):
        if _is_float16(np.asarray(a)):
            seen.append(name)
            raise Float16Sort(f"{name} called on a float16 array")
        return fn(a, *args, **kwargs)

    return wrapped


@pytest.fixture
def no_float16_sort(monkeypatch):
    """Yields the list of float16 sorts seen; the test fails at teardown if there were any
    (recorded as well as raised, since a caller's `except Exception` could swallow the error)."""
    seen: list[str] = []
    for name in FUNCTIONS:
        monkeypatch.setattr(np, name, _refusing(getattr(np, name), f"np.{name}", seen))

    def profile(frame, event, arg):
        if event == "c_call" and getattr(arg, "__name__", "") in METHODS and _is_float16(getattr(arg, "__self__", None)):
            seen.append(f"ndarray.{arg.__name__} in {frame.f_code.co_filename}:{frame.f_lineno}")

    old = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield seen
    finally:
        sys.setprofile(old)
    assert not seen, f"float16 arrays were sorted: {seen[:5]}"


def test_the_guard_catches_float16_sorts(no_float16_sort):
    x = np.array([3, 1, 2], np.float16)
    for name in FUNCTIONS:
        with pytest.raises(Float16Sort):
            getattr(np, name)(x, 1) if "partition" in name else getattr(np, name)(x)
    x.sort()
    x.argsort()
    np.sort(x.astype(np.float32))  # float32 is fine
    assert len(no_float16_sort) == len(FUNCTIONS) + 2
    no_float16_sort.clear()


def test_kmeans_on_few_distinct_float16_values(no_float16_sort):
    """The case numpy gets wrong here (36,864 values drawn from 16 distinct ones): 4 bits hold it exactly."""
    rng = np.random.default_rng(0)
    levels = np.r_[-np.arange(1, 9), np.arange(1, 9)] * 0.01
    w = rng.choice(levels, (64, 576)).astype(np.float16)
    for granularity in ("per_tensor", "per_grouped_channel"):
        lut, idx = kmeans1d.palettize_weight(w, 4, granularity, group_size=16)
        assert np.array_equal(lut_to_dense(lut, idx), w)
    lut, idx = kmeans1d.cluster_rows(w.reshape(4, -1), 2)
    assert (np.diff(lut.astype(np.float32), axis=1) > 0).all()  # sorted ascending, checked in float32


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(8, 64, 3)
        self.lin = torch.nn.Linear(64, 36)  # 36 channels: not divisible by group size 16, left dense

    def forward(self, x):
        return self.lin(self.conv(x).mean((2, 3)))


@pytest.fixture(scope="module")
def fp16_package(tmp_path_factory):
    ep = torch.export.export(Small().eval(), (torch.randn(1, 8, 10, 10),)).run_decompositions({})
    ml = ct.convert(ep, minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16,
                    convert_to="mlprogram", skip_model_load=True)
    path = tmp_path_factory.mktemp("f16") / "Unet.mlpackage"
    ml.save(str(path))
    return path


@pytest.mark.parametrize("mode", ["kmeans", "uniform"])
def test_sdwork_engine_compresses_without_sorting_float16(fp16_package, tmp_path, no_float16_sort, mode):
    """Palettize, save, account sizes, list dense layers, read the LUTs back and decode them."""
    recipe = Recipe(nbits=4, group_size=16, mode=mode, weight_threshold=512, components=("unet",), engine="sdwork")
    done = compress(recipe, {"unet": fp16_package}, tmp_path, progress=False)
    assert {l["name"]: l["kind"] for l in uncompressed_layers(done) if l["kind"] != "one_d"} == {
        "p_lin_weight_to_fp16": "channels_not_divisible"}
    luts = read_luts(done.packages["unet"])
    weights = package_weights(done.packages["unet"])
    assert set(luts) == {"p_conv_weight_to_fp16"}
    lut, idx = luts["p_conv_weight_to_fp16"]
    assert np.array_equal(lut_to_dense(lut, idx), weights["p_conv_weight_to_fp16"])
    assert done.sizes["unet"].lut_count == 4
