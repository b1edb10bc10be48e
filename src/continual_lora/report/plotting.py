"""matplotlib, headless, and PNGs written whole or not at all: shared by every report figure."""

from __future__ import annotations

import io
from pathlib import Path


def pyplot():
    """pyplot on the Agg backend (no display needed; safe on servers and in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig, dpi: int = 120) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    plt = pyplot()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


def save_png(fig, path: Path, dpi: int = 120) -> Path:
    """The figure as a PNG at `path`, written atomically; the figure is closed."""
    from continual_lora.checkpoint import write_bytes_atomic

    write_bytes_atomic(Path(path), png_bytes(fig, dpi))
    return Path(path)
