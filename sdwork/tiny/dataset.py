"""Procedural caption-image dataset: simple shapes on plain backgrounds.

Every image is drawn from four captioned attributes (size, colour, shape,
background) plus an uncaptioned random position and small colour jitter.
A fixed, seeded subset of attribute combinations is held out of training so
that generation and CLIP scoring can be judged on prompts never seen.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # draw at 4x and box-filter down for anti-aliased edges

COLOURS = {
    "red": (215, 35, 35),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 215, 40),
    "purple": (140, 55, 200),
    "orange": (245, 135, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (8.0, 11.0), "large": (17.0, 22.0)}  # radius range in pixels
SQUARE_HALF_SIDE = 0.85  # x radius: a square of about the area of the circle of the same radius
BACKGROUNDS = {"white": (240, 240, 240), "black": (20, 20, 20), "gray": (128, 128, 128)}

ATTRIBUTES = {
    "size": tuple(SIZES),
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "background": tuple(BACKGROUNDS),
}
N_HELD_OUT = 12
SPLIT_SEED = 1234


@dataclass(frozen=True)
class Attrs:
    size: str
    colour: str
    shape: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} on a {self.background} background"


def all_combinations() -> list[Attrs]:
    return [Attrs(*c) for c in itertools.product(*ATTRIBUTES.values())]


def split_combinations() -> tuple[list[Attrs], list[Attrs]]:
    """(train, held_out): a seeded choice of combinations never used for training."""
    combos = all_combinations()
    rng = np.random.default_rng(SPLIT_SEED)
    held = set(rng.choice(len(combos), size=N_HELD_OUT, replace=False).tolist())
    train = [c for i, c in enumerate(combos) if i not in held]
    held_out = [c for i, c in enumerate(combos) if i in held]
    return train, held_out


def parse_caption(caption: str) -> Attrs:
    words = caption.split()
    if len(words) != 8 or words[0] != "a" or words[4:6] != ["on", "a"] or words[7] != "background":
        raise ValueError(f"not a dataset caption: {caption!r}; expected 'a <size> <colour> <shape> on a <background> background'")
    attrs = Attrs(words[1], words[2], words[3], words[6])
    for name, values in ATTRIBUTES.items():
        if getattr(attrs, name) not in values:
            raise ValueError(f"unknown {name} {getattr(attrs, name)!r} in {caption!r}")
    return attrs


def partial_caption(attrs: Attrs, keep) -> str:
    """A caption naming only the kept attributes (size, colour, shape, background), e.g.
    "a green shape on a black background" or "a small green circle"."""
    size, colour, shape, bg = (bool(k) for k in keep)
    words = ["a"] + [attrs.size] * size + [attrs.colour] * colour + [attrs.shape if shape else "shape"]
    return " ".join(words) + (f" on a {attrs.background} background" if bg else "")


def background_free_caption(attrs: Attrs) -> str:
    """The caption without its background: "a small green circle"."""
    return partial_caption(attrs, (True, True, True, False))


def one_attribute_variants(attrs: Attrs) -> list[Attrs]:
    """Every caption that differs from `attrs` in exactly one attribute."""
    out = []
    for name, values in ATTRIBUTES.items():
        for v in values:
            if v != getattr(attrs, name):
                out.append(Attrs(**{**attrs.__dict__, name: v}))
    return out


def _jitter(rgb, rng, amount=12):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def render(attrs: Attrs, rng: np.random.Generator, background_rgb=None) -> np.ndarray:
    """One 64x64x3 uint8 image of `attrs` at a random position.

    background_rgb replaces the named background (attrs.background is then ignored): the
    scorer's training uses it to show shapes on colours no caption names.
    """
    s = SUPERSAMPLE
    lo, hi = SIZES[attrs.size]
    r = rng.uniform(lo, hi)
    margin = r + 2
    cx, cy = rng.uniform(margin, IMAGE_SIZE - margin, size=2)
    bg = _jitter(BACKGROUNDS[attrs.background], rng, 6) if background_rgb is None else tuple(background_rgb)
    img = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), bg)
    draw = ImageDraw.Draw(img)
    fill = _jitter(COLOURS[attrs.colour], rng)
    x, y, rr = cx * s, cy * s, r * s
    if attrs.shape == "circle":
        draw.ellipse([x - rr, y - rr, x + rr, y + rr], fill=fill)
    elif attrs.shape == "square":
        h = rr * SQUARE_HALF_SIDE
        draw.rectangle([x - h, y - h, x + h, y + h], fill=fill)
    else:  # upright equilateral triangle inscribed in the circle
        pts = [(x + rr * np.cos(a), y - rr * np.sin(a)) for a in np.deg2rad([90, 210, 330])]
        draw.polygon(pts, fill=fill)
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
    return np.asarray(img, dtype=np.uint8)


def make_dataset(combos: list[Attrs], per_combo: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Images (N, 64, 64, 3) uint8 and their captions, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for attrs in combos:
        for _ in range(per_combo):
            images.append(render(attrs, rng))
            captions.append(attrs.caption)
    return np.stack(images), captions


def unnamed_background(colour: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """A random plain background far from every named background and from the shape's colour."""
    fill = np.array(COLOURS[colour])
    while True:
        bg = rng.integers(0, 256, size=3)
        far_named = all(np.abs(bg - np.array(v)).max() > 48 for v in BACKGROUNDS.values())
        if far_named and np.abs(bg - fill).sum() > 150:
            return tuple(int(c) for c in bg)


def make_unnamed_background_set(combos: list[Attrs], per_shape: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Images of every (size, colour, shape) that `combos` contain, on unnamed random backgrounds,
    captioned without a background ("a small green circle"). No named background appears, so no
    held-out combination does either."""
    rng = np.random.default_rng(seed)
    triplets = sorted({(a.size, a.colour, a.shape) for a in combos})
    images, captions = [], []
    for size, colour, shape in triplets:
        for _ in range(per_shape):
            bg = unnamed_background(colour, rng)
            attrs = Attrs(size, colour, shape, "white")  # the background is replaced, never named
            images.append(render(attrs, rng, background_rgb=bg))
            captions.append(background_free_caption(attrs))
    return np.stack(images), captions


def vocabulary_words() -> list[str]:
    words = {"a", "on", "background"}
    for values in ATTRIBUTES.values():
        words.update(values)
    return sorted(words)
