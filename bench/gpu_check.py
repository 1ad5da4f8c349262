"""The GPU half of the checks (`make gpu-check`, via bench/gpu_check.sh): CUDA tests and GPU benchmarks.

Runs on the lent GPU machine (Python 3.12, no bpy, no Ray, no internet). Writes one JSON file,
`<out>/gpu_check.json`: environment, build times of the CUDA ops, the CUDA test results (twins vs CUDA
ops) and every stage's `run_gpu(cfg, out_dir)` benchmark rows. Each part is time-boxed so the whole check
stays under its budget; a part that fails is recorded with its error and the rest still runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

GPU_BENCHES = ["reconstruct", "mesh", "model", "mfu"]
# Seconds each benchmark may take before it is cut off (its rows so far are lost, the error is recorded):
# the whole check must fit a GPU loan of minutes (make gpu-check: under 6), builds and tests included. The
# last full check took 128 s; mesh adds the 256³ dense vs coarse-to-fine and permissive-step rows, mfu the
# torch.compile case (compilation: tens of seconds, unmeasured on the GPU so far).
BENCH_BUDGET_S = {"reconstruct": 80, "mesh": 80, "model": 50, "mfu": 100}


class _Deadline(Exception):
    pass


def _alarm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise _Deadline("time budget of this benchmark ran out")


def _env() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0),
            "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
    for name in ("diso", "nvdiffrast", "webdataset", "lpips", "trimesh", "xatlas", "skimage"):
        try:
            mod = importlib.import_module(name)
            info[name] = getattr(mod, "__version__", "importable")
        except Exception as e:  # noqa: BLE001 - report, don't stop
            info[name] = f"missing: {type(e).__name__}: {e}"
    return info


def _build_ops() -> dict:
    """Import / JIT-build the CUDA ops once, timed (nvdiffrast compiles its plugin on first use)."""
    out = {}
    for label, mod_name, fn in [("nvdiffrast", "training.ops.raster", "cuda_context"),
                                ("diso", "training.ops.marching_cubes", "cuda_marching_cubes")]:
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(mod_name)
            if hasattr(mod, fn):
                getattr(mod, fn)()
            out[label] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1)}
        except Exception as e:  # noqa: BLE001
            out[label] = {"ok": False, "seconds": round(time.perf_counter() - t0, 1),
                          "error": f"{type(e).__name__}: {e}"}
    return out


def _gpu_test_files() -> list[str]:
    return sorted(str(p) for p in Path("tests").rglob("test_*.py") if "mark.gpu" in p.read_text())


def _run_tests(out_dir: Path, timeout: float) -> dict:
    files = _gpu_test_files()
    if not files:
        return {"files": [], "note": "no test file carries the gpu marker"}
    xml = out_dir / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
           f"--junitxml={xml}", *files]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        log, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        log, rc = f"{e.stdout or ''}{e.stderr or ''}\nTIMEOUT after {timeout:.0f} s", -1
    (out_dir / "gpu_tests.log").write_text(log if isinstance(log, str) else log.decode())
    res: dict = {"files": files, "returncode": rc, "seconds": round(time.perf_counter() - t0, 1),
                 "tail": log[-3000:] if isinstance(log, str) else ""}
    if xml.exists():
        cases = []
        for tc in ET.parse(xml).getroot().iter("testcase"):
            status = "passed"
            for child in tc:
                if child.tag in ("failure", "error"):
                    status = child.tag
                elif child.tag == "skipped":
                    status = "skipped"
            cases.append({"test": f"{tc.get('classname')}::{tc.get('name')}", "status": status,
                          "seconds": float(tc.get("time", 0))})
        res["cases"] = cases
        res["summary"] = {s: sum(c["status"] == s for c in cases) for s in ("passed", "failure", "error", "skipped")}
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="work/gpu-check")
    p.add_argument("--config", default="configs/paper.yaml", help="config for the GPU benchmarks")
    p.add_argument("--test-timeout", type=float, default=150.0)
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every benchmark's time budget")
    p.add_argument("--only", default="", help=f"comma-separated subset of benchmarks: {', '.join(GPU_BENCHES)}")
    args = p.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def save() -> None:
        report["seconds_total"] = round(time.perf_counter() - t_start, 1)
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))

    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU present; nothing was run.")
        return 0
    report["env"] = _env()
    print("env:", json.dumps(report["env"]), flush=True)
    report["build"] = _build_ops()
    print("build:", json.dumps(report["build"]), flush=True)
    save()
    if not args.skip_tests:
        report["tests"] = _run_tests(out_dir, args.test_timeout)
        print("tests:", json.dumps(report["tests"].get("summary", report["tests"].get("note"))), flush=True)
        save()

    from bench.common import format_table
    from core.config import load_config

    cfg = load_config(args.config)
    report["benchmarks"], report["bench_errors"] = [], {}
    for name in [s for s in args.only.split(",") if s] or GPU_BENCHES:
        t0 = time.perf_counter()
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(int(BENCH_BUDGET_S.get(name, 60) * args.budget_scale))
        try:
            mod = importlib.import_module(f"bench.{name}")
            if not hasattr(mod, "run_gpu"):
                continue
            rows = mod.run_gpu(cfg, out_dir / name)
            signal.alarm(0)
            for r in rows:
                r["stage"] = name
                r["torch"] = torch.__version__  # every GPU number with the torch it was taken with
            report["benchmarks"] += rows
            print(f"== {name} ({time.perf_counter() - t0:.1f} s)\n{format_table(rows)}", flush=True)
        except (Exception, _Deadline) as e:  # noqa: BLE001
            signal.alarm(0)
            traceback.print_exc()
            report["bench_errors"][name] = f"{type(e).__name__}: {e}"
        torch.cuda.empty_cache()
        save()
    save()
    print(f"gpu-check: wrote {out_dir / 'gpu_check.json'} in {time.perf_counter() - t_start:.0f} s")
    failed = report.get("tests", {}).get("summary", {})
    return 1 if (failed.get("failure") or failed.get("error") or report["bench_errors"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
