"""torch.export + ct.convert of each pipeline component into an fp16 ML Program package.

torch.jit.trace is broken with numpy 2.4 in coremltools 9.0, so every component
goes through torch.export(...).run_decompositions({}) (see shared/REFERENCE.md).
"""
from __future__ import annotations

import contextlib
import functools
import gc
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sdwork.convert import components as C
from sdwork.coreml.package import package_weights, set_metadata
from sdwork.convert.tokenizer_files import write_tokenizer_files
from sdwork.convert.weightmap import build_weight_map, sidecar
from sdwork.quiet import coremltools_progress
from sdwork.weights import fp16_hash
from sdwork.errors import ConfigError

# Bump when a package's layout or metadata changes: cached fp16 packages are keyed by it.
FORMAT_VERSION = "3"


def convert_pipeline(pipe, out_dir, components=C.COMPONENTS, target: str = "iOS18", unet_batch: int = 2,
                     progress: bool = True, source=None, io: str = "apple", attention: str = "original",
                     chunks: int = 1) -> dict[str, Path]:
    """Convert the pipeline's components to <out_dir>/<Name>.mlpackage (+ weight maps, tokenizer files).

    Returns {component: package path}; the tokenizer files are written when the pipeline has one.
    io: "apple" (the Swift package's contract) or "diffusers"; attention: the UNet's layout,
    "original", "split_einsum" or "split_einsum_v2" (Neural Engine). chunks=2 also writes the UNet
    as UnetChunk1 / UnetChunk2 beside Unet.mlpackage (see unet_chunks).
    `source` (another pipeline) names the model the packages derive from when `pipe` holds weights
    changed from it (palettized in torch, DKM): the packages are then evaluated against `source`.
    """
    components = C.check_components(components)
    _check_target(target)
    check_unet_layout(pipe, components, unet_batch, io, attention)
    _check_chunks(chunks, components)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if getattr(pipe, "tokenizer", None) is not None:
        write_tokenizer_files(pipe.tokenizer, out_dir)
    paths = {}
    for comp in tqdm(components, desc="convert", disable=not progress):
        paths[comp] = convert_component(pipe, comp, out_dir, target=target, unet_batch=unet_batch,
                                        progress=progress, source=source, io=io, attention=attention)
        # coremltools' programs hold reference cycles: free this component's (GBs at full size)
        # before the next one is exported, not whenever the collector next runs
        gc.collect()
    if "unet" in paths:
        _write_chunks(paths["unet"], chunks)
    return paths


CHUNK_PACKAGES = ("UnetChunk1.mlpackage", "UnetChunk2.mlpackage")


def unet_chunks(folder) -> dict[str, Path]:
    """{"unet_chunk1": path, "unet_chunk2": path} of the UNet chunks in `folder` ({} when not chunked)."""
    found = [Path(folder) / n for n in CHUNK_PACKAGES]
    return {f"unet_chunk{i}": p for i, p in enumerate(found, 1)} if all(p.exists() for p in found) else {}


def _write_chunks(unet_package: Path, chunks: int) -> None:
    # chunks of an earlier conversion would belong to other weights: replaced or removed, never kept
    for name in CHUNK_PACKAGES:
        shutil.rmtree(unet_package.parent / name, ignore_errors=True)
    if chunks == 2:
        from sdwork.coreml.chunk import split_unet

        split_unet(unet_package, unet_package.parent)


def _check_chunks(chunks, components) -> None:
    from sdwork import validate

    validate.choice("chunks", chunks, (1, 2))
    if chunks == 2 and "unet" not in components:
        raise ConfigError("chunks=2 splits the UNet, but components does not include 'unet'; add it or use chunks=1")


def check_unet_layout(pipe, components, unet_batch: int, io: str, attention: str) -> C.Shapes:
    """Every refusal of a layout before anything is exported or written."""
    shapes = C.Shapes.of(pipe, unet_batch, io, attention)
    if attention != "original" and "unet" in components:
        from sdwork.convert.neural_engine import check_unet

        check_unet(C.torch_module(pipe, "unet"), attention)
    return shapes


def convert_component(pipe, component: str, out_dir, target: str = "iOS18", unet_batch: int = 2,
                      progress: bool = True, source=None, io: str = "apple", attention: str = "original") -> Path:
    """Export, convert, verify the weight map and save one component; returns the package path."""
    sp = C.spec(component)
    _check_target(target)
    module = C.torch_module(pipe, component)
    shapes = check_unet_layout(pipe, (component,), unet_batch, io, attention)
    _check_float32(module, component)
    wrapper = sp.wrap(module, shapes)
    with _eval(module), torch.no_grad():
        ep = export(wrapper, sp.inputs(shapes))
    placeholders = _placeholders(ep, wrapper, module)
    mlmodel = to_coreml(ep, sp.inputs(shapes), sp.outputs(shapes), target, progress)
    del ep
    wm = build_weight_map(component, sp.module, C.owned_parameters(pipe, component), placeholders,
                          package_weights(mlmodel))
    describe(mlmodel, sp, shapes)
    set_metadata(mlmodel, {
        "format": FORMAT_VERSION,
        "component": component,
        **identity(source if source is not None else pipe, component),
        "target": target,
        "io": io,
        "attention": attention if component == "unet" else "original",
        "shapes": json.dumps(shapes.__dict__),
        "weightmap": wm.to_json(indent=None),
    })
    path = Path(out_dir) / sp.package
    _save(mlmodel, path)
    sidecar(path).write_text(wm.to_json())
    del mlmodel, wrapper
    return path


def identity(pipe, component: str) -> dict[str, str]:
    """The metadata that ties a package to the model it was converted from: the model's name and
    the fp16 hash of the weights the package holds (checked when a package is evaluated)."""
    return {"model": model_name(pipe), "source_weights": fp16_hash(C.owned_parameters(pipe, component))}


def model_name(pipe) -> str:
    return str(getattr(pipe, "model_spec", getattr(pipe, "name_or_path", "?")))


# ------------------------------------------------------------------ steps
def export(wrapper: torch.nn.Module, inputs: list[C.Tensor]):
    args = tuple(example_input(t) for t in inputs)
    return torch.export.export(wrapper, args).run_decompositions({})


def example_input(t: C.Tensor) -> torch.Tensor:
    # tracing needs values of the right shape only; fixed seed keeps it deterministic
    g = torch.Generator().manual_seed(0)
    if t.name == "input_ids":
        return torch.randint(0, 2, t.shape, generator=g, dtype=torch.int32).to(torch.float32 if t.dtype != np.int32 else torch.int32)
    if t.name == "timestep":
        return torch.full(t.shape, 500.0)
    return torch.randn(t.shape, generator=g)


def to_coreml(ep, inputs: list[C.Tensor], outputs: list[C.Tensor], target: str, progress: bool = True):
    import coremltools as ct

    register_alias_op()
    with coremltools_progress(progress):
        return ct.convert(
            ep,
            convert_to="mlprogram",
            minimum_deployment_target=getattr(ct.target, target),
            compute_precision=ct.precision.FLOAT16,
            inputs=[ct.TensorType(name=t.name, shape=t.shape, dtype=t.dtype) for t in inputs],
            outputs=[ct.TensorType(name=t.name, dtype=t.dtype) for t in outputs],
            skip_model_load=True,  # no Core ML runtime on Linux; on macOS loading compiles (slow)
        )


def describe(mlmodel, sp: C.Component, shapes: C.Shapes) -> None:
    mlmodel.short_description = sp.description
    for t in sp.inputs(shapes):
        mlmodel.input_description[t.name] = t.description
    for t in sp.outputs(shapes):
        mlmodel.output_description[t.name] = t.description


@functools.cache
def register_alias_op() -> None:
    """coremltools 9.0 registers aten alias_copy but not alias (CLIPTextModel's position_ids
    buffer emits it): alias is a pass-through, so register it as one."""
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY, register_torch_op

    if _TORCH_OPS_REGISTRY.get_func("alias") is not None:
        return

    @register_torch_op
    def alias(context, node):
        x = _get_inputs(context, node, expected=1)[0]
        context.add(x, torch_name=node.name)


# ------------------------------------------------------------------ helpers
def _placeholders(ep, wrapper: torch.nn.Module, module: torch.nn.Module) -> dict[str, str]:
    """Exported placeholder name (p_<attr>_<param>) -> parameter name relative to the pipeline module.

    A wrapper holds the module's own parameters, or views of them (the Neural Engine UNet sees a
    Linear weight as a 1x1 conv's): found by storage, never by copying."""
    relative = {id(p): n for n, p in module.named_parameters()}
    by_storage = {(p.data_ptr(), p.numel()): n for n, p in module.named_parameters()}
    in_wrapper = dict(wrapper.named_parameters())

    def name(fqn):
        p = in_wrapper[fqn]
        return relative.get(id(p)) or by_storage[(p.data_ptr(), p.numel())]

    return {ph: name(fqn) for ph, fqn in ep.graph_signature.inputs_to_parameters.items()}


def _check_target(target: str) -> None:
    import coremltools as ct

    ok = [t.name for t in ct.target if t.name.startswith("iOS") and int(t.name[3:]) >= 16]
    if target not in ok:
        raise ConfigError(f"unknown or unsupported target {target!r}; choose from {', '.join(ok)} "
                         "(iOS18 is needed for per-grouped-channel LUTs)")


def _check_float32(module: torch.nn.Module, component: str) -> None:
    dtypes = {p.dtype for p in module.parameters()}
    if dtypes != {torch.float32}:
        raise ConfigError(f"{component} has {sorted(map(str, dtypes))} weights; load the pipeline in float32 "
                         "(load_pipeline's default): conversion rounds to fp16 itself")


@contextlib.contextmanager
def _eval(module: torch.nn.Module):
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, t in modes.items():
            m.training = t


def _save(mlmodel, path: Path) -> None:
    """Save beside, then swap in: an interrupted conversion never leaves half a package."""
    tmp = path.with_name(".tmp-" + path.name)  # coremltools insists on the .mlpackage suffix
    shutil.rmtree(tmp, ignore_errors=True)
    mlmodel.save(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
