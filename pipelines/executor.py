"""The one executor of every stage: runs a plain step, or a stateful worker, over items and returns one
manifest row per item. `data.executor`, `render.executor` and `shards.executor` take the same values:

- `local`: in this process, one item after another, no timeout. For debugging: a hang hangs the job.
- `process`: isolated worker processes (spawned), at most `workers` at once, each living for many items.
  An item that runs past `timeout_s` gets its worker killed; a worker that dies (segfault, OOM kill) fails
  only the item it held. Either way that item becomes a `failed` row and a fresh worker takes the next one.
- `ray`: the same on Ray (`RAY_ADDRESS` for a cluster, else a private local instance: `init_ray`): a step
  runs as Ray tasks of `batch_size` items,
  spread over the nodes (a task past `timeout_s` x its items is cancelled); a stateful worker is a Ray
  actor, killed and replaced after a timeout or a crash.

Two forms of work, neither of which imports Ray:

- a step, `step(item, **kwargs) -> row` (`run_step`): a row is a dict with at least `uid` and `status`.
  An exception becomes a `failed` row with the reason (the exception's first line), and the job goes on.
- a stateful worker (`run_workers`): `make()` builds it once per worker process / actor (e.g. one that holds
  bpy) and `worker(item) -> row` is called for many items; an optional `worker.ready()` runs before the
  first item (its cost does not count against that item's timeout). When `retire(row)` is true the worker
  is replaced after that item (its state is unknown). `local` rebuilds it in this process.

A job-level failure still raises: a worker that cannot even start, or an error in a caller's `on_row`.
A tqdm bar counts finished items (ok / failed); `on_row(item, row)` sees each row as it arrives, so a caller
can flush its manifest during a long job (a SIGKILL then loses at most what was not flushed). Rows come
back in the order of the items.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import wait as mp_wait
from typing import Any

from tqdm import tqdm

from core.config import EXECUTORS, check_executor

__all__ = ["EXECUTORS", "ExecutorError", "StepWorker", "batched", "check_executor", "failed_row", "init_ray",
           "run_item", "run_step", "run_workers"]
STARTUP_S = 120.0  # a worker gets this long to start (imports, ready()) before it counts as broken
Row = dict[str, Any]
OnRow = Callable[[dict, Row], None]


class ExecutorError(RuntimeError):
    """A job-level failure: a worker that cannot start (an unknown executor is a core.config.ConfigError)."""


def failed_row(item: dict, reason: str, key: str = "uid") -> Row:
    """The row written for an item whose step did not return: keeps the item's identity and the reason."""
    return {"uid": str(item.get(key, "")), "status": "failed", "reason": reason}


def _reason(exc: BaseException) -> str:
    """First line of the error; prefixed by its type unless the exception says its text is the reason."""
    text = str(exc).strip().splitlines()
    if getattr(exc, "reason_only", False) and text:
        return text[0]
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")


def run_item(step: Callable[..., Row], item: dict, kwargs: dict, key: str = "uid") -> Row:
    """Call `step(item, **kwargs)`; any exception becomes a failed row (the job goes on)."""
    try:
        row = step(item, **kwargs)
    except Exception as e:  # noqa: BLE001 - per-item errors are data, not crashes
        return failed_row(item, _reason(e), key)
    if not isinstance(row, dict) or "status" not in row:
        return failed_row(item, f"step returned {type(row).__name__}, not a row dict", key)
    row.setdefault("uid", str(item.get(key, "")))
    return row


def run_batch(step: Callable[..., Row], batch: Sequence[dict], kwargs: dict, key: str = "uid") -> list[Row]:
    """One Ray task: the step over every item of `batch`, per-item errors captured."""
    return [run_item(step, item, kwargs, key) for item in batch]


def batched(items: Sequence[Any], size: int) -> list[list[Any]]:
    size = max(1, int(size))
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


class StepWorker:
    """A step as a stateful worker, so that the process backend runs steps and workers alike."""

    def __init__(self, step: Callable[..., Row], kwargs: dict, key: str = "uid") -> None:
        self.step, self.kwargs, self.key = step, kwargs, key

    def __call__(self, item: dict) -> Row:
        return run_item(self.step, item, self.kwargs, self.key)


def _start(worker: Any) -> Any:
    ready = getattr(worker, "ready", None)
    if callable(ready):
        ready()
    return worker


class _Rows:
    """Collects rows by item index; drives the progress bar and the caller's `on_row`."""

    def __init__(self, items: list[dict], key: str, desc: str, progress: bool, on_row: OnRow | None) -> None:
        self.items, self.key, self.on_row = items, key, on_row
        self.rows: list[Row | None] = [None] * len(items)
        self.ok = self.failed = 0
        self.bar = tqdm(total=len(items), desc=desc, unit="item", disable=not progress or not items,
                        dynamic_ncols=True)

    def put(self, i: int, row: Row) -> None:
        if self.rows[i] is not None:  # a late duplicate (e.g. a cancelled Ray task that finished anyway)
            return
        self.rows[i] = row
        if row.get("status") == "failed":
            self.failed += 1
        else:
            self.ok += 1
        self.bar.update(1)
        self.bar.set_postfix(ok=self.ok, failed=self.failed)
        if self.on_row is not None:
            self.on_row(self.items[i], row)

    def result(self) -> list[Row]:
        self.bar.close()
        return [r if r is not None else failed_row(self.items[i], "no result (executor lost the item)", self.key)
                for i, r in enumerate(self.rows)]


# ----------------------------------------------------------------------------------------------------------
# Process backend: a pool of spawned worker processes, items fed one at a time.
# ----------------------------------------------------------------------------------------------------------


def _worker_loop(conn: Any, make: Callable[[], Any], key: str) -> None:
    """Body of a worker process: build the worker, then answer (index, item) messages until None."""
    try:
        worker = _start(make())
        conn.send(("ready", os.getpid()))
        while (msg := conn.recv()) is not None:
            i, item = msg
            conn.send(("row", i, run_item(worker, item, {}, key)))
    except (EOFError, KeyboardInterrupt):  # the driver went away or the user interrupted: just end
        pass
    except BaseException:  # noqa: BLE001 - tell the driver what broke this worker, then exit
        try:
            conn.send(("error", traceback.format_exc(limit=3)))
        except OSError:
            pass
    finally:
        conn.close()


@dataclass
class _Proc:
    proc: Any
    conn: Any
    started: float  # when the process was started (the start deadline)
    ready: bool = False
    item: int | None = None  # index of the item it holds
    since: float = 0.0  # when it got that item (the item's deadline)


def _process_pool(make: Callable[[], Any], items: list[dict], put: Callable[[int, Row], None], *, workers: int,
                  timeout_s: float | None, start_timeout_s: float, retire: Callable[[Row], bool] | None,
                  key: str) -> None:
    # spawn, not fork: the parent may hold threads (tqdm, Ray, torch) that fork would copy half-locked.
    ctx = mp.get_context("spawn")
    pending = deque(range(len(items)))
    pool: list[_Proc] = []

    def spawn() -> None:
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=_worker_loop, args=(child, make, key), daemon=True)
        proc.start()
        child.close()
        pool.append(_Proc(proc, parent, time.monotonic()))

    def stop(w: _Proc) -> None:
        pool.remove(w)
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join(timeout=10)
        w.conn.close()

    def lost(w: _Proc, reason: str) -> None:
        """`w` is gone: its item fails; a worker that never started means no worker can (a job error)."""
        stop(w)
        if w.item is not None:
            put(w.item, failed_row(items[w.item], reason, key))
        elif not w.ready:
            raise ExecutorError(f"a worker process could not start: {reason}")

    try:
        while pending or any(w.item is not None for w in pool):
            busy = sum(w.item is not None for w in pool)
            while len(pool) < min(max(1, workers), len(pending) + busy):
                spawn()
            now = time.monotonic()
            for w in list(pool):
                if w.ready and w.item is None and pending:
                    i = pending.popleft()
                    try:
                        w.conn.send((i, items[i]))
                    except OSError:  # died while idle: nothing of it is lost, the item goes to another
                        pending.appendleft(i)
                        stop(w)
                        continue
                    w.item, w.since = i, now
            for conn in mp_wait([w.conn for w in pool], timeout=0.2):
                w = next(p for p in pool if p.conn is conn)
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    w.proc.join(timeout=5)
                    lost(w, f"worker died (exit code {w.proc.exitcode})")
                    continue
                if msg[0] == "ready":
                    w.ready = True
                elif msg[0] == "row":
                    w.item = None
                    put(msg[1], msg[2])
                    if retire is not None and retire(msg[2]):
                        stop(w)  # the next turn starts a fresh one if items are left
                else:
                    lost(w, f"worker error: {msg[1].strip().splitlines()[-1]}")
            now = time.monotonic()
            for w in list(pool):
                if w.item is not None and timeout_s and now - w.since > timeout_s:
                    lost(w, f"timeout after {timeout_s:g} s (worker killed)")
                elif not w.ready and now - w.started > start_timeout_s:
                    lost(w, f"no answer within {start_timeout_s:g} s")
    finally:
        for w in pool:
            try:
                w.conn.send(None)
            except OSError:
                pass
        for w in list(pool):
            w.proc.join(timeout=5)
            stop(w)


# ----------------------------------------------------------------------------------------------------------
# Ray: one place that connects; tasks for steps, actors for stateful workers.
# ----------------------------------------------------------------------------------------------------------


def init_ray(address: str | None = None, num_cpus: int | None = None) -> Any:
    """Connect to Ray once: `address` or `RAY_ADDRESS` (a cluster), else start a private local instance.

    Returns the `ray` module. A bare `ray.init()` would join whatever `/tmp/ray/ray_current_cluster` names
    (a world-writable folder: anyone's cluster) and unpickle results from it; `address="local"` always
    starts a new instance, with token authentication on (`RAY_AUTH_MODE=token` unless the environment says
    otherwise) and a random token in this process's environment only: Ray's servers listen on every
    interface (Ray 2.60 has no loopback-only mode), the token refuses whoever else reaches them. It gets
    `num_cpus` (default: all cores) and no dashboard; the working tree travels with the driver only on a
    local instance. A cluster's authentication is its own (docs/scaleout.md: token on, 0600 token file).
    """
    import ray  # lazily: steps and the other backends never need it

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=True)
    else:
        _private_token()
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, ignore_reinit_error=True,
                 log_to_driver=True, configure_logging=False)
    return ray


def _private_token() -> None:
    """Token authentication for a private local instance: a random token in this process's environment,
    unless the user chose a mode or a token (RAY_AUTH_MODE, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH)."""
    import secrets

    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ["RAY_AUTH_MODE"] == "token" and not (os.environ.get("RAY_AUTH_TOKEN")
                                                       or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    try:  # Ray caches its config (and a token it found) from the environment once imported: read it again
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError, TypeError):
        pass


def _call(fn: Callable[[list], list], batch: list) -> tuple[str, list]:
    """The Ray task body: `fn` travels pickled (a function, or a partial of one), so any callable works.

    Returns (id of the node that ran it, fn(batch)): the driver reports where batches ran, which is how a
    user (and tests/test_scaleout.py) sees that a cluster's nodes all took work.
    """
    import ray  # inside a Ray worker: always importable there

    return ray.get_runtime_context().get_node_id(), fn(batch)


def _ray_tasks(step: Callable[..., Row], kwargs: dict, items: list[dict], put: Callable[[int, Row], None], *,
               batch_size: int, workers: int, timeout_s: float | None, address: str | None, key: str) -> None:
    """`batch_size` items per Ray task, at most `workers` in flight; a task past its deadline is cancelled."""
    ray = init_ray(address)
    # SPREAD: data tasks are I/O-bound; spread them over the cluster's nodes rather than packing the head.
    remote = ray.remote(max_retries=0, num_cpus=1, scheduling_strategy="SPREAD")(_call)
    fn = partial(run_batch, step, kwargs=kwargs, key=key)
    size = max(1, int(batch_size))
    batches = batched(list(range(len(items))), size)
    deadline_s = None if timeout_s is None else timeout_s * size
    pending = deque(range(len(batches)))
    running: dict[Any, tuple[int, float | None]] = {}
    nodes: dict[str, int] = {}  # node id -> batches it finished

    def fail(b: int, reason: str) -> None:
        for i in batches[b]:
            put(i, failed_row(items[i], reason, key))

    while pending or running:
        while pending and len(running) < max(1, workers):
            b = pending.popleft()
            ref = remote.remote(fn, [items[i] for i in batches[b]])
            running[ref] = (b, None if deadline_s is None else time.monotonic() + deadline_s)
        ready, _ = ray.wait(list(running), num_returns=1, timeout=0.2)
        for ref in ready:
            b, _ = running.pop(ref)
            try:
                node, rows = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - worker crash, task error: the batch fails, the job goes on
                fail(b, _reason(e))
                continue
            nodes[node] = nodes.get(node, 0) + 1
            for i, row in zip(batches[b], rows):
                put(i, row)
        now = time.monotonic()
        for ref, (b, deadline) in list(running.items()):
            if deadline is not None and now > deadline:
                ray.cancel(ref, force=True)
                running.pop(ref)
                fail(b, f"TimeoutError: timeout after {deadline_s:g} s (task cancelled)")
    # one line on stderr (not a log record: it must show whatever the logging setup) with full node ids, so
    # it can be matched against `ray list nodes`
    placed = ", ".join(f"{node} x{n}" for node, n in sorted(nodes.items()))
    print(f"ray: {sum(nodes.values())} task(s) finished on {len(nodes)} node(s): {placed}", file=sys.stderr,
          flush=True)


class _ActorHost:
    """Body of a Ray actor: builds one worker and calls it item after item."""

    def __init__(self, make: Callable[[], Any], key: str) -> None:
        self.make, self.key, self.worker = make, key, None

    def ready(self) -> int:
        self.worker = _start(self.make())
        return os.getpid()

    def call(self, item: dict) -> Row:
        return run_item(self.worker, item, {}, self.key)


def _ray_actors(make: Callable[[], Any], items: list[dict], put: Callable[[int, Row], None], *, workers: int,
                timeout_s: float | None, start_timeout_s: float, retire: Callable[[Row], bool] | None,
                key: str, address: str | None, num_cpus: float) -> None:
    ray = init_ray(address, num_cpus=max(workers, os.cpu_count() or 1))
    from ray.exceptions import RayActorError

    host = ray.remote(num_cpus=num_cpus, max_restarts=0)(_ActorHost)

    def started(n: int) -> list[Any]:
        new = [host.remote(make, key) for _ in range(n)]
        try:
            ray.get([a.ready.remote() for a in new], timeout=start_timeout_s)
        except Exception as e:
            for a in new:
                ray.kill(a, no_restart=True)
            raise ExecutorError(f"a Ray worker could not start: {_reason(e)}") from e
        return new

    pending = deque(range(len(items)))
    idle = started(max(1, min(workers, len(items))))
    running: dict[Any, tuple[Any, int, float]] = {}  # object ref -> (actor, item index, start)

    def replace(actor: Any) -> None:
        ray.kill(actor, no_restart=True)
        if pending:
            idle.extend(started(1))

    try:
        while pending or running:
            while pending and idle:
                actor, i = idle.pop(), pending.popleft()
                running[actor.call.remote(items[i])] = (actor, i, time.monotonic())
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for ref in ready:
                actor, i, _t0 = running.pop(ref)
                try:
                    row = ray.get(ref)
                except RayActorError as e:
                    put(i, failed_row(items[i], f"worker died ({type(e).__name__}); actor replaced", key))
                    replace(actor)
                    continue
                put(i, row)
                if retire is not None and retire(row):
                    replace(actor)
                else:
                    idle.append(actor)
            now = time.monotonic()
            for ref, (actor, i, t0) in list(running.items()):
                if timeout_s and now - t0 > timeout_s:
                    running.pop(ref)
                    put(i, failed_row(items[i], f"timeout after {timeout_s:g} s (actor killed)", key))
                    replace(actor)
    finally:
        for actor, _, _ in running.values():
            ray.kill(actor, no_restart=True)
        for actor in idle:
            ray.kill(actor, no_restart=True)


# ----------------------------------------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------------------------------------


def run_step(step: Callable[..., Row], items: Iterable[dict], *, executor: str = "local", workers: int = 1,
             batch_size: int = 1, timeout_s: float | None = None, kwargs: dict | None = None,
             key: str = "uid", desc: str = "", address: str | None = None, on_row: OnRow | None = None,
             progress: bool = True) -> list[Row]:
    """Run `step(item, **kwargs)` over `items`; return one row per item, in the order of `items`.

    `timeout_s` is per item (`local` does not enforce it). `batch_size` groups items into one Ray task
    (`ray` only: a task's deadline is `timeout_s` x its items, and a cancelled task fails all of them).
    """
    check_executor(executor)
    items = list(items)
    kwargs = dict(kwargs or {})
    rows = _Rows(items, key, desc or getattr(step, "__name__", "step"), progress, on_row)
    try:
        if not items:
            pass  # nothing to do: start no process and no Ray
        elif executor == "local":
            for i, item in enumerate(items):
                rows.put(i, run_item(step, item, kwargs, key))
        elif executor == "process":
            _process_pool(partial(StepWorker, step, kwargs, key), items, rows.put, workers=workers,
                          timeout_s=timeout_s, start_timeout_s=STARTUP_S, retire=None, key=key)
        else:
            _ray_tasks(step, kwargs, items, rows.put, batch_size=batch_size, workers=workers, timeout_s=timeout_s,
                       address=address, key=key)
    finally:
        result = rows.result()
    return result


def run_workers(make: Callable[[], Any], items: Iterable[dict], *, executor: str = "local", workers: int = 1,
                timeout_s: float | None = None, retire: Callable[[Row], bool] | None = None, key: str = "uid",
                desc: str = "", address: str | None = None, on_row: OnRow | None = None, progress: bool = True,
                start_timeout_s: float = STARTUP_S, num_cpus: float = 1.0) -> list[Row]:
    """Run stateful workers over `items`: `make()` once per worker, then `worker(item) -> row` per item.

    `make` must be picklable for `process` and `ray` (a class, or a functools.partial of one). `timeout_s` is
    per item; the worker that ran past it is killed and replaced (`local`: not enforced). A worker whose row
    makes `retire(row)` true is replaced after reporting it. `start_timeout_s` bounds a worker's start
    (`make()` + `ready()`); a worker that cannot start raises ExecutorError. `num_cpus`: Ray's CPU
    reservation per actor. Returns one row per item, in the order of `items`.
    """
    check_executor(executor)
    items = list(items)
    rows = _Rows(items, key, desc or "workers", progress, on_row)
    try:
        if not items:
            pass
        elif executor == "local":
            worker = _start(make())
            for i, item in enumerate(items):
                row = run_item(worker, item, {}, key)
                rows.put(i, row)
                if retire is not None and retire(row) and i + 1 < len(items):
                    worker = _start(make())  # what the process holds itself (e.g. bpy) stays: use process/ray
        elif executor == "process":
            _process_pool(make, items, rows.put, workers=workers, timeout_s=timeout_s,
                          start_timeout_s=start_timeout_s, retire=retire, key=key)
        else:
            _ray_actors(make, items, rows.put, workers=workers, timeout_s=timeout_s,
                        start_timeout_s=start_timeout_s, retire=retire, key=key, address=address, num_cpus=num_cpus)
    finally:
        result = rows.result()
    return result
