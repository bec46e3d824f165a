"""Runs on a two-node Ray cluster on this machine (both nodes on 127.0.0.1, no dashboard):

- a node killed while it trains a job: Ray runs the job again elsewhere and the run finishes, all done;
- a 2-worker full fine-tune (a Ray Train gang, placement spread) under ZeRO-2 and ZeRO-3 has one rank on
  each node; its saved model is the one it digested (`weights_sha256`), equals one worker's training on
  the same global batch (to 1e-5) and differs from the base;
- a store behind a `file://` URL, written by jobs on both nodes: each job's result records the node that
  ran it (provenance's `ray_node_id`), and they differ.

Each node has 2 logical CPUs; the specs size their jobs against that so that where a job can go is
forced (a 2-CPU job takes a whole node). The cluster is this module's own (`ray.cluster_utils.Cluster`,
processes of this test, removed afterwards); a session Ray that was connected is restarted after it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time

import psutil
import pytest
import torch
import yaml

from pefteval_harness import cli
from pefteval_harness.jobs.train import tensors_sha256
from pefteval_harness.plan import build_plan
from pefteval_harness.runner import execute, init_ray
from pefteval_harness.spec import Spec
from pefteval_harness.store import Store
from tests.loopback import assert_listens_on_loopback_only
from tests.test_gang import check_gang_costs, full_weights

pytestmark = pytest.mark.slow

CPUS = 2  # per node
NODE = {"num_cpus": CPUS, "node_ip_address": "127.0.0.1", "object_store_memory": 150 * 2**20}


def _pids(node) -> list[int]:
    return [info.process.pid for infos in node.all_processes.values() for info in infos if info.process]


@pytest.fixture(scope="module")
def two_nodes():
    """A head and a worker node on 127.0.0.1; this process is the driver, connected to the head."""
    import ray
    from ray.cluster_utils import Cluster

    reconnect = ray.is_initialized()  # the session's local Ray (conftest `local_ray`): back afterwards
    if reconnect:
        ray.shutdown()
    # Ray's temp folder (sessions, sockets, the "current cluster" address file) of this cluster only:
    # other Rays on the machine neither see it nor lose theirs when it goes.
    temp_dir = tempfile.mkdtemp(prefix="pefteval-ray-", dir="/tmp")  # short: Ray's socket paths
    # A killed node is seen dead within about 2 s (Ray's default health checks take 15 s or more): until
    # then the driver would count its CPUs as free.
    health = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3"}
    env = {"RAY_TMPDIR": temp_dir, "RAY_USAGE_STATS_ENABLED": "0", **health}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    try:
        cluster.add_node(**NODE)
        cluster.wait_for_nodes()
        init_ray(cluster.address)
        nodes = [n for n in ray.nodes() if n["Alive"]]
        assert len(nodes) == 2 and {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}
        assert_listens_on_loopback_only(pid for node in cluster.list_all_nodes() for pid in _pids(node))
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value
        shutil.rmtree(temp_dir, ignore_errors=True)
        if reconnect:
            init_ray(None, num_cpus=2)


def _node_ids(cluster) -> set[str]:
    return {node.node_id for node in cluster.list_all_nodes()}


def _plan(spec: dict):
    plan = build_plan(Spec.model_validate(spec))
    return plan, {(j.kind, j.label): j for j in plan.jobs}


def _ran_on(store: Store, job_id: str) -> str:
    node = store.result(job_id)["pefteval"]["ray_node_id"]
    assert node, f"{job_id}: no node recorded"
    return node


def _running_train(node) -> tuple[str, psutil.Process] | tuple[None, None]:
    """The label of the train job a node's worker process is running (Ray titles it `ray::<task name>`),
    and that process."""
    from ray._private import ray_constants

    raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    for proc in raylet.children():
        try:
            title = proc.cmdline()[0]
        except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
            continue
        if title.startswith("ray::train:"):
            return title.removeprefix("ray::train:").split(" (")[0], proc
    return None, None


def _alive_nodes() -> int:
    import ray

    return sum(node["Alive"] for node in ray.nodes())


def test_a_node_killed_mid_run_leaves_no_job_undone(two_nodes, tiny_model_dir, tmp_path):
    lora = {"method": "lora", "config": {"r": 2, "target_modules": ["q_proj", "v_proj"]}, "evaluate": False}
    plan, jobs = _plan(
        {
            "base_model": str(tiny_model_dir),
            "train": {"tasks": ["pefteval_quick_sentiment"], "max_steps": 24, "batch_size": 4},
            "finetunes": {"a": lora, "b": lora},
            "evaluate": {"tasks": ["pefteval_quick_sentiment"], "limit": 4, "batch_size": 4},
            # Two training jobs do not fit on one node: one runs on each. The base's evaluation fits beside.
            "resources": {"train": {"num_cpus": 1.5}, "evaluate": {"num_cpus": 0.5}, "max_retries": 1},
        }
    )
    trains = {label: job.id for (kind, label), job in jobs.items() if kind == "train"}
    store = Store(tmp_path / "store")
    worker = next(iter(two_nodes.worker_nodes))
    outcome: dict = {}

    def run():
        try:
            outcome["summary"] = execute(plan, store, max_retries=1, tasks_per_worker=1)
        except BaseException as e:  # reported by the test thread
            outcome["error"] = e

    driver = threading.Thread(target=run, daemon=True)
    driver.start()
    victim, deadline = None, time.monotonic() + 180
    while victim is None and driver.is_alive() and time.monotonic() < deadline:
        label, process = _running_train(worker)
        job_id = trains.get(label)
        progress = store.progress(job_id) if job_id else None
        if progress and progress.get("phase") == "train" and not store.is_done(job_id):
            victim = job_id  # the worker node is training it: its Trainer has started
        else:
            time.sleep(0.1)
    assert victim, f"no train job seen training on the worker node: {outcome}"
    killed = worker.node_id
    # The whole node goes at once, its worker too: left to notice its raylet's death, the worker could
    # still finish the job on the dead node.
    process.kill()
    two_nodes.remove_node(worker, allow_graceful=False)
    assert not store.is_done(victim)
    two_nodes.add_node(**NODE)  # a replacement, so that the next tests have two nodes again
    driver.join(timeout=300)
    assert not driver.is_alive(), "the run did not finish"
    assert "error" not in outcome, outcome
    summary = outcome["summary"]
    assert not summary.failed and set(summary.ran) == {j.id for j in plan.jobs}, summary
    assert _ran_on(store, victim) != killed  # run again on a live node
    assert store.result(victim)["steps"] == 24
    deadline = time.monotonic() + 30  # the next tests count on Ray seeing two live nodes, the dead one gone
    while _alive_nodes() != 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _alive_nodes() == 2


def test_a_gang_spreads_its_ranks_over_both_nodes(two_nodes, tiny_model_dir, tmp_path):
    gang = {"workers": 2, "placement": "spread"}
    plan, jobs = _plan(
        {
            "base_model": str(tiny_model_dir),
            "train": {"tasks": ["pefteval_quick_sentiment"], "max_steps": 6, "batch_size": 8, "learning_rate": 0.005},
            "finetunes": {
                "zero2": {"method": "full", "deepspeed": {"zero_stage": 2}, "resources": gang, "evaluate": False},
                "zero3": {"method": "full", "deepspeed": {"zero_stage": 3}, "resources": gang, "evaluate": False},
                # The same fine-tune in one process, to compare the gangs with (same global batch).
                "one_worker": {"method": "full", "deepspeed": {"zero_stage": 2}, "evaluate": False},
            },
            # No evaluations: what the gangs saved is compared with the one worker's weights and the base's.
            "evaluate": {"tasks": ["pefteval_quick_sentiment"], "limit": 4, "include_base": False},
            # A rank takes a whole 2-CPU node: each gang has one rank per node, and the gangs run one after
            # the other (at once, their 4 ranks on this VM's 2 cores made training 8 times slower).
            "resources": {"train": {"num_cpus": 2}, "max_retries": 0},
        }
    )
    store = Store(tmp_path / "store")
    summary = execute(plan, store, max_retries=0)
    assert not summary.failed, summary.failed
    base = full_weights(tiny_model_dir)
    alone = full_weights(store.artifact(jobs["train", "one_worker"].id))
    assert tensors_sha256(alone) == store.result(jobs["train", "one_worker"].id)["weights_sha256"]
    for label in ("zero2", "zero3"):
        result = check_gang_costs(store, jobs["train", label].id, steps=6)
        assert result["restarts"] == 0 and result["resumed_from_step"] == 0
        assert {w["node_id"] for w in result["per_worker"]} == _node_ids(two_nodes), (label, result["per_worker"])
        trained = full_weights(store.artifact(jobs["train", label].id))
        assert tensors_sha256(trained) == result["weights_sha256"]  # ZeRO-3: the partitions were gathered
        assert any(not torch.equal(trained[name], weight) for name, weight in base.items()), f"{label}: untrained"
        # Each rank takes half of each batch of 8 and the loss is averaged over both ranks' tokens: the
        # gang's step is the one process's, up to the order of float sums (seen: up to a few 1e-6 after
        # 6 steps at lr 5e-3, while training moves the weights by about 1e-2).
        for name, weight in alone.items():
            torch.testing.assert_close(trained[name], weight, rtol=0, atol=1e-5, msg=f"{label}: {name}")


def test_a_file_url_store_on_two_nodes(two_nodes, tiny_model_dir, tmp_path, capsys):
    spec = {
        "name": "file-url",
        "base_model": str(tiny_model_dir),
        "train": {"tasks": ["pefteval_quick_sentiment"], "max_steps": 4, "batch_size": 4},
        "finetunes": {"lora": {"method": "lora", "config": {"r": 2, "target_modules": ["q_proj", "v_proj"]}}},
        "evaluate": {"tasks": ["pefteval_quick_sentiment"], "limit": 4, "batch_size": 4},
        # The training job and the base's evaluation each hold a node: they start together, one per node.
        "resources": {"train": {"num_cpus": CPUS}, "evaluate": {"num_cpus": CPUS}, "max_retries": 0},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    url = (tmp_path / "shared" / "run").as_uri()  # file:///...
    assert cli.main(["run", str(tmp_path / "spec.yaml"), "--output", url]) == 0
    assert "3 jobs ran, 0 already done, 0 failed" in capsys.readouterr().out
    store = Store(url)
    plan, _ = _plan(spec)
    assert all(store.is_done(j.id) for j in plan.jobs)
    # Jobs land on both nodes: each result names the node that ran it (provenance).
    assert {_ran_on(store, j.id) for j in plan.jobs} == _node_ids(two_nodes)
    assert (tmp_path / "shared" / "run" / "leaderboard.md").is_file()
