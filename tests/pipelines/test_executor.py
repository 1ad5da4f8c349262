"""The executor: the same rows from every executor, per-item errors captured, a hung or crashed worker fails
only its own item and is replaced, stateful workers live for many items and are retired on request, the old
vocabulary is refused by name, and small real Ray runs (tasks and actors)."""

from __future__ import annotations

import os
import sys
import time
from functools import partial
from pathlib import Path

import pytest

from core.config import ConfigError, load_config
from pipelines.executor import ExecutorError, batched, check_executor, run_step, run_workers


def square(item: dict, offset: int = 0) -> dict:
    if item["x"] == 3:
        raise ValueError("bad item 3\nsecond line")
    return {"uid": item["uid"], "status": "ok", "value": item["x"] ** 2 + offset}


def crash_on_5(item: dict) -> dict:
    if item["x"] == 5:
        os._exit(7)  # a segfault-like death: no exception, no goodbye
    return {"uid": item["uid"], "status": "ok", "pid": os.getpid()}


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


@pytest.mark.parametrize("executor, workers", [("local", 1), ("process", 1), ("process", 3)])
def test_executors_agree_and_capture_errors(executor, workers):
    seen = []
    rows = run_step(square, ITEMS, executor=executor, workers=workers, kwargs={"offset": 1},
                    on_row=lambda item, row: seen.append((item["uid"], row["uid"])), progress=False)
    assert rows == expected(1)
    assert sorted(seen) == [(f"u{i}", f"u{i}") for i in range(8)]  # on_row pairs each row with its item


def test_step_returning_garbage_is_a_failed_row():
    rows = run_step(not_a_row, ITEMS[:2], progress=False)
    assert [r["status"] for r in rows] == ["failed", "failed"] and "not a row dict" in rows[0]["reason"]


def test_dead_worker_fails_only_its_item():
    rows = run_step(crash_on_5, ITEMS, executor="process", workers=2, progress=False)
    status = {r["uid"]: (r["status"], r.get("reason", "")) for r in rows}
    assert status["u5"][0] == "failed" and "worker died (exit code 7)" in status["u5"][1]
    assert all(status[f"u{i}"] == ("ok", "") for i in range(8) if i != 5)  # the others went on elsewhere


def test_hanging_item_times_out_and_the_job_goes_on():
    t0 = time.monotonic()
    rows = run_step(hang_on_2, ITEMS[:5], executor="process", workers=2, timeout_s=1.5, progress=False)
    status = {r["uid"]: r for r in rows}
    assert status["u2"]["status"] == "failed" and "timeout after 1.5 s (worker killed)" in status["u2"]["reason"]
    assert [status[u]["status"] for u in ("u0", "u1", "u3", "u4")] == ["ok"] * 4
    assert time.monotonic() - t0 < 60  # the hung worker was killed, not waited for (it sleeps 600 s)


def test_vocabulary_and_batches():
    assert batched(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert [check_executor(e) for e in ("local", "process", "ray")] == ["local", "process", "ray"]
    for old, new in (("inline", "use local"), ("thread", "use process"), ("auto", "use local, or ray")):
        with pytest.raises(ConfigError, match=f"must be local \\| process \\| ray, got '{old}' .*{new}"):
            run_step(square, ITEMS[:1], executor=old, progress=False)
        with pytest.raises(ConfigError, match=f"render.executor must be local \\| process \\| ray, got '{old}'"):
            load_config(None, [f"render.executor={old}"])
    assert run_step(square, [], executor="ray", progress=False) == []  # nothing to do: Ray is not started


# ----------------------------------------------------------------------------------------------------------
# Stateful workers (the renderer's form): one instance for many items, replaced after a timeout, a crash,
# or a row that says so.
# ----------------------------------------------------------------------------------------------------------


class Counter:
    """A stateful worker: counts the items it has seen; hangs, dies or asks to be retired on request."""

    def __init__(self, tag: str = "w") -> None:
        self.tag, self.seen, self.started = tag, 0, False

    def ready(self) -> None:
        self.started = True

    def __call__(self, item: dict) -> dict:
        assert self.started, "ready() runs before the first item"
        self.seen += 1
        if item["do"] == "hang":
            time.sleep(600)
        if item["do"] == "crash":
            os._exit(3)
        return {"uid": item["uid"], "status": "ok", "pid": os.getpid(), "worker": id(self), "seen": self.seen,
                "retire": item["do"] == "poison"}


def retire(row: dict) -> bool:
    return bool(row.get("retire"))


def broken_worker() -> Counter:
    raise RuntimeError("no renderer here")


def jobs(*kinds: str) -> list[dict]:
    return [{"uid": f"j{i}", "do": k} for i, k in enumerate(kinds)]


def test_process_worker_lives_for_many_items_and_is_replaced_after_a_timeout():
    rows = run_workers(Counter, jobs("a", "b", "hang", "c", "d"), executor="process", workers=1, timeout_s=2.0,
                       retire=retire, progress=False)
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "ok", "ok"]
    assert "timeout after 2 s (worker killed)" in rows[2]["reason"]
    first, second = rows[0]["pid"], rows[3]["pid"]
    assert rows[1]["pid"] == first and rows[1]["seen"] == 2  # one process, one instance, state kept
    assert second != first and rows[3]["seen"] == 1 and rows[4]["pid"] == second  # a fresh one took over


def test_process_worker_crash_fails_only_its_item():
    rows = run_workers(Counter, jobs("a", "crash", "b", "c"), executor="process", workers=1, timeout_s=60,
                       progress=False)
    assert [r["status"] for r in rows] == ["ok", "failed", "ok", "ok"]
    assert rows[1]["reason"] == "worker died (exit code 3)"
    assert rows[2]["pid"] != rows[0]["pid"] and rows[2]["seen"] == 1 and rows[3]["seen"] == 2


def test_process_worker_retired_on_its_row():
    rows = run_workers(partial(Counter, "p"), jobs("a", "poison", "b", "c"), executor="process", workers=1,
                       timeout_s=60, retire=retire, progress=False)
    assert all(r["status"] == "ok" for r in rows)
    assert rows[0]["pid"] == rows[1]["pid"] and rows[1]["seen"] == 2  # the poisoned row is reported ...
    assert rows[2]["pid"] != rows[1]["pid"] and rows[2]["seen"] == 1  # ... then its worker is replaced
    assert rows[3]["pid"] == rows[2]["pid"]


def test_local_worker_retired_on_its_row_is_rebuilt_in_this_process():
    rows = run_workers(Counter, jobs("a", "poison", "b"), executor="local", retire=retire, progress=False)
    assert {r["pid"] for r in rows} == {os.getpid()}
    assert rows[1]["worker"] == rows[0]["worker"] and rows[2]["worker"] != rows[1]["worker"]
    assert [r["seen"] for r in rows] == [1, 2, 1]


def test_worker_that_cannot_start_is_a_job_error():
    with pytest.raises(ExecutorError, match="could not start: worker error: RuntimeError: no renderer here"):
        run_workers(broken_worker, jobs("a", "b"), executor="process", workers=2, progress=False)


@pytest.mark.ray
def test_small_ray_run_generates_real_assets(tmp_path: Path):
    import trimesh

    from pipelines.sources.procedural import fetch

    items = [{"uid": f"procedural-{i:04d}", "locator": str(i)} for i in range(3)]
    items.append({"uid": "bad", "locator": "not-a-number"})
    rows = run_step(fetch, items, executor="ray", workers=2, batch_size=2, timeout_s=120,
                    kwargs={"assets_dir": str(tmp_path), "texture_size": 32}, progress=False)
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed"]
    assert "ValueError" in rows[3]["reason"]
    for r in rows[:3]:
        scene = trimesh.load(r["path"])  # a real, loadable textured GLB written by a Ray worker
        assert len(scene.geometry) == 1


@pytest.mark.ray
def test_ray_actors_replace_hung_crashed_and_retired_workers():
    from pipelines.executor import init_ray

    ray = init_ray(num_cpus=2)
    # The test module is not importable in Ray's workers: ship the worker class by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    rows = run_workers(Counter, jobs("a", "b", "hang", "c", "crash", "d", "poison", "e"), executor="ray",
                       workers=1, timeout_s=8.0, retire=retire, progress=False, num_cpus=0)
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "ok", "failed", "ok", "ok", "ok"]
    assert rows[2]["reason"].startswith("timeout after 8 s (actor killed)")
    assert rows[4]["reason"].startswith("worker died (") and "actor replaced" in rows[4]["reason"]
    pids = [r.get("pid") for r in rows]
    assert pids[0] == pids[1] and [rows[i]["seen"] for i in (0, 1)] == [1, 2]  # one actor, reused
    assert pids[3] != pids[0] and rows[3]["seen"] == 1  # replaced after the timeout
    assert pids[5] not in (pids[0], pids[3]) and pids[6] == pids[5]  # replaced after the crash
    assert pids[7] != pids[6] and rows[7]["seen"] == 1  # replaced after the poisoned row
