"""Execution on Ray: every job not already done in the store becomes a Ray task with its resources.

Dependencies flow through Ray (a job's task receives its inputs' object refs), failed jobs are retried
`max_retries` times by Ray, then recorded in the store as failed with the reason; jobs downstream of a
failure are recorded as failed with the upstream job named. Nothing finished is ever run again.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from pefteval_harness.plan import Plan
from pefteval_harness.store import FAILED, Store

log = logging.getLogger(__name__)

# Local Ray stays on loopback (ENVIRONMENT.md): Ray otherwise binds the machine's network address.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


@dataclass
class RunSummary:
    skipped: list[str] = field(default_factory=list)  # already done in the store
    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # job id -> reason


def init_ray(address: str | None, num_cpus: int | None = None, verbose: bool = False) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS, as `ray job submit` sets), else start Ray locally."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # Ray reads these when it is imported: set them before the import, and check that it worked.
        os.environ.update(LOOPBACK_ENV)
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=verbose)
        return
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:
        raise RuntimeError(
            "ray was imported before pefteval could keep the local Ray on 127.0.0.1:"
            " set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before importing ray"
        )
    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        num_cpus=num_cpus,
        log_to_driver=verbose,  # the jobs' own output; Ray keeps it in its session logs either way
    )
    addresses = {node["NodeManagerAddress"] for node in ray.nodes()}
    if addresses != {"127.0.0.1"}:
        ray.shutdown()
        raise RuntimeError(f"the local Ray bound to {addresses}, not 127.0.0.1; stopped it")


def _remote_job(job: dict, store_root: str, *inputs) -> dict:
    """The body of every Ray task. `inputs` are the upstream jobs' statuses: Ray waits for them."""
    from pefteval_harness.jobs import run_job

    return run_job(job, Store(store_root))


def execute(plan: Plan, store: Store, max_retries: int = 1) -> RunSummary:
    """Run the plan's pending jobs on the connected Ray cluster; return what ran, skipped and failed."""
    import ray

    # A fresh worker process per job: training sets process-wide state (torch.distributed, DeepSpeed
    # environment), and the peak memory a job records is then its own.
    remote = ray.remote(max_calls=1)(_remote_job)
    summary = RunSummary()
    refs: dict[str, ray.ObjectRef] = {}
    for job in plan.jobs:
        if store.is_done(job.id):
            summary.skipped.append(job.id)
            continue
        res = job.resources
        options = dict(
            num_cpus=res["num_cpus"],
            num_gpus=res["num_gpus"],
            max_retries=max_retries,
            retry_exceptions=True,
            name=f"{job.kind}:{job.label}",
        )
        if res.get("memory_gb"):
            options["memory"] = int(res["memory_gb"] * 2**30)
        inputs = [refs[d] for d in job.deps if d in refs]
        refs[job.id] = remote.options(**options).remote(job.to_dict(), str(store.root), *inputs)
        log.info("submitted %s (%s %s)", job.id, job.kind, job.label)

    by_ref = {refs[job.id]: job for job in plan.jobs if job.id in refs}
    waiting = list(refs.values())  # in plan order: ray.wait returns an upstream failure before its dependants
    while waiting:
        (ref,), waiting = ray.wait(waiting, num_returns=1)
        job = by_ref[ref]
        try:
            ray.get(ref)
            summary.ran.append(job.id)
            log.info("done %s %s (%d left)", job.kind, job.label, len(waiting))
        except Exception as e:  # any failure of a job is recorded, never dropped
            failed_inputs = [d for d in job.deps if d in summary.failed]
            if failed_inputs:
                reason, attempts = f"upstream job {failed_inputs[0]} failed", 0
            else:
                reason, attempts = _cause(e), max_retries + 1
            summary.failed[job.id] = reason
            store.record(job.to_dict(), FAILED, reason=reason, attempts=attempts)
            log.error("FAILED %s %s: %s", job.kind, job.label, reason)
    return summary


def _cause(error: Exception) -> str:
    """The original exception's one-line message, out of Ray's wrapper."""
    import ray

    if isinstance(error, ray.exceptions.RayTaskError) and error.cause is not None:
        error = error.cause
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"
