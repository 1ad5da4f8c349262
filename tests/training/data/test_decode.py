"""training/data/decode.py: PNG decoding against PIL, and crafted samples refused with a reason before
anything large is allocated or decoded."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from tests.fake_renders import write_renders
from tests.training.data.common import SIZE, VIEWS, cfg_for
from training.data.batch import as_tensors, decode_batches, finish_batch
from training.data.decode import ViewSpec, view_spec


def test_png_decoding_matches_pil_for_every_kind_of_png(monkeypatch):
    """The libspng fast path (8-bit RGBA) and the PIL fallback give PIL's own pixels (RGB/grey/palette/16-bit
    RGBA as PIL converts them), and the header is checked before either decodes."""
    import training.data.decode as D

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
            got = D.rgba_png(data, (24, 24), name)
            assert got.dtype == np.uint8 and np.array_equal(got, ref), (backend, name)
        with pytest.raises(ValueError, match="expected PNG"):
            D.rgba_png(pngs["RGBA9"], (24, 25), "wrong size")  # refused from the header, nothing decoded
        with pytest.raises(ValueError, match="PNG"):
            D.rgba_png(b"GIF89a" + b"\0" * 64, (24, 24), "not a png")
        with pytest.raises(Exception):  # noqa: B017 - either decoder's own error; the stream's handler skips it
            D.rgba_png(pngs["RGBA9"][:len(pngs["RGBA9"]) // 2], (24, 24), "truncated")


def decode_one(sample: dict, spec: ViewSpec, rng: np.random.Generator) -> dict:
    """One raw sample through the loader's own path (its header, then its views into a batch of one,
    finished); the handler skips nothing, so any problem raises."""
    (b,) = decode_batches(iter([sample]), spec, rng, 1, handler=lambda e: False)
    return finish_batch(as_tensors(b))


def _raw(tmp_path, uid="crafted", views=VIEWS) -> dict:
    """A render folder's files as one raw sample: field name -> bytes."""
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
    assert decode_one(raw, _spec(), np.random.default_rng(0))["input_rgb"].shape == (1, 2, 3, SIZE, SIZE)
    for cams, why in ((_cams(side=100000), "max_side"), (_cams(width=np.int32(SIZE), height=np.int32(SIZE * 2)), "max_side"),
                      (_cams(side=0), "max_side"), (_cams(width=np.float32(32.0)), "integer")):
        with pytest.raises(ValueError, match=why):
            decode_one({**raw, "cameras.npz": _npz(**cams)}, _spec(), np.random.default_rng(0))
    with pytest.raises(ValueError, match="max_side"):  # the config bound is the one used
        decode_one(raw, _spec(max_side=SIZE - 1), np.random.default_rng(0))
    cfg = cfg_for(tmp_path)
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
        decode_one({**raw, "cameras.npz": bomb.getvalue()}, _spec(), rng)
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
        decode_one({**raw, "cameras.npz": lie.getvalue()}, _spec(), rng)
    with pytest.raises(ValueError, match="1 <= V <= 1000"):  # too many views
        decode_one({**raw, "cameras.npz": _npz(**_cams(V=1001))}, _spec(), rng)
    with pytest.raises(ValueError, match="Object arrays|object arrays|pickle"):  # pickles stay data
        decode_one({**raw, "cameras.npz": _npz(**_cams(), extra=np.array([{"a": 1}], dtype=object))}, _spec(), rng)


@pytest.mark.parametrize("scale", [0, -10000.0, "nan", float("inf")])
def test_depth_scale_must_be_positive(tmp_path, scale):
    raw = _raw(tmp_path)
    meta = json.loads(raw["meta.json"])
    meta["depth_scale"] = scale
    with pytest.raises(ValueError, match="depth_scale"):
        decode_one({**raw, "meta.json": json.dumps(meta).encode()}, _spec(), np.random.default_rng(0))


def test_depth_png_must_be_16_bit(tmp_path):
    raw = _raw(tmp_path)
    eight = io.BytesIO()
    Image.fromarray(np.full((SIZE, SIZE), 200, np.uint8)).save(eight, "PNG")  # mode L: depths 256x off
    bad = {**raw, **{f"{i:02d}.depth.png": eight.getvalue() for i in range(VIEWS)}}
    with pytest.raises(ValueError, match="16-bit"):
        decode_one(bad, _spec(), np.random.default_rng(0))
