"""render/sheet.py: layout and compositing checked against closed-form pixel values."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from render.sheet import LABEL_W, contact_sheet


def make_folder(root, name, color, alpha, views=4, flags=()):
    f = root / name
    f.mkdir()
    px = np.zeros((32, 32, 4), np.uint8)
    px[..., :3], px[..., 3] = color, alpha
    for i in range(views):
        Image.fromarray(px).save(f / f"{i:02d}.rgba.png")
    (f / "meta.json").write_text(json.dumps({"quality": {"ok": not flags, "flags": list(flags)}}))
    return f


def test_sheet_layout_and_pixels(tmp_path):
    a = make_folder(tmp_path, "a", (255, 0, 0), 255)
    b = make_folder(tmp_path, "b", (0, 0, 255), 128, views=2, flags=["tiny"])
    empty = tmp_path / "empty"
    empty.mkdir()
    out = contact_sheet([a, b, empty], tmp_path / "sheet.png", views=3, tile=32)
    im = np.asarray(Image.open(out))
    assert im.shape == (2 * 32, LABEL_W + 3 * 32, 3)  # the folder without views has no row
    assert (im[5, LABEL_W + 5] == [255, 0, 0]).all()  # opaque red
    # Half-transparent blue over the checkerboard's light cell (200): 255*a + 200*(1-a), a = 128/255.
    a_ = 128 / 255
    exp = np.round([200 * (1 - a_), 200 * (1 - a_), 255 * a_ + 200 * (1 - a_)])
    np.testing.assert_allclose(im[32 + 2, LABEL_W + 2], exp, atol=1)
    assert (im[32 + 2, LABEL_W + 2 * 32 + 2] == 255).all()  # b has 2 views: the third tile stays white
    assert not list(tmp_path.glob(".tmp-*"))


def test_nothing_to_show(tmp_path):
    assert contact_sheet([], tmp_path / "s.png") is None
    assert not (tmp_path / "s.png").exists()
