"""Run a plain step function over items: inline, in a thread or process pool, or as Ray tasks.

A step is `step(item: dict, **kwargs) -> dict` (a manifest row with at least `uid` and `status`); it never
imports Ray. The executor only schedules it:

- items are grouped into batches; one batch is one task (a Ray task, or one worker process);
- an exception from one item becomes a `failed` row with the reason, and the batch goes on;
- a task that runs past its deadline (`timeout_s` per item x items in the batch) is cancelled (Ray),
  killed (process backend) or abandoned (thread backend: a Python thread cannot be killed, so it runs on
  in the background; use process/Ray for untrusted or hang-prone steps), and its unfinished items become
  `failed` rows with reason `timeout ...`;
- a worker that dies (segfault, OOM kill) fails only the items it had not finished;
- a tqdm bar counts finished items; `on_rows` sees rows as they arrive, so a caller can flush its
  manifest during a long job (a SIGKILL then loses at most what was not flushed).

Ray is imported lazily, and `init_ray` is the one place that decides how to connect (`RAY_ADDRESS` or the
`address` argument for a cluster, otherwise a local instance). `map_batches` is the generic layer other
stages may reuse: it maps a callable over batches and returns the results in order.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as futures_wait
from functools import partial
from multiprocessing.connection import wait as mp_wait
from typing import Any

from tqdm import tqdm

BACKENDS = ("inline", "thread", "process", "ray")
STARTUP_S = 120.0  # a worker process gets this long to start (imports) before its first item's deadline
Row = dict[str, Any]


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
    """One task: the step over every item of `batch`, per-item errors captured."""
    return [run_item(step, item, kwargs, key) for item in batch]


def batched(items: Sequence[Any], size: int) -> list[list[Any]]:
    size = max(1, int(size))
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


# ----------------------------------------------------------------------------------------------------------
# Ray: one place that connects.
# ----------------------------------------------------------------------------------------------------------


def init_ray(address: str | None = None, num_cpus: int | None = None) -> Any:
    """Connect to Ray once: `address` or `RAY_ADDRESS` (a cluster), else start a local instance.

    Returns the `ray` module. A local instance gets `num_cpus` (default: all cores) and no dashboard; the
    working tree travels with the driver only on a local instance (a cluster must have the package installed).
    """
    import ray  # lazily: steps and the non-Ray backends never need it

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, ignore_reinit_error=True,
                 log_to_driver=True, configure_logging=False)
    return ray


def _call(fn: Callable[[list], list], batch: list) -> tuple[str, list]:
    """The Ray task body: `fn` travels pickled (a function, or a partial of one), so any callable works.

    Returns (id of the node that ran it, fn(batch)): the driver reports where batches ran, which is how a
    user (and tests/test_scaleout.py) sees that a cluster's nodes all took work.
    """
    import ray  # inside a Ray worker: always importable there

    return ray.get_runtime_context().get_node_id(), fn(batch)


def _ray_map(fn: Callable[[list], list], batches: list[list], deadlines: list[float | None],
             on_done: Callable[[int, list | BaseException], None], workers: int, address: str | None,
             max_retries: int) -> None:
    """Run `fn(batch)` per batch as Ray tasks, at most `workers` in flight; report each as it ends."""
    ray = init_ray(address)
    # SPREAD: data tasks are I/O-bound; spread them over the cluster's nodes rather than packing the head.
    remote = ray.remote(max_retries=max_retries, num_cpus=1, scheduling_strategy="SPREAD")(_call)
    pending = list(range(len(batches)))[::-1]
    running: dict[Any, tuple[int, float | None]] = {}
    nodes: dict[str, int] = {}  # node id -> batches it finished
    limit = max(1, workers)
    while pending or running:
        while pending and len(running) < limit:
            i = pending.pop()
            deadline = None if deadlines[i] is None else time.monotonic() + deadlines[i]
            running[remote.remote(fn, batches[i])] = (i, deadline)
        ready, _ = ray.wait(list(running), num_returns=1, timeout=0.2)
        for ref in ready:
            i, _ = running.pop(ref)
            try:
                node, result = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - worker crash, task error: the batch fails, the job goes on
                on_done(i, e)
                continue
            nodes[node] = nodes.get(node, 0) + 1
            on_done(i, result)
        now = time.monotonic()
        for ref, (i, deadline) in list(running.items()):
            if deadline is not None and now > deadline:
                ray.cancel(ref, force=True)
                running.pop(ref)
                on_done(i, TimeoutError(f"timeout after {deadlines[i]:.0f} s (task cancelled)"))
    # one line on stderr (not a log record: it must show whatever the logging setup) with full node ids, so
    # it can be matched against `ray list nodes`
    placed = ", ".join(f"{node} x{n}" for node, n in sorted(nodes.items()))
    print(f"ray: {sum(nodes.values())} task(s) finished on {len(nodes)} node(s): {placed}", file=sys.stderr,
          flush=True)


# ----------------------------------------------------------------------------------------------------------
# Process backend: one worker process per batch, rows streamed back, killed at the deadline.
# ----------------------------------------------------------------------------------------------------------


def _process_worker(conn: Any, step: Callable[..., Row], batch: list[dict], kwargs: dict, key: str) -> None:
    try:
        conn.send(("ready",))  # the per-item deadline starts now, not while the interpreter starts up
        for idx, item in enumerate(batch):
            conn.send((idx, run_item(step, item, kwargs, key)))
        conn.send(None)
    except BaseException:  # noqa: BLE001 - report what broke the worker, then exit
        conn.send(("error", traceback.format_exc(limit=3)))
    finally:
        conn.close()


def _process_map(step: Callable[..., Row], batches: list[list[dict]], kwargs: dict, key: str,
                 timeout_s: float | None, workers: int, on_rows: Callable[[list[Row]], None]) -> None:
    # spawn, not fork: the parent may hold threads (tqdm, Ray, torch) that fork would copy half-locked.
    ctx = mp.get_context("spawn")
    pending = list(range(len(batches)))[::-1]
    running: dict[Any, dict] = {}  # reader connection -> state

    def finish(state: dict, reason: str) -> None:
        proc = state["proc"]
        if proc.is_alive():
            proc.kill()
        proc.join()
        rest = [failed_row(it, reason, key) for j, it in enumerate(state["batch"]) if j not in state["done"]]
        if rest:
            on_rows(rest)

    while pending or running:
        while pending and len(running) < max(1, workers):
            i = pending.pop()
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_process_worker, args=(writer, step, batches[i], kwargs, key), daemon=True)
            proc.start()
            writer.close()
            running[reader] = {"proc": proc, "batch": batches[i], "done": set(), "t0": time.monotonic(),
                               "ready": False}
        for reader in mp_wait(list(running), timeout=0.2):
            state = running[reader]
            try:
                msg = reader.recv()
            except (EOFError, OSError):
                running.pop(reader)
                state["proc"].join(timeout=5)
                finish(state, f"worker died (exit code {state['proc'].exitcode})")
                continue
            if msg is None:
                running.pop(reader)
                finish(state, "worker ended early")
            elif msg[0] == "ready":
                state["ready"] = True
                state["t0"] = time.monotonic()
            elif msg[0] == "error":
                running.pop(reader)
                finish(state, f"worker error: {msg[1].strip().splitlines()[-1]}")
            else:
                idx, row = msg
                state["done"].add(idx)
                state["t0"] = time.monotonic()  # the deadline is per item: it restarts after each one
                on_rows([row])
        if timeout_s:
            now = time.monotonic()
            for reader, state in list(running.items()):
                limit = timeout_s if state["ready"] else max(STARTUP_S, timeout_s)
                if now - state["t0"] > limit:
                    running.pop(reader)
                    what = "timeout" if state["ready"] else "worker did not start within"
                    finish(state, f"{what} after {limit:.0f} s (worker killed)")


# ----------------------------------------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------------------------------------


def map_batches(fn: Callable[[list], list], batches: list[list], *, backend: str = "inline", workers: int = 1,
                timeout_s: float | None = None, address: str | None = None, max_retries: int = 0,
                on_done: Callable[[int, list | BaseException], None] | None = None) -> list[list | BaseException]:
    """Map `fn` over `batches`; result i is `fn(batches[i])` or the exception that ended it.

    `timeout_s` is the whole-batch deadline, counted from the batch's start (Ray: the task is cancelled;
    thread: the batch is reported as timed out and abandoned, since a thread cannot be stopped; inline and
    process here: not enforced). This is the generic layer: no row semantics.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown executor backend '{backend}' (known: {', '.join(BACKENDS)})")
    results: list[list | BaseException] = [[] for _ in batches]
    if not batches:
        return results  # nothing to do: do not start Ray or a pool

    def done(i: int, res: list | BaseException) -> None:
        results[i] = res
        if on_done is not None:
            on_done(i, res)

    if backend == "ray":
        _ray_map(fn, batches, [timeout_s] * len(batches), done, workers, address, max_retries)
    elif backend in ("inline", "process"):
        # a process pool over arbitrary callables has no streaming; run_step has the process backend.
        for i, b in enumerate(batches):
            try:
                done(i, fn(b))
            except Exception as e:  # noqa: BLE001
                done(i, e)
    else:
        _thread_map(fn, batches, timeout_s, workers, done)
    return results


def _thread_body(fn: Callable[[list], list], batch: list, fut: Future) -> None:
    try:
        fut.set_result(fn(batch))
    except BaseException as e:  # noqa: BLE001 - handed to the driver as the batch's result
        fut.set_exception(e)


def _thread_map(fn: Callable[[list], list], batches: list[list], timeout_s: float | None, workers: int,
                on_done: Callable[[int, list | BaseException], None]) -> None:
    """At most `workers` batches in flight, each in its own daemon thread, deadline = its start + timeout_s.

    A Python thread cannot be killed: a batch past its deadline is reported as a TimeoutError and abandoned
    (its thread runs on in the background, frees its slot, and dies with the process since it is a daemon).
    The deadline counts from the batch's start, not from when the driver begins waiting for it, and nothing
    waits for abandoned threads (a ThreadPoolExecutor's exit would). Untrusted or hang-prone work belongs on
    the process or Ray backends, which do kill.
    """
    pending = list(range(len(batches)))[::-1]
    running: dict[int, tuple[Future, float | None]] = {}
    while pending or running:
        while pending and len(running) < max(1, workers):
            i = pending.pop()
            fut: Future = Future()
            threading.Thread(target=_thread_body, args=(fn, batches[i], fut), daemon=True,
                             name=f"executor-batch-{i}").start()
            running[i] = (fut, None if timeout_s is None else time.monotonic() + timeout_s)
        futures_wait([f for f, _ in running.values()], timeout=0.1, return_when=FIRST_COMPLETED)
        now = time.monotonic()
        for i, (fut, deadline) in list(running.items()):
            if fut.done():
                running.pop(i)
                exc = fut.exception()
                on_done(i, exc if exc is not None else fut.result())
            elif deadline is not None and now > deadline:
                running.pop(i)
                on_done(i, TimeoutError(f"timeout after {timeout_s:g} s (thread abandoned, still running: "
                                        f"use the process or ray backend to kill hung work)"))


def run_step(step: Callable[..., Row], items: Iterable[dict], *, backend: str = "inline", workers: int = 1,
             batch_size: int = 1, timeout_s: float | None = None, kwargs: dict | None = None,
             key: str = "uid", desc: str = "", address: str | None = None,
             on_rows: Callable[[list[Row]], None] | None = None, progress: bool = True) -> list[Row]:
    """Run `step(item, **kwargs)` over `items`; return one row per item, in the order of `items`.

    `timeout_s` is per item: the process backend restarts the deadline after each finished item; Ray and
    thread tasks get `timeout_s x len(batch)` from their start; inline does not enforce it (use it for
    debugging). A timed-out thread is abandoned, not killed: untrusted work goes on process or ray.
    """
    items = list(items)
    kwargs = dict(kwargs or {})
    batches = batched(items, batch_size)
    offsets = [i * max(1, int(batch_size)) for i in range(len(batches))]
    rows: list[Row | None] = [None] * len(items)
    bar = tqdm(total=len(items), desc=desc or getattr(step, "__name__", "step"), unit="item",
               disable=not progress, dynamic_ncols=True)

    def emit(new: list[Row]) -> None:
        bar.update(len(new))
        if on_rows is not None and new:
            on_rows(new)

    try:
        if not items:
            pass
        elif backend == "process":
            by_uid: dict[str, list[int]] = {}
            for idx, it in enumerate(items):
                by_uid.setdefault(str(it.get(key, "")), []).append(idx)

            def place(new: list[Row]) -> None:
                for r in new:
                    slots = by_uid.get(str(r.get("uid", "")), [])
                    slot = next((s for s in slots if rows[s] is None), None)
                    if slot is not None:
                        rows[slot] = r
                emit(new)

            _process_map(step, batches, kwargs, key, timeout_s, workers, place)
        elif backend in BACKENDS:
            task = partial(run_batch, step, kwargs=kwargs, key=key)

            def on_done(i: int, res: list | BaseException) -> None:
                batch = batches[i]
                if isinstance(res, BaseException):
                    res = [failed_row(it, _reason(res), key) for it in batch]
                for j, r in enumerate(res):
                    rows[offsets[i] + j] = r
                emit(list(res))

            deadline = None if timeout_s is None else timeout_s * max(1, int(batch_size))
            map_batches(task, batches, backend=backend, workers=workers, timeout_s=deadline, address=address,
                        on_done=on_done)
        else:
            raise ValueError(f"unknown executor backend '{backend}' (known: {', '.join(BACKENDS)})")
    finally:
        bar.close()
    return [r if r is not None else failed_row(items[i], "no result (executor lost the item)", key)
            for i, r in enumerate(rows)]
