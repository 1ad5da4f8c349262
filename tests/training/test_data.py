"""training/data.py: the streaming loader against the arrays the (fake) render stage wrote.

Inputs are render folders written by tests/fake_renders.py and packed by pipelines.shards; expected values
are computed here with numpy from those arrays (compositing, depth scale, K shifts), or by closed form.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.cameras import project
from core.config import Config
from core.layout import shard_urls
from pipelines.shards import pack
from tests.fake_renders import write_renders
from training.data import (
    RAW_KEYS,
    ViewSpec,
    decode_sample,
    finish_batch,
    load_render_folder,
    make_loader,
    view_spec,
)
from training.tario import DataStalled

UIDS = [f"asset{i:02d}" for i in range(9)]
SIZE, VIEWS = 32, 6


def _cfg(out: Path) -> Config:
    cfg = Config(out=str(out))
    cfg.shards.val_fraction = 0.0
    cfg.shards.max_count = 2  # 9 assets -> 5 shards, enough for 2 nodes x 2 workers
    cfg.loader.input_views, cfg.loader.input_size = 2, SIZE
    cfg.loader.shuffle_buffer = 4
    cfg.nerf.sup_views, cfg.nerf.render_size, cfg.nerf.patch_size = 2, SIZE, 0
    cfg.mesh.sup_views, cfg.mesh.render_size = 3, SIZE
    return cfg


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    written = write_renders(out, UIDS, views=VIEWS, size=SIZE)
    cfg = _cfg(out)
    pack(cfg)
    return cfg, written


def _composite(rgba: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[H,W,4] u8 -> rgb [3,H,W], alpha [1,H,W] in float64 (the reference for straight-alpha compositing)."""
    a = rgba[..., 3:].astype(np.float64) / 255.0
    rgb = rgba[..., :3].astype(np.float64) / 255.0 * a + bg.astype(np.float64) * (1.0 - a)
    return rgb.transpose(2, 0, 1), a.transpose(2, 0, 1)


def _epoch(cfg, stage="mesh", **kw):
    loader = make_loader(cfg, shard_urls(cfg.out), stage, resampled=False, **kw)
    return loader, list(loader)


def test_round_trip_pixels_depths_cameras(packed):
    cfg, written = packed
    loader, batches = _epoch(cfg, "mesh", batch_size=2, background="black")
    seen = set()
    for b in batches:
        assert b["input_rgb"].shape[1:] == (2, 3, SIZE, SIZE) and b["sup_depth"].shape[1:] == (3, 1, SIZE, SIZE)
        for j, uid in enumerate(b["uid"]):
            seen.add(uid)
            w = written[uid]
            bg = b["background"][j].numpy()
            assert np.array_equal(bg, np.zeros(3))
            for key, views in (("input", b["input_views"][j]), ("sup", b["sup_views"][j])):
                for k, v in enumerate(views):
                    rgb, a = _composite(w["rgba"][v], bg)
                    np.testing.assert_allclose(b[f"{key}_rgb"][j, k].numpy(), rgb, atol=1e-6)
                    mask = b[f"{key}_mask"][j, k].numpy()
                    np.testing.assert_allclose(mask, a, atol=1e-6)
                    np.testing.assert_array_equal(b[f"{key}_c2w"][j, k].numpy(), w["c2w"][v])
                    np.testing.assert_array_equal(b[f"{key}_K"][j, k].numpy(), w["K"][v])
                    if key == "sup":
                        np.testing.assert_allclose(b["sup_depth"][j, k, 0].numpy(),
                                                   w["depth"][v].astype(np.float64) / 10000.0, rtol=1e-6)
            assert not set(b["input_views"][j]) & set(b["sup_views"][j])
    assert seen == set(UIDS) and loader.skipped == 0


def test_white_background_is_the_default(packed):
    cfg, written = packed
    _, batches = _epoch(cfg, "nerf", batch_size=3)
    b = batches[0]
    uid, v = b["uid"][0], b["input_views"][0][0]
    rgb, _ = _composite(written[uid]["rgba"][v], np.ones(3))
    np.testing.assert_allclose(b["input_rgb"][0, 0].numpy(), rgb, atol=1e-6)
    assert "sup_depth" not in b and torch.all(b["background"] == 1)


def test_patch_crop_shifts_K_and_keeps_the_pixels(packed):
    cfg, written = packed
    P = 8
    _, batches = _epoch(cfg, "nerf", batch_size=3, patch=P, depths=True)
    offsets = set()
    for b in batches:
        assert b["sup_rgb"].shape[-2:] == (P, P)
        for j, uid in enumerate(b["uid"]):
            for k, v in enumerate(b["sup_views"][j]):
                K_full, K = written[uid]["K"][v], b["sup_K"][j, k].numpy()
                x0, y0 = K_full[0, 2] - K[0, 2], K_full[1, 2] - K[1, 2]
                assert x0 == int(x0) and y0 == int(y0) and 0 <= x0 <= SIZE - P and 0 <= y0 <= SIZE - P
                x0, y0 = int(x0), int(y0)
                offsets.add((x0, y0))
                rgb, _ = _composite(written[uid]["rgba"][v][y0:y0 + P, x0:x0 + P], np.ones(3))
                np.testing.assert_allclose(b["sup_rgb"][j, k].numpy(), rgb, atol=1e-6)
                np.testing.assert_allclose(b["sup_depth"][j, k, 0].numpy(),
                                           written[uid]["depth"][v][y0:y0 + P, x0:x0 + P] / 10000.0, rtol=1e-6)
                # a world point projects into the patch exactly (x0, y0) left/up of where it lands in the view
                pt = np.array([[0.1, -0.2, 0.05]])
                uv_full, _ = project(pt, written[uid]["c2w"][v], K_full)
                uv_patch, _ = project(pt, b["sup_c2w"][j, k].numpy(), K)
                np.testing.assert_allclose(uv_patch[0], uv_full[0] - [x0, y0], atol=1e-4)
    assert len(offsets) > 3  # the crops move


def test_resized_inputs_and_scaled_K(tmp_path):
    written = write_renders(tmp_path, ["small"], views=VIEWS, size=SIZE)
    cfg = _cfg(tmp_path)
    pack(cfg)
    half = SIZE // 2
    cfg.loader.input_size = half
    _, (b,) = _epoch(cfg, "mesh", batch_size=1, sup_size=half)
    w = written["small"]
    for k, v in enumerate(b["input_views"][0]):
        # reference: PIL's own bilinear (triangle filter widened by the scale, i.e. antialiased) per channel
        rgb, a = _composite(w["rgba"][v], np.ones(3))
        ref = np.stack([np.asarray(Image.fromarray(c.astype(np.float32), "F").resize((half, half), Image.BILINEAR))
                        for c in np.concatenate([rgb, a])])
        got = torch.cat([b["input_rgb"][0, k], b["input_mask"][0, k]]).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-4)  # float32 accumulation order differs
        # the K of the resized image projects a point to half the full-resolution pixel coordinates
        pt = np.array([[0.2, 0.1, -0.1]])
        uv_full, _ = project(pt, w["c2w"][v], w["K"][v])
        uv_half, _ = project(pt, b["input_c2w"][0, k].numpy(), b["input_K"][0, k].numpy())
        np.testing.assert_allclose(uv_half[0], uv_full[0] / 2, atol=1e-4)
    # depth is resized by nearest: every value is one that exists in the full image (no blended surfaces)
    for k, v in enumerate(b["sup_views"][0]):
        d = b["sup_depth"][0, k, 0].numpy()
        np.testing.assert_allclose(d, w["depth"][v][1::2, 1::2] / 10000.0, rtol=1e-6)


def test_same_seed_same_batches_other_seed_other_batches(packed):
    cfg, _ = packed

    def run(seed):
        loader = make_loader(cfg, shard_urls(cfg.out), "nerf", batch_size=2, resampled=True, epoch_samples=6,
                             seed=seed, patch=8, background="random")
        return list(loader)

    a, b, c = run(1), run(1), run(2)
    assert len(a) == 3  # with_epoch: 6 samples per worker in batches of 2
    for x, y in zip(a, b):
        assert x["uid"] == y["uid"] and x["sup_views"] == y["sup_views"]
        assert torch.equal(x["sup_rgb"], y["sup_rgb"]) and torch.equal(x["sup_K"], y["sup_K"])
        assert torch.equal(x["background"], y["background"])
    assert [x["uid"] for x in a] != [x["uid"] for x in c] or not all(
        torch.equal(x["sup_K"], y["sup_K"]) for x, y in zip(a, c))


def test_each_sample_exactly_once_per_epoch_over_2_nodes_x_2_workers(packed):
    cfg, _ = packed
    torch.set_num_threads(1)
    seen: list[str] = []
    for rank in range(2):
        loader = make_loader(cfg, shard_urls(cfg.out), "nerf", batch_size=2, resampled=False, workers=2,
                             rank=rank, world_size=2, seed=5)
        loader.set_epoch(3)
        for b in loader:
            seen += b["uid"]
    assert sorted(seen) == sorted(UIDS)


def test_resampled_ranks_draw_from_their_own_shards(packed):
    cfg, _ = packed
    per_rank = []
    for rank in range(2):
        loader = make_loader(cfg, shard_urls(cfg.out), "nerf", batch_size=2, resampled=True, epoch_samples=12,
                             rank=rank, world_size=2)
        per_rank.append({u for b in loader for u in b["uid"]})
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]


def test_corrupt_shards_and_samples_are_skipped_and_counted(packed, tmp_path):
    cfg, written = packed
    urls = shard_urls(cfg.out)
    garbage = tmp_path / "train-000090.tar"
    garbage.write_bytes(b"not a tar" * 100)
    truncated = tmp_path / "train-000091.tar"
    truncated.write_bytes(Path(urls[0]).read_bytes()[:5000])  # cut inside the first sample
    # a shard whose one sample has every PNG replaced by garbage of the same length
    import tarfile
    bad = tmp_path / "train-000092.tar"
    with tarfile.open(urls[1]) as src, tarfile.open(bad, "w", format=tarfile.USTAR_FORMAT) as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name.endswith(".png"):
                data = b"\x89PNG broken" + bytes(len(data) - 11)
            dst.addfile(m, io.BytesIO(data))
    missing = str(tmp_path / "train-000093.tar")
    loader = make_loader(cfg, [str(garbage), str(truncated), str(bad), missing, *urls], "nerf", batch_size=1,
                         resampled=False)
    with pytest.warns(UserWarning, match="skipping corrupt"):
        got = [u for b in loader for u in b["uid"]]
    assert sorted(got) == sorted(UIDS)  # every good sample once; nothing from the broken files
    assert loader.skipped >= 4


def test_pipe_urls_and_brace_patterns(packed):
    cfg, _ = packed
    urls = shard_urls(cfg.out)
    loader = make_loader(cfg, [f"pipe:cat {u}" for u in urls], "nerf", batch_size=3, resampled=False)
    assert sorted(u for b in loader for u in b["uid"]) == sorted(UIDS)
    brace = str(Path(cfg.out) / "shards" / "train-{000000..000004}.tar")
    loader = make_loader(cfg, brace, "nerf", batch_size=3, resampled=False)
    assert sorted(u for b in loader for u in b["uid"]) == sorted(UIDS)


def test_render_folder_reads_like_the_shards(packed):
    cfg, written = packed
    _, batches = _epoch(cfg, "mesh", batch_size=1)
    b = batches[0]
    uid = b["uid"][0]
    s = load_render_folder(Path(cfg.out) / "renders" / uid, b["input_views"][0], b["sup_views"][0])
    for k in ("input_rgb", "input_mask", "input_c2w", "input_K", "sup_rgb", "sup_mask", "sup_depth", "sup_K"):
        assert torch.equal(s[k], b[k][0]), k


def test_too_few_views_is_skipped_not_raised(tmp_path):
    write_renders(tmp_path, ["few"], views=3, size=SIZE)
    write_renders(tmp_path, ["enough"], views=VIEWS, size=SIZE)
    cfg = _cfg(tmp_path)
    pack(cfg)
    loader = make_loader(cfg, shard_urls(cfg.out), "mesh", batch_size=1, resampled=False)  # needs 2 + 3 views
    with pytest.warns(UserWarning, match="need 5"):
        assert [u for b in loader for u in b["uid"]] == ["enough"]
    assert loader.skipped == 1
    shutil.rmtree(tmp_path / "renders")


def test_patch_of_a_resized_view(packed):
    """NeRF patches of a supervision view brought to half size: crop of the resized composite, K scaled then shifted."""
    cfg, written = packed
    half, P = SIZE // 2, 6
    _, batches = _epoch(cfg, "nerf", batch_size=3, sup_size=half, patch=P)
    for b in batches[:2]:
        for j, uid in enumerate(b["uid"]):
            for k, v in enumerate(b["sup_views"][j]):
                K_half = written[uid]["K"][v].copy()
                K_half[:2] *= 0.5
                K = b["sup_K"][j, k].numpy()
                x0, y0 = int(K_half[0, 2] - K[0, 2]), int(K_half[1, 2] - K[1, 2])
                assert K_half[0, 2] - K[0, 2] == x0 and 0 <= x0 <= half - P and 0 <= y0 <= half - P
                rgb, a = _composite(written[uid]["rgba"][v], np.ones(3))
                ref = np.stack([np.asarray(Image.fromarray(c.astype(np.float32), "F").resize((half, half), Image.BILINEAR))
                                for c in np.concatenate([rgb, a])])[:, y0:y0 + P, x0:x0 + P]
                got = torch.cat([b["sup_rgb"][j, k], b["sup_mask"][j, k]]).numpy()
                np.testing.assert_allclose(got, ref, atol=1e-4)  # float32 accumulation order differs


def test_worker_batches_equal_in_process_batches(packed):
    """A DataLoader worker (batches decoded into shared memory) yields exactly what the in-process stream does."""
    cfg, _ = packed
    torch.set_num_threads(1)

    def run(workers):
        return list(make_loader(cfg, shard_urls(cfg.out), "mesh", batch_size=2, resampled=False, workers=workers,
                                seed=3, background="random"))

    a, b = run(0), run(1)
    assert len(a) == len(b) == 5  # 9 samples in batches of 2: the last one partial
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and x["uid"] == y["uid"]
        for key, val in x.items():
            if isinstance(val, torch.Tensor):
                assert torch.equal(val, y[key]), key
    assert a[-1]["input_rgb"].shape[0] == 1


def test_raw_batches_carry_the_stored_bytes_and_finish_like_the_reference(packed):
    """raw=True (what training uses): uint8 RGBA exactly as rendered, patch cut from it, workers included;
    finish_batch composites them to the numpy reference and equals a finished loader's batch."""
    cfg, written = packed
    torch.set_num_threads(1)
    P = 8

    def run(raw, workers):
        return list(make_loader(cfg, shard_urls(cfg.out), "mesh", batch_size=2, resampled=False, workers=workers,
                                seed=4, background="random", patch=P, raw=raw))

    raw0, raw1, fin = run(True, 0), run(True, 1), run(False, 0)
    assert len(raw0) == len(raw1) == len(fin) == 5
    for r, r1, f in zip(raw0, raw1, fin):
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
        assert done.keys() == f.keys() and not set(RAW_KEYS) & done.keys()
        for key, val in f.items():
            if isinstance(val, torch.Tensor):
                assert torch.equal(val, done[key]), key
        for j, uid in enumerate(r["uid"]):
            bg = r["background"][j].numpy()
            for k, v in enumerate(r["input_views"][j]):
                rgb, a = _composite(written[uid]["rgba"][v], bg)
                np.testing.assert_allclose(done["input_rgb"][j, k].numpy(), rgb, atol=1e-6)
                np.testing.assert_allclose(done["input_mask"][j, k].numpy(), a, atol=1e-6)


def test_training_loop_composites_raw_batches_on_its_device(packed):
    from training.loop import to_device

    cfg, _ = packed
    r = next(iter(make_loader(cfg, shard_urls(cfg.out), "nerf", batch_size=2, resampled=False, raw=True)))
    f = next(iter(make_loader(cfg, shard_urls(cfg.out), "nerf", batch_size=2, resampled=False)))
    done = to_device(r, torch.device("cpu"))
    assert torch.equal(done["sup_rgb"], f["sup_rgb"]) and torch.equal(done["input_mask"], f["input_mask"])


def test_mixed_stored_sizes_close_a_batch_early(tmp_path):
    """Shards holding views of two sizes: native-size samples travel raw, the others are resized; a batch
    never mixes the two layouts, every sample is read once and comes out right."""
    small, big = ["s0", "s1", "s2"], ["b0", "b1", "b2"]
    w = {**write_renders(tmp_path, big, views=VIEWS, size=SIZE),
         **write_renders(tmp_path, small, views=VIEWS, size=SIZE // 2)}
    cfg = _cfg(tmp_path)
    cfg.shards.max_count = 6
    pack(cfg)
    batches = list(make_loader(cfg, shard_urls(cfg.out), "nerf", batch_size=4, resampled=False, raw=True,
                               background="black"))
    assert sorted(u for b in batches for u in b["uid"]) == sorted(small + big)
    assert len(batches) >= 2 and all(len(b["uid"]) <= 4 for b in batches)
    for b in batches:
        assert {u[0] for u in b["uid"]} in ({"s"}, {"b"})  # one layout per batch
        assert ("input_rgba8" in b) == (b["uid"][0][0] == "b")
        done = finish_batch(b)
        for j, uid in enumerate(b["uid"]):
            v = b["input_views"][j][0]
            rgb, _ = _composite(w[uid]["rgba"][v], np.zeros(3))
            if uid[0] == "b":
                np.testing.assert_allclose(done["input_rgb"][j, 0].numpy(), rgb, atol=1e-6)
            else:  # upsampled 2x: the same picture, smoothed
                assert done["input_rgb"].shape[-1] == SIZE
                np.testing.assert_allclose(done["input_rgb"][j, 0, :, ::2, ::2].mean().item(), rgb.mean(), atol=0.02)


def test_png_decoding_matches_pil_for_every_kind_of_png(monkeypatch):
    """The libspng fast path (8-bit RGBA) and the PIL fallback give PIL's own pixels (RGB/grey/palette/16-bit
    RGBA as PIL converts them), and the header is checked before either decodes."""
    import training.data as D

    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (24, 24, 4), dtype=np.uint8)
    px[..., 3] = np.where(rng.random((24, 24)) < 0.3, 0, px[..., 3])
    pngs = {}
    for mode in ("RGBA", "RGB", "LA", "L", "P"):
        for level in (0, 9):
            buf = io.BytesIO()
            Image.fromarray(px, "RGBA").convert(mode).save(buf, "PNG", compress_level=level)
            pngs[f"{mode}{level}"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(px, "RGBA").save(buf, "PNG", optimize=True)
    pngs["RGBA-opt"] = buf.getvalue()
    for backend in ("pyspng", "pil"):
        if backend == "pil":
            monkeypatch.setattr(D, "pyspng", None)
        elif D.pyspng is None:
            continue
        for name, data in pngs.items():
            ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))
            got = D._rgba(data, (24, 24), name)
            assert got.dtype == np.uint8 and np.array_equal(got, ref), (backend, name)
        with pytest.raises(ValueError, match="expected PNG"):
            D._rgba(pngs["RGBA9"], (24, 25), "wrong size")  # refused from the header, nothing decoded
        with pytest.raises(ValueError, match="PNG"):
            D._rgba(b"GIF89a" + b"\0" * 64, (24, 24), "not a png")
        with pytest.raises(Exception):  # noqa: B017 - either decoder's own error; the stream's handler skips it
            D._rgba(pngs["RGBA9"][:len(pngs["RGBA9"]) // 2], (24, 24), "truncated")


# ----------------------------------------------------------------------------------------------------------
# Crafted samples: refused with a reason before anything large is allocated or decoded.
# ----------------------------------------------------------------------------------------------------------


def _raw(tmp_path, uid="crafted", views=VIEWS) -> dict:
    write_renders(tmp_path, [uid], views=views, size=SIZE)
    folder = tmp_path / "renders" / uid
    return {"__key__": uid, **{p.name: p.read_bytes() for p in folder.iterdir()}}


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _spec(**kw) -> ViewSpec:
    return ViewSpec(2, 2, SIZE, SIZE, 0, "white", True, **kw)


def _cams(V=VIEWS, side=SIZE, **over) -> dict:
    c = {"c2w": np.tile(np.eye(4, dtype=np.float32), (V, 1, 1)), "K": np.tile(np.eye(3, dtype=np.float32), (V, 1, 1)),
         "width": np.int32(side), "height": np.int32(side)}
    c.update(over)
    return c


def test_oversized_or_non_square_views_are_refused_before_decoding(tmp_path):
    raw = _raw(tmp_path)
    assert decode_sample(raw, _spec(), np.random.default_rng(0))["input_rgb"].shape == (2, 3, SIZE, SIZE)
    for cams, why in ((_cams(side=100000), "max_side"), (_cams(width=np.int32(SIZE), height=np.int32(SIZE * 2)), "max_side"),
                      (_cams(side=0), "max_side"), (_cams(width=np.float32(32.0)), "integer")):
        with pytest.raises(ValueError, match=why):
            decode_sample({**raw, "cameras.npz": _npz(**cams)}, _spec(), np.random.default_rng(0))
    with pytest.raises(ValueError, match="max_side"):  # the config bound is the one used
        decode_sample(raw, _spec(max_side=SIZE - 1), np.random.default_rng(0))
    cfg = _cfg(tmp_path)
    cfg.loader.max_side = 16
    assert view_spec(cfg, "nerf").max_side == 16


def test_camera_arrays_are_bounded_before_they_are_allocated(tmp_path):
    raw = _raw(tmp_path)
    rng = np.random.default_rng(0)
    # a zip bomb: 8 MB of zeros compressed to a few kB; refused from the zip directory
    bomb = io.BytesIO()
    np.savez_compressed(bomb, **_cams(), pad=np.zeros(8 << 20, np.uint8))
    assert len(bomb.getvalue()) < 100_000
    with pytest.raises(ValueError, match="uncompressed"):
        decode_sample({**raw, "cameras.npz": bomb.getvalue()}, _spec(), rng)
    # a .npy header claiming 10^12 floats over 64 bytes of data: refused from the header
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 4, 4)})
    lie = io.BytesIO()
    with zipfile.ZipFile(lie, "w") as z:
        z.writestr("c2w.npy", head.getvalue() + bytes(64))
        for k, v in _cams().items():
            if k != "c2w":
                b = io.BytesIO()
                np.save(b, v)
                z.writestr(f"{k}.npy", b.getvalue())
    with pytest.raises(ValueError, match="header says"):
        decode_sample({**raw, "cameras.npz": lie.getvalue()}, _spec(), rng)
    with pytest.raises(ValueError, match="1 <= V <= 1000"):  # too many views
        decode_sample({**raw, "cameras.npz": _npz(**_cams(V=1001))}, _spec(), rng)
    with pytest.raises(ValueError, match="Object arrays|object arrays|pickle"):  # pickles stay data
        decode_sample({**raw, "cameras.npz": _npz(**_cams(), extra=np.array([{"a": 1}], dtype=object))}, _spec(), rng)


@pytest.mark.parametrize("scale", [0, -10000.0, "nan", float("inf")])
def test_depth_scale_must_be_positive(tmp_path, scale):
    raw = _raw(tmp_path)
    meta = json.loads(raw["meta.json"])
    meta["depth_scale"] = scale
    with pytest.raises(ValueError, match="depth_scale"):
        decode_sample({**raw, "meta.json": json.dumps(meta).encode()}, _spec(), np.random.default_rng(0))


def test_depth_png_must_be_16_bit(tmp_path):
    raw = _raw(tmp_path)
    eight = io.BytesIO()
    Image.fromarray(np.full((SIZE, SIZE), 200, np.uint8)).save(eight, "PNG")  # mode L: depths 256x off
    bad = {**raw, **{f"{i:02d}.depth.png": eight.getvalue() for i in range(VIEWS)}}
    with pytest.raises(ValueError, match="16-bit"):
        decode_sample(bad, _spec(), np.random.default_rng(0))


def test_resampled_stream_raises_on_a_systematic_decode_error(tmp_path):
    """Asking for more views than were rendered fails every sample; a resampled (infinite) stream must stop
    with that reason instead of warning forever."""
    write_renders(tmp_path, ["few"], views=3, size=SIZE)
    cfg = _cfg(tmp_path)
    pack(cfg)
    cfg.loader.max_consecutive_failures = 20
    loader = make_loader(cfg, shard_urls(cfg.out), "mesh", batch_size=1, resampled=True, epoch_samples=10,
                         workers=0)  # needs 2 + 3 views, has 3
    with pytest.warns(UserWarning), pytest.raises(DataStalled, match=r"20 shards/samples in a row.*need 5"):
        next(iter(loader))
    shutil.rmtree(tmp_path / "renders")
