"""Scale-out, proven small: `make data` on a two-node Ray cluster, and training with torchrun across two "nodes".

Two real `ray start` processes (`--head`, then `--address`), each with its own temp dir and ports, stand in for
a two-machine cluster. `python -m pipelines.data` runs in a subprocess with only `RAY_ADDRESS` pointing at it.
Ray's own state (the task table of the state API, the node table) must show the download tasks on both nodes,
and the manifests must be complete and equal to those of a run without Ray.

The cluster runs with token authentication on, as docs/scaleout.md says to run one: a random token is
written to a 0600 file before `ray start --head`, every node and driver gets `RAY_AUTH_MODE=token` and
`RAY_AUTH_TOKEN_PATH`, and a driver without the token is refused. Each node advertises the address it is
given (`--node-ip-address`). Without `RAY_ADDRESS`, the executor never joins a cluster it was not told
about: it starts a private instance, even when Ray's discovery file names another one.

The nodes are started with `--block` in their own process group: stopping them is a signal to the two
processes this test started (and, for leftovers, to their process groups), never `ray stop`, which would
stop every Ray instance on the machine, other users' included.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
RAY_CLI = Path(sys.executable).parent / "ray"
DATA_ARGS = ["--source", "procedural", "data.max_assets=4", "data.procedural_count=4", "data.download_batch=1"]
RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}  # + RAY_AUTH_TOKEN_PATH, per cluster


def write_token(folder: Path) -> Path:
    """A random token in a file only its owner can read, created so (O_EXCL, mode 0600) before any node
    starts: Ray's own generator writes ~/.ray/auth_token with the umask's mode (0644 here)."""
    path = folder / "auth_token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def node_ip() -> str:
    """This machine's address as Ray advertises it (Ray turns 127.0.0.1 into it anyway)."""
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    """Every port a node binds at a fixed default, made free ones: other Ray instances may run here."""
    return ["--node-manager-port", str(_free_port()), "--object-manager-port", str(_free_port()),
            "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
            "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port())]


def _stop(proc: subprocess.Popen) -> None:
    """Stop one `ray start --block` we started: SIGTERM (it stops its own children), then its process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group is the one start_new_session made for this node only
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout_s: float = 60.0, host: str = "127.0.0.1") -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start --head exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the head's GCS did not listen on {port} within {timeout_s:.0f} s")


def _reread_ray_config() -> None:
    """Ray reads RAY_AUTH_MODE once into its cached config: read the environment again after changing it."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict]:
    """A two-node Ray cluster on this machine; yields its address and the connected `ray` module."""
    import ray

    # short temp dirs: Ray puts unix sockets under them, and socket paths are limited to ~107 bytes
    dirs = [Path(tempfile.mkdtemp(prefix="gtr-ray-head-", dir="/tmp")),
            Path(tempfile.mkdtemp(prefix="gtr-ray-node-", dir="/tmp"))]
    token = write_token(dirs[0])
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")} | RAY_ENV | {
        "RAY_AUTH_TOKEN_PATH": str(token)}
    port = _free_port()
    ip = node_ip()
    address = f"{ip}:{port}"
    procs: list[subprocess.Popen] = []
    logs = [d / "ray-start.log" for d in dirs]
    mp = pytest.MonkeyPatch()
    try:
        procs.append(subprocess.Popen(
            [str(RAY_CLI), "start", "--head", "--port", str(port), "--node-ip-address", ip, "--num-cpus", "1",
             "--block", "--temp-dir", str(dirs[0]), "--ray-client-server-port", str(_free_port()),
             "--dashboard-port", str(_free_port()), "--disable-usage-stats", *_node_ports()],
            env=env, cwd=dirs[0], stdout=open(logs[0], "w"), stderr=subprocess.STDOUT, start_new_session=True))
        _wait_port(port, procs[0], logs[0], host=ip)
        procs.append(subprocess.Popen(
            [str(RAY_CLI), "start", "--address", address, "--node-ip-address", ip, "--num-cpus", "1", "--block",
             "--temp-dir", str(dirs[1]), "--disable-usage-stats", *_node_ports()],
            env=env, cwd=dirs[1], stdout=open(logs[1], "w"), stderr=subprocess.STDOUT, start_new_session=True))
        for k, v in (RAY_ENV | {"RAY_AUTH_TOKEN_PATH": str(token)}).items():
            mp.setenv(k, v)
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.delenv("RAY_AUTH_TOKEN", raising=False)
        _reread_ray_config()
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        t0 = time.monotonic()
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            if procs[1].poll() is not None:
                raise RuntimeError(f"ray start --address exited:\n{logs[1].read_text()[-2000:]}")
            if time.monotonic() - t0 > 90:
                raise RuntimeError("the second node did not join within 90 s")
            time.sleep(0.5)
        yield {"address": address, "ray": ray, "env": env, "token": token}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        mp.undo()
        _reread_ray_config()
        for proc in reversed(procs):  # the joined node first, the head last
            _stop(proc)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def _run_data(out: Path, extra: list[str], env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipelines.data", "--out", str(out), *DATA_ARGS, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _manifest(out: Path, stage: str) -> list[dict]:
    """The stage's rows without what legitimately differs between runs (timings, the OUT prefix of paths)."""
    rows = pq.read_table(out / "manifest" / f"{stage}.parquet").to_pylist()
    for r in rows:
        r.pop("seconds", None)
        if r.get("path"):
            r["path"] = str(Path(r["path"]).relative_to(out))
    return sorted(rows, key=lambda r: r["uid"])


def test_data_job_runs_on_both_nodes_of_a_cluster(cluster, tmp_path: Path):
    ray = cluster["ray"]
    node_ids = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(node_ids) == 2

    on_cluster = _run_data(tmp_path / "cluster", ["data.executor=ray"],
                           cluster["env"] | {"RAY_ADDRESS": cluster["address"]})
    local = tmp_path / "local"
    _run_data(local, ["data.executor=local"], {k: v for k, v in cluster["env"].items() if k != "RAY_ADDRESS"})

    # Ray's own task table: every download batch is a finished `_call` task; together they used both nodes.
    from ray.util.state import list_tasks

    tasks = [t for t in list_tasks(address=cluster["address"],  # never "the" local instance: others may run
                                   filters=[("func_or_class_name", "=", "_call")], limit=1000,
                                   raise_on_missing_output=False)]
    assert len(tasks) == 4, [(t.name, t.state) for t in tasks]  # download_batch=1: one task per asset
    assert {t.node_id for t in tasks} == node_ids
    # the executor's own report (node ids from each task's runtime context) says the same
    line = re.search(r"ray: (\d+) task\(s\) finished on (\d+) node\(s\): (.*)", on_cluster.stderr)
    assert line, on_cluster.stderr[-2000:]
    reported = dict(re.findall(r"([0-9a-f]{16,}) x(\d+)", line.group(3)))
    print(line.group(0), [(t.node_id[:8], t.state) for t in tasks])  # shown with -rP
    assert set(reported) == node_ids and sum(map(int, reported.values())) == 4

    # complete, and the same decisions and the same bytes as the run without Ray
    out = tmp_path / "cluster"
    for stage in ("filter", "download"):
        assert _manifest(out, stage) == _manifest(local, stage)
    rows = _manifest(out, "download")
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    for r in rows:  # the recorded checksum is that of the file on disk (hashlib, not the stage's helper)
        assert hashlib.sha256((out / r["path"]).read_bytes()).hexdigest() == r["sha256"]


def test_the_cluster_refuses_a_driver_without_its_token(cluster):
    assert stat.S_IMODE(cluster["token"].stat().st_mode) == 0o600
    script = f"import ray; ray.init(address={cluster['address']!r}, log_to_driver=False); print('JOINED')"
    for extra in ({"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}):
        env = {k: v for k, v in cluster["env"].items() if k != "RAY_AUTH_TOKEN_PATH"} | extra
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "JOINED" not in proc.stdout, (extra, proc.stdout[-500:])
        assert re.search(r"(?i)auth", proc.stdout + proc.stderr), proc.stderr[-2000:]


PRIVATE = textwrap.dedent("""
    import sys
    from pipelines.executor import init_ray
    ray = init_ray(num_cpus=1)
    from ray._raylet import AuthenticationMode, get_authentication_mode
    print("GCS", ray.get_runtime_context().gcs_address, get_authentication_mode() == AuthenticationMode.TOKEN,
          flush=True)
    sys.stdin.read()  # hold the instance until the test closes stdin
    ray.shutdown()
""")


def test_without_ray_address_a_private_instance_never_joins_a_discovered_one(cluster, tmp_path: Path):
    """Ray's discovery file (ray_current_cluster under RAY_TMPDIR, /tmp/ray by default: world-writable) names
    the running cluster; `init_ray` without RAY_ADDRESS starts its own instance instead of joining it, with
    token auth on, and a driver without that instance's token is refused by it."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="gtr-rt-", dir="/tmp"))
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text(cluster["address"])
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
        env |= {"RAY_TMPDIR": str(ray_tmp), "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-c", PRIVATE], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            assert line.startswith("GCS "), proc.stderr.read()[-3000:] if proc.poll() is not None else line
            _, gcs, token_on = line.split()
            assert gcs != cluster["address"] and token_on == "True"
            stranger = f"import ray; ray.init(address={gcs!r}, log_to_driver=False); print('JOINED')"
            other = subprocess.run([sys.executable, "-c", stranger], env=env | {"RAY_AUTH_MODE": "disabled"},
                                   capture_output=True, text=True, timeout=120)
            assert other.returncode != 0 and "JOINED" not in other.stdout
        finally:
            proc.stdin.close()
            proc.wait(timeout=120)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_torchrun_two_nodes_read_shards_by_url(tmp_path: Path):
    """Training across "machines": two torchrun launches (`--nnodes 2 --node_rank 0/1 --master_addr`), one
    process each, stage 1 for 2 steps on shards served over HTTP (a stand-in for object storage)."""
    from core.config import Config
    from pipelines.shards import pack
    from tests.fake_renders import write_renders
    from tests.training.test_distributed import SMALL

    data = tmp_path / "data"
    write_renders(data, [f"asset{i}" for i in range(4)], views=6, size=32)
    cfg = Config(out=str(data))
    cfg.shards.val_fraction, cfg.shards.max_count = 0.0, 2
    pack(cfg, executor="local")
    assert sorted(p.name for p in (data / "shards").glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar"]

    http_port, master_port = _free_port(), _free_port()
    log = tmp_path / "http.log"
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(http_port), "--bind", "127.0.0.1",
                               "--directory", str(data / "shards")], stdout=subprocess.DEVNULL,
                              stderr=open(log, "w"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    url = f"http://127.0.0.1:{http_port}/train-{{000000..000001}}.tar"
    run = tmp_path / "run"
    nodes = []
    try:
        _wait_port(http_port, server, log)
        for node_rank in (0, 1):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
                   "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(master_port),
                   "-m", "training.train_nerf", "--out", str(run), f"nerf.shards={url}", *SMALL]
            nodes.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
        outputs = [p.communicate(timeout=400)[0] for p in nodes]
    finally:
        for p in [*nodes, server]:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, text in zip(nodes, outputs):
        assert p.returncode == 0, text[-3000:]
    meta = json.loads((run / "runs" / "nerf" / "step-2" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == 2
    # the server's own access log: every training shard was fetched over HTTP
    fetched = set(re.findall(r'"GET /(train-\d{6}\.tar) HTTP', log.read_text()))
    assert fetched == {"train-000000.tar", "train-000001.tar"}
