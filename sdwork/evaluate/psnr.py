"""Every PSNR sdwork reports, in one place, each named for what it averages.

- `image_psnr(ref, img)`: one uint8 image against its reference, peak 255 (scikit-image); inf
  when identical.
- `pooled_psnr(mse)`: 10 log10(255^2 / mean MSE) over a set of images (a prompt, a run): the
  `psnr` column of results. Not the mean of per-image PSNRs, which one identical image makes inf.
- `signal_psnr(ref, x)`: 20 log10((max|ref| + 1e-5) / (rms(ref - x) + 1e-10)) for float tensors
  (package outputs, latents). This is Apple's ml-stable-diffusion formula with one deliberate
  difference: Apple's `compute_psnr` takes the peak from the tensor under test, max|x|; sdwork
  takes it from the reference, so a damaged output cannot raise its own score.
- `latent_psnr(refs, xs)`: signal_psnr per image, averaged (Apple's mixed-bit pre-analysis signal).
"""
from __future__ import annotations

import math

import numpy as np


def image_psnr(ref: np.ndarray, img: np.ndarray) -> float:
    """PSNR in dB of a uint8 image against its reference; inf when they are identical."""
    from skimage.metrics import peak_signal_noise_ratio

    if np.array_equal(ref, img):
        return math.inf  # MSE is 0: say so instead of dividing by zero
    return float(peak_signal_noise_ratio(ref, img, data_range=255))


def pooled_psnr(mse: float) -> float:
    """PSNR of a set of uint8 images from their mean squared error (peak 255)."""
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def signal_psnr(ref: np.ndarray, x: np.ndarray) -> float:
    """PSNR in dB of a float tensor against its reference, peak max|ref| (about 200 when equal)."""
    ref, x = np.asarray(ref, np.float64), np.asarray(x, np.float64)
    rmse = math.sqrt(float(np.mean((ref - x) ** 2)))
    return 20 * math.log10((float(np.abs(ref).max()) + 1e-5) / (rmse + 1e-10))


def latent_psnr(refs: np.ndarray, xs: np.ndarray) -> float:
    """signal_psnr of each image's latents against its reference, averaged over images."""
    return float(np.mean([signal_psnr(r, x) for r, x in zip(refs, xs)]))
