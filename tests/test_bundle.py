"""sdwork bundle: the Resources folder Apple's Swift package loads, from a run or a folder.

The names are those StableDiffusionPipeline+Resources.swift opens (apple/ml-stable-diffusion
e12202c): TextEncoder, Unet or UnetChunk1 + UnetChunk2, VAEDecoder, VAEEncoder (optional), as
.mlmodelc, plus vocab.json and merges.txt. Linux has no Core ML compiler: Resources holds the
.mlpackage files and the report says what was skipped. Tests marked slow share one tiny run
(fp16 conversion, a 4-bit UNet variant, its scoring: about 40 s)."""
import platform
import shutil

import pytest

from sdwork.bundle import COMPILE_SKIPPED, RESOURCE_NAMES, bundle
from sdwork.cli import main
from sdwork.coreml.chunk import imbalance
from sdwork.coreml.package import metadata
from sdwork.coreml.sizes import MODEL, WEIGHTS, package_sizes
from sdwork.errors import ConfigError, MismatchError, PackageError

SWIFT_NAMES = {"TextEncoder", "Unet", "UnetChunk1", "UnetChunk2", "VAEDecoder", "VAEEncoder"}
TOKENIZER = {"vocab.json", "merges.txt"}
linux_only = pytest.mark.skipif(platform.system() == "Darwin", reason="macOS compiles the packages")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run folder, the 4-bit UNet variant's name, the fp16 packages)"""
    from sdwork.compress.recipe import Recipe
    from sdwork.experiments.experiment import Experiment
    from sdwork.generate import GenSettings

    settings = GenSettings(prompts=["a small red circle on a gray background"], seeds=[0], steps=2, guidance=5.0,
                           threads=1)
    exp = Experiment("tiny-random", settings, "tiny-random", tmp_path_factory.mktemp("run"), progress=False)
    v = exp.run(Recipe(nbits=4, group_size=16, components=("unet",)))
    return exp.out, v.name, exp.fp16_packages()


def _names(folder):
    return {p.name for p in folder.iterdir()}


def _same_package(a, b) -> bool:
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in (MODEL, WEIGHTS))


def test_resource_names_are_the_swift_packages_and_the_converters():
    from sdwork.convert.components import spec

    assert set(RESOURCE_NAMES.values()) | {"UnetChunk1", "UnetChunk2"} == SWIFT_NAMES
    assert all(spec(c).package == f"{n}.mlpackage" for c, n in RESOURCE_NAMES.items())


# ------------------------------------------------------------------ bundles
@pytest.mark.slow
@linux_only
def test_fp16_run_bundles_the_fp16_packages(run, tmp_path):
    folder, _, fp16 = run
    report = bundle(folder, tmp_path, progress=False)
    resources = tmp_path / "Resources"
    assert report.resources == resources and report.variant == "fp16"
    assert _names(resources) == {"TextEncoder.mlpackage", "Unet.mlpackage", "VAEDecoder.mlpackage"} | TOKENIZER
    assert set(report.files) == _names(resources)
    for component, package in fp16.items():
        assert _same_package(resources / f"{RESOURCE_NAMES[component]}.mlpackage", package)
    for f in TOKENIZER:
        assert (resources / f).read_bytes() == (fp16["text_encoder"].parent / f).read_bytes()
    assert "VAEEncoder" in report.not_bundled  # the run converted none: optional for the Swift package
    assert not report.compiled and report.timings is None and report.parity is None


@pytest.mark.slow
@linux_only
def test_linux_reports_the_skipped_compile_and_the_command(run, tmp_path):
    report = bundle(run[0], tmp_path, progress=False)
    text = str(report)
    assert report.compile_status == COMPILE_SKIPPED == "compile: skipped, needs macOS (Core ML compiler)"
    assert COMPILE_SKIPPED in text.splitlines()
    assert report.compile_command.startswith("for p in ") and "xcrun coremlcompiler compile" in report.compile_command
    assert str(tmp_path / "Resources") in report.compile_command
    assert "predict parity and timing: skipped, needs macOS (Core ML runtime)" in text.splitlines()
    assert not any(n.endswith(".mlmodelc") for n in report.files)


@pytest.mark.slow
@linux_only
def test_compressed_variant_in_two_chunks(run, tmp_path):
    folder, name, fp16 = run
    report = bundle(folder, tmp_path, variant=name, chunks=2, progress=False)
    resources = tmp_path / "Resources"
    assert _names(resources) == {"TextEncoder.mlpackage", "UnetChunk1.mlpackage", "UnetChunk2.mlpackage",
                                 "VAEDecoder.mlpackage"} | TOKENIZER  # no Unet: Swift would load it instead
    chunks = [resources / f"UnetChunk{i}.mlpackage" for i in (1, 2)]
    files = [(c / WEIGHTS).stat().st_size for c in chunks]
    assert list(report.chunk_bytes) == files and imbalance(*files) <= 0.10
    variant_unet = folder / "variants" / name / "Unet.mlpackage"
    for i, c in enumerate(chunks, 1):
        assert any(l.compressed for l in package_sizes(c).layers)
        assert metadata(c)["chunk"] == str(i)
        assert metadata(c)["source_weights"] == metadata(variant_unet)["source_weights"]
        assert report.origins[c.name] == variant_unet
    # the components the variant left alone come from the run's fp16 packages
    assert _same_package(resources / "TextEncoder.mlpackage", fp16["text_encoder"])
    assert "UnetChunk1.mlpackage" in str(report) and "apart" in str(report)


@pytest.mark.slow
@linux_only
def test_plain_folder_of_packages(run, tmp_path):
    fp16 = run[2]
    report = bundle(fp16["unet"].parent, tmp_path, progress=False)
    assert report.variant is None
    assert _names(tmp_path / "Resources") == {"TextEncoder.mlpackage", "Unet.mlpackage", "VAEDecoder.mlpackage"} | TOKENIZER


@pytest.mark.slow
@linux_only
def test_same_bundle_is_rebuilt_a_different_one_refused(run, tmp_path):
    folder, name, _ = run
    bundle(folder, tmp_path, variant=name, progress=False)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "Resources").rglob("*")}
    bundle(folder, tmp_path, variant=name, progress=False)  # same inputs: rebuilt in place
    with pytest.raises(MismatchError, match="different bundle.*variant"):
        bundle(folder, tmp_path, variant="fp16", progress=False)
    with pytest.raises(MismatchError, match="chunks: 1 -> 2"):
        bundle(folder, tmp_path, variant=name, chunks=2, progress=False)
    assert set(before) == set((tmp_path / "Resources").rglob("*"))  # the refused ones changed nothing
    foreign = tmp_path / "other"
    (foreign / "Resources").mkdir(parents=True)
    (foreign / "Resources" / "Unet.mlmodelc").mkdir()
    with pytest.raises(MismatchError, match="did not write"):
        bundle(folder, foreign, progress=False)
    assert _names(foreign / "Resources") == {"Unet.mlmodelc"}


# ------------------------------------------------------------------ errors, before anything is written
@pytest.mark.slow
def test_unknown_variant_lists_the_names(run, tmp_path):
    folder, name, _ = run
    with pytest.raises(ConfigError, match=rf"'fp16', '{name}'.*did you mean '{name}'"):
        bundle(folder, tmp_path / "out", variant=name.replace("g16", "g61"), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_out_that_is_a_file_is_refused(run, tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        bundle(run[0], tmp_path / "out", progress=False)


@pytest.mark.slow
def test_packages_off_apples_io_contract_are_refused(run, tmp_path):
    import coremltools as ct

    fp16 = run[2]
    folder = tmp_path / "pkgs"
    folder.mkdir()
    for f in ("TextEncoder.mlpackage", "VAEDecoder.mlpackage", "vocab.json", "merges.txt"):
        (shutil.copytree if f.endswith(".mlpackage") else shutil.copy2)(fp16["unet"].parent / f, folder / f)
    m = ct.models.MLModel(str(fp16["unet"]), skip_model_load=True)
    spec = m.get_spec()
    ct.utils.rename_feature(spec, "noise_pred", "out")  # a name the Swift package would not find
    ct.models.MLModel(spec, weights_dir=m.weights_dir, skip_model_load=True).save(str(folder / "Unet.mlpackage"))
    with pytest.raises(PackageError, match="I/O contract.*noise_pred"):
        bundle(folder, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_arguments_are_refused_before_writing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="chunks must be one of 1, 2"):
        bundle(empty, out, chunks=3)
    with pytest.raises(ConfigError, match="holds no package"):
        bundle(empty, out)
    with pytest.raises(ConfigError, match="is no folder"):
        bundle(tmp_path / "missing", out)
    with pytest.raises(ConfigError, match="no run folder"):
        bundle(empty, out, variant="km4")
    (empty / "Unet.mlpackage").mkdir()
    with pytest.raises(ConfigError, match="lacks TextEncoder.mlpackage, VAEDecoder.mlpackage"):
        bundle(empty, out)
    if platform.system() != "Darwin":
        with pytest.raises(ConfigError, match="compile=True needs macOS"):
            bundle(empty, out, compile=True)
    assert not out.exists()


# ------------------------------------------------------------------ the macOS branch, as far as Linux goes
@pytest.mark.slow
def test_mac_branch_compiles_to_the_swift_names(run, tmp_path, monkeypatch):
    """With the compiler stubbed (it exists only on macOS): Resources ends up with .mlmodelc folders of
    exactly the Swift names, the report says what ran, and without the runtime says parity was skipped."""
    import coremltools.models.utils as ct_utils

    compiled = []

    def fake_compile(model, destination_path=None):
        compiled.append(destination_path)
        shutil.copytree(model, destination_path)
        return destination_path

    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(ct_utils, "compile_model", fake_compile)
    folder, name, _ = run
    report = bundle(folder, tmp_path, variant=name, chunks=2, progress=False)
    assert _names(tmp_path / "Resources") == {"TextEncoder.mlmodelc", "UnetChunk1.mlmodelc", "UnetChunk2.mlmodelc",
                                              "VAEDecoder.mlmodelc"} | TOKENIZER
    assert len(compiled) == 4 and report.compiled and report.compile_command is None
    assert report.compile_status.startswith("compile: compiled 4 packages")
    assert report.runtime_status.startswith("predict parity and timing: skipped, coremltools was installed without")
    assert report.timings is None and report.parity is None


# ------------------------------------------------------------------ CLI
@pytest.mark.slow
@linux_only
def test_cli_bundle(run, tmp_path, capsys):
    folder, name, _ = run
    assert main(["bundle", str(folder), "--out", str(tmp_path), "--variant", name, "--chunks", "2"]) == 0
    out = capsys.readouterr().out
    assert COMPILE_SKIPPED in out and "UnetChunk2.mlpackage" in out and "xcrun coremlcompiler compile" in out
    assert main(["bundle", str(folder), "--out", str(tmp_path), "--variant", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdwork: error: variant must be one of") and len(err.strip().splitlines()) == 1


def test_cli_bundle_errors(tmp_path, capsys):
    assert main(["bundle", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "holds no package" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["bundle", str(tmp_path), "--out", str(tmp_path / "out"), "--chunks", "3"])
    assert e.value.code == 2
    assert not (tmp_path / "out").exists()
