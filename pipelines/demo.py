"""`make demo`: the whole chain on the embedded procedural data with the demo config, stage after stage.

Each stage is its own module and resumes itself, so a second run reuses what is done. Stages run as
subprocesses (the render stages hold Blender in their workers; training is torch only) with the same
`--config/--out/--source` and overrides; the eval set is built (pipelines.evalset) before it is scored, and
the HTML report (eval.html_report, run by name: pipelines never import eval) closes the chain.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from core.cli import EXIT_PARTIAL, config_from_args, save_resolved, stage_parser

# (title, module, extra arguments); exit code 3 means "finished, some items failed" and the chain goes on.
STAGES: list[tuple[str, str, list[str]]] = [
    ("data: procedural assets -> manifest", "pipelines.data", []),
    ("render: 32 views per asset (Blender, Cycles CPU)", "pipelines.render", []),
    ("shards: WebDataset tars + index", "pipelines.shards", []),
    ("train-nerf: stage 1", "training.train_nerf", []),
    ("train-mesh: stage 2", "training.train_mesh", []),
    ("render-eval: the eval set (held-out procedural assets), orbit + 4 input views", "pipelines.evalset", []),
    ("eval: reconstruction (feed-forward / refined), re-rendered orbit, metrics, report", "eval.run", []),
    ("report: one static HTML page of the run (open it offline)", "eval.html_report", []),
]


def main(argv: list[str] | None = None) -> int:
    p = stage_parser(__doc__)
    p.add_argument("--from", dest="start", default="", help="start at this module (e.g. training.train_mesh)")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    save_resolved(cfg, "demo")
    common = ["--config", args.config, "--out", cfg.out, "--source", cfg.source, *args.overrides]
    names = [m for _, m, _ in STAGES]
    if args.start and args.start not in names:
        p.error(f"--from must be one of {', '.join(names)}")
    todo = STAGES[names.index(args.start):] if args.start else STAGES
    t_all = time.perf_counter()
    timings = []
    for i, (title, module, extra) in enumerate(todo, 1):
        print(f"\n=== [{i}/{len(todo)}] {title}  (python -m {module})", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", module, *common, *extra])
        dt = time.perf_counter() - t0
        timings.append((module, dt, rc))
        if rc not in (0, EXIT_PARTIAL):
            print(f"\ndemo stopped: {module} exited with {rc} after {dt:.0f} s. Fix the error above and rerun "
                  f"`make demo` (finished work is reused), or start there with ARGS='--from {module}'.",
                  file=sys.stderr)
            return rc
    out = Path(cfg.out)
    print(f"\n=== demo finished in {(time.perf_counter() - t_all) / 60:.1f} min")
    for module, dt, rc in timings:
        print(f"  {module:<22} {dt:7.1f} s{'  (some items failed: see OUT/manifest)' if rc == EXIT_PARTIAL else ''}")
    print(f"""
Where to look:
  the run        {out / 'report' / 'index.html'}  (open it in a browser: stages, renders, curves, table, 3D)
  report         {out / 'eval' / 'report.md'}  (also report.csv, report.json)
  contact sheets {out / 'eval' / 'sheets'}/*.png   renders: {out / 'renders' / 'sheet.png'}
  meshes         {out / 'eval' / 'meshes'}/*.glb
  status tables  {out / 'manifest'}/*.parquet
  TensorBoard    .venv/bin/tensorboard --logdir {out / 'runs'}
""")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
