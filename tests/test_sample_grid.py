"""Sample grids: a row per name, the first `columns` images each, enlarged, labelled."""

from __future__ import annotations

import numpy as np
from PIL import Image

from continual_lora.sample_grid import CELL, LABEL_WIDTH, LINE_HEIGHT, save_grid


def test_grid_layout_and_multiline_labels(tmp_path):
    white = np.full((3, 32, 32, 3), 255, np.uint8)
    black = np.zeros((10, 32, 32, 3), np.uint8)
    path = save_grid({"giraffe": white, "upstream:\na silhouette of a bear": black},
                     tmp_path / "samples" / "stage-01.png", columns=8)
    image = np.asarray(Image.open(path).convert("L"))
    cell = 32 * -(-CELL // 32)  # 32-pixel samples shown 3x
    assert image.shape == (2 * cell, LABEL_WIDTH + 8 * cell)  # 8 columns: the longest row
    assert (image[:cell, LABEL_WIDTH:LABEL_WIDTH + 3 * cell] == 255).all()  # row 1: white
    assert (image[:cell, LABEL_WIDTH + 3 * cell:] == 255).all()  # beyond its 3 samples: blank
    assert (image[cell:, LABEL_WIDTH:] == 0).all()  # row 2: its first 8 of 10 black samples

    def inked(rows) -> bool:
        return bool((image[rows, :LABEL_WIDTH] < 128).any())

    top = cell + (cell - 2 * LINE_HEIGHT) // 2  # two label lines, centred in the row
    assert inked(slice(top, top + LINE_HEIGHT))
    assert inked(slice(top + LINE_HEIGHT, top + 2 * LINE_HEIGHT))
    assert not inked(slice(cell, top)) and not inked(slice(top + 2 * LINE_HEIGHT, 2 * cell))
