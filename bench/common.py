"""Shared helpers for benchmarks: the result record, machine description, timing and peak memory."""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import queue
import resource
import time
from collections.abc import Callable
from typing import Any


def _call_in_child(q: Any, fn: Callable[..., Any], args: tuple) -> None:
    try:
        q.put({"result": fn(*args)})
    except BaseException:  # the parent must see why, not wait for a result that never comes
        import traceback

        q.put({"error": traceback.format_exc()})


def in_fresh_process(fn: Callable[..., Any], *args: Any, what: str = "benchmark case") -> Any:
    """fn(*args) (a module-level function) in a fresh spawned process, so its peak RSS and imports are its own.

    Returns its result; raises RuntimeError with the child's traceback, or its exit code when it died (an OOM
    kill, a crash) — polled, so a dead child fails the bench instead of hanging it."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_call_in_child, args=(q, fn, args))
    p.start()
    try:
        while True:
            try:
                r = q.get(timeout=5)
                break
            except queue.Empty:
                if not p.is_alive():
                    raise RuntimeError(f"{what} died with exit code {p.exitcode}") from None
    finally:
        p.join(timeout=60)
    if "error" in r:
        raise RuntimeError(f"{what} failed:\n{r['error']}")
    return r["result"]


def machine() -> str:
    """One line naming the machine a number was measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    desc = f"{os.cpu_count()} cores, {cpu}"
    try:
        import torch

        if torch.cuda.is_available():
            desc = f"{torch.cuda.get_device_name(0)}; {desc}"
    except Exception:  # noqa: BLE001 - torch missing or broken: describe the CPU only
        pass
    return desc


def result(measure: str, ours: float, baseline: float | None = None, baseline_name: str = "",
           unit: str = "", notes: str = "", higher_is_better: bool = False) -> dict[str, Any]:
    """One benchmark row. `ratio` is always "how many times better ours is" (>1 = ours wins)."""
    ratio = None
    if baseline is not None and ours and baseline:
        ratio = (ours / baseline) if higher_is_better else (baseline / ours)
    return {"measure": measure, "ours": ours, "baseline": baseline, "baseline_name": baseline_name,
            "ratio": ratio, "unit": unit, "machine": machine(), "notes": notes}


def timeit(fn: Callable[[], Any], repeat: int = 3, warmup: int = 1) -> float:
    """Median wall-clock seconds of `fn()` over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows as an aligned text table: measure, ours, compared approach, ratio, machine."""
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    head = ["measure", "ours", "baseline", "compared with", "ratio", "unit", "machine"]
    body = [[r.get("measure", ""), fmt(r.get("ours")), fmt(r.get("baseline")), r.get("baseline_name", "") or "-",
             (f"{r['ratio']:.2f}x" if r.get("ratio") else "-"), r.get("unit", ""), r.get("machine", "")]
            for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(head, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in body]
    return "\n".join(lines)
