"""Kill `pefteval run` at seeded random moments until it completes; compare with an uninterrupted run.

A trial is one results folder: the run is started, killed K times (`--kills-per-trial`) at random moments,
restarted after each driver kill, and finally left to complete. A kill comes at least `--earliest` seconds
after its run started, then after a uniform random wait of up to the reference run's duration times the
share of the plan's jobs not done yet (times `--window`: on a machine whose load drops after the
reference, runs end before most kills). Each kill is, at random:
- driver: SIGKILL to `pefteval run`, then to whatever remains of the local Ray it started (its own
  descendants, nothing else on the machine), then the same command again;
- worker: SIGKILL to one Ray worker process of that run that is running a job (its process title names a
  task, not `ray::IDLE`); Ray runs the task again (`max_retries`), the run goes on.

Printed, per trial and in total: kills done (driver/worker), trials whose final leaderboard scores equal
the reference's, jobs rerun needlessly (a job done before a kill whose result was written again after),
and stores that needed a hand fix (the final run did not exit 0, or the store check failed: a job of the
plan not done, an unreadable status/result, a temporary file or a partial artifact left behind).
Goal: every trial identical, 0, 0. A run that exits 1 because a job's worker was killed more often than
Ray retries it (class "killed") is reported too; the next run completes it.

    python bench/chaos.py --spec examples/quickstart.yaml --trials 3 --kills-per-trial 3 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from pefteval_harness.jobs import JOB_KINDS  # a job's Ray task is named "<kind>:<label>"

REPO = Path(__file__).resolve().parent.parent
PEFTEVAL = [sys.executable, "-m", "pefteval_harness.cli"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
COMPARED = ("score", "aggregate", "gap")  # leaderboard records that must not depend on interruptions


def start_run(spec: Path, out: Path, log: Path, umask: int | None = None) -> subprocess.Popen:
    """`pefteval run` as a user starts it, in its own session (so that killing it kills nothing else), its
    output appended to `log`; under `umask` if given (the driver, its local Ray and every worker)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | OFFLINE
    with open(log, "a") as f:
        return subprocess.Popen(
            [*PEFTEVAL, "run", str(spec), "--output", str(out)],
            cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=None if umask is None else lambda: os.umask(umask),
        )  # fmt: skip


def kill_driver(process: subprocess.Popen) -> None:
    """SIGKILL the driver, then what is left of the local Ray it started: its descendants only.

    Ray's workers run in sessions of their own, so the driver's process group is not enough; they are
    found as descendants (driver -> raylet -> workers) before the kill, when the tree is still whole."""
    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    process.kill()
    process.wait(timeout=30)
    _, alive = psutil.wait_procs(tree, timeout=20)  # Ray's processes exit once their parents are gone
    for proc in alive:
        try:
            proc.kill()  # psutil checks the pid still names the same process (create time)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def busy_workers(process: subprocess.Popen) -> list[tuple[psutil.Process, str]]:
    """The run's Ray worker processes running a job now, with their titles (`ray::<kind>:<label>`; idle
    workers are `ray::IDLE`, Ray's own processes have other names)."""
    found = []
    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    for proc in tree:
        try:
            title = " ".join(" ".join(proc.cmdline()).split())  # Ray pads the process title with spaces
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if title.startswith("ray::") and title[5:].split(":")[0] in JOB_KINDS:
            found.append((proc, title))
    return found


def done_jobs(out: Path) -> dict[str, int]:
    """Job id -> mtime (ns) of its result (its status if it has none), for the jobs whose status says done."""
    done = {}
    for status in out.glob("jobs/*/status.json"):
        try:
            if json.loads(status.read_text())["state"] != "done":
                continue
        except (OSError, ValueError, KeyError):
            continue
        result = status.parent / "result.json"
        done[status.parent.name] = (result if result.exists() else status).stat().st_mtime_ns
    return done


def left_share(out: Path) -> float:
    """The share of the plan's jobs not done yet (1 before the first run has written its plan)."""
    try:
        jobs = json.loads((out / "plan.json").read_text())["jobs"]
    except (OSError, ValueError, KeyError):
        return 1.0
    return 1 - len(done_jobs(out).keys() & {job["id"] for job in jobs}) / max(1, len(jobs))


def compared_rows(out: Path) -> list[dict]:
    """The leaderboard's scores, without job ids: those also name the code's version (task files, builders),
    which may change between two runs when the bench runs from a working tree being edited."""
    rows = json.loads((out / "leaderboard.json").read_text())
    return [{k: v for k, v in r.items() if k != "job_id"} for r in rows if r.get("record") in COMPARED]


def store_problems(out: Path) -> list[str]:
    """What a user would have to fix by hand: jobs of the plan not done, unreadable files, leftovers."""
    problems = []
    plan = json.loads((out / "plan.json").read_text())
    for job in plan["jobs"]:
        folder = out / "jobs" / job["id"]
        for name in ("status.json", "result.json"):
            try:
                data = json.loads((folder / name).read_text())
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as e:
                problems.append(f"{folder / name}: unreadable ({e})")
                continue
            if name == "status.json" and data.get("state") != "done":
                problems.append(f"{folder / name}: {data.get('state')}")
        if not (folder / "status.json").exists():
            problems.append(f"{folder}: no status")
    # Temporary files (".status.json.xyz") and staging folders (".artifact.xyz") of killed writers.
    problems += [f"{p}: left behind" for p in out.rglob(".*")]
    return problems


@dataclass
class Totals:
    driver_kills: int = 0
    worker_kills: int = 0
    identical: int = 0
    trials: int = 0
    reruns: list[str] = field(default_factory=list)
    hand_fixes: list[str] = field(default_factory=list)
    killed_failures: int = 0  # runs that exited 1 because a job's worker died more often than Ray retries


def wait_until(process: subprocess.Popen, moment: float) -> bool:
    """Sleep until `moment` (monotonic); False if the run ended first."""
    while time.monotonic() < moment:
        if process.poll() is not None:
            return False
        time.sleep(0.1)
    return process.poll() is None


def trial(n: int, args, rng: random.Random, reference: list[dict], duration: float, totals: Totals) -> None:
    out = args.workdir / f"trial-{n}"
    log = args.workdir / f"trial-{n}.log"
    kills, first_done, runs = 0, {}, 0
    while True:
        runs += 1
        process = start_run(args.spec, out, log)
        started = time.monotonic()
        driver_killed, workers_killed = False, 0
        while kills < args.kills_per_trial and not driver_killed:
            kind = rng.choice(["driver", "worker"])
            # Within what is left of the run: the reference's duration times the share of jobs not done.
            span = max(1.0, args.window * duration * left_share(out) - args.earliest)
            if not wait_until(process, max(started + args.earliest, time.monotonic()) + rng.uniform(0, span)):
                break
            for job, mtime in done_jobs(out).items():  # what a rerun must not touch
                first_done.setdefault(job, mtime)
            if kind == "driver":
                kill_driver(process)
                kills, driver_killed = kills + 1, True
                totals.driver_kills += 1
                print(f"  trial {n}: killed the driver at {time.monotonic() - started:.1f} s", flush=True)
                continue
            while process.poll() is None and not (workers := busy_workers(process)):
                time.sleep(0.1)  # no job running this instant: the next one that starts
            if process.poll() is not None:
                break
            victim, title = rng.choice(workers)
            try:
                victim.kill()
            except psutil.NoSuchProcess:
                continue  # it finished meanwhile: draw again
            kills, workers_killed = kills + 1, workers_killed + 1
            totals.worker_kills += 1
            print(f"  trial {n}: killed worker {title} at {time.monotonic() - started:.1f} s", flush=True)
        if driver_killed:
            continue
        try:
            code = process.wait(timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            kill_driver(process)
            totals.hand_fixes.append(f"trial {n}: run {runs} hung for {args.run_timeout:.0f} s (log {log})")
            break
        if code == 0:
            break
        if not workers_killed:  # nothing of this run was killed, yet it failed
            totals.hand_fixes.append(f"trial {n}: run {runs} exited {code} (log {log})")
            break
        totals.killed_failures += 1  # a job's worker killed beyond its retries: the next run redoes it
        print(f"  trial {n}: run exited {code} (a job's retries used up); running it again", flush=True)
    totals.trials += 1
    after = done_jobs(out)
    rerun = [job for job, mtime in first_done.items() if after.get(job) != mtime]
    totals.reruns += [f"trial {n}: {job}" for job in rerun]
    problems = store_problems(out) if (out / "plan.json").exists() else ["no plan.json"]
    totals.hand_fixes += [f"trial {n}: {p}" for p in problems]
    same = (out / "leaderboard.json").exists() and compared_rows(out) == reference
    totals.identical += same
    print(
        f"trial {n}: {kills} kills, {runs} runs, identical={same}, rerun={len(rerun)}, problems={len(problems)}",
        flush=True,
    )
    for line in rerun + problems:
        print(f"    {line}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", type=Path, default=REPO / "examples" / "quickstart.yaml")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--kills-per-trial", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--earliest", type=float, default=1.0, help="no kill before this many seconds of a run")
    parser.add_argument(
        "--window", type=float, default=1.0, help="kills within this fraction of what is left (less: more kills)"
    )
    parser.add_argument("--run-timeout", type=float, default=1800, help="seconds a run may take: longer is a hang")
    parser.add_argument("--workdir", type=Path, help="where results folders and logs go (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    args.spec = args.spec.resolve()
    args.workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="chaos-"))).resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)

    start = time.monotonic()
    reference_run = start_run(args.spec, args.workdir / "reference", args.workdir / "reference.log")
    if reference_run.wait(timeout=args.run_timeout) != 0:
        print(f"the reference run failed: {args.workdir / 'reference.log'}")
        return 1
    duration = time.monotonic() - start
    reference = compared_rows(args.workdir / "reference")
    print(f"reference run: {duration:.0f} s, {len(reference)} leaderboard rows compared ({', '.join(COMPARED)})")

    totals = Totals()
    for n in range(args.trials):
        trial(n, args, rng, reference, duration, totals)
    where = args.spec.relative_to(REPO) if args.spec.is_relative_to(REPO) else args.spec
    print(f"\nspec {where}, seed {args.seed}, {args.trials} trials of up to {args.kills_per_trial} kills")
    kills = totals.driver_kills + totals.worker_kills
    print(f"kills done: {kills} (driver {totals.driver_kills}, worker {totals.worker_kills})")
    print(f"trials ended identical to the reference: {totals.identical} of {totals.trials}")
    print(f"jobs rerun needlessly: {len(totals.reruns)}")
    print(f"stores that needed a hand fix: {len(totals.hand_fixes)}")
    print(f"runs ended 1 by a job killed beyond its retries (the next run completed it): {totals.killed_failures}")
    print(f"wall time: {(time.monotonic() - start) / 60:.1f} min")
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
