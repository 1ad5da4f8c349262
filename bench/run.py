"""`make bench`: run every stage's benchmark, print one table, write OUT/bench/results.json."""

from __future__ import annotations

import importlib
import json
import sys
import time
import traceback

from bench.common import format_table, machine
from core.cli import config_from_args, stage_parser
from core.io import atomic_write_text

STAGES = ["data", "procedural", "render", "shards", "model", "nerf", "mesh", "reconstruct", "eval", "learning"]
# benchmarks that run after a stage's own module, under the same name (bench.learning imports nothing of them)
FOLLOW_UPS = {"learning": [("learning_curves", "curves")]}


def main(argv: list[str] | None = None) -> int:
    p = stage_parser(__doc__)
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(STAGES)}")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    stages = [s for s in args.only.split(",") if s] or STAGES
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(unknown)}")
    out_dir = cfg.out_path / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, errors = [], {}
    for stage in stages:
        t0 = time.perf_counter()
        print(f"== bench {stage}", flush=True)
        try:
            stage_rows = importlib.import_module(f"bench.{stage}").run(cfg, out_dir / stage)
            for module, sub in FOLLOW_UPS.get(stage, []):
                stage_rows += importlib.import_module(f"bench.{module}").run(cfg, out_dir / stage / sub)
        except Exception as e:  # noqa: BLE001 - one broken benchmark must not hide the others
            traceback.print_exc()
            errors[stage] = f"{type(e).__name__}: {e}"
            continue
        for r in stage_rows:
            r.setdefault("stage", stage)
        rows += stage_rows
        print(format_table(stage_rows), f"\n({time.perf_counter() - t0:.1f} s)\n", flush=True)
    print("\n== all benchmarks\n" + format_table(rows))
    path = atomic_write_text(out_dir / "results.json", json.dumps(
        {"machine": machine(), "results": rows, "errors": errors}, indent=2, default=str))
    print(f"\nwrote {path}")
    if errors:
        print(f"{len(errors)} benchmark(s) failed: {', '.join(errors)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
