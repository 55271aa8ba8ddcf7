"""Image grids for notebooks: one labelled row per variant, one column per (prompt, seed).

The grid is laid out by hand, not by tight_layout: row labels sit in a column of their own,
horizontal and centred on their row (a rotated multi-line label ran into the row above), and
column titles are wrapped to the tile width (truncated prompts all read the same). Knowing
where every tile is also lets a test check that each one was drawn (`tile_boxes`).
"""
from __future__ import annotations

import textwrap

import numpy as np

from sdwork.errors import ConfigError

FONT = 7.5  # points; legible at 100 dpi without crowding a 0.75 in tile
CHAR_W = 0.52 * FONT / 72  # average width of a DejaVu Sans character, inches
LINE_H = 1.25 * FONT / 72  # line height, inches
GAP = 0.06  # inches between tiles
MARGIN = 0.08


def pair_titles(pairs) -> list[str]:
    """Column titles for (prompt, seed) pairs: the whole prompt (wrapped later) and its seed."""
    return [f"{p}\nseed {s}" for p, s in pairs]


def image_grid(rows: dict[str, np.ndarray], col_titles: list[str] | None = None, max_cols: int = 8,
               width_in: float | None = None, max_tile: float = 1.5, label_in: float | None = None):
    """A figure (outside pyplot) of images (N, H, W, 3) uint8 per row, labelled on the left.

    Only the first `max_cols` images of each row are shown, so a large grid stays readable; the
    figure is at most `width_in` wide (a notebook column by default). A title's first line that
    neighbouring columns share (the prompt of several seeds) is written once across them.
    """
    from sdwork.report.figure import WIDTH_IN, new_figure

    cols = _check(rows, col_titles, max_cols)
    g = _Layout.of(list(rows), col_titles[:cols] if col_titles else None, cols, width_in or WIDTH_IN, max_tile,
                   label_in)
    fig = new_figure(g.width, g.height)
    fig.tile_axes = [[_tile(fig, images[c], g.x(c), g.top(r) - g.tile_offset, g.tile) for c in range(cols)]
                     for r, images in enumerate(rows.values())]
    for r, label in enumerate(g.labels):
        fig.text((g.label_in - 0.05) / g.width, (g.top(r) - g.row_h / 2) / g.height, label, ha="right",
                 va="center", fontsize=FONT)
    _titles(fig, g)
    return fig


def _titles(fig, g: "_Layout") -> None:
    """Shared first lines centred over their columns, the rest (the seed) over each column."""
    base = g.top(0) + g.gap
    for start, end, head in g.heads:
        x = (g.x(start) + g.x(end - 1) + g.tile) / 2
        fig.text(x / g.width, (base + g.sub_h) / g.height, head, ha="center", va="bottom", fontsize=FONT,
                 linespacing=1.1)
    for c, sub in enumerate(g.subs):
        fig.text((g.x(c) + g.tile / 2) / g.width, base / g.height, sub, ha="center", va="bottom", fontsize=FONT,
                 linespacing=1.1)


class _Layout:
    """Where everything of a grid goes, in inches, on whole pixels (a tile edge between two
    pixels would blur or shift a row of the image)."""

    @classmethod
    def of(cls, labels, titles, cols, width_in, max_tile, label_in):
        from sdwork.report.figure import DPI

        g = cls()
        g.px = lambda inches: round(inches * DPI) / DPI
        longest = max(len(line) for label in labels for line in str(label).split("\n"))
        g.label_in = g.px(label_in or min(1.55, max(0.6, longest * CHAR_W + 0.15)))
        g.gap, g.margin = g.px(GAP), g.px(MARGIN)
        g.tile = g.px(min(max_tile, (width_in - g.label_in - 2 * g.margin) / cols - g.gap))
        g.labels = [_wrap(label, g.label_in - 0.1) for label in labels]
        g.row_h = g.px(max(g.tile, max(_lines(label) for label in g.labels) * LINE_H))
        g.tile_offset = g.px((g.row_h + g.tile) / 2)
        g._titles(titles or [])
        g.width = g.label_in + cols * (g.tile + g.gap) + 2 * g.margin
        g.height = 2 * g.margin + g.title_h + len(labels) * (g.row_h + g.gap)
        return g

    def _titles(self, titles) -> None:
        heads = [t.split("\n", 1)[0] for t in titles]
        self.subs = [_wrap(t.split("\n", 1)[1], self.tile) if "\n" in t else "" for t in titles]
        self.heads, start = [], 0
        for c in range(1, len(heads) + 1):
            if c == len(heads) or heads[c] != heads[start]:
                span = (c - start) * (self.tile + self.gap) - self.gap
                self.heads.append((start, c, _wrap(heads[start], span)))
                start = c
        self.sub_h = max((_lines(t) for t in self.subs if t), default=0) * LINE_H
        head_h = max((_lines(h) for _, _, h in self.heads), default=0) * LINE_H
        self.title_h = self.px(head_h + self.sub_h + 0.05) if titles else 0

    def x(self, c: int) -> float:
        return self.label_in + c * (self.tile + self.gap)

    def top(self, r: int) -> float:
        """The top of row r, inches from the bottom of the figure."""
        return self.height - self.margin - self.title_h - r * (self.row_h + self.gap)


def tile_boxes(fig) -> list[list[tuple[int, int, int, int]]]:
    """Per row, per column: (left, top, right, bottom) of each image tile in the PNG's pixels."""
    w, h = fig.get_size_inches() * fig.dpi
    out = []
    for row in fig.tile_axes:
        boxes = []
        for ax in row:
            p = ax.get_position()
            boxes.append((round(p.x0 * w), round((1 - p.y1) * h), round(p.x1 * w), round((1 - p.y0) * h)))
        out.append(boxes)
    return out


def _check(rows, col_titles, max_cols) -> int:
    if not rows:
        raise ConfigError("image_grid needs at least one row of images")
    n = {len(v) for v in rows.values()}
    if len(n) != 1:
        raise ConfigError(f"every row needs the same number of images, got {sorted(n)}")
    count = n.pop()
    if col_titles is not None and len(col_titles) < min(count, max_cols):
        raise ConfigError(f"{len(col_titles)} column titles for {count} images: give one per (prompt, seed)")
    return min(count, max_cols)


def _tile(fig, image, left, bottom, size):
    w, h = fig.get_size_inches()
    ax = fig.add_axes((left / w, bottom / h, size / w, size / h))
    ax.imshow(image, interpolation="nearest")
    ax.set_axis_off()
    return ax


def _wrap(text: str, width_in: float) -> str:
    """Each line of text wrapped to width_in inches (words kept whole, long ones broken)."""
    chars = max(6, int(width_in / CHAR_W))
    return "\n".join(textwrap.fill(line, chars) or line for line in str(text).split("\n"))


def _lines(text: str) -> int:
    return text.count("\n") + 1


def tile_errors(png: bytes, boxes, rows) -> list[str]:
    """What is wrong with each tile of a rendered grid (empty when every tile shows its image):
    the PNG is sampled at the centre of each source pixel, which nearest-neighbour drawing keeps
    exact, so a blank, half-drawn or shifted tile shows up. `rows` are the image arrays per row."""
    import io

    from PIL import Image

    shown = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    bad = []
    for r, (row_boxes, images) in enumerate(zip(boxes, rows)):
        for c, (left, top, right, bottom) in enumerate(row_boxes):
            img = np.asarray(images[c]).astype(int)
            h, w = img.shape[:2]
            ys = (top + (np.arange(h) + 0.5) * (bottom - top) / h).astype(int)
            xs = (left + (np.arange(w) + 0.5) * (right - left) / w).astype(int)
            if ys.max() >= shown.shape[0] or xs.max() >= shown.shape[1]:
                bad.append(f"row {r} col {c}: outside the {shown.shape[1]}x{shown.shape[0]} image")
                continue
            wrong = (np.abs(shown[np.ix_(ys, xs)] - img).max(axis=-1) > 8).mean()
            if wrong > 0.02:  # a few edge pixels may round to the neighbour
                bad.append(f"row {r} col {c}: {wrong:.0%} of pixels wrong")
    return bad
