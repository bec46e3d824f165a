"""Never hang, always stop.

- A plain `pefteval run` starts a Ray of its own, even when the machine's Ray temp folder names a dead cluster
  (what a `ray start` that was killed rather than stopped leaves behind): the tests below run with a private
  Ray temp folder (RAY_TMPDIR) holding such an address file, and each run's Ray starts there.
- A cluster it is told to join (`--address`, RAY_ADDRESS, `--address auto`) that does not answer fails the run
  with one line naming the address, exit 2, nothing written: at once when nothing listens there, within
  `runner.JOIN_TIMEOUT_SECONDS` when something listens that is not Ray.
- SIGINT (Ctrl-C) or SIGTERM stops a run within seconds: its running jobs cancelled and not recorded failed,
  its claims released, its Ray gone, exit 130 / 143; the same command then resumes it, the jobs done before
  untouched.
- A local Ray that dies starting (its raylet aborts when its dashboard agent is slow, on a loaded machine) is
  started again once, its dead processes stopped: the resumed run above meets one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from bench.chaos import busy_workers, kill_driver
from pefteval_harness.runner import JOIN_TIMEOUT_SECONDS, StopSignals
from tests.conftest import PEFTEVAL, REPO
from tests.loopback import free_ports, processes_naming
from tests.test_pipeline import pefteval

SPEC = """\
name: stopped
base_model: tiny
evaluate:
  tasks: [pefteval_quick_sentiment, pefteval_quick_arithmetic]
  limit: 8
resources: {tasks_per_worker: 1}   # one worker per evaluation: some finish while others run
"""
JOBS = 1 + 2  # the base model, 2 evaluations
# In Ray's dashboard agent only (the raylet starts it): the first one to start dies before it writes its ports.
AGENT_DIES_ONCE = """\
import os
import sys

if any(arg.endswith("dashboard/agent.py") for arg in sys.argv) and not os.path.exists("{marker}"):
    open("{marker}", "w").close()
    os._exit(1)
"""
# Ray keeps 127.0.0.1 as it is only with this (else it means the machine's network address): what a user of a
# loopback cluster sets, and what keeps these tests' connections on loopback.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@pytest.fixture
def ray_tmpdir():
    """A private Ray temp folder whose address file names a dead cluster (a port nothing listens on). Short,
    under /tmp: a Ray session's socket paths must stay under the 107 characters of a Unix socket address."""
    folder = Path(tempfile.mkdtemp(prefix="pefteval-ray-", dir="/tmp"))
    (folder / "ray").mkdir()
    (folder / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_ports(1)[0]}")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC)
    return path


@pytest.mark.parametrize("how", ["--address", "RAY_ADDRESS", "auto"])
def test_joining_an_address_nothing_listens_at_fails_at_once_naming_it(how, spec, tmp_path, ray_tmpdir, monkeypatch):
    """In this process, for speed (no Ray starts); the slow test below runs the command as a user does."""
    from pefteval_harness.cli import main
    from pefteval_harness.runner import JOIN_ENV

    dead = (ray_tmpdir / "ray" / "ray_current_cluster").read_text()
    for name, value in {**LOOPBACK, "RAY_TMPDIR": str(ray_tmpdir)}.items():
        monkeypatch.setenv(name, value)
    assert not set(JOIN_ENV) & set(os.environ)
    args = ["run", str(spec), "--output", str(tmp_path / "out")]
    if how == "--address":
        args += ["--address", dead]
    elif how == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", dead)
    else:
        from ray._private.services import find_gcs_addresses

        if find_gcs_addresses():  # Ray's rule: `auto` joins a Ray running on this machine when there is one
            pytest.skip("a Ray runs on this machine (another test's): --address auto would join it")
        args += ["--address", "auto"]  # joins what the temp folder's address file names: here, nothing
    stderr = io.StringIO()
    started = time.monotonic()
    with contextlib.redirect_stderr(stderr):
        code = main(args)
    assert code == 2 and time.monotonic() - started < 10
    error = stderr.getvalue().strip().splitlines()[-1]
    named = {"--address": f"--address {dead}", "RAY_ADDRESS": f"RAY_ADDRESS={dead}", "auto": "ray_current_cluster"}
    assert error.startswith("pefteval: error: ") and named[how] in error and dead in error, error
    assert "Connection refused" in error
    assert not (tmp_path / "out").exists()
    assert not set(JOIN_ENV) & set(os.environ)  # set for the join only: a local Ray started later needs Ray's own


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_the_first_signal_stops_a_run_and_a_second_one_does_not_cut_the_stopping_short(signum):
    before = {s: signal.getsignal(s) for s in StopSignals.SIGNALS}
    with StopSignals() as stop:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler runs in this thread at once, interrupting this
        os.kill(os.getpid(), signal.SIGINT)  # while stopping: ignored
        time.sleep(0.1)
    assert (stop.name, stop.exit_code) == (signum.name, 128 + signum)
    assert {s: signal.getsignal(s) for s in StopSignals.SIGNALS} == before


@pytest.mark.slow
def test_joining_a_port_that_is_not_a_ray_cluster_fails_within_the_stated_time(spec, tmp_path):
    with socket.socket() as silent:  # accepts connections (the kernel does) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        result = pefteval(
            "run", spec, "--output", tmp_path / "out", "--address", address, env_extra=LOOPBACK, timeout=300
        )
        took = time.monotonic() - started
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    # The last line (Ray logs its connection attempt above it).
    error = result.stderr.strip().splitlines()[-1]
    assert error == f"pefteval: error: --address {address}: no Ray cluster answered at {address} within 30 s"
    # Ray's own connect would retry for about 14 minutes; the process's start-up (imports) comes on top.
    assert took < JOIN_TIMEOUT_SECONDS + 15, f"took {took:.0f} s"
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_cancels_its_jobs_exits_and_resumes(spec, tmp_path, ray_tmpdir):
    """SIGTERM once the base model is done and an evaluation's worker runs; then the same command completes the
    run. (SIGINT takes the same path: `StopSignals`, tested above for both.)"""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_TMPDIR"] = str(ray_tmpdir)  # names a dead cluster: each run must start a Ray of its own there
    stale = (ray_tmpdir / "ray" / "ray_current_cluster").read_text()
    driver = subprocess.Popen(
        [*PEFTEVAL, "run", str(spec), "--output", str(out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        def evaluating() -> bool:  # the base model done, an evaluation claimed and its worker at it
            busy = [title for _, title in busy_workers(driver) if title.startswith("ray::evaluate:")]
            return bool(_statuses(out) and _claimed(out) and busy)

        while not evaluating():
            assert driver.poll() is None, "the run ended before it could be stopped"
            assert time.monotonic() < deadline, "no job done and another running within 300 s"
            time.sleep(0.1)
        running = _claimed(out)
        # Everything the run started (its local Ray's processes, the workers in sessions of their own), now.
        started = psutil.Process(driver.pid).children(recursive=True)
        sent = time.monotonic()
        driver.send_signal(signal.SIGTERM)
        _, stderr = driver.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if driver.poll() is None:
            kill_driver(driver)
    assert driver.returncode == 143, stderr[-3000:]
    assert took < 15, f"stopping took {took:.0f} s"
    assert "stopped by SIGTERM" in stderr.strip().splitlines()[-1]
    assert "Connecting to existing Ray cluster" not in stderr  # a Ray of its own, not the dead one
    _, alive = psutil.wait_procs(started, timeout=5)
    assert not alive, f"the stopped run left {[p.name() for p in alive]} behind"

    done = _statuses(out)
    assert 1 <= len(done) < JOBS
    # What it cancelled is not recorded at all (no status): not failed, just not done; its claims are released.
    assert all(json.loads((out / "jobs" / job / "status.json").read_text())["state"] == "done" for job in done)
    assert running - set(done), "no running job was cancelled"
    assert not list(out.glob("jobs/*/claim")), "claims left after the run stopped"
    for path in out.rglob("*.json"):  # nothing half-written: every file the store shows reads whole
        if not path.name.startswith("."):
            json.loads(path.read_text())

    # The same command again, its Ray's first dashboard agent dying at once (as one too slow to start does on a
    # loaded machine): the raylet aborts, and the run starts a new local Ray.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(AGENT_DIES_ONCE.format(marker=tmp_path / "agent-died"))
    rerun = subprocess.Popen(
        [*PEFTEVAL, "run", str(spec), "--output", str(out)],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(site)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        while len(sessions := sorted((ray_tmpdir / "ray").glob("session_2*"))) < 3:  # this run's second Ray
            assert rerun.poll() is None, "the run ended before it started a second Ray"
            time.sleep(0.1)
        dead = sessions[1].name  # the Ray that died starting: its processes were stopped before the next one
        deadline = time.monotonic() + 5
        while (left := processes_naming(dead)) and time.monotonic() < deadline:
            time.sleep(0.1)
        stdout, stderr = rerun.communicate(timeout=600)
    finally:
        if rerun.poll() is None:
            kill_driver(rerun)
    assert not left, f"the Ray that died starting left {left} running"
    assert rerun.returncode == 0, stderr[-3000:]
    assert (tmp_path / "agent-died").exists() and "the local Ray did not start" in stderr, stderr[-3000:]
    assert f"{JOBS - len(done)} jobs ran, {len(done)} already done, 0 failed" in stdout
    after = _statuses(out)
    assert len(after) == JOBS and {job: after[job] for job in done} == done  # the done jobs were not touched
    leaderboard = (out / "leaderboard.md").read_text()
    assert all(task in leaderboard for task in ("quick_sentiment", "quick_arithmetic"))
    # Two runs, three Rays of their own in the private temp folder (the second run's first one died starting);
    # the dead cluster's address file as it was.
    assert len(list((ray_tmpdir / "ray").glob("session_2*"))) == 3
    assert (ray_tmpdir / "ray" / "ray_current_cluster").read_text() == stale


def _statuses(out: Path) -> dict[str, int]:
    """Job id -> the mtime (ns) of its status.json, for the jobs that ended."""
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("jobs/*/status.json")}


def _claimed(out: Path) -> set[str]:
    """Jobs the run has taken (their claim) and not finished."""
    return {p.parent.name for p in out.glob("jobs/*/claim") if not (p.parent / "status.json").exists()}
