"""Learning curves of the demo recipe: held-out-asset PSNR / mask IoU against training steps and asset count.

Procedural-world assets (the demo's `data.procedural_*` settings) are rendered once with the demo's render
settings into OUT/bench/learning/curves (reused on later runs); held-out assets are the same generator at
indices after the training ones, as the demo's eval set. The stage-1 recipe is replayed through the model
API (`bench.learning_rung1.memorise`: random supervision rays over the training views, MSE + mask, AdamW with
the loop's warm-up + cosine, the demo's lr / batch / model; as many rays per asset as the demo supervises pixels,
1024 = one 32² view), not through the shard loader, so that one
rendered set serves every asset count. Scores: held-out views of unseen assets, inputs 4 fixed views.
Writes the two curves as `curves.png` next to the renders (docs/learning_curves.png is a copy of one).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from bench.common import result
from core.config import Config

STEPS = 400  # training steps of every run; the step curve has a point every STEPS // 4
ASSET_COUNTS = (4, 8, 16)  # training assets of the runs (the largest run is also the step curve)
HELD_ASSETS = 8  # unseen assets scored
HELD_START = 1000  # index of the first held-out asset (pipelines.evalset also starts after training's)


def render_world(cfg: Config, out_dir: Path, indices: range) -> list[Path]:
    """Render folders of procedural-world assets `indices` (cfg.data / cfg.render settings), made if absent."""
    from bench.learning import render_job
    from pipelines.sources.procedural import candidates, fetch

    d = cfg.data
    folders = []
    for cand in candidates(len(indices), indices.start, d.procedural_preset, d.procedural_seed,
                           d.procedural_difficulty):
        dest = out_dir / "renders" / cand["uid"]
        if not (dest / "cameras.npz").is_file():
            (out_dir / "assets").mkdir(parents=True, exist_ok=True)
            row = fetch(cand, str(out_dir / "assets"), d.procedural_texture_size, d.procedural_preset,
                        d.procedural_seed, d.procedural_difficulty)
            render_job(cfg, {**cand, **row}, dest, views=cfg.render.views)
        folders.append(dest)
    return folders


def plot(path: Path, panels: list[tuple[str, list[float], dict[str, list[float]]]]) -> Path:
    """A small line chart per panel (title, x values, {series name: y values}); series sharing a unit (the
    name up to its first comma: "PSNR dB", "PSNR dB, lift off") share a range, printed in the legend, and
    every point is labelled with its value."""
    W, H, pad = 420, 300, 46
    img = Image.new("RGB", (W * len(panels), H), "white")
    draw = ImageDraw.Draw(img)
    colours = ["#1f77b4", "#d62728", "#2ca02c"]
    for k, (title, xs, series) in enumerate(panels):
        x0, span = k * W, max(1e-9, xs[-1] - xs[0])
        px = [x0 + pad + (x - xs[0]) / span * (W - pad - 40) for x in xs]
        draw.text((x0 + pad, 8), title, fill="black")
        draw.rectangle([x0 + pad, pad, x0 + W - 40, H - pad], outline="black")
        for x, p in zip(xs, px):
            draw.text((p - 8, H - pad + 4), f"{x:g}", fill="black")
        ranges: dict[str, tuple[float, float]] = {}
        for name, ys in series.items():
            unit = name.split(",")[0]
            lo, hi = ranges.get(unit, (min(ys), max(ys)))
            ranges[unit] = (min(lo, *ys), max(hi, *ys))
        for j, (name, ys) in enumerate(series.items()):
            lo, hi = ranges[name.split(",")[0]]
            lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-6 else (lo, hi)
            pts = [(p, H - pad - (y - lo) / (hi - lo) * (H - 2 * pad)) for p, y in zip(px, ys)]
            colour = colours[j % len(colours)]
            draw.line(pts, fill=colour, width=2)
            for (qx, qy), y in zip(pts, ys):
                draw.ellipse([qx - 3, qy - 3, qx + 3, qy + 3], fill=colour)
                draw.text((qx + 4, qy - 12 + 24 * j), f"{y:.3g}", fill=colour)
            draw.text((x0 + W - 170, pad + 4 + 12 * j), f"{name} [{lo:.3g}, {hi:.3g}]", fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def run(cfg: Config, out_dir: Path) -> list[dict[str, Any]]:
    from bench.learning_rung1 import MemoriseSettings, memorise

    train = render_world(cfg, out_dir, range(max(ASSET_COUNTS)))
    held = render_world(cfg, out_dir, range(HELD_START, HELD_START + HELD_ASSETS))
    n = cfg.nerf
    s = MemoriseSettings(steps=STEPS, eval_every=STEPS // 4, batch=n.batch_size, rays=n.rays or n.sup_views * n.render_size**2,
                         lr=n.lr, warmup=n.warmup_steps, mask_weight=n.mask_weight,
                         input_size=cfg.loader.input_size)
    runs = {}
    for count in sorted(ASSET_COUNTS, reverse=True):
        runs[count] = memorise(train[:count], replace(s, batch=min(s.batch, count)), cfg.model, held)
    big = runs[max(ASSET_COUNTS)]
    # What users had before `model.lift` (the demo's default since round 3): the same largest run without it.
    before = (memorise(train[: max(ASSET_COUNTS)], s, replace(cfg.model, lift=False), held) if cfg.model.lift
              else [None] * len(big))
    steps = [p["step"] for p in big]
    counts = sorted(runs)
    (out_dir / "curves.json").write_text(json.dumps({**{str(c): r for c, r in runs.items()},
                                                     "lift off": before}, indent=1))
    png = plot(out_dir / "curves.png", [
        (f"held-out assets vs steps ({max(ASSET_COUNTS)} training assets)", steps,
         {"PSNR dB": [p["held_psnr"] for p in big], "mask IoU": [p["held_iou"] for p in big],
          **({"PSNR dB, lift off": [p["held_psnr"] for p in before]} if before[0] else {})}),
        (f"held-out assets vs training assets ({STEPS} steps)", counts,
         {"PSNR dB": [runs[c][-1]["held_psnr"] for c in counts], "mask IoU": [runs[c][-1]["held_iou"] for c in counts]}),
    ])
    note = f"{HELD_ASSETS} unseen assets, difficulty {cfg.data.procedural_difficulty}; curves {png}"
    rows = [result(f"curve: held-out PSNR at step {p['step']} ({max(ASSET_COUNTS)} assets)", p["held_psnr"],
                   b["held_psnr"] if b else None, "model.lift off (before)" if b else "", "dB",
                   f"mask IoU {p['held_iou']:.3f}" + (f" (lift off {b['held_iou']:.3f})" if b else "")
                   + f"; {p['seconds']:.0f} s; {note}", higher_is_better=True)
            for p, b in zip(big, before)]
    rows += [result(f"curve: held-out PSNR with {c} training assets ({STEPS} steps)", runs[c][-1]["held_psnr"],
                    None, "", "dB", f"mask IoU {runs[c][-1]['held_iou']:.3f}; own held-out views "
                    f"{runs[c][-1]['psnr']:.2f} dB; {note}", higher_is_better=True) for c in counts]
    return rows
