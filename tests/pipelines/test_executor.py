"""The executor: same rows from every backend, per-item errors captured, timeouts and dead workers
become failed rows without losing the other items, and a small real Ray run."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pipelines.executor import batched, map_batches, run_step


def square(item: dict, offset: int = 0) -> dict:
    if item["x"] == 3:
        raise ValueError("bad item 3\nsecond line")
    return {"uid": item["uid"], "status": "ok", "value": item["x"] ** 2 + offset}


def crash_on_5(item: dict) -> dict:
    if item["x"] == 5:
        os._exit(7)  # a segfault-like death: no exception, no goodbye
    return {"uid": item["uid"], "status": "ok"}


def hang_on_2(item: dict) -> dict:
    if item["x"] == 2:
        time.sleep(600)
    return {"uid": item["uid"], "status": "ok"}


def not_a_row(item: dict) -> int:
    return 1


ITEMS = [{"uid": f"u{i}", "x": i} for i in range(8)]


def expected(offset=0):
    return [{"uid": f"u{i}", "status": "failed", "reason": "ValueError: bad item 3"} if i == 3
            else {"uid": f"u{i}", "status": "ok", "value": i * i + offset} for i in range(8)]


@pytest.mark.parametrize("backend, workers, batch", [("inline", 1, 1), ("inline", 1, 3), ("thread", 2, 3),
                                                     ("process", 2, 3)])
def test_backends_agree_and_capture_errors(backend, workers, batch):
    seen = []
    rows = run_step(square, ITEMS, backend=backend, workers=workers, batch_size=batch, kwargs={"offset": 1},
                    on_rows=seen.extend, progress=False)
    assert rows == expected(1)
    assert sorted(r["uid"] for r in seen) == sorted(r["uid"] for r in rows)


def test_step_returning_garbage_is_a_failed_row():
    rows = run_step(not_a_row, ITEMS[:2], progress=False)
    assert [r["status"] for r in rows] == ["failed", "failed"] and "not a row dict" in rows[0]["reason"]


def test_dead_worker_fails_only_its_unfinished_items():
    rows = run_step(crash_on_5, ITEMS, backend="process", workers=2, batch_size=4, progress=False)
    status = {r["uid"]: (r["status"], r.get("reason", "")) for r in rows}
    # batch [4,5,6,7]: 4 finished before the crash, 5 killed it, 6 and 7 never ran
    assert status["u4"] == ("ok", "")
    for u in ("u5", "u6", "u7"):
        assert status[u][0] == "failed" and "worker died (exit code 7)" in status[u][1]
    assert all(status[f"u{i}"] == ("ok", "") for i in range(4))


def test_hanging_item_times_out_and_the_job_goes_on():
    rows = run_step(hang_on_2, ITEMS[:5], backend="process", workers=2, batch_size=2, timeout_s=1.5,
                    progress=False)
    status = {r["uid"]: r for r in rows}
    assert status["u2"]["status"] == "failed" and "timeout after 2 s (worker killed)" in status["u2"]["reason"]
    # u3 shared the batch with the hanging u2 and never ran; everything else finished
    assert status["u3"]["status"] == "failed"
    assert [status[u]["status"] for u in ("u0", "u1", "u4")] == ["ok"] * 3


def test_thread_backend_deadline_counts_from_start_and_does_not_wait_for_a_hung_thread():
    """u0 hangs (until released), u1 takes 1.6 s against a 1.0 s budget. A deadline counted from when the
    driver starts waiting for u1 (after u0's timeout) would have let u1 pass; and the old pool's exit waited
    for the hung thread, so run_step could not return while u0 was still hanging."""
    import threading

    release, state = threading.Event(), {"hanging": False}

    def step(item: dict) -> dict:
        if item["x"] == 0:
            state["hanging"] = True
            release.wait(120)
            state["hanging"] = False
        elif item["x"] == 1:
            time.sleep(1.6)
        return {"uid": item["uid"], "status": "ok"}

    try:
        rows = run_step(step, ITEMS[:4], backend="thread", workers=2, batch_size=1, timeout_s=1.0, progress=False)
        still_hanging = state["hanging"]
    finally:
        release.set()
    by = {r["uid"]: r for r in rows}
    assert by["u0"]["status"] == "failed" and "timeout after 1 s (thread abandoned" in by["u0"]["reason"]
    assert by["u1"]["status"] == "failed" and "timeout" in by["u1"]["reason"]
    assert by["u2"]["status"] == by["u3"]["status"] == "ok"  # the freed slots went on with the job
    assert still_hanging  # run_step returned while the abandoned thread was still blocked


def test_map_batches_generic_and_batched():
    assert batched(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    out = map_batches(lambda b: [sum(b)] if b[0] != 3 else 1 / 0, [[1, 2], [3], [4]], backend="thread", workers=2)
    assert out[0] == [3] and out[2] == [4] and isinstance(out[1], ZeroDivisionError)
    with pytest.raises(ValueError, match="unknown executor backend"):
        map_batches(len, [[1]], backend="dask")
    assert run_step(square, [], backend="ray", progress=False) == []  # nothing to do: Ray is not started


@pytest.mark.ray
def test_small_ray_run_generates_real_assets(tmp_path: Path):
    import trimesh

    from pipelines.sources.procedural import fetch

    items = [{"uid": f"procedural-{i:04d}", "locator": str(i)} for i in range(3)]
    items.append({"uid": "bad", "locator": "not-a-number"})
    rows = run_step(fetch, items, backend="ray", workers=2, batch_size=2, timeout_s=120,
                    kwargs={"assets_dir": str(tmp_path), "texture_size": 32}, progress=False)
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed"]
    assert "ValueError" in rows[3]["reason"]
    for r in rows[:3]:
        scene = trimesh.load(r["path"])  # a real, loadable textured GLB written by a Ray worker
        assert len(scene.geometry) == 1
