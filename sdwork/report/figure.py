"""Figures that belong to their caller alone.

Every figure sdwork.report returns is a `matplotlib.figure.Figure` with its own Agg canvas,
never registered with pyplot. In a Jupyter kernel, pyplot's inline backend redraws (and
shows) every figure in its registry whenever it flushes, from whatever thread handles the
message at hand; a widget callback drawing a pyplot figure at that moment got blank or half
drawn tiles, and a stray copy in JupyterLab's log console. A figure pyplot does not know is
drawn only by the code that holds it.

A cell that ends with such a figure shows it as a PNG (`_repr_mimebundle_`); `png(fig)`
renders the bytes for code that displays them itself (the recipe panel).
"""
from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# A notebook column in JupyterLab is about 800 px wide: 7.5 in at 100 dpi fills it without
# being shrunk (a shrunk figure is what made labels and legends hard to read).
DPI = 100
WIDTH_IN = 7.5


def new_figure(width_in: float = WIDTH_IN, height_in: float = 4.0, dpi: int = DPI, layout: str | None = None):
    """A Figure outside pyplot's registry, with an Agg canvas (so savefig and PNG output work)."""
    fig = NotebookFigure(figsize=(width_in, height_in), dpi=dpi, facecolor="white", layout=layout)
    FigureCanvasAgg(fig)
    return fig


def png(fig, dpi: int | None = None) -> bytes:
    """The figure as PNG bytes, drawn now in the calling thread, at its own size."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi or fig.dpi, facecolor=fig.get_facecolor())
    return buf.getvalue()


class NotebookFigure(Figure):
    """A Figure that shows itself as a PNG at the end of a cell, pyplot or not."""

    def _repr_mimebundle_(self, include=None, exclude=None):
        # a mime bundle wins over matplotlib_inline's formatter (which crops the figure with
        # bbox_inches="tight"), so the cell shows the same picture savefig writes
        w, h = self.get_size_inches() * self.dpi
        return {"image/png": png(self), "text/plain": f"<figure {w:.0f}x{h:.0f} px>"}
