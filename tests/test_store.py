"""The store never shows a torn result, and a job is done only once its status says so."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest

from pefteval_harness import store as store_module
from pefteval_harness.store import CLAIM_STALE_SECONDS, DONE, FAILED, Store, read_json, umask_mode, write_atomic
from tests.test_store_fsspec import dead_pid


def test_write_atomic_replaces_whole_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "a" / "result.json"
    write_atomic(path, "old")
    write_atomic(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_staging_becomes_the_artifact_only_when_the_block_finishes(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(RuntimeError), store.staging("train-1") as scratch:
        (scratch / "weights").write_text("half")
        raise RuntimeError("killed mid-way")
    assert not store.artifact("train-1").exists()
    assert list(store.job_dir("train-1").iterdir()) == []  # the scratch folder is gone too

    with store.staging("train-1") as scratch:
        (scratch / "weights").write_text("whole")
    assert (store.artifact("train-1") / "weights").read_text() == "whole"
    assert not store.is_done("train-1")  # an artifact alone is not a finished job


def test_a_killed_attempts_leftovers_go_when_the_job_is_staged_again_or_recorded(tmp_path):
    store = Store(tmp_path)
    folder = store.job_dir("train-1")
    for dead in (".artifact.k1ll", "..artifact.k1ll.tiny"):  # a killed staging, the tiny model's own inside it
        (folder / dead).mkdir(parents=True)
        (folder / dead / "model.safetensors").write_bytes(b"half")
    (folder / ".status.json.k1ll").write_text("{")  # a killed atomic write
    (folder / ".claim.n0w").write_text("{}")  # another run writing its claim this instant: not a leftover
    (folder / ".claim.k1ll").write_text("{}")  # ... unless old: a claim writer killed long ago
    died = {"owner": "r", "host": store_module._HOST, "pid_ns": store_module._PID_NS, "pid": dead_pid()}
    (folder / ".claim.d1ed").write_text(json.dumps(died))  # ... or young, its writer killed on this host
    old = time.time() - CLAIM_STALE_SECONDS - 5
    os.utime(folder / ".claim.k1ll", (old, old))
    with store.staging("train-1") as scratch:
        assert sorted(p.name for p in folder.iterdir()) == sorted([".claim.n0w", scratch.name])
        (scratch / "model.safetensors").write_bytes(b"whole")
        (scratch / "model.safetensors").chmod(0o600)  # as safetensors writes it
    assert stat.S_IMODE((store.artifact("train-1") / "model.safetensors").stat().st_mode) == umask_mode(0o644)
    assert stat.S_IMODE(store.artifact("train-1").stat().st_mode) == umask_mode(0o755)
    (folder / ".result.json.k1ll").write_text("{")
    store.record({"id": "train-1"}, DONE, {})
    kept = [".claim.n0w", "artifact", "job.json", "result.json", "status.json"]
    assert sorted(p.name for p in folder.iterdir()) == kept


@pytest.mark.parametrize("kind", ["local", "file-url"])
def test_stale_temporaries_of_the_run_files_go_and_young_ones_and_others_stay(kind, tmp_path, monkeypatch):
    from pefteval_harness.store import CACHE_ENV, STALE_TEMPORARY_SECONDS

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    store = Store(tmp_path / "run") if kind == "local" else Store(f"file://{tmp_path}/run")
    store.write_text("leaderboard.md", "| model |")
    names = (
        (".leaderboard.md.k1ll3d_x", "plots/.scaling.png.k1ll3d_y")
        if kind == "local"
        else ("leaderboard.md.0123abcd.tmp", "plots/scaling.png.0123abcd.tmp")
    )
    killed, young, other = tmp_path / "run" / names[0], tmp_path / "run" / names[1], tmp_path / "run" / ".gitignore"
    for path in (killed, young, other):
        path.parent.mkdir(exist_ok=True)
        path.write_text("x")
    old = time.time() - STALE_TEMPORARY_SECONDS - 60
    os.utime(killed, (old, old))  # a killed writer's, long ago
    os.utime(other, (old, old))  # not a temporary file of ours
    store.remove_stale_temporaries()
    assert not killed.exists() and young.exists() and other.exists()
    assert store.read_text("leaderboard.md") == "| model |"


def test_status_is_the_commit_point(tmp_path):
    store = Store(tmp_path)
    job = {"id": "evaluate-1", "kind": "evaluate", "label": "base", "config": {}}
    store.record(job, FAILED, reason="boom")
    assert not store.is_done("evaluate-1") and store.status("evaluate-1")["reason"] == "boom"
    store.record(job, DONE, {"results": {}})
    assert store.is_done("evaluate-1") and store.result("evaluate-1") == {"results": {}}
    assert read_json(store.job_dir("evaluate-1") / "job.json") == job
    assert [(j["id"], s["state"]) for j, s in store.jobs()] == [("evaluate-1", DONE)]


def test_a_claim_is_exclusive_until_released_or_stale(tmp_path):
    from pefteval_harness import store as store_module

    store = Store(tmp_path)
    assert store.claim("train-1", "run-a")
    assert store.claim("train-1", "run-a")  # its own claim again
    assert not store.claim("train-1", "run-b") and store.claim_is_live("train-1")
    store.release("train-1", "run-b")  # not b's to release
    assert store.claim_holder("train-1") == "run-a"
    store.release("train-1", "run-a")
    assert store.claim("train-1", "run-b")

    # run-b died: its claim stops being refreshed and goes stale, and another run takes the job over.
    old = time.time() - store_module.CLAIM_STALE_SECONDS - 5
    os.utime(store.job_dir("train-1") / "claim", (old, old))
    assert not store.claim_is_live("train-1")
    assert store.claim("train-1", "run-c") and store.claim_holder("train-1") == "run-c"
    store.refresh_claims(["train-1"], "run-c")
    assert store.claim_is_live("train-1")
    # A claim appears whole (written aside, then linked in place): no temporary file is left.
    assert store.claim("train-2", "run-c") and not store.claim("train-2", "run-d")
    assert sorted(p.name for p in store.job_dir("train-2").iterdir()) == ["claim"]


def test_a_claim_is_exclusive_where_the_filesystem_has_no_hard_links(tmp_path, monkeypatch):
    def no_links(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    store = Store(tmp_path)
    assert store.claim("train-1", "run-a") and not store.claim("train-1", "run-b")
    assert store.claim_holder("train-1") == "run-a"
    assert sorted(p.name for p in store.job_dir("train-1").iterdir()) == ["claim"]


def test_an_older_store_is_refused_with_a_clear_message(tmp_path):
    from pefteval_harness.errors import BadInput

    write_atomic(tmp_path / "plan.json", '{"spec_hash": "x", "jobs": []}')
    expected = r"older pefteval \(plan schema 1\); this version reads schema 2: rerun into a new --output"
    with pytest.raises(BadInput, match=expected):
        Store(tmp_path).plan()
