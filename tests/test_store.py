"""The store never shows a torn result, and a job is done only once its status says so."""

from __future__ import annotations

import pytest

from pefteval_harness.store import DONE, FAILED, Store, read_json, write_atomic


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


def test_status_is_the_commit_point(tmp_path):
    store = Store(tmp_path)
    job = {"id": "evaluate-1", "kind": "evaluate", "label": "base", "config": {}}
    store.record(job, FAILED, reason="boom")
    assert not store.is_done("evaluate-1") and store.status("evaluate-1")["reason"] == "boom"
    store.record(job, DONE, {"results": {}})
    assert store.is_done("evaluate-1") and store.result("evaluate-1") == {"results": {}}
    assert read_json(store.job_dir("evaluate-1") / "job.json") == job
    assert [(j["id"], s["state"]) for j, s in store.jobs()] == [("evaluate-1", DONE)]
