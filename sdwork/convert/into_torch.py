"""Copy a package's exact weights into the torch pipeline, so a (compressed) package can be
evaluated on Linux by running its weights in PyTorch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sdwork.convert import components as C
from sdwork.coreml.package import PackageError, metadata, open_package, package_weights
from sdwork.convert.weightmap import WeightMap, read_weight_map
from sdwork.weights import fp16_hash


class PackageMismatchError(PackageError):
    """The package was not converted from a model of this architecture or component."""


def load_packages_into_pipeline(pipe, packages: dict[str, Path]):
    """Overwrite every weight of pipe's components with the values their packages compute with.

    Returns pipe (changed in place). Raises PackageMismatchError for a package of another
    component or model, PackageError for a missing or damaged one.
    """
    for component, package in packages.items():
        load_package_into_module(C.torch_module(pipe, component), component, package)
    return pipe


@torch.no_grad()
def load_package_into_module(module: torch.nn.Module, component: str, package, same_weights: bool = True) -> WeightMap:
    """Copy the package's weights into `module`. same_weights: first check the package was converted
    from these very weights (its metadata's fp16 hash); off only where `module` is a blank copy."""
    mlmodel = open_package(package)
    wm = check_belongs(module, component, package, mlmodel, same_weights)
    weights = package_weights(mlmodel)
    params = dict(module.named_parameters())
    for name, e in wm.entries.items():
        p = params[name]
        if e.kind == "identity":
            p.fill_(1.0 if name.endswith("weight") else 0.0)
            continue
        if e.const not in weights:
            raise PackageMismatchError(f"{package} has no constant {e.const} (for {name}): the package was edited "
                                       f"after conversion or its weight map belongs to another package")
        p.copy_(_as_tensor(weights[e.const], p, name, package))
    return wm


def check_belongs(module: torch.nn.Module, component: str, package, mlmodel=None, same_weights: bool = True) -> WeightMap:
    """The weight map, after checking the package holds `component` of a model with these parameters
    (and, with same_weights, that it was converted from exactly these weights)."""
    sp = C.spec(component)
    meta = metadata(mlmodel if mlmodel is not None else package)
    if meta.get("component", component) != component:
        raise PackageMismatchError(f"{package} holds the {meta['component']} component, not {component}: "
                                   f"pass it under the key {meta['component']!r}")
    wm = read_weight_map(package)
    if wm.component != component:
        raise PackageMismatchError(f"the weight map of {package} is for {wm.component}, not {component}")
    own = {n: tuple(p.shape) for n, p in module.named_parameters() if sp.owns(n)}
    mapped = {n: e.shape for n, e in wm.entries.items()}
    if own != mapped:
        missing = sorted(set(own) - set(mapped))
        extra = sorted(set(mapped) - set(own))
        reshaped = sorted(n for n in set(own) & set(mapped) if own[n] != mapped[n])
        detail = "; ".join(f"{what}: {len(names)} e.g. {names[0]}" for what, names in
                           (("not in the package", missing), ("not in the model", extra),
                            ("different shape", reshaped)) if names)
        raise PackageMismatchError(
            f"{package} does not belong to this model's {component} ({detail}): it was converted from "
            f"another model (package model: {meta.get('model', '?')}); convert this pipeline's own packages"
        )
    if same_weights:
        _check_source(module, sp, package, meta)
    return wm


def _check_source(module: torch.nn.Module, sp, package, meta: dict) -> None:
    if "source_weights" not in meta:
        raise PackageMismatchError(f"{package} carries no source identity (converted by an older sdwork): "
                                   "re-convert it with sdwork.convert.convert_pipeline")
    own = fp16_hash({n: p for n, p in module.named_parameters() if sp.owns(n)})
    if meta["source_weights"] != own:
        raise PackageMismatchError(
            f"{package} was converted from other weights than this model's {sp.name} (package: model "
            f"{meta.get('model', '?')!r}, weights {meta['source_weights']}; this model: weights {own}): "
            "evaluate it with the model it came from, or convert this model's own packages")


def _as_tensor(value: np.ndarray, p: torch.Tensor, name: str, package) -> torch.Tensor:
    if value.size != p.numel():
        raise PackageMismatchError(f"{package}: the constant for {name} has {value.size} values, the parameter "
                                   f"{tuple(p.shape)} needs {p.numel()}: the package belongs to another model")
    return torch.from_numpy(np.ascontiguousarray(value).astype(np.float32)).reshape(p.shape).to(p.dtype)
