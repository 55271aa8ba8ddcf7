"""Simple weight perturbations: a known, cheap damage to score against the baseline.

Linear n-bit rounding snaps every weight matrix or kernel to 2^(n-1)-1 evenly
spaced levels either side of zero, with one scale per output channel (the
symmetric per-channel scheme of coremltools' linear_quantize_weights). It
shows what the drift metrics see before any real Core ML compression runs.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from sdwork.weights import components


@dataclass(frozen=True)
class PerturbReport:
    """What was rounded and what was left alone (1-D biases and norm scales stay as they are)."""

    bits: int
    rounded_tensors: int
    rounded_params: int
    kept_tensors: int
    kept_params: int

    def __str__(self):
        return (
            f"{self.bits}-bit linear rounding: {self.rounded_tensors} weight tensors "
            f"({self.rounded_params:,} values) rounded; {self.kept_tensors} 1-D tensors "
            f"({self.kept_params:,} values: biases, norm scales) kept as they were"
        )


def round_linear(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel (axis 0) rounding of `w` to `bits` bits."""
    _check_bits(bits)
    qmax = 2 ** (bits - 1) - 1
    flat = w.reshape(w.shape[0], -1)
    scale = flat.abs().amax(dim=1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero channel stays zero
    return (torch.round(flat / scale).clamp(-qmax, qmax) * scale).reshape(w.shape).to(w.dtype)


@torch.no_grad()
def round_weights_linear(pipe, bits: int) -> PerturbReport:
    """Round every weight with 2+ dimensions of every pipeline component in place."""
    _check_bits(bits)
    counts = [0, 0, 0, 0]
    for module in components(pipe).values():
        for p in module.parameters():
            if not p.is_floating_point():
                continue
            if p.ndim >= 2:
                p.copy_(round_linear(p, bits))
                counts[0] += 1
                counts[1] += p.numel()
            else:
                counts[2] += 1
                counts[3] += p.numel()
    return PerturbReport(bits, *counts)


def perturbed_copy(pipe, bits: int):
    """(a deep copy of `pipe` with weights rounded to `bits` bits, its PerturbReport); `pipe` is untouched."""
    other = copy.deepcopy(pipe)
    return other, round_weights_linear(other, bits)


def _check_bits(bits):
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an integer from 2 to 16, got {bits!r}")
