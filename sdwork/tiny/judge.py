"""Read the attributes back from an image with pixel statistics alone.

Independent of any learned model: it uses the generator's own colour tables.
The background is the median border colour; the shape is the largest blob of
pixels far from it; its colour is the nearest table colour to the blob's
median. Its shape: an upright triangle holds its mass low (centroid 1/6 of
its height below the box centre; circles and squares are symmetric), and a
square fills its bounding box (~1.0) where a circle fills pi/4. Both cues
survive the blur of a VAE decoder. Its size follows from its extent.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from sdwork.tiny.dataset import BACKGROUNDS, COLOURS, Attrs

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that counts as shape
TRIANGLE_OFFSET = 0.075  # centroid below box centre / height: triangles 0.14-0.17, others < 0.02
SQUARE_FILL = 0.87  # fill ratio between circles (0.73-0.85) and squares (0.98-1.0)
LARGE_EXTENT = 24  # pixels of bounding-box side: small shapes span 14-22, large ones 29-44


def _nearest(rgb: np.ndarray, table: dict[str, tuple]) -> str:
    names = list(table)
    d = np.linalg.norm(np.asarray([table[n] for n in names], float) - rgb, axis=1)
    return names[int(np.argmin(d))]


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
    return labels == (1 + int(np.argmax(sizes)))


def judge(image: np.ndarray) -> Attrs | None:
    """The attributes an image shows, or None when no shape is visible."""
    img = image.astype(np.float64)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    mask = np.linalg.norm(img - bg, axis=-1) > FOREGROUND_DISTANCE
    blob = _largest_blob(mask)
    area = float(blob.sum())
    if area < 20:
        return None
    ys, xs = np.nonzero(blob)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = area / (h * w)
    offset = (ys.mean() - (ys.min() + ys.max()) / 2) / h
    shape = "triangle" if offset > TRIANGLE_OFFSET else "square" if fill > SQUARE_FILL else "circle"
    colour = _nearest(np.median(img[blob], axis=0), COLOURS)
    size = "large" if max(h, w) > LARGE_EXTENT else "small"
    return Attrs(size=size, colour=colour, shape=shape, background=_nearest(bg, BACKGROUNDS))


def accuracy(images: np.ndarray, targets: list[Attrs]) -> dict[str, float]:
    """Share of images whose judged attribute matches the target, per attribute."""
    judged = [judge(im) for im in images]
    out = {}
    for name in ("colour", "shape", "size", "background"):
        hits = [j is not None and getattr(j, name) == getattr(t, name) for j, t in zip(judged, targets)]
        out[name] = float(np.mean(hits))
    out["all"] = float(np.mean([j == t for j, t in zip(judged, targets)]))
    return out
