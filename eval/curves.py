"""Training curves for the HTML report: a run's TensorBoard scalars (OUT/runs/<stage>/tensorboard) drawn as
small PNG line charts with PIL (no plotting library is pinned).

The trainer logs `train/<name>` every `log_every` steps and `val/<name>` at validation
(training/logging.py); one chart per name holds both series, raw values faint and an exponential moving
average on top, so a noisy loss still shows its trend.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

Series = tuple[np.ndarray, np.ndarray]  # steps [N], values [N]
COLOURS = {"train": (31, 119, 180), "val": (214, 39, 40)}


def read_scalars(logdir: str | Path) -> dict[str, Series]:
    """Every scalar tag of the event files in `logdir` -> (steps, values), sorted by step; {} when none.

    A resumed run appends event files with a purge step; TensorBoard's own reader applies it, so a step
    logged twice appears once (the later value)."""
    logdir = Path(logdir)
    if not logdir.is_dir() or not any(logdir.glob("events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0 = keep every point
    quiet = logging.getLogger("tensorboard")  # a resumed run's purge is expected, not worth a warning
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        acc.Reload()
    finally:
        quiet.setLevel(level)
    out = {}
    for tag in acc.Tags().get("scalars", []):
        by_step = {e.step: e.value for e in acc.Scalars(tag)}
        steps = np.array(sorted(by_step), dtype=np.int64)
        out[tag] = (steps, np.array([by_step[s] for s in steps], dtype=np.float64))
    return out


def group_by_name(scalars: dict[str, Series]) -> dict[str, dict[str, Series]]:
    """{"train/loss": s, "val/loss": t, "lr": u} -> {"loss": {"train": s, "val": t}, "lr": {"train": u}}."""
    groups: dict[str, dict[str, Series]] = {}
    for tag, series in sorted(scalars.items()):
        split, _, name = tag.rpartition("/")
        groups.setdefault(name, {})[split or "train"] = series
    return groups


def ema(values: np.ndarray, weight: float = 0.9) -> np.ndarray:
    """TensorBoard's smoothing: s_t = w s_{t-1} + (1 - w) x_t, debiased for the first points."""
    out, s, norm = np.empty_like(values), 0.0, 0.0
    for i, v in enumerate(values):
        s, norm = weight * s + (1 - weight) * v, weight * norm + (1 - weight)
        out[i] = s / norm
    return out


@dataclass
class Axis:
    lo: float
    hi: float
    log: bool

    def __call__(self, v: np.ndarray) -> np.ndarray:
        v = np.log10(np.maximum(v, 1e-30)) if self.log else v
        lo, hi = (math.log10(self.lo), math.log10(self.hi)) if self.log else (self.lo, self.hi)
        return (v - lo) / (hi - lo if hi > lo else 1.0)


def _axis(values: np.ndarray) -> Axis:
    v = values[np.isfinite(values)]
    if not v.size:
        return Axis(0.0, 1.0, False)
    lo, hi = float(v.min()), float(v.max())
    if lo > 0 and hi / lo > 100:  # a loss falling over orders of magnitude reads best on a log axis
        return Axis(lo, hi, True)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
    return Axis(max(lo - pad, 0.0) if lo >= 0 else lo - pad, hi + pad, False)  # a loss axis does not dip below 0


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def plot(title: str, series: dict[str, Series], size: tuple[int, int] = (360, 220)) -> Image.Image:
    """One chart: each split's raw values (faint) and their moving average (solid), step on x."""
    W, H = size
    left, right, top, bottom = 52, 10, 20, 26
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.text((left, 4), title, fill="black", font=font)
    steps = np.concatenate([s for s, _ in series.values()])
    values = np.concatenate([v for _, v in series.values()])
    if not steps.size:
        return img
    x0, x1 = float(steps.min()), float(max(steps.max(), steps.min() + 1))
    ya = _axis(values)
    pw, ph = W - left - right, H - top - bottom
    d.rectangle([left, top, left + pw, top + ph], outline=(160, 160, 160))
    for frac, v in ((0.0, ya.lo), (1.0, ya.hi)):
        y = top + ph * (1 - frac)
        d.text((2, y - 6), _fmt(v), fill=(90, 90, 90), font=font)
    d.text((left, top + ph + 4), f"{int(x0)}", fill=(90, 90, 90), font=font)
    d.text((left + pw - 6 * len(str(int(x1))), top + ph + 4), f"{int(x1)}", fill=(90, 90, 90), font=font)
    d.text((left + pw // 2 - 12, top + ph + 12), "step" + (" (y log)" if ya.log else ""), fill=(90, 90, 90), font=font)

    def points(s: np.ndarray, v: np.ndarray) -> list[tuple[float, float]]:
        ok = np.isfinite(v)
        xs = left + pw * (s[ok] - x0) / (x1 - x0)
        ys = top + ph * (1 - np.clip(ya(v[ok]), 0, 1))
        return list(zip(xs.tolist(), ys.tolist()))

    legend_x = left + pw - 60
    for i, (split, (s, v)) in enumerate(series.items()):
        colour = COLOURS.get(split, (44, 160, 44))
        faint = tuple(int(c + (255 - c) * 0.65) for c in colour)
        if len(s) > 20:
            d.line(points(s, v), fill=faint, width=1)
            d.line(points(s, ema(v)), fill=colour, width=2)
        elif len(s) > 1:
            d.line(points(s, v), fill=colour, width=2)
        for x, y in points(s, v) if len(s) <= 20 else []:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        y = top + 10 + 11 * i
        d.line([(legend_x, y), (legend_x + 12, y)], fill=colour, width=2)
        d.text((legend_x + 16, y - 6), split, fill=colour, font=font)
    return img


def curve_images(logdir: str | Path) -> dict[str, Image.Image]:
    """name -> chart of every scalar name of a run (train and val together); {} when it logged nothing."""
    return {name: plot(name, series) for name, series in group_by_name(read_scalars(logdir)).items()}
