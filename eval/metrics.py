"""Image metrics of the paper's protocol, batched in torch: PSNR, SSIM, LPIPS (VGG and AlexNet).

Conventions (docs/CONTRACTS.md "Evaluation"): images are [B,3,H,W] float in [0, 1], RGBA renders composited on white
first; PSNR and SSIM with data range 1; SSIM with an 11-tap Gaussian window of σ 1.5, K1 0.01, K2 0.03 and
population (not sample) covariances, averaged over the valid interior and the channels — equal to
`skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=1, channel_axis=...)`; LPIPS v0.1 with ImageNet trunks (`training.lpips_weights`, through `training.inference`), fed [-1, 1].
Every metric returns one value per image ([B]); averaging over views and assets is the report's job.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from training.inference import load_lpips
from training.inference import psnr as shared_psnr

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # skimage: int(truncate 3.5 * σ 1.5 + 0.5) -> an 11-tap window
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_pair(pred: torch.Tensor, gt: torch.Tensor) -> None:
    if pred.shape != gt.shape or pred.ndim != 4:
        raise ValueError(f"expected two [B,C,H,W] tensors of one shape, got {tuple(pred.shape)} / {tuple(gt.shape)}")


def to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 or float images [..., H, W, C] (numpy, HWC) -> float32 [B, C, H, W] in [0, 1]."""
    if isinstance(images, torch.Tensor):
        return images.float()
    a = np.asarray(images)
    scale = 255.0 if a.dtype == np.uint8 else 1.0
    t = torch.from_numpy(a.astype(np.float32) / scale)
    if t.ndim == 3:
        t = t[None]
    return t.permute(0, 3, 1, 2).contiguous()


def composite_on_white(rgba: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Straight-alpha RGBA -> RGB over white. rgba: [B,4,H,W] float in [0,1], or uint8/float HWC numpy."""
    t = to_tensor(rgba) if not isinstance(rgba, torch.Tensor) else rgba.float()
    if t.shape[1] == 3:
        return t
    if t.shape[1] != 4:
        raise ValueError(f"expected RGB or RGBA channels, got {t.shape[1]}")
    rgb, a = t[:, :3], t[:, 3:4]
    return rgb * a + (1.0 - a)


def psnr(pred: torch.Tensor, gt: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per image 10·log10(range² / MSE) over all pixels and channels; identical images give +inf. -> [B].

    training.metrics.psnr without its 100 dB cap (the one implementation; float64 inside)."""
    _check_pair(pred, gt)
    return shared_psnr(pred, gt, data_range, max_db=None)


@functools.lru_cache(maxsize=4)
def _gauss_1d(sigma: float, radius: int) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


SSIM_BLOCK = 64  # output rows/columns per banded-matrix block of the separable filter


@functools.lru_cache(maxsize=8)
def _band(sigma: float, radius: int, block: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """[block + 2·radius, block] banded matrix: column j holds the Gaussian taps at rows j .. j + 2·radius."""
    g = _gauss_1d(sigma, radius)
    taps = len(g)
    band = torch.zeros(block + taps - 1, block, dtype=torch.float64)
    for j in range(block):
        band[j:j + taps, j] = g
    return band.to(device=device, dtype=dtype)


def _blocks(n: int, band: torch.Tensor) -> tuple[int, int]:
    """For a valid filter over n samples: (outputs n − 2r, padded input length so outputs fill whole blocks)."""
    win, block = band.shape
    out_n = n - (win - block)
    return out_n, -(-out_n // block) * block + (win - block)


def _filter_last(x: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
    """1-D Gaussian along the last axis, no padding: [..., nb·block + 2r] -> [..., nb·block], ONE matrix product.

    Windows of `block + 2r` samples every `block` (a copy, 1.2x the data) times the banded block: BLAS does
    block + 2r multiply-adds per output instead of a direct filter's 2r + 1, yet one large GEMM runs far
    faster than torch's CPU convolutions of one-channel planes or than batched products of strided views.
    """
    win, block = band.shape
    y = x.unfold(-1, win, block).reshape(-1, win) @ band  # [(...)·nb, block]
    return y.reshape(*x.shape[:-1], -1)


def _filter_valid(x: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian of planes x [M, Hp, Wp] (lengths from `_blocks`) -> [M, Hp − 2r, Wp − 2r].
    The second pass reads the first one transposed (its window copy does the transposition)."""
    return _filter_last(_filter_last(x, band).transpose(1, 2), band).transpose(1, 2)


def ssim(pred: torch.Tensor, gt: torch.Tensor, data_range: float = 1.0, chunk_pixels: int = 1 << 20) -> torch.Tensor:
    """Per image mean SSIM (Gaussian 11/σ 1.5, population covariance) -> [B]. Needs H, W ≥ 11.

    skimage filters the whole image with reflection and then drops `radius` pixels at each border before
    averaging; the kept pixels only see real pixels, so a filter without padding gives exactly those.
    float32 inside (|difference| to skimage's float64 ≤ ~1e-7 on the tests' images and on flat white
    renders): each image channel is first shifted by its mean over both images, which changes no variance or
    covariance but keeps E[x²] − E[x]² from cancelling large numbers (shifted back for the luminance term).
    Images are filtered `chunk_pixels` // (H·W) at a time (at least one; memory ~20 floats per pixel of it).
    """
    _check_pair(pred, gt)
    if min(pred.shape[-2:]) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs images of at least {2 * SSIM_RADIUS + 1} pixels, got {tuple(pred.shape[-2:])}")
    band = _band(SSIM_SIGMA, SSIM_RADIUS, SSIM_BLOCK, torch.float32, str(pred.device))
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    out = []
    chunk = max(1, chunk_pixels // (pred.shape[-2] * pred.shape[-1]))
    for i in range(0, pred.shape[0], chunk):
        x, y = pred[i:i + chunk].float(), gt[i:i + chunk].float()  # [n,C,H,W]
        n, c, h, w = x.shape
        k = 0.5 * (x.mean(dim=(2, 3), keepdim=True) + y.mean(dim=(2, 3), keepdim=True))  # [n,C,1,1]
        x, y = x - k, y - k
        (ho, hp), (wo, wp) = _blocks(h, band), _blocks(w, band)
        # The five planes to filter, written straight into one zero-padded buffer (no stack/pad copies).
        planes = x.new_zeros(n, 5, c, hp, wp)
        for j, (a, b) in enumerate(((x, None), (y, None), (x, x), (y, y), (x, y))):
            planes[:, j, :, :h, :w] = a if b is None else a * b
        f = _filter_valid(planes.reshape(n * 5 * c, hp, wp), band)[:, :ho, :wo].reshape(n, 5, c, ho, wo)
        mx, my, sxx, syy, sxy = f.unbind(1)
        vx, vy, cxy = sxx - mx * mx, syy - my * my, sxy - mx * my
        mx, my = mx + k, my + k
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        out.append(s.double().mean(dim=(2, 3)).mean(1))  # mean over pixels per channel, then channels
    return torch.cat(out).float()


class Lpips:
    """LPIPS v0.1 with a real ImageNet trunk; images [B,3,H,W] in [0, 1] (mapped to [-1, 1] inside) -> [B].

    Trunks load lazily and once per instance (`training.inference.load_lpips`; raises if they are
    missing — never a random trunk). `chunk` bounds the images per forward pass (memory).
    """

    def __init__(self, device: str | torch.device = "cpu", chunk: int = 8):
        self.device = torch.device(device)
        self.chunk = chunk
        self._models: dict[str, torch.nn.Module] = {}

    def model(self, net: str) -> torch.nn.Module:
        if net not in self._models:
            self._models[net] = load_lpips(net, self.device)
        return self._models[net]

    MIN_SIZE = 32  # AlexNet's three strided stages leave nothing of smaller images

    @torch.no_grad()
    def __call__(self, pred: torch.Tensor, gt: torch.Tensor, net: str = "vgg") -> torch.Tensor:
        _check_pair(pred, gt)
        if min(pred.shape[-2:]) < self.MIN_SIZE:
            raise ValueError(f"LPIPS needs images of at least {self.MIN_SIZE} px, got {tuple(pred.shape[-2:])}")
        m = self.model(net)
        out = []
        for i in range(0, pred.shape[0], self.chunk):
            a = pred[i:i + self.chunk].to(self.device).float() * 2 - 1
            b = gt[i:i + self.chunk].to(self.device).float() * 2 - 1
            out.append(m(a, b).flatten().cpu())
        return torch.cat(out)


def image_metrics(pred: torch.Tensor, gt: torch.Tensor, lpips: Lpips | None = None) -> dict[str, np.ndarray]:
    """All image metrics per view. pred, gt: [V,3,H,W] in [0, 1] (already on white). -> {name: [V]}.

    Keys: psnr, ssim, lpips_vgg, lpips_alex (the last two only with an `Lpips`; NaN for images smaller
    than `Lpips.MIN_SIZE`, which LPIPS cannot score).
    """
    out = {"psnr": psnr(pred, gt).numpy(), "ssim": ssim(pred, gt).numpy()}
    if lpips is not None:
        small = min(pred.shape[-2:]) < Lpips.MIN_SIZE
        for net in ("vgg", "alex"):
            out[f"lpips_{net}"] = np.full(len(pred), np.nan, np.float32) if small else lpips(pred, gt, net).numpy()
    return out


def mean_finite(values: np.ndarray) -> float:
    """Mean that ignores +inf PSNRs of pixel-identical views (they would make every average infinite)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan
