"""Overhead of `pefteval run` over plain `lm_eval` for one evaluation (a benchmark, not a test).

Both tools score the same local model on the quickstart leaf tasks with the same limit, batch size,
seeds and bootstrap iterations; each run is a fresh subprocess timed end to end, as a user experiences
it (Python start-up, imports, task indexing and, for pefteval, the spec, the plan, a local Ray and a Ray
worker process). The two alternate (the order flips every repetition) and the medians are compared.

    python bench/overhead.py [--limit 100] [--batch-size 16] [--repeats 3] [--warmup 1] [--keep]

Prints a table, a per-phase breakdown read from what each tool writes (lm-eval's results JSON `date`,
pefteval's store and its Ray session folder), and last `ratio pefteval/lm_eval = R (goal < 1.10)`.
Exit status: 0 whatever the ratio; 1 if a run fails (there is then nothing to measure).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "examples" / "quickstart.yaml"
GOAL = 1.10
SEED = 1234  # pefteval's default spec seed; it passes it as all four of lm-eval's seeds
BOOTSTRAP_ITERS = 100_000  # simple_evaluate's default, which the lm_eval CLI uses (it has no flag for it)
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

# The line Ray prints when `ray.init()` has started the local instance; pefteval's log format.
RAY_READY = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\s+INFO \S+ -- Started a local Ray instance")
SESSION = re.compile(r"^session_(\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d{6})_\d+$")


def tool(name: str) -> str:
    """The console script next to this interpreter (the venv's), else the one on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        sys.exit(f"overhead.py: {name} not found next to {sys.executable} nor on PATH")
    return found


def run(cmd: list[str], env: dict, log_dir: Path) -> tuple[float, float, float]:
    """Run `cmd` with stdout/stderr to files; (wall seconds, start epoch, end epoch). Exits on failure."""
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "stdout", "wb") as out, open(log_dir / "stderr", "wb") as err:
        start_epoch, start = time.time(), time.perf_counter()
        rc = subprocess.run(cmd, env=env, stdout=out, stderr=err, cwd=log_dir).returncode
        wall = time.perf_counter() - start
    if rc != 0:
        tail = (log_dir / "stderr").read_text(errors="replace").splitlines()[-25:]
        sys.exit(f"overhead.py: exit code {rc} from:\n  {' '.join(cmd)}\n" + "\n".join(tail))
    return wall, start_epoch, start_epoch + wall


def leftovers(marker: Path) -> list[int]:
    """Processes whose command line names `marker` (the private Ray folder of one run): Ray left them."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(marker).encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def leaf_tasks() -> list[str]:
    """The quickstart spec's `evaluate.tasks`, expanded to leaf task names as pefteval's plan does."""
    import yaml

    from pefteval_harness.tasks import resolve_tasks

    return resolve_tasks(yaml.safe_load(QUICKSTART.read_text())["evaluate"]["tasks"]).names


def scores(results: dict) -> dict[str, float]:
    """{task/metric: value} of an lm-eval results dict (stderr entries left out)."""
    return {
        f"{task}/{key}": value
        for task, metrics in results["results"].items()
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and "stderr" not in key and key != "alias"
    }


def baseline_phases(out: Path, start: float, end: float) -> tuple[dict, dict]:
    """lm_eval: start-up (imports, task index) until simple_evaluate starts; evaluation; the rest."""
    (path,) = out.rglob("results_*.json")
    results = json.loads(path.read_text())
    began, written = results["date"], path.stat().st_mtime
    phases = {"startup": began - start, "evaluate": written - began, "finish": end - written}
    return phases, scores(results)


def candidate_phases(out: Path, stderr: Path, ray_tmp: Path, start: float, end: float) -> tuple[dict, dict]:
    """pefteval: start-up to ray.init; Ray start-up; worker start until simple_evaluate; evaluation; rest.

    One evaluation job per task, all run by one worker that loads the model once and builds each task
    before scoring them: evaluation spans from the first simple_evaluate to the last result written.
    """
    paths = sorted(out.glob("jobs/evaluate-*/result.json"))
    results = [json.loads(path.read_text()) for path in paths]
    began, written = min(r["date"] for r in results), max(path.stat().st_mtime for path in paths)
    phases: dict[str, float] = {}
    # ray.init names its session folder after the moment it starts the node (local time, microseconds).
    sessions = [m for p in (ray_tmp / "ray").glob("session_*") if (m := SESSION.match(p.name))]
    ready = [m for line in stderr.read_text(errors="replace").splitlines() if (m := RAY_READY.match(line))]
    if len(sessions) == 1 and ready:
        ray_start = datetime.strptime(sessions[0].group(1), "%Y-%m-%d_%H-%M-%S_%f").timestamp()
        ray_ready = datetime.strptime(ready[0].group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        phases["startup"] = ray_start - start
        phases["ray_init"] = ray_ready - ray_start
        phases["worker"] = began - ray_ready
    else:  # Ray's output changed: keep what can still be told apart
        phases["startup"] = began - start
    phases["evaluate"] = written - began
    phases["finish"] = end - written
    return phases, {key: value for r in results for key, value in scores(r).items()}


BASELINE_PHASES = {
    "startup": "Python start, imports, TaskManager (all built-ins)",
    "evaluate": "simple_evaluate until results JSON written",
    "finish": "results JSON written until process exit",
}
CANDIDATE_PHASES = {
    "startup": "Python start, imports, spec + plan",
    "ray_init": "local Ray start-up (ray.init)",
    "worker": "worker process, imports, model load, each task built",
    "evaluate": "simple_evaluate (tasks sharing settings together), until the last result.json",
    "finish": "report, Ray shutdown, process exit",
}


def table(rows: list[list[str]], headers: list[str]) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=100, help="documents per task (default 100)")
    p.add_argument("--batch-size", type=int, default=16, help="lm-eval batch size (default 16)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each tool (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each tool first (default 1)")
    p.add_argument(
        "--eval-cpus",
        type=int,
        default=1,
        help="torch threads of both evaluations (default 1): pefteval's resources.evaluate.num_cpus, from which"
        " Ray sets OMP_NUM_THREADS in the job, and OMP_NUM_THREADS for both tools",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp folder (model, logs, outputs)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.eval_cpus < 1:
        p.error("--repeats and --eval-cpus must be at least 1, --warmup at least 0")
    if args.eval_cpus > (os.cpu_count() or 1):  # the local Ray would keep the job pending for ever
        p.error(f"--eval-cpus: this machine has {os.cpu_count()} CPUs")

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # pefteval must start its own Ray
    env.update(OFFLINE)
    os.environ.update(OFFLINE)
    # Same torch threads in both: Ray gives a job OMP_NUM_THREADS = its num_cpus (1 by default) while plain
    # lm_eval uses every core; on a busy 2-core machine that alone made lm_eval's evaluation 3-5x slower.
    env["OMP_NUM_THREADS"] = str(args.eval_cpus)
    pefteval, lm_eval = tool("pefteval"), tool("lm_eval")
    # Short: Ray puts unix sockets under it (RAY_TMPDIR/ray/session_*/sockets, 107 characters at most).
    tmp = Path(tempfile.mkdtemp(prefix="pfb-", dir="/tmp" if Path("/tmp").is_dir() else None))
    if args.keep:
        print(f"temp       {tmp} (kept: --keep)")
    try:
        return _bench(args, env, pefteval, lm_eval, tmp)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def _bench(args, env: dict, pefteval: str, lm_eval: str, tmp: Path) -> int:
    model = tmp / "model"
    wall, _, _ = run([pefteval, "tiny-model", "--out", str(model)], env, tmp / "logs" / "tiny-model")
    tasks = leaf_tasks()
    include = subprocess.run([pefteval, "tasks", "path"], env=env, capture_output=True, text=True, check=True)
    include_path = include.stdout.strip()
    spec = tmp / "overhead.yaml"
    spec.write_text(
        "name: overhead\n"
        f"base_model: {model}\n"
        f"seed: {SEED}\n"
        "evaluate:\n"
        f"  tasks: [{', '.join(tasks)}]\n"
        f"  limit: {args.limit}\n"
        f"  batch_size: {args.batch_size}\n"
        f"  bootstrap_iters: {BOOTSTRAP_ITERS}\n"
        "resources:\n"
        f"  evaluate: {{num_cpus: {args.eval_cpus}}}\n"
    )
    baseline_cmd = [
        lm_eval, "--model", "hf", "--model_args", f"pretrained={model}", "--include_path", include_path,
        "--tasks", ",".join(tasks), "--device", "cpu", "--batch_size", str(args.batch_size),
        "--limit", str(args.limit), "--seed", str(SEED),
    ]  # fmt: skip
    candidate_cmd = [pefteval, "run", str(spec)]

    print(f"model      {model} (pefteval tiny-model: {wall:.1f} s)")
    print(f"tasks      {', '.join(tasks)}")
    print(f"settings   limit {args.limit}, batch size {args.batch_size}, seed {SEED} (all four lm-eval seeds),")
    print(f"           bootstrap_iters {BOOTSTRAP_ITERS} (pefteval: from the spec; lm_eval CLI: its fixed default)")
    print(f"baseline   {' '.join(baseline_cmd)} --output_path OUT")
    print(f"candidate  {' '.join(candidate_cmd)} --output OUT   (RAY_ADDRESS unset, a private RAY_TMPDIR)")
    print(
        f"threads    OMP_NUM_THREADS={args.eval_cpus} for both (pefteval: resources.evaluate.num_cpus"
        f" {args.eval_cpus} too); --eval-cpus N to change"
    )
    print(f"runs       {args.warmup} untimed + {args.repeats} timed of each, alternating; {os.cpu_count()} CPUs")
    print(f"load       {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min) before the runs")
    print(flush=True)

    walls: dict[str, list[float]] = {"lm_eval": [], "pefteval": []}
    phases: dict[str, list[dict]] = {"lm_eval": [], "pefteval": []}
    found: dict[str, dict] = {}
    for i in range(args.warmup + args.repeats):
        timed = i >= args.warmup
        order = ["lm_eval", "pefteval"] if i % 2 == 0 else ["pefteval", "lm_eval"]
        for name in order:
            rep = tmp / "runs" / f"{i}-{name}"
            out = rep / "out"
            if name == "lm_eval":
                wall, start, end = run([*baseline_cmd, "--output_path", str(out)], env, rep / "logs")
                split, result = baseline_phases(out, start, end)
            else:
                ray_tmp = rep / "r"  # a Ray of its own: never joins a `ray start` cluster on this machine
                ray_tmp.mkdir(parents=True)
                wall, start, end = run(
                    [*candidate_cmd, "--output", str(out)], {**env, "RAY_TMPDIR": str(ray_tmp)}, rep / "logs"
                )
                split, result = candidate_phases(out, rep / "logs" / "stderr", ray_tmp, start, end)
                if pids := leftovers(ray_tmp):
                    print(f"  warning: Ray processes of this run still alive after pefteval exited: {pids}")
            found[name] = result
            label = f"timed  {i - args.warmup + 1}" if timed else f"warmup {i + 1}"
            parts = " | ".join(f"{k} {v:.2f}" for k, v in split.items())
            print(f"  {label}  {name:<8} {wall:6.2f} s  [{parts}]  load {os.getloadavg()[0]:.1f}", flush=True)
            if timed:
                walls[name].append(wall)
                phases[name].append(split)

    base, cand = statistics.median(walls["lm_eval"]), statistics.median(walls["pefteval"])
    ratio = cand / base
    print()
    rows = [
        [name, f"{statistics.median(w):.2f}", f"{min(w):.2f}", f"{max(w):.2f}", " ".join(f"{x:.2f}" for x in w)]
        for name, w in walls.items()
    ]
    print(table(rows, ["tool", "median s", "min s", "max s", "all runs s"]))
    print()
    print("breakdown (medians of the timed runs, seconds):")
    rows = []
    for name, described in (("lm_eval", BASELINE_PHASES), ("pefteval", CANDIDATE_PHASES)):
        for key, what in described.items():
            values = [s[key] for s in phases[name] if key in s]
            if values:
                rows.append([name, key, what, f"{statistics.median(values):.2f}"])
    print(table(rows, ["tool", "phase", "what", "median s"]))
    outside = {n: statistics.median(w) - statistics.median(s["evaluate"] for s in phases[n]) for n, w in walls.items()}
    print(
        f"\ntime outside simple_evaluate (median wall - median evaluate): lm_eval {outside['lm_eval']:.2f} s,"
        f" pefteval {outside['pefteval']:.2f} s"
    )
    same = found["lm_eval"] == found["pefteval"]
    print(f"same scores from both tools (last runs): {'yes' if same else 'NO: they did not do the same work'}")
    if not same:
        for key in sorted(set(found["lm_eval"]) | set(found["pefteval"])):
            print(f"  {key}: lm_eval {found['lm_eval'].get(key)}  pefteval {found['pefteval'].get(key)}")
    print(
        "differences in what they do: lm_eval's CLI indexes all of lm-eval's built-in tasks (no flag to skip"
        " it), pefteval indexes only its own; pefteval also validates a spec, plans, starts a local Ray, runs"
        " the job in a Ray worker process, records provenance and writes leaderboard files; lm_eval prints"
        " its table and writes one results JSON (--output_path)."
    )
    print(f"\nratio pefteval/lm_eval = {ratio:.2f} (goal < {GOAL:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
