"""Copy a package's exact weights into the torch pipeline, so a (compressed) package can be
evaluated on Linux by running its weights in PyTorch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sdwork.convert import components as C
from sdwork.coreml.package import PackageError, iter_package_weights, metadata, open_package
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
    from these very weights (its metadata's fp16 hash); off only where `module` is a blank copy.

    Weights are decompressed one at a time and copied at once (iter_package_weights), so a
    full-size UNet's dense weights never exist twice: only the package's stored form and one layer."""
    mlmodel = open_package(package)
    wm = check_belongs(module, component, package, mlmodel, same_weights)
    params = dict(module.named_parameters())
    by_const: dict[str, list[str]] = {}
    for name, e in wm.entries.items():
        if e.kind == "identity":
            params[name].fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            by_const.setdefault(e.const, []).append(name)
    written: set[str] = set()
    for const, value in iter_package_weights(mlmodel):
        names = by_const.get(const)
        if names and const in written:
            _check_same(value, params[names[0]], const, package)
        elif names:
            for name in names:
                params[name].copy_(_as_tensor(value, params[name], name, package))
            written.add(const)
    missing = sorted(set(by_const) - written)
    if missing:
        raise PackageMismatchError(f"{package} has no constant {missing[0]} (for {by_const[missing[0]][0]}): the "
                                   "package was edited after conversion or its weight map belongs to another package")
    return wm


def _check_same(value: np.ndarray, p: torch.Tensor, const: str, package) -> None:
    if not torch.equal(_as_tensor(value, p, const, package), p):
        raise PackageError(f"two different constants share the name {const!r} in {package}; convert it again")


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
    return torch.from_numpy(np.ascontiguousarray(value).astype(np.float32)).reshape(p.shape).to(p.device, p.dtype)
