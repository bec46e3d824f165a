"""Killed anywhere, nothing lost; one store, several runs; files as the user's umask says.

`bench/chaos.py` at a few fixed moments, on one small spec (the tiny base, a LoRA fine-tune, two
evaluations of each model):
- reference: two `pefteval run` of the spec at once on one results folder, under umask 022. Both exit 0
  with the same leaderboard; every job ran once (the two runs' "jobs ran" add up to the plan, and no
  result or status file was replaced after it first appeared); each run's plan and spec are kept
  (runs/<run id>/); every file is 0644 and every folder 0755.
- chaos, under umask 077: the driver SIGKILLed right after the first job is done, then the same command,
  whose training worker is killed mid-training and an evaluation worker mid-evaluation (Ray runs their
  tasks again, `max_retries`): it completes without waiting for the dead driver's claims, the leaderboard
  equals the reference's, no job done before a kill was written again, no staging folder or temporary
  file is left, every file is 0600 and folder 0700.
Node loss is in tests/test_two_node.py, per-kind timeouts in tests/test_scheduling.py, signals in
tests/test_signals.py.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time

import pytest

from bench import chaos  # the bench's run, kill and store-check helpers
from tests.test_pipeline import pefteval_here

pytestmark = pytest.mark.slow

SPEC = """\
name: chaos
base_model: tiny
seed: 1234
train:
  tasks: [pefteval_quick_sentiment]
  max_steps: 120          # about 3 s of training: long enough to be killed mid-way
  batch_size: 8
finetunes:
  lora:
    method: lora
    config: {r: 4, lora_alpha: 8, target_modules: all-linear}
evaluate:
  tasks: [pefteval_quick_sentiment, pefteval_quick_arithmetic]
  limit: 8
"""
JOBS = 1 + 1 + 2 * 2  # the base, the fine-tune, two evaluations of each


def _written(out) -> dict[str, tuple[int, int]]:
    """Each job's result/status file -> (inode, mtime): an atomic rewrite is a new inode."""
    found = {}
    for path in [*out.glob("jobs/*/result.json"), *out.glob("jobs/*/status.json")]:
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        found[str(path.relative_to(out))] = (st.st_ino, st.st_mtime_ns)
    return found


def _wait(process, condition, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} in {timeout:.0f} s"
        time.sleep(0.05)
    return found


def _modes(out) -> tuple[set[str], set[str]]:
    files, folders = set(), set()
    for folder, subfolders, names in os.walk(out):
        folders |= {oct(stat.S_IMODE(os.stat(os.path.join(folder, d)).st_mode)) for d in subfolders}
        files |= {oct(stat.S_IMODE(os.stat(os.path.join(folder, n)).st_mode)) for n in names}
    return files, folders


def _ran(log) -> int:
    return int(re.search(r"(\d+) jobs ran, \d+ already done, 0 failed", log.read_text()).group(1))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Two runs of the spec at once on one results folder, under umask 022."""
    work = tmp_path_factory.mktemp("two-runs")
    spec = work / "spec.yaml"
    spec.write_text(SPEC)
    out = work / "out"
    logs = [work / "first.log", work / "second.log"]
    runs = [chaos.start_run(spec, out, log, umask=0o022) for log in logs]
    first_seen: dict[str, tuple[int, int]] = {}
    while any(r.poll() is None for r in runs):  # every result and status as it first appears
        for path, written in _written(out).items():
            first_seen.setdefault(path, written)
        time.sleep(0.05)
    return out, runs, logs, first_seen


def test_two_runs_on_one_store_run_every_job_once_and_keep_both_plans(reference):
    out, runs, logs, first_seen = reference
    assert [r.returncode for r in runs] == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    assert _ran(logs[0]) + _ran(logs[1]) == JOBS  # each job ran in one of them only
    assert _written(out) == first_seen and len(first_seen) == 2 * JOBS  # none written twice
    printed = [log.read_text() for log in logs]  # the leaderboard, then the run's summary line
    tables = [text[text.index("| model") : text.rindex("\n", 0, text.rindex(" jobs ran,"))] for text in printed]
    assert tables[0] == tables[1]  # the same leaderboard printed by both
    kept = sorted(p.parent.name for p in out.glob("runs/*/plan.json"))
    assert len(kept) == 2 and all((out / "runs" / run / "spec.yaml").read_text() == SPEC for run in kept)
    assert json.loads((out / "plan.json").read_text()) == json.loads((out / "runs" / kept[0] / "plan.json").read_text())
    code, printed = pefteval_here("status", out)  # reads the latest plan.json
    assert code == 0 and f"{JOBS} done" in printed, printed
    assert not list(out.glob("jobs/*/claim")), "a finished run left a claim"


def test_store_files_follow_umask_022(reference):
    out = reference[0]
    files, folders = _modes(out)
    assert files == {"0o644"} and folders == {"0o755"}, (files, folders)


def test_killed_driver_and_workers_at_fixed_moments_lose_nothing(reference, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    out, log = tmp_path / "out", tmp_path / "run.log"
    untouched: dict[str, tuple[int, int]] = {}  # done before a kill: must stay as they were

    def done_jobs():
        return [p.parent.name for p in out.glob("jobs/*/status.json") if '"done"' in p.read_text()]

    def claimed_after_first_done():  # the base model done, and the driver holding the next jobs' claims
        done = done_jobs()
        return done and [p for p in out.glob("jobs/*/claim") if p.parent.name not in done]

    # 1. The driver, right after the first job (the base model) is done and the next ones are claimed.
    run = chaos.start_run(spec, out, log, umask=0o077)
    try:
        _wait(run, claimed_after_first_done, "first job done and the next claimed")
    finally:
        chaos.kill_driver(run)
    untouched |= _written(out)
    assert len(done_jobs()) < JOBS

    done_first = set(done_jobs())
    assert list(out.glob("jobs/*/claim")), "the killed driver held no claim: nothing to take over"

    # 2. The same command again: its training worker killed mid-training, an evaluation worker mid-evaluation.
    printed_before = len(log.read_text())
    run = chaos.start_run(spec, out, log, umask=0o077)
    try:
        for kind in ("train", "evaluate"):

            def running(kind=kind):
                busy = [(p, t) for p, t in chaos.busy_workers(run) if t.startswith(f"ray::{kind}:")]
                if kind == "train":  # mid-training: its trainer has started (its progress says so)
                    progress = [json.loads(p.read_text()) for p in out.glob("jobs/train-*/progress.json")]
                    busy = busy if any(p.get("phase") == "train" for p in progress) else []
                return busy

            worker, title = _wait(run, running, f"{kind} job running")[0]
            untouched |= {k: v for k, v in _written(out).items() if k.split("/")[1] in done_jobs()}
            worker.kill()
        assert run.wait(timeout=600) == 0, log.read_text()[-5000:]
    finally:
        if run.poll() is None:
            chaos.kill_driver(run)

    second = log.read_text()[printed_before:]
    assert f"{JOBS - len(done_first)} jobs ran, {len(done_first)} already done, 0 failed" in second
    # The dead driver's claims were taken over at once (its pid is gone on this host), not waited for; the
    # claims left are its own on jobs it finished (a done job's folder is not touched again).
    assert "being run by another run" not in second
    assert {p.parent.name for p in out.glob("jobs/*/claim")} <= done_first
    assert chaos.compared_rows(out) == chaos.compared_rows(reference[0])
    after = _written(out)
    assert {path: after.get(path) for path in untouched} == untouched  # no done job written again
    assert chaos.store_problems(out) == []  # every job done and readable, no staging or temporary file left
    files, folders = _modes(out)
    assert files == {"0o600"} and folders == {"0o700"}, (files, folders)
    assert len(list(out.glob("runs/*/plan.json"))) == 2
