"""Faults a cluster has, tried on this machine: the driver killed mid-run and started again.

The driver (`pefteval run`) is SIGKILLed once some jobs are done and others are not; the same command
then finishes the run: the done jobs are not run again (their status files untouched), the rest run,
and the claims the dead driver held do not make the new run wait (its pid is gone on this host).
Node loss is in tests/test_two_node.py, per-kind timeouts in tests/test_scheduling.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest

from tests.conftest import PEFTEVAL, REPO
from tests.test_pipeline import pefteval

pytestmark = pytest.mark.slow

SPEC = """\
name: driver-killed
base_model: tiny
evaluate:
  tasks: [pefteval_quick_sentiment, pefteval_quick_arithmetic, pefteval_quick_topic, pefteval_quick_echo]
  limit: 8
resources: {tasks_per_worker: 1}   # one worker per evaluation: some finish before others
"""


def _statuses(out):
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("jobs/*/status.json")}


def _kill_session(process: subprocess.Popen) -> None:
    """SIGKILL the driver, then whatever it started in its own session (its local Ray), only that."""
    pgid = os.getpgid(process.pid)
    process.kill()
    process.wait(timeout=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        left = [p for p in psutil.process_iter() if _pgid(p) == pgid]
        if not left:
            return
        time.sleep(0.5)
    os.killpg(pgid, signal.SIGKILL)


def _pgid(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except (ProcessLookupError, psutil.NoSuchProcess):
        return None


def test_a_killed_driver_resumes_without_rerunning_done_jobs(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    driver = subprocess.Popen(
        [*PEFTEVAL, "run", str(spec), "--output", str(out)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while len(_statuses(out)) < 2:  # the base and one evaluation done, others not
            assert driver.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no job finished in 300 s"
            time.sleep(0.2)
    finally:
        _kill_session(driver)
    done_before = _statuses(out)
    total = 1 + 4  # the base model, 4 evaluations
    assert 2 <= len(done_before) < total

    assert list(out.glob("jobs/*/claim")), "the killed driver held no claim: nothing to take over"

    rerun = pefteval("run", spec, "--output", out, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{total - len(done_before)} jobs ran, {len(done_before)} already done, 0 failed" in rerun.stdout
    # The dead driver's claims were taken over at once (its pid is gone on this host), not waited for.
    assert "being run by another run" not in rerun.stderr
    after = _statuses(out)
    assert len(after) == total
    assert {job: after[job] for job in done_before} == done_before  # the done jobs were not touched
    # Claims left are the dead driver's on jobs it finished (done jobs are not touched); the rest released.
    assert {p.parent.name for p in out.glob("jobs/*/claim")} <= set(done_before)
