"""training/data/batch.py: uint8 views carry the stored bytes; `finish_batch` and the training loop
composite them like the numpy reference computed here from the PNG pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.layout import shard_urls
from tests.training.data.common import composite
from training.data.batch import UINT8_KEYS, finish_batch
from training.data.stream import make_loader


def test_uint8_views_carry_the_stored_bytes_and_finish_like_the_reference(packed):
    """composite="device" (what training uses): uint8 RGBA exactly as rendered, patch cut from it, workers
    included; finish_batch composites them to the numpy reference, as the loader's own finished batches."""
    cfg, written = packed
    torch.set_num_threads(1)
    P = 8

    def run(composite_at, workers):
        return list(make_loader(cfg, shard_urls(cfg.out), "mesh", batch_size=2, resampled=False, workers=workers,
                                seed=4, background="random", patch=P, composite=composite_at))

    dev0, dev1, fin = run("device", 0), run("device", 1), run("loader", 0)
    assert len(dev0) == len(dev1) == len(fin) == 5
    for r, r1, f in zip(dev0, dev1, fin):
        assert "input_rgb" not in r and r["input_rgba8"].dtype == torch.uint8 and r["uid"] == r1["uid"] == f["uid"]
        assert torch.equal(r["input_rgba8"], r1["input_rgba8"]) and torch.equal(r["sup_rgba8"], r1["sup_rgba8"])
        for j, uid in enumerate(r["uid"]):
            for k, v in enumerate(r["input_views"][j]):
                np.testing.assert_array_equal(r["input_rgba8"][j, k].numpy(), written[uid]["rgba"][v])
            for k, v in enumerate(r["sup_views"][j]):
                K = r["sup_K"][j, k].numpy()
                x0, y0 = (int(written[uid]["K"][v][i, 2] - K[i, 2]) for i in (0, 1))
                np.testing.assert_array_equal(r["sup_rgba8"][j, k].numpy(),
                                              written[uid]["rgba"][v][y0:y0 + P, x0:x0 + P])
        done = finish_batch(r, "cpu")
        assert done.keys() == f.keys() and not set(UINT8_KEYS) & done.keys()
        for j, uid in enumerate(r["uid"]):
            bg = r["background"][j].numpy()
            for k, v in enumerate(r["input_views"][j]):
                rgb, a = composite(written[uid]["rgba"][v], bg)
                for b in (done, f):
                    np.testing.assert_allclose(b["input_rgb"][j, k].numpy(), rgb, atol=1e-6)
                    np.testing.assert_allclose(b["input_mask"][j, k].numpy(), a, atol=1e-6)
            for k, v in enumerate(r["sup_views"][j]):
                K = r["sup_K"][j, k].numpy()
                x0, y0 = (int(written[uid]["K"][v][i, 2] - K[i, 2]) for i in (0, 1))
                rgb, a = composite(written[uid]["rgba"][v][y0:y0 + P, x0:x0 + P], bg)
                for b in (done, f):
                    np.testing.assert_allclose(b["sup_rgb"][j, k].numpy(), rgb, atol=1e-6)
                    np.testing.assert_allclose(b["sup_mask"][j, k].numpy(), a, atol=1e-6)


def test_training_loop_composites_uint8_batches_on_its_device(packed):
    """The loop's `to_device` finishes a composite="device" batch: every view equals the straight-alpha
    composite computed here with numpy from the render folder's PNG files (read by PIL), on the batch's
    random backgrounds, patches located by their K shift."""
    from training.loop import to_device

    cfg, _ = packed
    P = 8
    r = next(iter(make_loader(cfg, shard_urls(cfg.out), "nerf", batch_size=3, resampled=False, patch=P,
                              background="random", composite="device")))
    assert {"input_rgba8", "sup_rgba8"} <= r.keys()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    done = to_device(r, device)
    assert not set(UINT8_KEYS) & done.keys() and done["sup_rgb"].device.type == device.type
    for j, uid in enumerate(r["uid"]):
        folder = Path(cfg.out) / "renders" / uid
        bg = r["background"][j].numpy().astype(np.float64)
        assert not np.allclose(bg, bg[0])  # a random colour, not a grey that hides a channel mix-up
        for group, views in (("input", r["input_views"][j]), ("sup", r["sup_views"][j])):
            for k, v in enumerate(views):
                px = np.asarray(Image.open(folder / f"{v:02d}.rgba.png").convert("RGBA")).astype(np.float64)
                x0 = y0 = 0
                if group == "sup":
                    with np.load(folder / "cameras.npz") as z:
                        K_view = z["K"][v]
                    K = r["sup_K"][j, k].numpy()
                    x0, y0 = int(round(K_view[0, 2] - K[0, 2])), int(round(K_view[1, 2] - K[1, 2]))
                    px = px[y0:y0 + P, x0:x0 + P]
                a = px[..., 3:] / 255.0
                want = (px[..., :3] / 255.0 * a + bg * (1.0 - a)).transpose(2, 0, 1)
                np.testing.assert_allclose(done[f"{group}_rgb"][j, k].cpu().numpy(), want, atol=1e-6)
                np.testing.assert_allclose(done[f"{group}_mask"][j, k].cpu().numpy(), a.transpose(2, 0, 1),
                                           atol=1e-6)
