"""fp16 rounding and weight hashes of a pipeline's torch modules.

The fp16 baseline every variant is scored against is the pipeline with every weight rounded
to fp16, as a Core ML package stores it. Hashes identify weights in cache keys, row keys and
package metadata; `fp16_hash` is the same whether or not the module was rounded already.
"""
from __future__ import annotations

import hashlib

import torch


def components(pipe) -> dict[str, torch.nn.Module]:
    """The pipeline's torch modules by name (text_encoder, unet, vae, ...)."""
    return {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


def round_weights_to_fp16(pipe):
    """Every weight of every component rounded to fp16 in place, computed in fp32 on the CPU
    (fp16 CPU kernels are slow and less deterministic, so the rounding is what we keep)."""
    for module in components(pipe).values():
        round_module_to_fp16(module)
    return pipe


@torch.no_grad()
def round_module_to_fp16(module: torch.nn.Module) -> torch.nn.Module:
    """Every float parameter and buffer of module rounded to fp16 in place (dtype kept)."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            t.copy_(t.to(torch.float16).to(t.dtype))
    return module


def weights_hash(pipe) -> str:
    """sha256 over every component's weights, in a stable order."""
    h = hashlib.sha256()
    for name, module in sorted(components(pipe).items()):
        _hash_weights(h, module, f"{name}.")
    return h.hexdigest()[:16]


def module_hash(module) -> str:
    """sha256 of one torch module's weights (e.g. a CLIP scorer), in a stable order."""
    h = hashlib.sha256()
    _hash_weights(h, module, "")
    return h.hexdigest()[:16]


def fp16_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of named tensors rounded to fp16: what a package converted from them holds, the
    same whether or not they were rounded already."""
    h = hashlib.sha256()
    _hash_tensors(h, tensors, "", fp16=True)
    return h.hexdigest()[:16]


def _hash_weights(h, module, prefix: str) -> None:
    _hash_tensors(h, module.state_dict(), prefix)


def _hash_tensors(h, tensors: dict, prefix: str, fp16: bool = False) -> None:
    for k, v in sorted(tensors.items()):
        v = v.detach()
        if fp16 and v.is_floating_point():
            v = v.to(torch.float16)
        h.update(f"{prefix}{k}:{tuple(v.shape)}:{v.dtype if not fp16 else 'fp16'}".encode())
        h.update(v.contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())  # view(-1): 0-d too
