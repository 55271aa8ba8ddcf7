"""Image grids for notebooks: one labelled row per variant, one column per (prompt, seed)."""
from __future__ import annotations

import numpy as np

from sdwork.errors import ConfigError


def image_grid(rows: dict[str, np.ndarray], col_titles: list[str] | None = None, cell: float = 1.4,
               max_cols: int = 12):
    """A matplotlib figure: row labels on the left, images (N, H, W, 3) uint8 per row.

    Only the first `max_cols` images of each row are shown, so a large grid stays readable.
    """
    import matplotlib.pyplot as plt

    if not rows:
        raise ConfigError("image_grid needs at least one row of images")
    n = {len(v) for v in rows.values()}
    if len(n) != 1:
        raise ConfigError(f"every row needs the same number of images, got {sorted(n)}")
    cols = min(n.pop(), max_cols)
    fig, axes = plt.subplots(len(rows), cols, figsize=(cell * cols + 1.2, cell * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(images[c], interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == 0 and col_titles is not None:
                ax.set_title(col_titles[c], fontsize=6)
    fig.tight_layout()
    return fig
