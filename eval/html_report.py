"""`make report`: one static page over everything a run wrote, OUT/report/index.html, that works offline.

    python -m eval.html_report [--config C] [--out OUT] [--dest DIR] [--viewer FILE]

It reads OUT's files only (it runs no model): the status manifests (per-stage counts and the reasons of
every row that is not ok), the render contact sheets, the training runs' TensorBoard scalars (drawn as
PNG curves, eval/curves.py), the evaluation report (OUT/eval/report.json: the table in the paper's
Table 1 layout, one row per asset with its ground-truth and predicted views) and each predicted GLB in
an interactive 3D viewer (eval/html_page.py says how that works from file://). Every picture is copied
into the report folder and linked relatively; the folder is written under a temporary name and renamed,
so it is complete or absent. What a run has not produced yet (no eval, no training) is said, not an error.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from core import manifest
from core.cli import config_from_args, stage_parser
from core.io import atomic_dir, clean_temporaries
from core.layout import UID_RE, view_name
from eval.curves import curve_images
from eval.html_page import VIEWER_JS, esc, glb_script, page, table, vendor_viewer
from eval.report import METHOD_TITLES, PAPER_GSO

# Table 1's columns: (key in report.json, heading, digits, scale); CD is reported ×100 as in the paper.
TABLE1 = [("psnr", "PSNR ↑", 2, 1), ("ssim", "SSIM ↑", 4, 1), ("lpips_vgg", "LPIPS (VGG) ↓", 4, 1),
          ("cd", "CD×100 ↓", 4, 100), ("iou", "IoU ↑", 4, 1), ("fscore", "F-score ↑", 4, 1)]
SHOWN_VIEWS = 2  # orbit views per asset and method on the page (0 and the opposite side)
METHOD_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")


def _num(x: Any, digits: int, scale: float = 1) -> str:
    return "–" if x is None or not isinstance(x, (int, float)) or not math.isfinite(x) else f"{x * scale:.{digits}f}"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Report:
    """Builds the page into `dest` (the temporary report folder), copying what it shows."""

    def __init__(self, out: Path, dest: Path, final: Path, viewer_js: Path = VIEWER_JS):
        self.out, self.dest, self.final = out, dest, final  # final: where `dest` is renamed to (relative links)
        self.copied: dict[Path, str] = {}
        self.viewer_note = vendor_viewer(dest, viewer_js)

    def image(self, src: Path, name: str, cls: str = "view", alt: str = "") -> str:
        """An <img> of a copy of `src` under img/ (once per source); a note when it is missing."""
        if not src.is_file():
            return f'<span class="muted">({esc(alt or src.name)} missing)</span>'
        if src not in self.copied:
            rel = f"img/{name}"
            (self.dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, self.dest / rel)
            self.copied[src] = rel
        return f'<img class="{cls}" src="{esc(self.copied[src])}" alt="{esc(alt or name)}" loading="lazy">'

    # ------------------------------------------------------------------------------------------------------

    def stages(self) -> str:
        """Per-stage status counts of every manifest (the run's and each eval set's), with the reasons."""
        tables = [(f"manifest/{s}", manifest.manifest_path(self.out, s)) for s in manifest.STAGES]
        for es in sorted((self.out / "evalsets").glob("*/manifest")):
            tables += [(f"evalsets/{es.parent.name}/{p.stem}", p) for p in sorted(es.glob("*.parquet"))]
        rows, details = [], []
        for name, path in tables:
            recs = manifest.read_rows(path) if path.is_file() else []
            if not recs:
                continue
            c = Counter(r["status"] for r in recs)
            flagged = sum(1 for r in recs if r["status"] == manifest.OK and r.get("quality_ok") is False)
            rows.append([f"<code>{esc(name)}</code>", *(f'<span class="{"bad" if s == manifest.FAILED and c[s] else ""}">'
                                                      f"{c[s]}</span>" for s in manifest.STATUSES),
                         str(flagged) if "quality_ok" in recs[0] else ""])
            why = Counter((r.get("reason") or "no reason given")[:240] for r in recs if r["status"] != manifest.OK)
            example = {}
            for r in recs:
                if r["status"] != manifest.OK:
                    example.setdefault((r.get("reason") or "no reason given")[:240], r["uid"])
            if why:
                details.append(f"<details><summary><code>{esc(name)}</code>: {sum(why.values())} not ok</summary>"
                               + table(["reason", "rows", "e.g."], [[esc(w), str(n), f"<code>{esc(example[w])}</code>"]
                                                                    for w, n in why.most_common(30)]) + "</details>")
        if not rows:
            return "<p class=muted>No status tables yet (run <code>make data</code>).</p>"
        return (table(["stage table", "ok", "skipped", "failed", "ok but quality-flagged"], rows)
                + "".join(details) + self._runs())

    def _runs(self) -> str:
        rows = []
        for stage in ("nerf", "mesh"):
            run = self.out / "runs" / stage
            steps = sorted(int(p.name[5:]) for p in run.glob("step-*") if p.name[5:].isdigit())
            if run.is_dir():
                rows.append([f"<code>runs/{stage}</code>", str(steps[-1]) if steps else "no checkpoint yet",
                             ", ".join(map(str, steps))])
        return table(["training run", "latest checkpoint step", "checkpoints kept"], rows) if rows else ""

    def renders(self) -> str:
        sheets = [("training renders", self.out / "renders" / "sheet.png")]
        sheets += [(f"eval set {p.parent.parent.name}", p) for p in sorted(self.out.glob("evalsets/*/renders_eval/sheet.png"))]
        parts = [f"<h3>{esc(title)}</h3>{self.image(p, f'sheets/{i}.png', 'sheet', title)}"
                 for i, (title, p) in enumerate(sheets) if p.is_file()]
        return "".join(parts) or "<p class=muted>No contact sheets yet (run <code>make render</code>).</p>"

    def training(self) -> str:
        parts = []
        for stage in ("nerf", "mesh"):
            charts = curve_images(self.out / "runs" / stage / "tensorboard")
            if not charts:
                continue
            imgs = []
            for name, chart in charts.items():
                rel = f"img/curves/{stage}-{name.replace('/', '_')}.png"
                (self.dest / rel).parent.mkdir(parents=True, exist_ok=True)
                chart.save(self.dest / rel)
                imgs.append(f'<img src="{esc(rel)}" alt="{esc(stage)} {esc(name)}" width="{chart.width}" height="{chart.height}">')
            parts.append(f"<h3>Stage {'1 (NeRF)' if stage == 'nerf' else '2 (mesh)'}: <code>runs/{stage}</code></h3>"
                         f'<div class="curves">{"".join(imgs)}</div>')
        return "".join(parts) or "<p class=muted>No TensorBoard scalars yet (run <code>make train-nerf</code>).</p>"

    # ------------------------------------------------------------------------------------------------------

    def evaluation(self, rep: dict | None) -> str:
        if rep is None:
            return "<p class=muted>No evaluation yet (run <code>make eval</code>): OUT/eval/report.json missing.</p>"
        info, mean = rep.get("info", {}), rep.get("mean", {})
        es = info.get("eval_set") or {}
        leak = es.get("leak_check") or {}
        lines = [f"<p>Eval set <code>{esc(es.get('slug', '?'))}</code>: {esc(info.get('assets', '?'))} assets from "
                 f"<code>{esc(info.get('source', '?'))}</code>; {esc(info.get('views', '?'))} orbit views at "
                 f"{esc(info.get('resolution', '?'))}², composited on white.</p>"]
        if leak.get("overlap"):
            lines.append(f'<p class="warn"><b>Train/eval leak:</b> {len(leak["overlap"])} eval assets are in the '
                         f"training shards: {esc(', '.join(leak['overlap'][:10]))}. These numbers do not measure "
                         "generalisation.</p>")
        elif leak.get("checked"):
            lines.append(f"<p>Leak check: no eval uid is in {esc(leak.get('against', 'the training shards'))}.</p>")
        head = ["Method", *(h for _, h, _, _ in TABLE1), "ok / failed"]
        rows = [[esc(METHOD_TITLES.get(m, m)), *(_num(v.get(k), d, s) for k, _, d, s in TABLE1),
                 f"{v.get('ok', 0)} / {v.get('failed', 0)}"] for m, v in mean.items()]
        for m, ref in PAPER_GSO.items():
            rows.append([f'<i class="muted">paper, GSO: {esc(METHOD_TITLES.get(m, m))}</i>',
                         *(f'<i class="muted">{_num(ref.get("lpips" if k == "lpips_vgg" else k), d)}</i>'
                           for k, _, d, _ in TABLE1), ""])
        lines.append(table(head, rows, "table1"))
        lines.append("<p class=muted>Paper rows (Table 1, GSO) for orientation only: other assets, 512², full "
                     "training. The full table with LPIPS (AlexNet) and ICP residuals: <code>eval/report.md</code>.</p>")
        return "".join(lines)

    def assets(self, rep: dict | None) -> str:
        if rep is None:
            return "<p class=muted>No evaluated assets yet.</p>"
        rows_by_uid: dict[str, list[dict]] = {}
        # uids and method names become file names below: only the contract's spellings (no "/", no "..")
        good = [r for r in rep.get("rows", []) if UID_RE.match(str(r.get("uid"))) and METHOD_RE.match(str(r.get("method")))]
        for r in good:
            rows_by_uid.setdefault(r["uid"], []).append(r)
        methods = [m for m in rep.get("mean", {}) if METHOD_RE.match(m)] or sorted({r["method"] for r in good})
        slug = ((rep.get("info") or {}).get("eval_set") or {}).get("slug", "")
        views = int((rep.get("info") or {}).get("views") or 20)
        pick = sorted({0, views // 2})[:SHOWN_VIEWS]
        head = ["asset", "ground truth", *(esc(METHOD_TITLES.get(m, m).split(" (")[0]) for m in methods), "3D (GLB)"]
        body = [self._asset_row(uid, recs, methods, slug, pick, views) for uid, recs in rows_by_uid.items()]
        note = f'<p class="warn">{esc(self.viewer_note)}</p>' if self.viewer_note else ""
        return note + table(head, body, "assets")

    def _asset_row(self, uid: str, recs: list[dict], methods: list[str], slug: str, pick: list[int], views: int) -> list[str]:
        by_method = {r["method"]: r for r in recs}
        name = next((r.get("name") for r in recs if r.get("name")), "")
        orbit = self.out / "evalsets" / slug / "renders_eval" / uid / "orbit"
        gt = "".join(self.image(orbit / view_name(i, "rgba", views), f"assets/{uid}/gt-{i:02d}.png", alt=f"ground truth view {i}")
                     for i in pick)
        sheet = self._copy_sheet(uid)
        cells = [f"<code>{esc(uid)}</code><br>{esc(name)}" + (f'<br><a href="{esc(sheet)}">contact sheet</a>' if sheet else ""),
                 gt]
        for m in methods:
            r = by_method.get(m)
            if r is None:
                cells.append('<span class="muted">not run</span>')
            elif r.get("status") != "ok":
                cells.append(f'<span class="bad">failed: {esc(r.get("reason", ""))}</span>')
            else:
                imgs = "".join(self.image(self.out / "eval" / "views" / m / uid / f"{i:02d}.png",
                                          f"assets/{uid}/{m}-{i:02d}.png", alt=f"{m} view {i}") for i in pick)
                cells.append(imgs + "<br>" + " · ".join(f"{h.split(' ')[0]} {_num(r.get(k), d, s)}"
                                                        for k, h, d, s in TABLE1 if k in ("psnr", "ssim", "lpips_vgg", "cd")))
        cells.append(self._viewer(uid, [m for m in methods if by_method.get(m, {}).get("status") == "ok"]))
        return cells

    def _copy_sheet(self, uid: str) -> str:
        src = self.out / "eval" / "sheets" / f"{uid}.png"
        if not src.is_file():
            return ""
        self.image(src, f"assets/{uid}/sheet.png")
        return self.copied[src]

    def _viewer(self, uid: str, methods: list[str]) -> str:
        glbs = {m: self.out / "eval" / "meshes" / f"{uid}.{m}.glb" for m in methods}
        glbs = {m: p for m, p in glbs.items() if p.is_file()}
        if not glbs:
            return '<span class="muted">no GLB (eval.mesh_export=none?)</span>'
        links = " ".join(f'<a href="{esc(os.path.relpath(p, self.final))}">{esc(m)}.glb</a>' for m, p in glbs.items())
        if self.viewer_note:
            return links
        vid = f"viewer-{uid}"
        scripts = {}
        for m, p in glbs.items():
            rel = f"meshes/{p.name}.js"
            (self.dest / "meshes").mkdir(exist_ok=True)
            glb_script(p, f"{vid}:{m}", self.dest / rel)
            scripts[m] = rel
        first = "refined" if "refined" in glbs else next(iter(glbs))
        buttons = "".join(f'<button data-viewer="{esc(vid)}" data-method="{esc(m)}">{esc(m)}</button>' for m in glbs)
        return (f'<model-viewer id="{esc(vid)}" data-glbs="{esc(json.dumps(scripts))}" data-first="{esc(first)}" '
                f'camera-controls interaction-prompt="none" '
                f'alt="{esc(uid)} predicted mesh"></model-viewer><div class="pick">{buttons}</div>'
                f'<div class="muted">download: {links}</div>')


def build(out: str | Path, dest: str | Path | None = None, viewer_js: Path = VIEWER_JS) -> Path:
    """Write the report of run `out` into `dest` (default OUT/report/) atomically; return index.html."""
    out = Path(out)
    dest = Path(dest) if dest else out / "report"
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_temporaries(dest.parent)
    rep = _read_json(out / "eval" / "report.json")
    with atomic_dir(dest, overwrite=True) as tmp:
        r = Report(out, Path(tmp), dest, viewer_js)
        sections = [("stages", "Stages", r.stages()), ("renders", "Renders", r.renders()),
                    ("training", "Training", r.training()), ("evaluation", "Evaluation", r.evaluation(rep)),
                    ("assets", "Per asset", r.assets(rep))]
        nav = "".join(f'<a href="#{k}">{t}</a>' for k, t, _ in sections)
        body = (f"<h1>GTR run report</h1><p class=muted>Run folder <code>{esc(out.resolve())}</code>; written "
                f"{time.strftime('%Y-%m-%d %H:%M')}.</p><nav>{nav}</nav>"
                + "".join(f'<section id="{k}"><h2>{t}</h2>{html}</section>' for k, t, html in sections)
                + "<footer><p class=muted>3D viewer: @google/model-viewer (Apache-2.0; bundles three.js, MIT, and "
                "lit, BSD-3-Clause), licences in vendor/.</p></footer>")
        (Path(tmp) / "index.html").write_text(page("GTR run report", body, viewer=not r.viewer_note))
    return dest / "index.html"


def main(argv: list[str] | None = None) -> int:
    p = stage_parser(__doc__.split("\n\n")[0])
    p.add_argument("--dest", default=None, help="report folder (default OUT/report)")
    p.add_argument("--viewer", default=str(VIEWER_JS), help="model-viewer UMD script to copy in (default: tools/node_modules)")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    if not cfg.out_path.is_dir():
        print(f"error: run folder {cfg.out_path} does not exist", file=sys.stderr)
        return 2
    index = build(cfg.out_path, args.dest, Path(args.viewer))
    print(f"report: {index} (open it in a browser; it needs no server)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
