"""Helpers for tests that start their own Ray clusters on 127.0.0.1 (test_ray_cluster, test_two_node).

Each cluster gets free ports and its own temp folder, is checked to listen on loopback only, and is torn
down by killing exactly the processes it started (never `ray stop`: that stops every Ray on the machine).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 right now."""
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


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:  # ::ffff:127.0.0.1
        ip = ip.ipv4_mapped
    return ip.is_loopback


def assert_listens_on_loopback_only(pids: Iterable[int]) -> None:
    """Nothing these processes (and their children) listen on is reachable from another machine."""
    procs: list[psutil.Process] = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            procs += [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for proc in procs:
        try:
            listening = [c.laddr.ip for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        assert all(is_loopback(ip) for ip in listening), f"{proc.name()} listens on {listening}"


def cluster_env() -> dict[str, str]:
    """Environment of a test cluster and of the CLI calls to it: loopback Ray, offline, no usage report."""
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


def processes_naming(text: str) -> list[psutil.Process]:
    """Live processes with `text` in an argument of their command line (a Ray session's or temp folder)."""
    return [proc for proc in psutil.process_iter(["cmdline"]) if any(text in arg for arg in proc.info["cmdline"] or ())]


def kill_tree(roots: list[subprocess.Popen], temp_dir: str) -> None:
    """Stop a cluster this test started, and only it: its node processes (`ray start --block` and the
    like), their descendants, and any process whose command line names the cluster's own temp folder
    (orphans). All nodes are sent SIGTERM first, then waited for together: a node's processes name the
    head's temp folder too, so stopping one node at a time would wait on the others."""
    procs: list[psutil.Process] = []
    for root in roots:
        try:
            parent = psutil.Process(root.pid)
            procs += [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    procs += [proc for proc in processes_naming(temp_dir) if proc not in procs]
    for root in roots:
        if root.poll() is None:
            root.send_signal(signal.SIGTERM)  # `ray start --block` drains and stops its services
    _, alive = psutil.wait_procs(procs, timeout=20)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    for root in roots:
        try:
            root.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
