"""eval/html_report.py (+ eval/curves.py): the static HTML report of a run, on a run built from the real
writers (status tables, TensorBoard logger, eval report, GLB export), read back by an HTML parser and, where
Debian's chromium and tools/node_modules are installed, opened in a real headless browser from file://."""

from __future__ import annotations

import json
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from core import manifest
from core.sheets import SheetRow, write_sheet
from eval.curves import ema, read_scalars
from eval.html_report import build, main
from eval.report import write_report
from tests.fake_renders import write_render_folder, write_renders
from tests.node_tools import TOOLS, missing
from training.export import export_glb
from training.logging import Logger

SLUG = "procedural-heldout"
UIDS = ["procedural-100", "procedural-101", "procedural-102"]
METHODS = ["feedforward", "refined"]


def fake_run(out: Path) -> dict:
    """A run folder as the stages leave it: 2 renders ok + 1 failed, a training run with scalars, an eval set
    of 3 assets (one refined row failed), their predicted views and GLBs, and the eval report."""
    write_renders(out, ["a0", "a1"], failed=("a2",), views=2)
    write_sheet(out / "renders" / "sheet.png", [SheetRow("a0", [np.full((32, 32, 3), 200, np.uint8)])])
    log = Logger(out / "runs" / "nerf", progress=False)
    for step in range(0, 100, 5):
        log.scalars(step, {"loss": 1.0 / (1 + step), "psnr": 10 + step / 10})
    log.scalars(50, {"psnr": 14.0}, prefix="val/")
    log.scalars(99, {"psnr": 18.0}, prefix="val/")
    log.close()
    (out / "runs" / "nerf" / "step-100").mkdir()
    es = out / "evalsets" / SLUG
    for i, uid in enumerate(UIDS):
        write_render_folder(es / "renders_eval" / uid, "orbit", views=20, size=32, seed=i)
    manifest.write_rows(manifest.manifest_path(es, "render_eval"),
                        [{"uid": u, "status": "ok", "reason": ""} for u in UIDS]
                        + [{"uid": "procedural-103", "status": "failed", "reason": "timeout after 600 s"}])
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.35)
    rows = []
    for uid in UIDS:
        for k, method in enumerate(METHODS):
            if uid == UIDS[2] and method == "refined":
                rows.append({"uid": uid, "method": method, "status": "failed", "reason": "RuntimeError: boom"})
                continue
            colour = np.array([0.9, 0.2, 0.1]) if k else np.array([0.1, 0.3, 0.9])
            for v in range(20):
                img = np.zeros((32, 32, 4), np.uint8)
                img[8:24, 8:24] = [*(colour * 255).astype(np.uint8), 255]
                (out / "eval" / "views" / method / uid).mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(out / "eval" / "views" / method / uid / f"{v:02d}.png")
            export_glb(out / "eval" / "meshes" / f"{uid}.{method}.glb", sphere.vertices, sphere.faces,
                       lambda p, c=colour: np.broadcast_to(c, (len(p), 3)), texture_size=64, texture_png=False)
            rows.append({"uid": uid, "method": method, "status": "ok", "reason": "", "name": f"thing {uid}",
                         "psnr": 20.0 + k, "ssim": 0.9, "lpips_vgg": 0.1, "cd": 0.01, "iou": 0.7, "fscore": 0.8})
    info = {"source": "procedural", "assets": len(UIDS), "views": 20, "resolution": 32,
            "eval_set": {"slug": SLUG, "source": "procedural", "assets": len(UIDS), "root": str(es), "held_out": True,
                         "leak_check": {"checked": True, "overlap": [], "against": "train shards"}}}
    write_report(rows, out / "eval", info)
    return {"rows": rows}


class _Page(HTMLParser):
    """Collects what the checks need: image sources, links, scripts, the assets table's rows, viewers."""

    def __init__(self) -> None:
        super().__init__()
        self.imgs, self.links, self.scripts, self.viewers, self.asset_rows = [], [], [], [], []
        self._table = None
        self._depth = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
            if self._table == "assets" and self.asset_rows:
                self.asset_rows[-1].append(a["src"])
        elif tag == "a" and "href" in a:
            self.links.append(a["href"])
        elif tag == "script" and "src" in a:
            self.scripts.append(a["src"])
        elif tag == "model-viewer":
            self.viewers.append(a)
        elif tag == "table":
            self._table = a.get("class")
        elif tag == "tr" and self._table == "assets" and self._depth:
            self.asset_rows.append([])
        elif tag == "tbody":
            self._depth = 1

    def handle_endtag(self, tag):
        if tag == "table":
            self._table, self._depth = None, 0


def test_report_shows_every_stage_asset_view_and_glb_with_relative_files(tmp_path):
    out = tmp_path / "run"
    fake_run(out)
    index = build(out)
    assert index == out / "report" / "index.html"
    text = index.read_text()
    p = _Page()
    p.feed(text)
    # every picture and script is inside the report folder, relative, and exists
    for src in p.imgs + p.scripts:
        assert not src.startswith(("/", "http:", "https:", "file:")), src
        assert (index.parent / src).is_file(), src
    for href in p.links:
        if href.startswith("#"):
            assert f'id="{href[1:]}"' in text, href
        else:
            assert (index.parent / href).is_file(), href
    # one row per eval asset, with ground truth + feed-forward + refined views (2 each); the failed one says why
    assert len(p.asset_rows) == len(UIDS)
    assert [len(r) for r in p.asset_rows] == [6, 6, 4]
    assert "failed: RuntimeError: boom" in text
    # the asset's pictures are the files the stages wrote, not something else
    first = p.asset_rows[0]
    assert Image.open(index.parent / first[0]).tobytes() == Image.open(
        out / "evalsets" / SLUG / "renders_eval" / UIDS[0] / "orbit" / "00.rgba.png").tobytes()
    assert Image.open(index.parent / first[4]).tobytes() == Image.open(
        out / "eval" / "views" / "refined" / UIDS[0] / "00.png").tobytes()
    # stage counts and reasons: render 2 ok / 1 failed (blender crashed), the eval set's timeout
    assert "<code>manifest/render</code>" in text and "blender crashed" in text and "timeout after 600 s" in text
    # training curves: a chart per scalar name; the latest checkpoint
    assert any("curves/nerf-loss.png" in s for s in p.imgs) and any("curves/nerf-psnr.png" in s for s in p.imgs)
    assert ">100<" in text
    # Table 1 layout: one row per method with its mean, the paper's rows for orientation
    assert "GTR feed-forward" in text and "20.00" in text and "paper, GSO" in text
    # a 3D viewer per asset with a GLB, each GLB handed over as a script holding exactly its bytes
    if p.viewers:
        assert len(p.viewers) == len(UIDS)
        glbs = json.loads(p.viewers[0]["data-glbs"])
        assert set(glbs) == set(METHODS)
        js = (index.parent / glbs["refined"]).read_text()
        import base64

        payload = js.split('", "', 1)[1].rsplit('"', 1)[0]
        assert base64.b64decode(payload) == (out / "eval" / "meshes" / f"{UIDS[0]}.refined.glb").read_bytes()
        assert (index.parent / "vendor" / "LICENSE.model-viewer.txt").is_file()


def test_report_without_viewer_or_eval_says_so(tmp_path):
    out = tmp_path / "run"
    write_renders(out, ["a0"], views=2)
    index = build(out, viewer_js=tmp_path / "absent.js")
    text = index.read_text()
    assert "No evaluation yet" in text and "No TensorBoard scalars yet" in text
    assert "<model-viewer" not in text and not (index.parent / "vendor").exists()
    fake_run(out)
    rep = json.loads((out / "eval" / "report.json").read_text())  # a row naming a path is not followed
    rep["rows"].append({"uid": "../../escape", "method": "refined", "status": "ok"})
    (out / "eval" / "report.json").write_text(json.dumps(rep))
    text = build(out, viewer_js=tmp_path / "absent.js").read_text()
    assert "escape" not in text and not (tmp_path / "escape").exists()
    assert "the 3D viewer is not installed" in text and "refined.glb</a>" in text
    assert main(["--out", str(tmp_path / "nothing")]) == 2


def test_scalars_come_back_as_logged_and_smoothing_is_tensorboards(tmp_path):
    log = Logger(tmp_path, progress=False)
    for step in (0, 10, 20):
        log.scalars(step, {"loss": step * 0.5})
    log.close()
    s = read_scalars(tmp_path / "tensorboard")
    np.testing.assert_array_equal(s["train/loss"][0], [0, 10, 20])
    np.testing.assert_allclose(s["train/loss"][1], [0.0, 5.0, 10.0])
    # debiased EMA: first value is the value itself; second = (0.9*0.1*x0 + 0.1*x1) / (1 - 0.9^2)
    np.testing.assert_allclose(ema(np.array([2.0, 4.0]), 0.9), [2.0, (0.09 * 2 + 0.1 * 4) / 0.19])
    assert read_scalars(tmp_path / "none") == {}


@pytest.mark.skipif(bool(missing("playwright-core", "@google/model-viewer", browser=True)),
                    reason=missing("playwright-core", "@google/model-viewer", browser=True) or "")
def test_report_in_a_headless_browser_loads_cleanly_and_draws_a_model(tmp_path):
    out = tmp_path / "run"
    fake_run(out)
    index = build(out)
    shot = tmp_path / "viewer.png"
    r = subprocess.run(["node", str(TOOLS / "browser_check.mjs"), str(index), str(shot), "90000"],
                       capture_output=True, text=True, timeout=240)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["errors"] == [] and result["failedRequests"] == [], result
    assert result["rows"] == len(UIDS) and result["viewers"] == len(UIDS)
    assert result["loaded"] is True, result
    # The first viewer shows the refined sphere (baked red): pixels unlike the viewer's background colour
    # (#eef1f5), and red ones among them. An empty or failed viewer is all background.
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    background = np.array([0xEE, 0xF1, 0xF5])
    drawn = np.abs(img - background).sum(-1) > 30
    reddish = (img[..., 0] > img[..., 2] + 40) & drawn
    assert drawn.mean() > 0.05 and reddish.mean() > 0.02, (drawn.mean(), reddish.mean())
