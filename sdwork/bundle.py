"""A Resources folder that Apple's Swift StableDiffusion package loads, from a run or a folder.

    bundle("runs/sweep", "ship/km4", variant="km4-g16")   # or: sdwork bundle runs/sweep --out ship/km4 ...

`StableDiffusionPipeline(resourcesAt:)` (swift/StableDiffusion/pipeline/
StableDiffusionPipeline+Resources.swift) opens fixed names in one folder: TextEncoder.mlmodelc,
Unet.mlmodelc or, when both exist, UnetChunk1.mlmodelc + UnetChunk2.mlmodelc, VAEDecoder.mlmodelc,
VAEEncoder.mlmodelc when present (image-to-image), and the tokenizer's vocab.json and merges.txt.
Compiling a package to .mlmodelc needs macOS: there the packages are compiled, and where the
Core ML runtime loads they are timed per compute unit and checked against torch. Elsewhere
Resources holds the .mlpackage files and the report gives the command to compile them on a Mac.

out/bundle.json records what the bundle was made from, so a rerun into the same folder rebuilds
it and a different bundle is refused instead of overwriting it.
"""
from __future__ import annotations

import hashlib
import json
import platform
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sdwork import validate
from sdwork.errors import ConfigError, MismatchError, PackageError
from sdwork.io import as_json, differences, write_json

# component -> the name the Swift package opens (without .mlmodelc); read from
# StableDiffusionPipeline+Resources.swift, not from the converter's tables
RESOURCE_NAMES = {"text_encoder": "TextEncoder", "unet": "Unet", "vae_decoder": "VAEDecoder",
                  "vae_encoder": "VAEEncoder"}
CHUNK_RESOURCES = ("UnetChunk1", "UnetChunk2")
TOKENIZER_FILES = ("vocab.json", "merges.txt")
REQUIRED = ("text_encoder", "unet", "vae_decoder")  # resourcesAt: fails without them
FP16 = "fp16"
STAMP = "bundle.json"
COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")
COMPILE_SKIPPED = "compile: skipped, needs macOS (Core ML compiler)"


@dataclass
class BundleReport:
    resources: Path
    source: Path
    variant: str | None  # the run's row, "fp16", or None for a plain folder of packages
    chunks: int
    files: tuple[str, ...]  # what Resources holds
    origins: dict[str, Path]  # each resource -> the package it was copied or split from
    compile_status: str
    compile_command: str | None  # what to run on a Mac, when nothing was compiled here
    runtime_status: str
    not_bundled: dict[str, str] = field(default_factory=dict)  # optional resource -> why it is absent
    chunk_bytes: tuple[int, int] | None = None  # weight.bin bytes of UnetChunk1, UnetChunk2
    timings: pd.DataFrame | None = None  # macOS: load and one prediction per compute unit
    parity: pd.DataFrame | None = None  # macOS: Core ML against torch

    @property
    def compiled(self) -> bool:
        return self.compile_command is None

    def lines(self) -> list[str]:
        what = f"{self.source}" + (f" variant {self.variant}" if self.variant else "")
        out = [f"bundle: {what} -> {self.resources} (chunks={self.chunks})"]
        for name in self.files:
            origin = self.origins.get(name)
            out.append(f"  {name}" + (f"  <- {origin}" if origin else ""))
        if self.chunk_bytes:
            a, b = self.chunk_bytes
            out.append(f"  UNet chunks: {a:,} and {b:,} weight bytes ({abs(a - b) / max(a, b):.1%} apart)")
        out += [f"  {name}: not bundled, {why}" for name, why in self.not_bundled.items()]
        out.append(self.compile_status)
        if self.compile_command:
            out.append(f"compile on a Mac: {self.compile_command}")
            out.append("  (then delete the .mlpackage folders: the Swift package opens only the .mlmodelc)")
        out.append(self.runtime_status)
        for title, table in (("timing", self.timings), ("parity", self.parity)):
            if table is not None and not table.empty:
                out += [f"{title}:", table.to_string(index=False)]
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def bundle(source, out, variant: str | None = None, chunks: int = 1, compile="auto",
           progress: bool = True) -> BundleReport:
    """Write <out>/Resources for the Swift package from a run folder (`variant`: a row name, or
    "fp16" / None for the fp16 packages) or a plain folder of .mlpackage files. Everything is
    checked before anything is written; see the module docstring."""
    validate.choice("chunks", chunks, (1, 2))
    validate.choice("compile", compile, ("auto", True, False))
    on_mac = platform.system() == "Darwin"
    if compile is True and not on_mac:
        raise ConfigError(f"compile=True needs macOS (the Core ML compiler); this is {platform.system()}. "
                          "Use compile='auto' to write the .mlpackage files and the command to compile them")
    src = _resolve(source, variant, progress)
    _check_contract(src.packages)
    out = _check_out_path(out)
    stamp = _stamp(src, chunks)
    _check_out(out, stamp)
    resources = out / "Resources"
    tmp = out / ".tmp-Resources"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        origins, chunk_bytes = _write(src, tmp, chunks, progress)
        skipped = COMPILE_SKIPPED if not on_mac else "compile: skipped, not asked (compile=False)"
        report = BundleReport(resources, src.folder, src.variant, chunks, (), origins,
                              skipped, _compile_command(resources), _runtime_skipped(on_mac),
                              src.not_bundled, chunk_bytes)
        if on_mac and compile:
            _on_mac(report, tmp, src)
        shutil.rmtree(resources, ignore_errors=True)
        tmp.rename(resources)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(out / STAMP, stamp)
    report.files = tuple(sorted(p.name for p in resources.iterdir()))
    return report


# ------------------------------------------------------------------ the source
@dataclass
class _Source:
    folder: Path
    variant: str | None
    packages: dict[str, Path]  # component -> package
    tokenizer: Path  # the folder holding vocab.json and merges.txt
    not_bundled: dict[str, str]
    pipe: object = None  # the fp16 torch pipeline, when the source is a run


def _resolve(source, variant, progress: bool) -> _Source:
    from sdwork.paths import run_dir

    folder = run_dir(source)  # relative to the checkout, as the sweep's run folders are
    if not folder.is_dir():
        raise ConfigError(f"source {str(source)!r} is no folder; pass a run folder (with results.jsonl) "
                          "or a folder of .mlpackage files")
    from sdwork.experiments.results import RESULTS

    if (folder / RESULTS).exists() or (folder / "config.json").exists():
        return _from_run(folder, variant, progress)
    if variant is not None:
        raise ConfigError(f"variant={variant!r} names a row of a run, but {folder} is no run folder "
                          f"(no {RESULTS}); leave the variant out to bundle the packages in it")
    return _from_folder(folder)


def _from_folder(folder: Path) -> _Source:
    found = {c: folder / f"{n}.mlpackage" for c, n in RESOURCE_NAMES.items() if (folder / f"{n}.mlpackage").is_dir()}
    if not found:
        raise ConfigError(f"{folder} holds no package the Swift package loads (looked for "
                          f"{', '.join(n + '.mlpackage' for n in RESOURCE_NAMES.values())}); convert first "
                          "(sdwork.convert.convert_pipeline) or pass a run folder")
    missing = [RESOURCE_NAMES[c] + ".mlpackage" for c in REQUIRED if c not in found]
    if missing:
        raise ConfigError(f"{folder} lacks {', '.join(missing)}: the Swift package needs a text encoder, a UNet "
                          "and a VAE decoder. For a compressed variant, pass its run folder and --variant: "
                          "the run supplies the fp16 packages of the components it did not compress")
    _check_tokenizer(folder)
    return _Source(folder, None, found, folder, _absent(found, "the folder has no VAEEncoder.mlpackage"))


def _from_run(run: Path, variant, progress: bool) -> _Source:
    from sdwork.experiments.results import rows

    names = [r["name"] for r in rows(run)]
    name = FP16 if variant is None else validate.choice("variant", variant, [FP16, *names])
    compressed = {} if name == FP16 else _compressed(run, name)
    pipe, fp16 = _fp16_packages(run, compressed, progress)
    packages = {**fp16, **compressed}
    tokenizer = Path(fp16["text_encoder"]).parent
    _check_tokenizer(tokenizer)
    why = "the run converted no VAE encoder (none of its recipes compressed one); image-to-image only"
    return _Source(run, name, packages, tokenizer, _absent(packages, why), pipe)


def _compressed(run: Path, name: str) -> dict[str, Path]:
    """{component: package} of the components a variant compressed (its folder holds only those)."""
    from sdwork.convert.components import spec
    from sdwork.experiments.results import rows

    row = next(r for r in rows(run) if r["name"] == name)
    folder = run / row.get("packages", f"variants/{name}")
    found = {c: folder / spec(c).package for c in RESOURCE_NAMES if (folder / spec(c).package).is_dir()}
    if not found:
        raise ConfigError(f"variant {name!r} has no packages in {folder}: they were dropped (--drop-packages) or "
                          "deleted; run the recipe again with its packages kept")
    return found


def _fp16_packages(run: Path, compressed: dict, progress: bool):
    """The fp16 pipeline of a run and the fp16 packages its variants started from (the sweep's cached
    conversion, or converted again from the run's model when the cache was cleared)."""
    from sdwork.compress.recipe import COMPONENTS
    from sdwork.convert.cache import fp16_packages
    from sdwork.experiments.experiment import GENERATION_COMPONENTS
    from sdwork.load import load_pipeline
    from sdwork.weights import round_weights_to_fp16, weights_hash

    config = json.loads((run / "config.json").read_text())
    pipe = load_pipeline(config["model"], progress=False)
    round_weights_to_fp16(pipe)
    if weights_hash(pipe) != config["weights_hash"]:
        raise MismatchError(f"the model {config['model']!r} now has other weights than when {run} was made "
                            f"(weights {weights_hash(pipe)}, the run's {config['weights_hash']}); bundle from "
                            "the packages themselves: pass the folder that holds them")
    # the components the sweep converted, so the cached conversion is found (Experiment.fp16_packages)
    wanted = tuple(c for c in COMPONENTS if c in set(GENERATION_COMPONENTS) | set(compressed))
    return pipe, fp16_packages(pipe, wanted, progress=progress, attention=config.get("attention", "original"))


def _absent(packages: dict, why: str) -> dict[str, str]:
    return {} if "vae_encoder" in packages else {RESOURCE_NAMES["vae_encoder"]: why}


def _check_tokenizer(folder: Path) -> None:
    missing = [f for f in TOKENIZER_FILES if not (folder / f).is_file()]
    if missing:
        raise ConfigError(f"{folder} has no {' or '.join(missing)}: the Swift package's tokenizer needs both; "
                          "write them with sdwork.convert.tokenizer_files.write_tokenizer_files(pipe.tokenizer, "
                          f"{str(folder)!r})")


def _check_contract(packages: dict[str, Path]) -> None:
    """Apple's I/O names, shapes and dtypes, for packages sdwork converted (they record their shapes)."""
    from sdwork.coreml.contract import contract_table
    from sdwork.coreml.package import metadata

    if not all(metadata(p).get("shapes") for p in packages.values()):
        return  # made elsewhere: nothing recorded to check against
    table = contract_table(packages)
    bad = table[~table["matches"]]
    if not bad.empty:
        r = bad.iloc[0]
        raise PackageError(f"{packages[r['component']]} does not follow Apple's I/O contract, which the Swift "
                           f"package expects: {r['io']} {r['name']} should be {r['expected']}, it is {r['got']} "
                           f"({len(bad)} difference(s)); re-convert with io='apple'")


# ------------------------------------------------------------------ the out folder
def _check_out_path(out) -> Path:
    if out is None:
        raise ConfigError("out is missing: give the folder the bundle goes to, e.g. out='ship/my-model'")
    from sdwork.paths import run_dir

    out = run_dir(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={str(out)!r} is a file; pass a folder (Resources/ is written inside it)")
    return out


def _stamp(src: _Source, chunks: int) -> dict:
    """What the bundle is made from: source, variant, chunking and each package's program digest."""
    return dict(source=str(src.folder.resolve()), variant=src.variant, chunks=chunks,
                packages={c: _package_digest(p) for c, p in sorted(src.packages.items())})


def _package_digest(package: Path) -> str:
    from sdwork.coreml.sizes import MODEL, WEIGHTS

    h = hashlib.sha256((package / MODEL).read_bytes())
    weights = package / WEIGHTS
    h.update(str(weights.stat().st_size if weights.exists() else 0).encode())
    return h.hexdigest()[:16]


def _check_out(out: Path, stamp: dict) -> None:
    """Refuse a Resources folder that holds another bundle (or one sdwork did not write)."""
    resources = out / "Resources"
    if not resources.is_dir() or not any(resources.iterdir()):
        return
    old = out / STAMP
    if not old.exists():
        raise MismatchError(f"{resources} already holds files that sdwork bundle did not write; refusing to "
                            "overwrite them: pass another --out, or delete that folder")
    diff = differences(json.loads(old.read_text()), as_json(stamp))
    if diff:
        raise MismatchError(f"{resources} holds a different bundle ({'; '.join(diff)}); refusing to overwrite "
                            "it: pass another --out, or delete that folder to replace it")


# ------------------------------------------------------------------ writing
def _write(src: _Source, dest: Path, chunks: int, progress: bool):
    """Copy (or split) the packages and the tokenizer files into dest; returns (origins, chunk bytes)."""
    origins, chunk_bytes = {}, None
    for component, package in src.packages.items():
        if component == "unet" and chunks == 2:
            chunk_bytes = _write_chunks(package, dest, progress)
            origins.update({f"{n}.mlpackage": package for n in CHUNK_RESOURCES})
            continue
        name = f"{RESOURCE_NAMES[component]}.mlpackage"
        shutil.copytree(package, dest / name)
        origins[name] = package
    for f in TOKENIZER_FILES:
        shutil.copy2(src.tokenizer / f, dest / f)
        origins[f] = src.tokenizer / f
    return origins, chunk_bytes


def _write_chunks(unet: Path, dest: Path, progress: bool) -> tuple[int, int]:
    from sdwork.coreml.chunk import chunk_weight_bytes, split_unet

    scratch = dest / ".chunks"
    paths = split_unet(unet, scratch, progress=progress)
    for p, name in zip(paths, CHUNK_RESOURCES):
        p.rename(dest / f"{name}.mlpackage")  # the weight maps beside them stay behind: no Swift resource
    shutil.rmtree(scratch)
    return chunk_weight_bytes(*(dest / f"{n}.mlpackage" for n in CHUNK_RESOURCES))


def _compile_command(resources: Path) -> str:
    r = shlex.quote(str(resources))
    return f'for p in {r}/*.mlpackage; do xcrun coremlcompiler compile "$p" {r}/; done'


def _runtime_skipped(on_mac: bool) -> str:
    if on_mac:
        return "predict parity and timing: skipped, nothing was compiled"
    return "predict parity and timing: skipped, needs macOS (Core ML runtime)"


# ------------------------------------------------------------------ macOS only
def _on_mac(report: BundleReport, dest: Path, src: _Source) -> None:
    """Compile every package in dest to .mlmodelc (removing the package), then, where the Core ML
    runtime loads, time each and check it against torch. Not run on Linux: kept to library calls."""
    from coremltools.models.utils import compile_model

    from sdwork.evaluate.coreml_pipeline import no_runtime_reason

    inputs = {}
    for package in sorted(dest.glob("*.mlpackage")):
        inputs[package.stem] = _input_features(package)
        compile_model(str(package), destination_path=str(dest / f"{package.stem}.mlmodelc"))
        shutil.rmtree(package)
    report.compile_status = f"compile: compiled {len(inputs)} packages with coremltools.models.utils.compile_model"
    report.compile_command = None
    reason = no_runtime_reason()
    if reason:
        report.runtime_status = f"predict parity and timing: skipped, {reason}"
        return
    report.timings = _timings(dest, inputs)
    ran = ["timing"]
    rows = []
    if src.pipe is not None:
        from sdwork.evaluate.parity import parity_report

        rows.append(parity_report(src.pipe, src.packages, progress=False))
        ran.append("parity of the source packages against torch (MLModel.predict)")
    if report.chunks == 2:
        rows.append(pd.DataFrame([_chunk_parity(dest, src.packages["unet"], inputs)]))
        ran.append("UnetChunk2(UnetChunk1(x)) against Unet")
    report.parity = pd.concat(rows, ignore_index=True) if rows else None
    missing = "" if src.pipe is not None else "; parity against torch skipped: a plain folder has no torch pipeline"
    report.runtime_status = f"predict parity and timing: ran {', '.join(ran)}{missing}"


def _input_features(package: Path) -> dict:
    """{input name: (shape, numpy dtype)} from the package's spec."""
    import numpy as np
    from coremltools.proto.FeatureTypes_pb2 import ArrayFeatureType as A

    from sdwork.coreml.package import open_package

    dtypes = {A.FLOAT16: np.float16, A.FLOAT32: np.float32, A.INT32: np.int32}
    spec = open_package(package).get_spec()
    return {f.name: (tuple(f.type.multiArrayType.shape), dtypes[f.type.multiArrayType.dataType])
            for f in spec.description.input}


def _timings(dest: Path, inputs: dict) -> pd.DataFrame:
    """Load and one prediction per compute unit; zeros are valid for every input (token id 0 too)."""
    import coremltools as ct
    import numpy as np

    rows = []
    for name, features in inputs.items():
        feed = {k: np.zeros(shape, dtype) for k, (shape, dtype) in features.items()}
        for unit in COMPUTE_UNITS:
            t0 = time.perf_counter()
            model = ct.models.CompiledMLModel(str(dest / f"{name}.mlmodelc"), compute_units=getattr(ct.ComputeUnit, unit))
            t1 = time.perf_counter()
            model.predict(feed)
            rows.append(dict(resource=name, compute_unit=unit, load_s=t1 - t0, predict_s=time.perf_counter() - t1))
            del model
    return pd.DataFrame(rows)


def _chunk_parity(dest: Path, unet: Path, inputs: dict) -> dict:
    """The compiled chunks run in sequence as the Swift package runs them (chunk 2 gets the original
    inputs merged with chunk 1's outputs), against the unsplit UNet."""
    import coremltools as ct
    import numpy as np

    from sdwork.evaluate.psnr import signal_psnr

    rng = np.random.default_rng(0)
    first, second = CHUNK_RESOURCES
    feed = {k: rng.standard_normal(shape).astype(dtype) for k, (shape, dtype) in inputs[first].items()}
    cpu = ct.ComputeUnit.CPU_ONLY
    whole = ct.models.MLModel(str(unet), compute_units=cpu).predict(feed)
    one, two = (ct.models.CompiledMLModel(str(dest / f"{n}.mlmodelc"), compute_units=cpu) for n in CHUNK_RESOURCES)
    merged = {**feed, **one.predict(feed)}
    got = two.predict({k: merged[k] for k in inputs[second]})
    db = min(signal_psnr(np.asarray(whole[k]), np.asarray(got[k])) for k in whole)
    return dict(component="unet_chunks", macos_psnr=db, macos_pass=bool(db >= 35.0),
                macos_status="ran UnetChunk1 then UnetChunk2 (CPU_ONLY) against Unet.mlpackage")
