"""The documented cluster path (cluster/README.md), end to end on a two-node loopback Ray cluster:

    ray start --head ...                   (127.0.0.1 only, its own ports and temp folder)
    a second node joining it               (another process tree, its own ports; see WORKER_NODE)
    ray job submit --address http://127.0.0.1:<dashboard> --working-dir <folder with the spec>
        --runtime-env cluster/runtime_env.yaml -- pefteval run spec.yaml --output <absolute path>

then the same submission again, which must redo nothing (resume). The evaluations run one per node. The
cluster is this test's own: each node is a child process tree (`ray start --block` in a new session), torn
down by killing exactly that tree, never with `ray stop` (which stops every Ray on the machine).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from pefteval_harness.store import Store
from tests.conftest import REPO
from tests.loopback import BIN, assert_listens_on_loopback_only, cluster_env, free_ports, kill_tree

RAY = str(BIN / "ray")
PEFTEVAL = str(BIN / "pefteval")
RUNTIME_ENV = REPO / "cluster" / "runtime_env.yaml"

# One task per worker and one CPU per node: the two evaluations run at once, one on each node.
SPEC = """\
name: cluster-smoke
base_model: tiny
evaluate:
  tasks: [pefteval_quick_sentiment, pefteval_quick_arithmetic]
  limit: 8
  batch_size: 8
resources: {tasks_per_worker: 1}
"""

# The one Ray port flag each service needs: every port is chosen free on 127.0.0.1, so this cluster
# never collides with another Ray on the machine (defaults such as 10001 or 52365 would).
HEAD_PORT_FLAGS = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
    "node-manager-port",
    "object-manager-port",
)
HEAD_FLAGS = [
    "--block",
    "--node-ip-address=127.0.0.1",
    "--num-cpus=1",
    "--object-store-memory=200000000",
    "--disable-usage-stats",
]


# `ray start --address` refuses to start a node while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (what keeps Ray
# on 127.0.0.1), and with =1 it moves a 127.0.0.1 node to the machine's network address. So the second
# node starts as `ray start --address <gcs> --block` starts one, through Ray's own Node class (as
# ray.cluster_utils does), without that guard: its own process tree, until it is sent SIGTERM.
WORKER_NODE = """\
import signal, sys, time
from ray._private.node import Node
from ray._private.parameter import RayParams
ports = {k: int(v) for k, v in (a.split("=") for a in sys.argv[2:])}
params = RayParams(gcs_address=sys.argv[1], node_ip_address="127.0.0.1", num_cpus=1,
                   object_store_memory=200_000_000, min_worker_port=0, max_worker_port=0, **ports)
node = Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # exits through atexit: the node's processes stop
print("node", node.node_id, flush=True)
while True:
    time.sleep(1)
"""
# The node's ports as RayParams names them (metrics_agent_port is `--dashboard-agent-grpc-port`).
NODE_PORTS = (
    "node_manager_port",
    "object_manager_port",
    "dashboard_agent_listen_port",
    "metrics_agent_port",
    "runtime_env_agent_port",
    "metrics_export_port",
)

NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _wait_for_dashboard(url: str, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with NO_PROXY_OPENER.open(f"{url}/api/version", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"Ray dashboard at {url} not up after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def _start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _live_nodes(gcs: str, env: dict) -> list[dict]:
    probe = (
        "import json, sys, ray; ray.init(address=sys.argv[1], log_to_driver=False);"
        " print(json.dumps([[n['NodeID'], n['NodeManagerAddress']] for n in ray.nodes() if n['Alive']]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, gcs], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    return [dict(zip(("id", "ip"), n, strict=True)) for n in json.loads(done.stdout.strip().splitlines()[-1])]


@pytest.fixture
def loopback_cluster():
    """A two-node Ray cluster on 127.0.0.1 with its own temp folder and ports; killed afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="pefteval-ray-", dir="/tmp")  # short: Ray's socket paths
    ports = iter(free_ports(len(HEAD_PORT_FLAGS) + len(NODE_PORTS)))
    head_ports = {flag: next(ports) for flag in HEAD_PORT_FLAGS}
    node_ports = {name: next(ports) for name in NODE_PORTS}  # the second node's own
    env = cluster_env()
    gcs = f"127.0.0.1:{head_ports['port']}"
    head_log, node_log = Path(temp_dir) / "ray-head.log", Path(temp_dir) / "ray-node.log"
    head_flags = [f"--{flag}={port}" for flag, port in head_ports.items()]
    head_flags += ["--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}"]
    head = _start([RAY, "start", "--head", *HEAD_FLAGS, *head_flags], env, head_log)
    node = None
    try:
        dashboard = f"http://127.0.0.1:{head_ports['dashboard-port']}"
        _wait_for_dashboard(dashboard, head, head_log)
        node_args = [f"{name}={port}" for name, port in node_ports.items()]
        node = _start([sys.executable, "-c", WORKER_NODE, gcs, *node_args], env, node_log)
        deadline, nodes = time.monotonic() + 60, []
        while len(nodes) < 2:
            assert node.poll() is None, f"worker node exited:\n{node_log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"worker node did not join:\n{node_log.read_text()[-4000:]}"
            time.sleep(1)
            nodes = _live_nodes(gcs, env)
        assert {n["ip"] for n in nodes} == {"127.0.0.1"}, nodes
        assert_listens_on_loopback_only([head.pid, node.pid])  # nothing this cluster runs is reachable from outside
        yield {"dashboard": dashboard, "gcs": gcs, "env": env, "nodes": {n["id"] for n in nodes}}
    finally:
        kill_tree([node, head] if node else [head], temp_dir)  # the worker node first
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(cluster: dict, working_dir: Path, output: Path) -> str:
    command = [
        RAY,
        "job",
        "submit",
        "--address",
        cluster["dashboard"],
        "--working-dir",
        str(working_dir),
        "--runtime-env",
        str(RUNTIME_ENV),
        "--",
        "pefteval",
        "run",
        "spec.yaml",
        "--output",
        str(output),
    ]
    done = subprocess.run(command, env=cluster["env"], capture_output=True, text=True, timeout=180)
    text = done.stdout + done.stderr
    assert done.returncode == 0, f"ray job submit failed ({done.returncode}):\n{text[-6000:]}"
    assert "succeeded" in text, text[-6000:]
    return text


@pytest.mark.slow
def test_ray_job_submit_runs_and_resumes(loopback_cluster, tmp_path):
    job_dir = tmp_path / "job"  # the uploaded working dir: the spec only, results live outside it
    job_dir.mkdir()
    (job_dir / "spec.yaml").write_text(SPEC)
    output = (tmp_path / "shared" / "runs" / "cluster-smoke").resolve()

    first = _submit(loopback_cluster, job_dir, output)
    assert "3 jobs ran, 0 already done, 0 failed" in first, first[-6000:]  # the tiny base, one evaluation per task
    assert (output / "leaderboard.md").is_file()

    board = subprocess.run(
        [PEFTEVAL, "leaderboard", str(output), "--format", "json"],
        env=loopback_cluster["env"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = json.loads(board.stdout)
    base = {row["task"]: row for row in rows if row["model"] == "base" and row["record"] == "score"}
    assert set(base) == {"pefteval_quick_sentiment", "pefteval_quick_arithmetic"}, rows
    for row in base.values():
        assert isinstance(row["value"], (int, float)), row
        assert row["job_id"].startswith("evaluate-"), row

    # Each evaluation records the node that ran it: one on each node.
    store = Store(output)
    nodes = {store.result(row["job_id"])["pefteval"]["ray_node_id"] for row in base.values()}
    assert nodes == loopback_cluster["nodes"], nodes

    second = _submit(loopback_cluster, job_dir, output)
    assert "0 jobs ran, 3 already done, 0 failed" in second, second[-6000:]
