"""Fixed-seed sample grids as PNG: one row per task (and the upstream probe), one column per
sample, each row labelled, small images enlarged (nearest neighbour) so they can be seen."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from continual_lora.checkpoint import write_bytes_atomic

CELL = 96  # pixels per cell at least: 32-pixel samples are shown 3× (nearest neighbour)
LABEL_WIDTH = 150  # about 22 characters of PIL's default font
LINE_HEIGHT = 12


def save_grid(rows: dict[str, np.ndarray], path: Path, columns: int = 8) -> Path:
    """Write `rows` (name → uint8 images (N, H, W, 3)) as one PNG, the first `columns`
    images of each row; returns the path. A name may have several lines (`\n`): as many as
    fit the cell are drawn, each cut to the label column's width."""
    from PIL import Image, ImageDraw

    side = max(img.shape[1] for img in rows.values())
    scale = max(1, -(-CELL // side))
    cell = side * scale
    n_cols = min(columns, max(len(img) for img in rows.values()))
    canvas = Image.new("RGB", (LABEL_WIDTH + n_cols * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, images) in enumerate(rows.items()):
        lines = name.split("\n")[:max(1, cell // LINE_HEIGHT)]
        top = r * cell + (cell - LINE_HEIGHT * len(lines)) // 2
        for i, line in enumerate(lines):
            draw.text((6, top + i * LINE_HEIGHT), line[:22], fill="black")
        for c, image in enumerate(images[:n_cols]):
            tile = Image.fromarray(image).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (LABEL_WIDTH + c * cell, r * cell))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, buffer.getvalue())
    return path
