"""The documented cluster path (cluster/README.md), end to end on a one-node loopback Ray cluster:

    ray start --head ... (127.0.0.1 only)
    ray job submit --address http://127.0.0.1:<dashboard> --working-dir <folder with the spec>
        --runtime-env cluster/runtime_env.yaml -- pefteval run spec.yaml --output <absolute path>

then the same submission again, which must redo nothing (resume). The cluster is this test's own: it is
started as a child process tree (`ray start --block` in a new session) and torn down by killing exactly
that tree, never with `ray stop` (which stops every Ray on the machine, other tests' too).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
PEFTEVAL = str(BIN / "pefteval")
RUNTIME_ENV = REPO / "cluster" / "runtime_env.yaml"

SPEC = """\
name: cluster-smoke
base_model: tiny
evaluate:
  tasks: [pefteval_quick_sentiment, pefteval_quick_arithmetic]
  limit: 8
  batch_size: 8
"""

# The one Ray port flag each service needs: every port is chosen free on 127.0.0.1, so this cluster
# never collides with another Ray on the machine (defaults such as 10001 or 52365 would).
PORT_FLAGS = (
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


def _free_ports(n: int) -> list[int]:
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:  # ::ffff:127.0.0.1
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _cluster_env() -> dict[str, str]:
    """Environment of the cluster and of the CLI calls: loopback Ray, offline, no usage report."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # keeps the node on 127.0.0.1
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",  # no usage report sent anywhere
        # A job inherits the environment its node's Ray was started with: this is how the HF offline
        # switches reach `pefteval run` and its tasks (cluster/runtime_env.yaml leaves them commented).
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        DS_ACCELERATOR="cpu",
        # The job's entrypoint is the `pefteval` command: the node's PATH must find this venv's.
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    for key in ("NO_PROXY", "no_proxy"):  # an HTTP proxy must never see the loopback job API
        env[key] = ",".join(filter(None, [env.get(key), "127.0.0.1", "localhost"]))
    return env


def _kill_tree(root: subprocess.Popen, temp_dir: str) -> None:
    """Stop the cluster this test started, and only it: the `ray start` process and its descendants,
    plus any process whose command line names this test's own Ray temp folder (orphans)."""
    procs: list[psutil.Process] = []
    try:
        parent = psutil.Process(root.pid)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in arg for arg in proc.info["cmdline"] or ()) and proc not in procs:
                procs.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    if root.poll() is None:
        root.send_signal(signal.SIGTERM)  # `ray start --block` drains and stops its services
    _, alive = psutil.wait_procs(procs, timeout=20)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    try:
        root.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


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


@pytest.fixture
def loopback_cluster():
    """A one-node Ray cluster on 127.0.0.1 with its own temp folder and ports; killed afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="pefteval-ray-", dir="/tmp")  # short: Ray's socket paths
    ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS)), strict=True))
    env = _cluster_env()
    log = Path(temp_dir) / "ray-start.log"
    command = [
        RAY,
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        *(f"--{flag}={port}" for flag, port in ports.items()),
        "--num-cpus=2",
        "--object-store-memory=200000000",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
        _wait_for_dashboard(dashboard, process, log)
        gcs = f"127.0.0.1:{ports['port']}"
        probe = (
            "import json, sys, ray; ray.init(address=sys.argv[1], log_to_driver=False);"
            " print(json.dumps(sorted({n['NodeManagerAddress'] for n in ray.nodes()})))"
        )
        done = subprocess.run(
            [sys.executable, "-c", probe, gcs], env=env, capture_output=True, text=True, timeout=60, check=True
        )
        assert json.loads(done.stdout.strip().splitlines()[-1]) == ["127.0.0.1"]
        # Nothing this cluster runs listens beyond loopback.
        for proc in [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]:
            try:
                listening = [c.laddr.ip for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN]
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            assert all(_is_loopback(ip) for ip in listening), f"{proc.name()} listens on {listening}"
        yield {"dashboard": dashboard, "gcs": gcs, "env": env, "temp_dir": temp_dir}
    finally:
        _kill_tree(process, temp_dir)
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

    second = _submit(loopback_cluster, job_dir, output)
    assert "0 jobs ran, 3 already done, 0 failed" in second, second[-6000:]
