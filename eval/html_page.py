"""The pieces of the HTML report that are not about the run: escaping, tables, the page shell (CSS and the
script that feeds GLBs to the 3D viewer), and the vendored viewer itself.

The page must work opened straight from disk (file://) with no network. Browsers refuse `fetch()` of
file:// URLs and module scripts from them, so: the viewer is `@google/model-viewer`'s UMD build (a classic
script, three.js and lit bundled), copied from tools/node_modules at report time with its licences; each GLB
travels as a small script (`meshes/<name>.glb.js`) that hands its bytes (base64) to the page, which makes a
blob: URL of them for the viewer. Over http the same files work unchanged.
"""

from __future__ import annotations

import base64
import html
import json
import shutil
from pathlib import Path

from core.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
NODE_MODULES = REPO / "tools" / "node_modules"
VIEWER_JS = NODE_MODULES / "@google" / "model-viewer" / "dist" / "model-viewer-umd.min.js"
# The UMD build bundles three.js (MIT) and lit (BSD-3-Clause) with model-viewer (Apache-2.0): all three travel.
VIEWER_LICENSES = {"model-viewer": NODE_MODULES / "@google" / "model-viewer" / "LICENSE",
                   "three.js": NODE_MODULES / "three" / "LICENSE", "lit": NODE_MODULES / "lit" / "LICENSE"}


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """An HTML table; cells are given as HTML (escape text with `esc` first)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def vendor_viewer(dest: Path, viewer_js: Path = VIEWER_JS) -> str:
    """Copy the viewer script and its licences into `dest/vendor/`; return "" or why the viewer is skipped."""
    if not viewer_js.is_file():
        return (f"the 3D viewer is not installed ({viewer_js.relative_to(REPO) if viewer_js.is_relative_to(REPO) else viewer_js} "
                "missing: run `npm ci` in tools/); the GLBs are linked below each asset instead")
    (dest / "vendor").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(viewer_js, dest / "vendor" / "model-viewer.min.js")
    for name, lic in VIEWER_LICENSES.items():
        if lic.is_file():
            shutil.copyfile(lic, dest / "vendor" / f"LICENSE.{name}.txt")
    return ""


def glb_script(glb: Path, key: str, dest: Path) -> None:
    """Write `dest` (a .js file) that hands the GLB's bytes to the page: `gtrGlb(key, base64)`."""
    data = base64.b64encode(glb.read_bytes()).decode("ascii")
    atomic_write_text(dest, f"gtrGlb({json.dumps(key)}, \"{data}\");\n")


CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1280px; padding: 0 16px 48px; color: #222; }
h1 { margin-top: 24px; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 36px; }
nav a { margin-right: 14px; } .muted { color: #777; } .warn { background: #fff3cd; padding: 8px 12px; }
.bad { color: #b00020; }
table { border-collapse: collapse; margin: 8px 0 16px; } th, td { border: 1px solid #ddd; padding: 4px 8px;
  vertical-align: top; text-align: left; } th { background: #f6f6f6; }
table.assets td { white-space: nowrap; } table.assets td:first-child { white-space: normal; max-width: 160px; }
img.sheet { max-width: 100%; border: 1px solid #eee; } img.view { width: 128px; height: 128px;
  image-rendering: pixelated; background: #fff; border: 1px solid #eee; }
.curves { display: flex; flex-wrap: wrap; gap: 8px; } .curves img { border: 1px solid #eee; }
model-viewer { width: 256px; height: 256px; background-color: #eef1f5; display: block; }
.pick button { font-size: 12px; margin: 2px; } .pick button.on { font-weight: bold; }
details { margin: 4px 0 10px; }
"""

# Feeds the viewers: each <model-viewer data-glbs='{"method": "meshes/x.glb.js"}'> loads one GLB script when
# it comes near the screen (or a button picks another method); the script calls gtrGlb with the bytes.
SCRIPT = """
const gtrWaiting = {};
function gtrGlb(key, b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const url = URL.createObjectURL(new Blob([bytes], { type: "model/gltf-binary" }));
  (gtrWaiting[key] || []).forEach((viewer) => { viewer.src = url; });
  gtrWaiting[key] = [];
}
function gtrShow(viewer, method) {
  const glbs = JSON.parse(viewer.dataset.glbs);
  const key = viewer.id + ":" + method;
  (gtrWaiting[key] = gtrWaiting[key] || []).push(viewer);
  const s = document.createElement("script");
  s.src = glbs[method];
  document.head.appendChild(s);
  viewer.parentElement.querySelectorAll(".pick button").forEach((b) => b.classList.toggle("on", b.dataset.method === method));
}
window.addEventListener("DOMContentLoaded", () => {
  const viewers = document.querySelectorAll("model-viewer[data-glbs]");
  const seen = new IntersectionObserver((entries) => entries.forEach((e) => {
    if (e.isIntersecting) { seen.unobserve(e.target); gtrShow(e.target, e.target.dataset.first); }
  }), { rootMargin: "400px" });
  viewers.forEach((v) => seen.observe(v));
  document.querySelectorAll(".pick button").forEach((b) => b.addEventListener("click", () =>
    gtrShow(document.getElementById(b.dataset.viewer), b.dataset.method)));
});
"""


def page(title: str, body: str, viewer: bool) -> str:
    scripts = '<script src="vendor/model-viewer.min.js"></script>' if viewer else ""
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>{CSS}</style>{scripts}<script>{SCRIPT}</script></head>\n<body>\n{body}\n</body></html>\n")
