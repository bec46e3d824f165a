"""`pefteval`: run, plan, status, leaderboard, tasks, data, methods, lm-eval, merge, tiny-model.

Exit codes: 0 success; 2 bad input (spec, config, arguments, a cluster address nothing answers at: one
line, no traceback, nothing written); 1 a runtime failure, after which the store is consistent and a rerun
resumes; 130 / 143 a run stopped by Ctrl-C (SIGINT) / SIGTERM, which a rerun resumes too.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pefteval_harness.errors import BadInput
from pefteval_harness.report.leaderboard import FORMATS
from pefteval_harness.secrets import redact, redact_handler

log = logging.getLogger(__name__)


def _load(spec_path: str, text: str | None = None):
    from pefteval_harness.plan import build_plan
    from pefteval_harness.spec import load_spec

    spec, path = load_spec(spec_path, text)
    try:
        return spec, build_plan(spec)
    except BadInput as e:
        raise BadInput(f"{path}: {e}") from None


def cmd_plan(args) -> int:
    from pefteval_harness.trust import notes

    _, plan = _load(args.spec)
    print(plan.describe())
    if lines := notes(plan):  # what a run would trust beyond pefteval's own code
        print("\n" + "\n".join(lines))
    return 0


def cmd_run(args) -> int:
    """Ctrl-C or SIGTERM stops the run within seconds (`runner.StopSignals`): its running jobs are cancelled, not
    recorded as failed, and its Ray shut down; exit 130 or 143. The same command then resumes it."""
    from pefteval_harness import runner

    with runner.StopSignals() as stop, runner.ray_of_this_block():
        try:
            return _run(args)
        except KeyboardInterrupt:
            pass
    print(f"pefteval: stopped by {stop.name}: running jobs cancelled; the same command resumes it", file=sys.stderr)
    return stop.exit_code


def _run(args) -> int:
    from pefteval_harness import runner, scheduling, trust
    from pefteval_harness.config_io import read_text
    from pefteval_harness.progress import LiveDisplay
    from pefteval_harness.report.leaderboard import write_reports
    from pefteval_harness.store import PLAN, RUNS, Store, is_url, new_run_id

    if args.num_cpus is not None and args.num_cpus < 1:  # a Ray with no CPU would run nothing, forever
        raise BadInput(f"--num-cpus: {args.num_cpus} is not a positive whole number")
    # Read once, now: it is kept in the store, and joining a cluster in a `ray job` may change the working folder.
    spec_text = read_text(Path(args.spec), "spec")
    spec, plan = _load(args.spec, spec_text)
    output = args.output or spec.output or str(Path("runs") / spec.name)
    # A local path is made absolute: Ray workers (on other nodes, or in `ray job submit`'s working-dir copy)
    # write there too. A store URL (s3://, gs://, file://) is the same everywhere as it is.
    store = Store(output if is_url(output) else Path(output).expanduser().resolve())
    if not store.shared_across_processes:
        raise BadInput(f"--output {output}: a store only this process sees; the run's Ray workers could not write it")
    if not is_url(output):  # a file where the folder (or one of its parents) would go: refused before writing
        existing = next(p for p in (store.root, *store.root.parents) if p.exists())
        if not existing.is_dir():
            raise BadInput(f"--output {output}: {existing} is not a folder")
    store.plan()  # refuses a results folder another pefteval version wrote
    store.remove_stale_temporaries()  # of a run killed while it wrote its reports
    output = store.url
    pending = [job for job in plan.jobs if not store.is_done(job.id)]
    for line in trust.notes(plan):  # what the run trusts beyond pefteval's code, said before it starts
        print(line, flush=True)
    if args.dry_run:
        print(plan.describe())
        print(f"\n{len(pending)} of {len(plan.jobs)} jobs to run; results would go to {output}")
        return 0

    if pending:  # a job no node can hold is bad input now, before anything is written: never a wait
        if args.address or os.environ.get("RAY_ADDRESS"):  # a cluster's nodes are known once joined
            runner.init_ray(args.address, num_cpus=args.num_cpus, verbose=args.verbose)
        scheduling.check_feasible(pending, spec.resources.gpu_memory_gb, num_cpus=args.num_cpus)
    # Every run keeps its own spec and plan (runs/<run id>/: several runs may share a store); the latest
    # is also at the top, what `pefteval status` and the leaderboard read.
    run_id, plan_json = new_run_id(), plan.to_json()
    for folder in (f"{RUNS}/{run_id}/", ""):
        store.write_text(f"{folder}spec.yaml", spec_text)
        store.write_json(f"{folder}{PLAN}", plan_json)
    summary = runner.RunSummary(skipped=[j.id for j in plan.jobs if j not in pending])
    if pending:
        log.info("%d of %d jobs to run, results in %s", len(pending), len(plan.jobs), output)
        runner.init_ray(args.address, num_cpus=args.num_cpus, verbose=args.verbose)
        resources = spec.resources
        with LiveDisplay(plan, store):  # done / running / failed / left, and the running jobs' progress
            summary = runner.execute(plan, store, resources.max_retries, resources.tasks_per_worker, run_id=run_id)
    print(write_reports(store))
    print(
        f"{len(summary.ran)} jobs ran, {len(summary.skipped)} already done, {len(summary.failed)} failed;"
        f" leaderboard: {store.location('leaderboard.md')}"
    )
    return 1 if summary.failed else 0


def cmd_status(args) -> int:
    """A run's state from its results folder alone: counts, running jobs' progress, failures."""
    import json
    import time

    from pefteval_harness.progress import status_of
    from pefteval_harness.store import Store, is_url

    if args.watch is not None and args.watch <= 0:
        raise BadInput(f"--watch: {args.watch:g} is not a positive number of seconds")
    store = Store(args.dir if is_url(args.dir) else Path(args.dir))  # a folder, or a store URL (s3://...)
    plan = store.plan()
    if plan is None:
        raise BadInput(f"{args.dir}: no plan.json: not a pefteval results folder, or its run has not started")
    clear = args.watch is not None and sys.stdout.isatty()
    try:
        while True:
            status = status_of(store, plan)
            if args.json:  # one object per refresh, one per line when watching
                text = json.dumps(status.to_json(), indent=None if args.watch else 2) + "\n"
            else:
                text = status.render()
            sys.stdout.write(("\x1b[H\x1b[2J" if clear else "") + text)
            sys.stdout.flush()
            if args.watch is None or status.finished:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:  # Ctrl-C ends watching: not an error
        return 0


def cmd_leaderboard(args) -> int:
    from pefteval_harness.report.leaderboard import collect, render

    sys.stdout.write(render(collect(args.dir), args.format))
    return 0


def cmd_tasks(args) -> int:
    from pefteval_harness.tasks import task_configs_path, task_manager

    if args.tasks_command == "path":
        print(task_configs_path())
        return 0
    from tabulate import tabulate

    root = task_configs_path()
    rows = []
    for name, entry in sorted(task_manager().task_index.items()):
        if entry.cfg is None or "task" not in entry.cfg or entry.yaml_path is None or "group" in entry.cfg:
            continue
        family = Path(entry.yaml_path).relative_to(root).parts[0]
        if args.family and family != args.family:
            continue
        cfg = entry.cfg
        metrics = ", ".join(m["metric"] for m in cfg.get("metric_list") or [])
        rows.append([name, family, cfg.get("output_type", ""), metrics, cfg.get("training_split") or "-"])
    if not rows:
        raise BadInput(f"--family: no tasks in family {args.family!r}")
    print(tabulate(rows, headers=["task", "family", "output_type", "metrics", "train split"], tablefmt="github"))
    return 0


def cmd_data(args) -> int:
    """`data export`: the datasets the selected tasks read, from the hub, as PEFTEVAL_DATA_DIR files."""
    from pefteval_harness.tasks import UnsupportedGroup, resolve_tasks
    from pefteval_harness.tasks.data import DATA_DIR_ENV, export, task_data_specs
    from pefteval_harness.trust import task_code_notes

    for folder in args.include_path:
        if not Path(folder).is_dir():
            raise BadInput(f"--include-path: {folder} is not a folder")
    for line in task_code_notes(args.include_path):  # building the tasks below runs it
        print(line, flush=True)
    try:
        selection = resolve_tasks(args.tasks, include_paths=args.include_path)
    except KeyError as e:
        raise BadInput(f"--tasks: no task matches {e.args[0]!r}") from None
    except UnsupportedGroup as e:
        raise BadInput(f"--tasks: {e}") from None
    specs = task_data_specs(selection.manager, selection.names)
    if not specs:
        raise BadInput(f"--tasks: none of {', '.join(args.tasks)} loads its data through pefteval's data loader")
    written = export([spec for found in specs.values() for spec in found], Path(args.out))
    for path in written:
        print(path)
    print(f"{len(written)} files for {len(specs)} tasks written; set {DATA_DIR_ENV}={args.out} to use them")
    return 0


def cmd_methods(args) -> int:
    """Every registered fine-tuning and merge method, with its parameters and defaults."""
    from tabulate import tabulate

    from pefteval_harness.finetuning import FINETUNE_METHODS
    from pefteval_harness.merging import describe_methods

    if args.kind in (None, "finetune"):
        rows = []
        for method in FINETUNE_METHODS.values():
            d = method.describe()
            params = ", ".join(f"{k}={v}" for k, v in d["defaults"].items()) or "-"
            if d["peft_config"]:
                params += f" (any peft {d['peft_config']} field)"
            kind = "virtual tokens" if d["prompt_learning"] else "weights"
            merges = "-" if d["produces"] == "model" else "yes" if d["mergeable"] else "no"
            rows.append([d["name"], d["produces"], kind, merges, d["adapter_family"] or "-", params, d["description"]])
        print("Fine-tuning methods (finetunes.<name>.method; parameters go under config:)\n")
        headers = ["method", "produces", "trains", "merges into base", "adapter family", "parameters", "description"]
        print(tabulate(rows, headers=headers, tablefmt="github"))
    if args.kind in (None, "merge"):
        rows = []
        for d in describe_methods():
            params = "; ".join(f"{p['name']}: {p['type']} = {p['default']}" for p in d["parameters"]) or "-"
            rows.append([d["name"], params, d["description"]])
        print("\nMerge methods (merges.<name>.method; parameters go under parameters:)\n")
        print(tabulate(rows, headers=["method", "parameters (type = default)", "description"], tablefmt="github"))
    return 0


def cmd_lm_eval(rest: list[str]) -> int:
    """lm-eval's own CLI, with the plugin's task folder added."""
    from lm_eval.__main__ import cli_evaluate

    from pefteval_harness.tasks import task_configs_path

    if any(a == "--include_path" or a.startswith("--include_path=") for a in rest):
        raise BadInput(
            "--include_path: lm-eval 0.4.13 takes one task folder and pefteval lm-eval passes its own;"
            ' use lm_eval --include_path "$(pefteval tasks path)" with your tasks copied under one folder'
        )
    sys.argv = ["lm_eval", *rest, "--include_path", str(task_configs_path())]
    cli_evaluate()
    return 0


def cmd_merge(args) -> int:
    from pefteval_harness.merging import merge_from_config

    out = merge_from_config(Path(args.config), Path(args.out))
    print(f"merged model written to {out}")
    return 0


def cmd_tiny_model(args) -> int:
    from pefteval_harness import tiny_model
    from pefteval_harness.numerics import pin_numerics

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise BadInput(f"--out: {out} exists and is not empty")
    pin_numerics(1)  # the same bits as the `base_model: tiny` job of a run builds
    print(f"tiny model written to {tiny_model.build(out)}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pefteval", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log every job and library message")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="plan and run an experiment spec on Ray, then write the leaderboard")
    run.add_argument("spec")
    run.add_argument(
        "--output",
        help="results folder, or a store URL: s3://, gs://, file:// (default: the spec's output:, else runs/<name>)",
    )
    run.add_argument(
        "--address",
        help="Ray cluster to join: host:port of its head, or auto (the one `ray start` on this machine"
        " registered). Default: RAY_ADDRESS, else a new local Ray of the run's own. Fails (exit 2) within"
        " 30 s if nothing answers there",
    )
    run.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    run.add_argument("--dry-run", action="store_true", help="print the plan and what is left to run")
    run.set_defaults(func=cmd_run)

    plan = sub.add_parser("plan", help="print the job graph of a spec without running anything")
    plan.add_argument("spec")
    plan.set_defaults(func=cmd_plan)

    status = sub.add_parser("status", help="what a run (here or on a cluster) has done, is doing, and left")
    status.add_argument("dir", help="the run's results folder")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.add_argument("--watch", type=float, metavar="N", help="refresh every N seconds until nothing is left")
    status.set_defaults(func=cmd_status)

    board = sub.add_parser("leaderboard", help="print the leaderboard of a results folder")
    board.add_argument("dir")
    board.add_argument("--format", choices=FORMATS, default="markdown")
    board.set_defaults(func=cmd_leaderboard)

    tasks = sub.add_parser("tasks", help="the plugin's lm-eval tasks")
    tasks_sub = tasks.add_subparsers(dest="tasks_command", required=True)
    listing = tasks_sub.add_parser("list", help="list the tasks")
    listing.add_argument("--family", help="only this family (its folder under task_configs/)")
    tasks_sub.add_parser("path", help="print the task folder, for lm_eval --include_path")
    tasks.set_defaults(func=cmd_tasks)

    data = sub.add_parser("data", help="task datasets as local files (the PEFTEVAL_DATA_DIR layout)")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    exporting = data_sub.add_parser(
        "export", help="write <key>/<split>.jsonl for the datasets the tasks read, loaded from the hub"
    )
    exporting.add_argument("--out", required=True, help="folder to write (PEFTEVAL_DATA_DIR's layout)")
    exporting.add_argument(
        "--tasks", nargs="+", default=["pefteval_*"], metavar="PATTERN",
        help="task names, globs or groups (default: every pefteval task)",
    )
    exporting.add_argument(
        "--include-path", action="append", default=[], metavar="DIR", help="another lm-eval task folder"
    )
    data.set_defaults(func=cmd_data)

    methods = sub.add_parser("methods", help="list the fine-tuning and merge methods with their parameters")
    methods.add_argument("kind", nargs="?", choices=["finetune", "merge"], help="only this kind")
    methods.set_defaults(func=cmd_methods)

    # Listed for --help only: main() hands everything after `lm-eval` to lm-eval's own parser.
    sub.add_parser("lm-eval", help="lm-eval's own CLI (same flags) with the plugin's tasks added")

    merge = sub.add_parser("merge", help="merge expert models or adapters as a YAML config says")
    merge.add_argument("config")
    merge.add_argument("--out", required=True)
    merge.set_defaults(func=cmd_merge)

    tiny = sub.add_parser("tiny-model", help="write the embedded default model to a folder")
    tiny.add_argument("--out", required=True)
    tiny.set_defaults(func=cmd_tiny_model)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["lm-eval"]:  # everything after it belongs to lm-eval's own parser
            return cmd_lm_eval(argv[1:])
        args = parser().parse_args(argv)
        logging.basicConfig(
            level=logging.INFO if args.verbose else logging.WARNING,
            format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        )
        logging.getLogger("pefteval_harness").setLevel(logging.INFO)  # job progress, always
        for handler in logging.getLogger().handlers:  # what the run prints says no secret either
            redact_handler(handler)
        return args.func(args)
    except BadInput as e:
        print(f"pefteval: error: {redact(str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
