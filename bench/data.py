"""Benchmark of the data stage: filtering 800,000 synthetic Objaverse annotation rows (Objaverse 1.0's size).

Ours: the annotation dicts become a pyarrow table (`annotations_to_table`: pyarrow converts the fields the
filters read straight from the dicts into one struct array per 64k rows, in C++; the columns are derived
with pyarrow compute) and `filter_table` decides every row with vectorised expressions, building reason
strings only for the rows that fail. Compared, in the same run and on the same
dicts, with what public download scripts do: a plain-Python loop over the dicts with one `if` per criterion.
Each approach runs in its own subprocess so peak memory is its own: the dicts are built first, then the
peak-RSS counter is reset (Linux `clear_refs`), so the peak reported is what the filtering added on top.

  python -m bench.data            # 800,000 rows
  python -m bench.data --rows 50000
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import format_table, result

ROWS = 800_000
REPEAT = 3  # timed runs per approach (the fastest is reported)
LICENSES = ["by", "by-sa", "cc0", "by-nc", "by-nc-sa", "by-nd", "by-nc-nd"]
TAGS = ["chair", "car", "scan", "lowpoly", "tree", "photogrammetry-scene", "game", "terrain", "house", "robot"]
CATS = ["architecture", "cars-vehicles", "furniture-home", "weapons-military", "nature-plants", "people"]


def synthetic(n: int, seed: int = 0) -> dict[str, dict]:
    """`n` Sketchfab-like annotations with the fields the filters read, values spread over every criterion."""
    rng = random.Random(seed)
    out = {}
    for i in range(n):
        uid = f"{rng.getrandbits(128):032x}"
        out[uid] = {
            "uid": uid, "name": f"model {i} {rng.choice(TAGS)}", "license": rng.choice(LICENSES),
            "faceCount": int(10 ** rng.uniform(1, 6.5)), "animationCount": rng.choice([0, 0, 0, 0, 1, 3]),
            "isAgeRestricted": rng.random() < 0.01, "viewerUrl": f"https://sketchfab.com/3d-models/{uid}",
            "archives": {"glb": {"size": int(10 ** rng.uniform(3, 8.5)), "textureCount": rng.choice([0, 1, 1, 2, 5])}},
            "tags": [{"name": t, "slug": t} for t in rng.sample(TAGS, rng.randint(0, 3))],
            "categories": [{"name": c, "slug": c} for c in rng.sample(CATS, rng.randint(0, 1))],
            "user": {"displayName": f"user{i % 5000}", "username": f"user{i % 5000}"},
        }
    return out


def python_loop(annotations: dict[str, dict], cfg: Any) -> dict[str, str]:
    """The approach of public scripts: one pass over the dicts, an `if` per criterion (first failure wins)."""
    reasons = {}
    licenses, deny_tags, deny_cats = set(cfg.licenses), set(cfg.deny_tags), set(cfg.deny_categories)
    for uid, a in annotations.items():
        glb = (a.get("archives") or {}).get("glb") or {}
        reason = ""
        if a.get("license") not in licenses:
            reason = f"license '{a.get('license')}' not in the allow-list"
        elif a["faceCount"] < cfg.min_faces:
            reason = f"face count {a['faceCount']} < min_faces {cfg.min_faces}"
        elif a["faceCount"] > cfg.max_faces:
            reason = f"face count {a['faceCount']} > max_faces {cfg.max_faces}"
        elif not cfg.allow_animation and a["animationCount"] > 0:
            reason = f"animated ({a['animationCount']} animations)"
        elif glb.get("textureCount", 0) < cfg.min_textures:
            reason = f"texture count {glb.get('textureCount')} < min_textures {cfg.min_textures}"
        elif glb.get("size", 0) > cfg.max_archive_bytes:
            reason = f"archive {glb.get('size')} bytes > max_archive_bytes {cfg.max_archive_bytes}"
        elif not cfg.allow_age_restricted and a.get("isAgeRestricted"):
            reason = "age-restricted"
        elif any((c.get("slug") or c.get("name", "").lower()) in deny_cats for c in a.get("categories", [])):
            reason = "category in deny-list"
        elif any((t.get("slug") or t.get("name", "").lower()) in deny_tags for t in a.get("tags", [])):
            reason = "tag in deny-list"
        reasons[uid] = reason
    return reasons


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def child(kind: str, n: int, repeat: int = REPEAT) -> dict[str, Any]:
    """Run one approach on `n` fresh synthetic rows in this process; seconds, peak MiB added, kept count.

    Seconds are the fastest of `repeat` runs on the same dicts (this machine is shared: the minimum is the
    least disturbed); the peak memory is that of the first run.
    """
    import pyarrow.compute as pc

    from core.config import DataConfig
    from pipelines.filter import annotations_to_table, filter_table

    cfg = DataConfig(max_assets=0, deny_categories=["weapons-military"])
    annotations = synthetic(n)
    filter_table(annotations_to_table(dict(list(annotations.items())[:100])), cfg)  # warm lazy imports
    reset = _reset_peak()
    base = _status_kb("VmRSS:")
    runs: list[dict[str, float]] = []
    peak = 0
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        if kind == "ours":
            table = annotations_to_table(annotations)
            t1 = time.perf_counter()
            out = filter_table(table, cfg)
            t2 = time.perf_counter()
            runs.append({"seconds": t2 - t0, "table_s": t1 - t0, "filter_s": t2 - t1})
        else:
            reasons = python_loop(annotations, cfg)
            runs.append({"seconds": time.perf_counter() - t0})
        if not peak:
            peak = _status_kb("VmHWM:") if reset else 0
    if kind == "ours":
        kept = int(pc.sum(pc.equal(out["status"], "ok")).as_py() or 0)
    else:
        kept = sum(1 for r in reasons.values() if not r)
    best = {k: min(r[k] for r in runs) for k in runs[0]}
    return {**best, "peak_added_mib": max(0, peak - base) / 1024 if reset else None, "kept": kept}


def _spawn(kind: str, n: int) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "bench.data", "--child", kind, "--rows", str(n)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(cfg: Any, out_dir: Path, rows: int = ROWS) -> list[dict]:
    ours, loop = _spawn("ours", rows), _spawn("loop", rows)
    if ours["kept"] != loop["kept"]:
        raise RuntimeError(f"the two approaches disagree: {ours['kept']} vs {loop['kept']} kept")
    note = f"{rows} rows, {ours['kept']} kept by both"
    out = [
        result("filter: dicts -> decisions (end to end)", ours["seconds"], loop["seconds"],
               "plain-Python loop over the dicts", "s", note),
        result("filter: vectorised decisions on the table only", ours["filter_s"], loop["seconds"],
               "plain-Python loop over the dicts", "s", f"table build took {ours['table_s']:.2f} s"),
    ]
    if ours["peak_added_mib"] is not None:
        out.append(result("filter: peak memory added", ours["peak_added_mib"], loop["peak_added_mib"],
                          "plain-Python loop over the dicts", "MiB", "peak RSS above the loaded dicts"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "data.json").write_text(json.dumps(out, indent=2))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=ROWS)
    p.add_argument("--child", choices=["ours", "loop"], help=argparse.SUPPRESS)
    p.add_argument("--out", default="work/bench/data")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rows)))
        return
    print(format_table(run(None, Path(args.out), args.rows)))


if __name__ == "__main__":
    main()
