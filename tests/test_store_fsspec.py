"""The store on fsspec URLs (docs/store.md): memory:// and file:// go through the remote code path (one put per
JSON file, artifacts uploaded from a scratch folder and read from a node-local cache), and behave as a local
store does. Another node is simulated by another cache folder ($PEFTEVAL_CACHE)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from pefteval_harness import cli
from pefteval_harness import store as store_module
from pefteval_harness.errors import BadInput
from pefteval_harness.store import CACHE_ENV, DONE, FAILED, RemoteStore, Store
from tests.conftest import PEFTEVAL, REPO

JOB = {"id": "train-1", "kind": "train", "label": "lora", "config": {}}


@pytest.fixture(params=["memory", "file"])
def store(request, tmp_path, monkeypatch) -> RemoteStore:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "node-a"))
    if request.param == "memory":
        url = f"memory://pefteval-test-{uuid.uuid4().hex[:8]}/run"
    else:
        url = f"file://{tmp_path}/run"
    found = Store(url)
    assert isinstance(found, RemoteStore) and found.url == url
    yield found
    if request.param == "memory":
        found.fs.rm(found._path, recursive=True)


def remote_files(store: RemoteStore, rel: str) -> list[str]:
    """Files below `rel`, relative to it, as the filesystem itself lists them."""
    base = store._abs(rel)
    return sorted(p[len(base) + 1 :] for p in store.fs.find(base)) if store.fs.exists(base) else []


def test_records_round_trip_with_the_status_written_last(store):
    assert store.status("train-1") is None and not store.is_done("train-1") and list(store.jobs()) == []
    store.record(JOB, FAILED, reason="boom")
    assert not store.is_done("train-1") and store.status("train-1")["reason"] == "boom"
    store.record(JOB, DONE, {"steps": 3})
    assert store.is_done("train-1") and store.result("train-1") == {"steps": 3}
    store.record({**JOB, "id": "evaluate-2"}, DONE, {"results": {}})
    store.write_json("jobs/evaluate-3/job.json", {**JOB, "id": "evaluate-3"})  # no status: not listed
    assert [(j["id"], s["state"]) for j, s in store.jobs()] == [("evaluate-2", DONE), ("train-1", DONE)]

    assert store.progress("train-1") is None
    store.write_progress("train-1", {"phase": "train", "step": 2})
    progress = store.progress("train-1")
    assert progress["step"] == 2 and time.time() - progress["time"] < 60

    store.write_text("spec.yaml", "name: x\n")
    assert store.read_text("spec.yaml") == "name: x\n" and store.plan() is None
    assert Store(store.url).result("train-1") == {"steps": 3}  # the url opens the same store again
    # No temporary names are left behind (file:// writes a temporary name, then renames it).
    assert remote_files(store, "jobs/train-1") == ["job.json", "progress.json", "result.json", "status.json"]


def test_a_file_url_store_has_the_local_layout(tmp_path, monkeypatch):
    """What a file:// store writes, a plain path reads: the layout is the same, so either can report it."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    remote = Store(f"file://{tmp_path}/run")
    remote.record(JOB, DONE, {"steps": 3})
    with remote.staging("train-1") as folder:
        (folder / "weights.bin").write_bytes(b"w" * 100)
    local = Store(tmp_path / "run")
    assert type(local) is Store and local.result("train-1") == {"steps": 3}
    assert (local.artifact("train-1") / "weights.bin").read_bytes() == b"w" * 100
    assert json.loads((tmp_path / "run" / "jobs" / "train-1" / "artifact.json").read_text()) == {
        "files": {"weights.bin": 100}
    }


def test_a_plan_of_another_version_is_refused_by_url(store):
    store.write_json("plan.json", {"spec_hash": "x", "jobs": []})
    with pytest.raises(BadInput, match=rf"^{store.url}/plan.json: written by an older pefteval \(plan schema 1\)"):
        store.plan()


def test_claims_are_exclusive_until_released_or_stale(store):
    assert store.claim("train-1", "run-a") and store.claim("train-1", "run-a")
    assert not store.claim("train-1", "run-b") and store.claim_is_live("train-1")
    store.release("train-1", "run-b")  # not b's to release
    assert store.claim_holder("train-1") == "run-a"
    store.release("train-1", "run-a")
    assert store.claim_holder("train-1") is None
    assert store.claim("train-1", "run-b")

    # run-b ran on another host and stopped refreshing its claim: stale by age, taken over.
    old = time.time() - store_module.CLAIM_STALE_SECONDS - 5
    other_host = {"owner": "run-b", "host": "elsewhere", "pid": 1, "pid_ns": None, "time": old}
    store.write_json("jobs/train-1/claim", other_host)
    assert not store.claim_is_live("train-1")
    assert store.claim("train-1", "run-c") and store.claim_holder("train-1") == "run-c"
    store.write_json("jobs/train-1/claim", {**other_host, "owner": "run-c"})  # as if c's heartbeat stopped
    store.refresh_claims(["train-1"], "run-c")
    assert store.claim_is_live("train-1") and not store.claim("train-1", "run-d")


def test_exclusive_create_lets_one_of_many_concurrent_claimants_win(store):
    owners = [f"run-{i}" for i in range(8)]
    won: dict[str, bool] = {}
    barrier = threading.Barrier(len(owners))

    def claim(owner: str) -> None:
        barrier.wait()
        won[owner] = store.claim("train-1", owner)

    threads = [threading.Thread(target=claim, args=(o,)) for o in owners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(won.values()) == 1 and store.claim_holder("train-1") == next(o for o, w in won.items() if w)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # exited and reaped: no process has this pid now
    return child.pid


@pytest.mark.parametrize("kind", ["local", "remote"])
def test_a_claim_of_a_dead_or_reused_pid_on_this_host_is_stale_at_once(kind, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    store = Store(tmp_path / "run") if kind == "local" else Store(f"file://{tmp_path}/run")
    mine = {"host": store_module._HOST, "pid_ns": store_module._PID_NS, "time": time.time()}
    store.write_json("jobs/train-1/claim", {**mine, "owner": "driver-alive", "pid": os.getpid()})
    assert store.claim_is_live("train-1") and not store.claim("train-1", "run-b")  # its holder lives
    store.write_json("jobs/train-1/claim", {**mine, "owner": "driver-killed", "pid": dead_pid()})
    assert not store.claim_is_live("train-1")  # fresh, but its process is gone: no 120 s wait
    assert store.claim("train-1", "run-b") and store.claim_holder("train-1") == "run-b"
    # Its pid given to another process since (this one, started at another time): dead as well.
    started = store_module._process_start(os.getpid())
    reused = {**mine, "owner": "driver-killed", "pid": os.getpid(), "started": started - 1}
    store.write_json("jobs/train-1/claim", reused)
    assert not store.claim_is_live("train-1")
    store.write_json("jobs/train-1/claim", {**reused, "started": started})
    assert store.claim_is_live("train-1")
    # The same pid on another host (or in another pid namespace) says nothing: judged by age only.
    store.write_json("jobs/train-1/claim", {**mine, "owner": "x", "pid": dead_pid(), "pid_ns": "pid:[1]"})
    assert store.claim_is_live("train-1")


def test_staging_uploads_once_the_block_finishes_and_readers_use_a_node_cache(store, tmp_path, monkeypatch):
    with store.staging("train-1") as folder:
        (folder / "model.safetensors").write_bytes(b"m" * 1000)
        (folder / "tokenizer").mkdir()
        (folder / "tokenizer" / "vocab.json").write_text("{}")
        assert remote_files(store, "jobs/train-1") == []  # nothing is uploaded before the block finishes
    assert remote_files(store, "jobs/train-1/artifact") == ["model.safetensors", "tokenizer/vocab.json"]
    assert store.read_json("jobs/train-1/artifact.json") == {
        "files": {"model.safetensors": 1000, "tokenizer/vocab.json": 2}
    }
    # The writing node keeps its staged folder as its cached copy: reading it downloads nothing.
    here = store.local_artifact("train-1")
    assert here.is_relative_to(tmp_path / "node-a") and (here / "model.safetensors").read_bytes() == b"m" * 1000

    # Another node downloads it once; its second read is the cached copy (the store's files are gone by then).
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "node-b"))
    there = store.local_artifact("train-1")
    assert there.is_relative_to(tmp_path / "node-b") and (there / "tokenizer" / "vocab.json").read_text() == "{}"
    store.fs.rm(store._abs("jobs/train-1/artifact"), recursive=True)
    assert store.local_artifact("train-1") == there and (there / "model.safetensors").stat().st_size == 1000
    assert sorted(p.name for p in there.parent.iterdir()) == ["train-1"]  # no temporary download left


@pytest.mark.parametrize("store", ["file"], indirect=True)  # memory://'s open files are shared, not thread-safe
def test_concurrent_readers_on_one_node_end_with_one_copy(store, tmp_path, monkeypatch):
    with store.staging("merge-1") as folder:
        for i in range(5):
            (folder / f"shard-{i}.bin").write_bytes(bytes([i]) * 50_000)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "node-b"))
    paths: list[Path] = []
    barrier = threading.Barrier(6)

    def read() -> None:
        barrier.wait()
        paths.append(store.local_artifact("merge-1"))

    threads = [threading.Thread(target=read) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(paths) == 6 and len(set(paths)) == 1
    assert sorted(p.name for p in paths[0].parent.iterdir()) == ["merge-1"]
    assert [(paths[0] / f"shard-{i}.bin").read_bytes() == bytes([i]) * 50_000 for i in range(5)] == [True] * 5


def test_a_failed_staging_block_leaves_nothing_and_a_retry_replaces_a_dead_attempts_upload(store, tmp_path):
    with pytest.raises(RuntimeError), store.staging("train-1") as folder:
        (folder / "half.bin").write_bytes(b"half")
        raise RuntimeError("killed mid-way")
    assert remote_files(store, "jobs") == []
    assert [p for p in (tmp_path / "node-a").rglob("*") if p.is_file()] == []
    with pytest.raises(FileNotFoundError, match="train-1/artifact: no artifact"):
        store.local_artifact("train-1")

    with store.staging("train-1") as folder:  # an attempt that uploaded, then died before its status
        (folder / "old.bin").write_bytes(b"old")
    shutil.rmtree(tmp_path / "node-a")  # and read on another node
    with store.staging("train-1") as folder:
        (folder / "new.bin").write_bytes(b"new")
    assert remote_files(store, "jobs/train-1/artifact") == ["new.bin"]
    assert sorted(p.name for p in store.local_artifact("train-1").iterdir()) == ["new.bin"]


def test_delete_artifact_removes_the_remote_folder_and_this_nodes_copy(store):
    with store.staging("merge-1") as folder:
        (folder / "w.bin").write_bytes(b"w")
    cached = store.local_artifact("merge-1")
    store.delete_artifact("merge-1")  # not done yet: kept
    assert remote_files(store, "jobs/merge-1/artifact") == ["w.bin"]
    store.record({**JOB, "id": "merge-1"}, DONE, {})
    store.delete_artifact("merge-1")
    assert store.artifact_deleted("merge-1") and store.is_done("merge-1")
    assert remote_files(store, "jobs/merge-1") == ["job.json", "result.json", "status.json"]
    assert not cached.exists()
    with pytest.raises(FileNotFoundError):
        store.local_artifact("merge-1")


@pytest.mark.parametrize("store", ["memory"], indirect=True)  # file://: the end-to-end run below
def test_the_report_reads_and_writes_a_remote_store_as_a_local_one(store, tmp_path):
    from pefteval_harness.report.leaderboard import collect, render, write_reports
    from tests.test_plots import full_store

    local = full_store(tmp_path / "local")
    (local / "lm-eval").mkdir()
    shutil.copy(next(local.glob("jobs/evaluate-*/result.json")), local / "lm-eval" / "results.json")
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        store.write_bytes(path.relative_to(local).as_posix(), path.read_bytes())
    store.write_bytes("plots/gone.png", b"a plot whose data are gone")

    assert render(collect(store.url), "csv") == render(collect(local), "csv")
    markdown = write_reports(store.url)
    assert markdown == write_reports(local) and store.read_text("leaderboard.md") == markdown
    assert json.loads(store.read_text("leaderboard.json")) == json.loads((local / "leaderboard.json").read_text())
    pngs = sorted(p.name for p in (local / "plots").iterdir())
    assert pngs and remote_files(store, "plots") == pngs  # uploaded, and the stale one removed


def _models(folder: Path) -> dict[str, Path]:
    """A base and two experts (the base plus noise): safetensors folders with a config.json, written directly
    (loading transformers' model classes would cost more than the whole test)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(32, 16, generator=generator) for i in range(2)}
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 64}
    folders = {}
    for name in ("base", "train-a", "train-b"):
        if name != "base":
            tensors = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in tensors.items()}
        folders[name] = folder / name
        folders[name].mkdir(parents=True)
        save_file(tensors, folders[name] / "model.safetensors")
        (folders[name] / "config.json").write_text(json.dumps(config))
    return folders


def test_a_merge_job_reads_and_writes_a_file_url_store_as_a_local_one(tmp_path, monkeypatch, isolated_process_state):
    """The merge job (engine staging inside the store's staging) gives the same files in both stores; its
    experts and base come through `local_artifact`."""
    from safetensors.torch import load_file

    from pefteval_harness.jobs import run_batch
    from pefteval_harness.jobs.types import ArtifactRef, Job, Lineage, MergeConfig

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "node-a"))
    models = _models(tmp_path / "models")
    local, remote = Store(tmp_path / "local"), Store(f"file://{tmp_path}/remote")
    for name, folder in models.items():
        shutil.copytree(folder, local.artifact(name))
        with remote.staging(name) as staged:
            shutil.copytree(folder, staged, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "node-a")  # the merge runs on a node that has none of them yet
    config = MergeConfig(method="task_arithmetic", method_version=1, parameters={"scaling": 1.0}, weights=None,
                         space="delta_w", experts=["train-a", "train-b"], base=ArtifactRef(job="base"), seed=0,
                         produces="model")  # fmt: skip
    job = Job(id="merge-1", label="ta", lineage=Lineage(model="ta", method="merge:task_arithmetic", base="tiny"),
              config=config).model_dump(mode="json")  # fmt: skip
    for store in (local, remote):
        assert run_batch([job], store.url) == {"merge-1": {"state": DONE}}, store.status("merge-1")

    merged = remote.local_artifact("merge-1")
    assert sorted(p.name for p in merged.iterdir()) == sorted(p.name for p in local.artifact("merge-1").iterdir())
    assert (merged / "model.safetensors").read_bytes() == (local.artifact("merge-1") / "model.safetensors").read_bytes()
    base, a, b, out = (load_file(f / "model.safetensors") for f in (*models.values(), merged))
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch_close(out[name], a[name] + b[name] - base[name])
    listed = sorted(p.name for p in local.job_dir("merge-1").iterdir())
    assert listed == ["artifact", "job.json", "log.txt", "progress.json", "result.json", "status.json"]
    assert "log.txt" in remote_files(remote, "jobs/merge-1")  # the job's log, through the store's API


def torch_close(x, y) -> bool:
    import torch

    return torch.allclose(x, y, atol=1e-6)


def test_an_unusable_url_is_one_line_naming_it(capsys):

    with pytest.raises(BadInput, match=r"^nosuch://bucket/run: not a store location fsspec can open"):
        Store("nosuch://bucket/run")
    if "s3fs" in sys.modules or _installed("s3fs"):
        pytest.skip("s3fs is installed here")
    assert cli.main(["leaderboard", "s3://bucket/run"]) == 2
    assert capsys.readouterr().err == (
        "pefteval: error: s3://bucket/run: Install s3fs to access S3 (needed on the driver and on every Ray node)\n"
    )


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


# --- end to end: a run whose store is a file:// URL ------------------------------------------------------

SPEC = """\
name: fsspec-smoke
base_model: tiny
evaluate:
  tasks: [{tasks}]
  limit: 8
  batch_size: 8
"""


def _pefteval(*args, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, CACHE_ENV: str(cache)}
    return subprocess.run([*PEFTEVAL, *map(str, args)], capture_output=True, text=True, cwd=REPO, env=env, timeout=900)


@pytest.mark.slow
def test_a_run_into_a_file_url_store_resumes_on_another_node_and_reports(tmp_path, capsys):
    """The base model is built by a job and uploaded; the first run's evaluations read the copy its node
    kept, the second run (another cache: another node) downloads it; both go through Ray workers. The
    report and `pefteval leaderboard` read the store by its URL."""
    spec = tmp_path / "spec.yaml"
    url = f"file://{tmp_path}/run"
    spec.write_text(SPEC.format(tasks="pefteval_quick_sentiment"))
    first = _pefteval("run", spec, "--output", url, "--num-cpus", "2", cache=tmp_path / "node-a")
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.rstrip().endswith(f"2 jobs ran, 0 already done, 0 failed; leaderboard: {url}/leaderboard.md")

    spec.write_text(SPEC.format(tasks="pefteval_quick_sentiment, pefteval_quick_arithmetic"))
    second = _pefteval("run", spec, "--output", url, "--num-cpus", "2", cache=tmp_path / "node-b")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "1 jobs ran, 2 already done, 0 failed" in second.stdout

    store = Store(url)
    jobs = store.plan()["jobs"]
    assert [j["config"]["kind"] for j in jobs] == ["base", "evaluate", "evaluate"]
    assert all(store.is_done(j["id"]) for j in jobs)
    base = jobs[0]["id"]
    assert "model.safetensors" in store.read_json(f"jobs/{base}/artifact.json")["files"]
    assert (Store(tmp_path / "run").artifact(base) / "config.json").is_file()  # the same files, as a folder
    for node, task in (("node-a", "pefteval_quick_sentiment"), ("node-b", "pefteval_quick_arithmetic")):
        (cached,) = (tmp_path / node).glob(f"*/{base}")
        assert (cached / "model.safetensors").is_file()
        (job,) = [j for j in jobs if j["config"].get("task") == task]
        result = store.result(job["id"])
        assert result["config"]["model_args"]["pretrained"] == str(cached)  # read from that node's cache
        assert task in result["results"]

    leaderboard = store.read_text("leaderboard.md")
    assert "pefteval_quick_arithmetic" in leaderboard and leaderboard in second.stdout
    capsys.readouterr()
    assert cli.main(["leaderboard", url]) == 0 and capsys.readouterr().out == leaderboard
    assert cli.main(["run", str(spec), "--output", "memory://run"]) == 2
    assert "memory://run: a store only this process sees" in capsys.readouterr().err
