"""What the input views alone give: each eval asset's visual hull from its input views (no learning), scored by
the eval's own geometry protocol, beside the eval rows of a run.

The hull is where every input view's mask covers a point (`training.model.lift.lift_views` on a grid³ of the
scene box, the features the demo model is handed), meshed by marching cubes at 0.5 and scored by
`eval.geometry.evaluate_geometry` with the config's eval settings against the asset's geometry.npz. It bounds
nothing strictly (a model may carve concavities the hull cannot), but a model whose IoU is far below its
inputs' hull is not using them (docs/training.md, "Lifting").

    python -m bench.hull_bound --config configs/demo.yaml --out OUT [--grid 128]   # after `make eval`
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from core.cli import config_from_args, stage_parser


def hull_mesh(folder: Path, size: int, box: float, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Vertices [N,3] (our frame), faces [F,3] of the visual hull of the posed views in `folder`."""
    from skimage.measure import marching_cubes

    from training.model.lift import FEATURES, lift_views, plane_points
    from training.recon_inputs import read_views

    v = read_views(folder, size)
    rgb = torch.from_numpy(v.rgb).permute(0, 3, 1, 2)[None]
    mask = torch.from_numpy(v.mask)[None, :, None]
    f = lift_views(rgb, mask, torch.from_numpy(v.c2w)[None], torch.from_numpy(v.K)[None],
                   plane_points(grid, grid, box))
    hull = f[0, 0, FEATURES:].permute(2, 1, 0).numpy()  # plane xy: [z, y(row), x(col)] → [x, y, z]
    verts, faces, _, _ = marching_cubes(hull, 0.5)
    return ((verts + 0.5) / grid * 2 - 1) * box, faces


def run(cfg, grid: int) -> list[dict]:
    from eval import geometry as G

    rows = []
    for inputs in sorted((cfg.out_path / "evalsets").glob("*/renders_eval/*/inputs")):
        uid, slug = inputs.parent.name, inputs.parents[2].name
        row = {"eval set": slug, "asset": uid}
        try:
            verts, faces = hull_mesh(inputs, cfg.loader.input_size, cfg.model.scene_box, grid)
            g = G.evaluate_geometry(G.check_mesh(verts, faces, "hull"), G.load_mesh(inputs / "geometry.npz"),
                                    cfg.eval.points, cfg.eval.fscore_threshold, cfg.eval.iou_resolution,
                                    cfg.eval.icp_iterations, seed=cfg.seed,
                                    iou_points_resolution=cfg.eval.iou_points_resolution)
            row.update({"hull IoU": g["iou"], "hull CD×100": 100 * g["cd"]})
        except Exception as e:  # noqa: BLE001 - a row with its reason; the others go on
            row["reason"] = f"{type(e).__name__}: {e}"
        done = cfg.out_path / "eval" / "rows" / slug / "feedforward" / f"{uid}.json"
        if done.is_file():
            ff = json.loads(done.read_text())
            row.update({"feed-forward IoU": ff.get("iou"), "feed-forward CD×100": 100 * ff.get("cd", float("nan"))})
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--grid", type=int, default=128, help="hull grid per side over the scene box")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    rows = run(cfg, args.grid)
    keys = ["eval set", "asset", "hull IoU", "feed-forward IoU", "hull CD×100", "feed-forward CD×100", "reason"]
    keys = [k for k in keys if any(k in r for r in rows)]
    print("| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys)
              + " |")
    for key in ("hull IoU", "feed-forward IoU"):
        vals = [r[key] for r in rows if isinstance(r.get(key), float)]
        if vals:
            print(f"mean {key}: {np.mean(vals):.3f} over {len(vals)} assets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
