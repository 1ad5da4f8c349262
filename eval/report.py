"""The evaluation report: per-asset rows → report.{json,csv,md} in the paper's Table 1 / Table 3 layout, and
contact sheets (ground truth vs each method on a few orbit views).

A row is a dict: uid, method, status (ok | failed), reason, and the metric columns below (NaN when a part
could not be scored). Means are over the ok rows of a method; PSNR averages skip +inf (pixel-identical views).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from core.io import atomic_write_text
from core.sheets import SheetRow, write_sheet

COLUMNS = ["psnr", "ssim", "lpips_vgg", "lpips_alex", "cd", "cd_l2", "iou_points", "iou", "fscore", "icp_residual"]
METHOD_TITLES = {
    "feedforward": "GTR feed-forward",
    "refined": "GTR + texture refinement (f_c + triplane)",
    "nerf_mc": "NeRF + marching cubes (ablation)",
    "refined_color": "Texture refinement: colour model only (Table 3)",
    "refined_triplane": "Texture refinement: triplane only (Table 3)",
}
# Paper Table 1 (GSO), for orientation only: different assets, resolution and training budget.
PAPER_GSO = {"feedforward": {"psnr": 28.67, "ssim": 0.9456, "lpips": 0.0549, "cd": 0.7404, "iou": 0.7077},
             "refined": {"psnr": 29.79, "ssim": 0.9603, "lpips": 0.0468}}


def _finite_mean(values: list[float]) -> float:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


def summarize(rows: list[dict]) -> dict[str, dict]:
    """{method: {column: mean over ok rows, "ok": n, "failed": n}} in first-seen method order."""
    out: dict[str, dict] = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == m]
        ok = [r for r in mine if r["status"] == "ok"]
        out[m] = {c: _finite_mean([r.get(c) for r in ok]) for c in COLUMNS}
        out[m]["ok"], out[m]["failed"] = len(ok), len(mine) - len(ok)
    return out


def _fmt(x: float, digits: int) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _asset(r: dict) -> str:
    return f"{r['uid']} ({r['name']})" if r.get("name") else r["uid"]


def _evalset_lines(es: dict) -> list[str]:
    """The eval set paragraph: which set, where, how many, and the leak check (loud when it fails)."""
    leak = es.get("leak_check", {})
    lines = [f"Eval set `{es['slug']}` ({'held-out' if es.get('held_out') else 'val split of the training data'}): "
             f"{es['assets']} assets from `{es['source']}` under `{es['root']}`"
             + (f"; {es['excluded_training']} candidates dropped because training used them"
                if es.get("excluded_training") else "") + "."]
    if leak.get("overlap"):
        n = len(leak["overlap"])
        lines += ["", f"> **WARNING — TRAIN/EVAL LEAK: {n} of {es['assets']} eval assets are in the training "
                  f"shards** ({leak['against']}): {', '.join(leak['overlap'][:10])}"
                  f"{' …' if n > 10 else ''}. These numbers do not measure generalisation."]
    elif leak.get("checked"):
        lines.append(f"Leak check: no eval uid is in {leak['against']}.")
    else:
        lines.append(f"Leak check not done: {leak.get('note', 'no shards index')}.")
    return lines


def markdown(rows: list[dict], info: dict) -> str:
    s = summarize(rows)
    lines = ["# Evaluation report", "",
             *(_evalset_lines(info["eval_set"]) if info.get("eval_set") else
               [f"{info.get('assets', 0)} assets from `{info.get('source', '')}`."]), "",
             f"Checkpoint `{info.get('checkpoint', '')}`; {info.get('views', 20)} ground-truth views per asset "
             f"(protocol `{info.get('protocol', 'instantmesh')}`) at {info.get('resolution', '?')}², composited on white.",
             "", "| Method | PSNR ↑ | SSIM ↑ | LPIPS VGG ↓ | LPIPS Alex ↓ | CD×100 ↓ | IoU (points, paper) ↑ | "
             f"IoU (solids) ↑ | F@{info.get('fscore_threshold', '?')} ↑ | ICP residual | ok / failed |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m, v in s.items():
        lines.append(f"| {METHOD_TITLES.get(m, m)} | {_fmt(v['psnr'], 2)} | {_fmt(v['ssim'], 4)} | "
                     f"{_fmt(v['lpips_vgg'], 4)} | {_fmt(v['lpips_alex'], 4)} | {_fmt(v['cd'] * 100, 4)} | "
                     f"{_fmt(v['iou_points'], 4)} | {_fmt(v['iou'], 4)} | {_fmt(v['fscore'], 4)} | "
                     f"{_fmt(v['icp_residual'], 4)} | {v['ok']} / {v['failed']} |")
    lines += ["", "Paper, GSO (Table 1), for orientation (other assets, 512², full training): feed-forward "
              "PSNR 28.67, SSIM 0.9456, LPIPS 0.0549, CD 0.7404, IoU 0.7077; refined PSNR 29.79, SSIM 0.9603, "
              "LPIPS 0.0468.", "",
              "Conventions (docs/eval.md): CD = mean squared nearest distance, both directions summed, ×100, in "
              "the [-1, 1]³ frame after ICP (the paper's magnitudes rule out unsquared distances); IoU (points) = "
              "IoU of the voxels the two surface samples occupy on a "
              f"{info.get('iou_points_resolution', '?')}³ grid (the paper's \"from 16000 surface points\"); "
              "IoU (solids) by winding numbers (exact by rays for closed meshes, approximate for open ones) on a "
              f"{info.get('iou_resolution', '?')}³ grid; {info.get('points', '?')} surface points per mesh."]
    failed = [r for r in rows if r["status"] != "ok" or r.get("notes")]
    if failed:
        lines += ["", "## Failures and notes", "", "| asset | method | status | reason / note |",
                  "| --- | --- | --- | --- |"]
        for r in failed:
            why = r.get("reason") or r.get("notes") or ""
            lines.append(f"| {_asset(r)} | {r['method']} | {r['status']} | {why.replace('|', '/')} |")
    lines += ["", "## Per asset", "", "| asset | method | PSNR | SSIM | LPIPS VGG | CD×100 | IoU (points) | IoU |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["status"] == "ok":
            lines.append(f"| {_asset(r)} | {r['method']} | {_fmt(r.get('psnr'), 2)} | {_fmt(r.get('ssim'), 4)} | "
                         f"{_fmt(r.get('lpips_vgg'), 4)} | {_fmt((r.get('cd') or math.nan) * 100, 4)} | "
                         f"{_fmt(r.get('iou_points'), 4)} | {_fmt(r.get('iou'), 4)} |")
    return "\n".join(lines) + "\n"


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        return _json_safe(x.item())
    return x


def write_report(rows: list[dict], out_dir: Path, info: dict) -> dict[str, Path]:
    """Write report.json (info, per-method means, rows), report.csv (rows + one mean row per method), report.md."""
    out_dir = Path(out_dir)
    summary = summarize(rows)
    paths = {"json": out_dir / "report.json", "csv": out_dir / "report.csv", "md": out_dir / "report.md"}
    atomic_write_text(paths["json"], json.dumps(_json_safe({"info": info, "mean": summary, "rows": rows}), indent=1))
    fields = ["uid", "name", "method", "status", "reason", *COLUMNS, "notes"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in fields})
    for m, v in summary.items():
        w.writerow({"uid": "MEAN", "method": m, "status": f"{v['ok']} ok / {v['failed']} failed",
                    **{c: v[c] for c in COLUMNS}})
    atomic_write_text(paths["csv"], buf.getvalue())
    atomic_write_text(paths["md"], markdown(rows, info))
    return paths


def contact_sheet(path: Path, gt: list[np.ndarray], preds: dict[str, list[np.ndarray] | None], tile: int = 128) -> Path:
    """Rows: ground truth, then each method (blank when it failed); columns: the chosen orbit views.

    Images are uint8 RGB [H,W,3] (already composited on white).
    """
    rows = [SheetRow("ground truth", list(gt))]
    rows += [SheetRow(name if images is not None else f"{name} (failed)", list(images or []))
             for name, images in preds.items()]
    return write_sheet(path, rows, tile=tile, columns=len(gt), labels="left", label_width=150)
