"""PNG figures for training runs, drawn with matplotlib's object API (no pyplot: no global backend or figure state,
so plotting from a library or a worker thread never touches the user's matplotlib setup)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Tuple

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .checkpoint import atomic_write_bytes


def new_figure(figsize: Tuple[float, float] = (7, 4.2), dpi: int = 100) -> Tuple[Figure, Axes]:
    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots()


def save_png(fig: Figure, path: Path) -> Path:
    """The figure as a PNG, written atomically."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(Path(path), buf.getvalue())
