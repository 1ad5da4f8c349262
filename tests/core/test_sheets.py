"""core/sheets.py: the grid's geometry and pixels against closed forms (tile positions, label strip or column,
straight alpha over the checkerboard, white where a row has no tile)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from core.sheets import LABEL_HEIGHT, SheetRow, checkerboard, write_sheet


def solid(color, size=8, alpha=None):
    px = np.zeros((size, size, 3 if alpha is None else 4), np.uint8)
    px[..., :3] = color
    if alpha is not None:
        px[..., 3] = alpha
    return px


def test_labels_above_rows_of_rgb_tiles(tmp_path):
    rows = [SheetRow("inputs", [solid((255, 0, 0)), solid((0, 255, 0))]), SheetRow("re-rendered", [solid((0, 0, 255))])]
    im = np.asarray(Image.open(write_sheet(tmp_path / "s.png", rows, labels="above")))
    assert im.shape == (2 * (LABEL_HEIGHT + 8), 2 * 8, 3)
    assert (im[LABEL_HEIGHT + 3, 3] == [255, 0, 0]).all() and (im[LABEL_HEIGHT + 3, 8 + 3] == [0, 255, 0]).all()
    y = 2 * LABEL_HEIGHT + 8
    assert (im[y + 3, 3] == [0, 0, 255]).all() and (im[y + 3, 8 + 3] == 255).all()  # no second tile: white
    assert (im[1:LABEL_HEIGHT - 1, :] < 128).any()  # the label is drawn in the strip, in black
    assert not list(tmp_path.glob(".tmp-*"))


def test_label_column_resize_and_straight_alpha(tmp_path):
    rows = [SheetRow("a", [solid((10, 20, 30), size=4)], note="flag"), SheetRow("b", [solid((0, 0, 255), alpha=128)])]
    im = np.asarray(Image.open(write_sheet(tmp_path / "s.png", rows, tile=16, columns=3, label_width=50)))
    assert im.shape == (2 * 16, 50 + 3 * 16, 3)
    assert (im[8, 50 + 8] == [10, 20, 30]).all()  # a 4x4 tile of one colour resized to 16x16 stays that colour
    a = 128 / 255  # blue at alpha 128 over the checkerboard's light cell (200) and dark cell (150)
    np.testing.assert_allclose(im[16 + 2, 50 + 2], np.round([200 * (1 - a), 200 * (1 - a), 255 * a + 200 * (1 - a)]), atol=1)
    np.testing.assert_allclose(im[16 + 10, 50 + 2], np.round([150 * (1 - a), 150 * (1 - a), 255 * a + 150 * (1 - a)]), atol=1)
    assert (im[:, 50 + 16:] == 255).all()  # columns 2 and 3 hold no tile
    note = im[18:30, :50]
    assert ((note[..., 0] > 150) & (note[..., 1] < 80)).any()  # the note is red, under the label
    assert (checkerboard(16)[0, 0] == 200).all() and (checkerboard(16)[0, 8] == 150).all()
    with pytest.raises(ValueError, match="labels must be"):
        write_sheet(tmp_path / "x.png", rows, labels="right")
