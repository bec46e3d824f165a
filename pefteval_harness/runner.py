"""Execution on Ray: the driver walks the plan's DAG and submits each job once its inputs are done.

- A job whose result is in the store is never run again; a job another live run holds (its claim in
  the store) is waited for, not run twice.
- Ready evaluation jobs of one model (same model, batch size and resources) go to one worker, which
  loads the model once (up to `tasks_per_worker` tasks each); each job is recorded on its own.
- A failed job is retried up to `max_retries` times unless its failure is deterministic (bad input);
  then it is recorded as failed with its reason and class, and every job downstream of it as failed
  because of it. Ray itself retries a worker that dies (`max_retries` on the task).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

from pefteval_harness.jobs.types import Job
from pefteval_harness.plan import Plan
from pefteval_harness.store import DONE, FAILED, Store, new_run_id

log = logging.getLogger(__name__)

# Local Ray stays on loopback: Ray otherwise binds the machine's network address, and token
# authentication (on by default in Ray 2.60) is pointless for a Ray only this process uses.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
POLL_SECONDS = 2.0  # how often the driver looks at jobs another run is doing


@dataclass
class RunSummary:
    skipped: list[str] = field(default_factory=list)  # already done in the store
    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # job id -> reason


def init_ray(address: str | None, num_cpus: int | None = None, verbose: bool = False) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS, as `ray job submit` sets); else start a new local Ray.

    A plain run never joins a Ray it was not told about: `address="local"` starts a fresh one even when
    the machine's Ray temp folder names another (possibly dead) cluster. `--address auto` joins that one.
    """
    from pefteval_harness.numerics import NUMERICS_ENV

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        # Ray reads these when it is imported: set them before the import, and check that it worked.
        # The numerics pins too: a local Ray's workers inherit them from the start (on a cluster, each
        # job sets them itself before torch computes anything: `numerics.pin_numerics`).
        os.environ.update({**LOOPBACK_ENV, **NUMERICS_ENV})
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
        address="local",
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        num_cpus=num_cpus,
        log_to_driver=verbose,  # the jobs' own output; Ray keeps it in its session logs either way
    )
    addresses = {node["NodeManagerAddress"] for node in ray.nodes()}
    if addresses != {"127.0.0.1"}:
        ray.shutdown()
        raise RuntimeError(f"the local Ray bound to {addresses}, not 127.0.0.1; stopped it")


def _batch_key(job: Job) -> str | None:
    """Evaluations that one worker can run on one loaded model share a key; other jobs run alone."""
    if job.kind != "evaluate":
        return None
    return job.config.model.model_dump_json() + str(job.config.settings.batch_size) + job.resources.model_dump_json()


class _Heartbeat:
    """Keeps this run's claims fresh while it works, so other runs know it is alive."""

    def __init__(self, store: Store, owner: str, held: set[str]):
        self.store, self.owner, self.held = store, owner, held
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(20):
            try:
                self.store.refresh_claims(list(self.held), self.owner)
            except Exception:  # a storage hiccup must not stop the heartbeat for good
                log.warning("could not refresh this run's claims", exc_info=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for job_id in list(self.held):
            self.store.release(job_id, self.owner)


def execute(plan: Plan, store: Store, max_retries: int = 1, tasks_per_worker: int = 24) -> RunSummary:
    """Run the plan's pending jobs on the connected Ray cluster; return what ran, was skipped and failed.

    A model's ready evaluations share a worker (one process start and model load) in groups of at most
    `tasks_per_worker` tasks: fewer spreads one model's tasks over more workers, more saves start-ups."""
    import ray

    from pefteval_harness.jobs import run_batch

    # A fresh worker process per task: training sets process-wide state (torch.distributed, DeepSpeed
    # environment), and the peak memory a job records is then its own.
    remote = ray.remote(max_calls=1)(run_batch)
    summary = RunSummary()
    owner = new_run_id()
    state: dict[str, str] = {}  # job id -> done | failed (settled jobs only)
    attempts: dict[str, int] = {}
    in_flight: dict[ray.ObjectRef, list[Job]] = {}
    elsewhere: set[str] = set()  # held by another live run: waited for
    held: set[str] = set()

    readers: dict[str, list[str]] = {}  # job id -> the jobs that read it
    for job in plan.jobs:
        for dep in job.deps:
            readers.setdefault(dep, []).append(job.id)

    def done_in_store(job: Job) -> bool:
        """Done, and its artifact there unless no pending job reads it (a deleted one is then rebuilt)."""
        status = store.status(job.id) or {}
        if status.get("state") != DONE:
            return False
        return not status.get("artifact_deleted") or all(store.is_done(r) for r in readers.get(job.id, []))

    def delete_spent_artifacts(settled: Job) -> None:
        """`keep_model: false`: a merged model goes once every job that reads it is settled."""
        for dep in settled.deps:
            if by_id[dep].keep_artifact or state.get(dep) != DONE:
                continue
            if all(r in state for r in readers[dep]):
                store.delete_artifact(dep)

    by_id = {job.id: job for job in plan.jobs}
    for job in plan.jobs:
        if done_in_store(job):
            state[job.id] = DONE
            summary.skipped.append(job.id)
    for job in plan.jobs:  # spent before an earlier run could delete them
        if job.id in state:
            delete_spent_artifacts(job)

    def fail(job: Job, outcome: dict) -> None:
        state[job.id] = FAILED
        delete_spent_artifacts(job)
        summary.failed[job.id] = outcome["reason"]
        store.record(
            job.model_dump(mode="json"),
            FAILED,
            reason=outcome["reason"],
            error_class=outcome["error_class"],
            attempts=attempts.get(job.id, 0),
        )
        log.error("FAILED %s: %s", _name(job), outcome["reason"])

    def submit(batch: list[Job]) -> None:
        for job in batch:
            attempts[job.id] = attempts.get(job.id, 0) + 1
        res = batch[0].resources
        options = dict(
            num_cpus=res.num_cpus,
            num_gpus=res.num_gpus,
            max_retries=max_retries,  # the worker process died: Ray runs the task again
            name=f"{batch[0].kind}:{batch[0].label}" + (f" ({len(batch)} tasks)" if len(batch) > 1 else ""),
        )
        if res.memory_gb:
            options["memory"] = int(res.memory_gb * 2**30)
        threads = max(1, int(res.num_cpus))
        ref = remote.options(**options).remote([j.model_dump(mode="json") for j in batch], str(store.root), threads)
        in_flight[ref] = batch
        log.info("submitted %s %s", batch[0].kind, ", ".join(j.id for j in batch))

    with _Heartbeat(store, owner, held):
        while True:
            # Settle what upstream failures decide, then submit every job whose inputs are done.
            batches: dict[str | None, list[Job]] = {}
            running = {j.id for batch in in_flight.values() for j in batch}
            for job in plan.jobs:
                if job.id in state or job.id in running:
                    continue
                failed_inputs = [d for d in job.deps if state.get(d) == FAILED]
                if failed_inputs:
                    fail(job, {"reason": f"upstream job {failed_inputs[0]} failed", "error_class": "upstream"})
                    continue
                if not all(state.get(d) == DONE for d in job.deps):
                    continue
                if done_in_store(job):  # another run finished it
                    state[job.id] = DONE
                    summary.skipped.append(job.id)
                    elsewhere.discard(job.id)
                    continue
                if not store.claim(job.id, owner):
                    if job.id not in elsewhere:
                        log.info("%s is being run by another run; waiting for it", _name(job))
                    elsewhere.add(job.id)
                    continue
                elsewhere.discard(job.id)
                held.add(job.id)
                key = _batch_key(job)
                batches.setdefault(key or job.id, []).append(job)
            for batch in batches.values():
                for start in range(0, len(batch), tasks_per_worker):
                    submit(batch[start : start + tasks_per_worker])
            if not in_flight and not elsewhere:
                break
            if not in_flight:  # only jobs of another run left: look again in a moment
                time.sleep(POLL_SECONDS)
                continue
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=POLL_SECONDS if elsewhere else None)
            for ref in ready:
                batch = in_flight.pop(ref)
                try:
                    outcomes = ray.get(ref)
                except Exception as e:  # the worker died every time Ray tried it
                    outcomes = {j.id: {"state": FAILED, "reason": _cause(e), "error_class": "error",
                                       "retryable": False} for j in batch}
                retry = []
                for job in batch:
                    outcome = outcomes[job.id]
                    if outcome["state"] == DONE:
                        state[job.id] = DONE
                        summary.ran.append(job.id)
                        log.info("done %s", _name(job))
                    elif outcome.get("retryable") and attempts[job.id] <= max_retries:
                        log.warning("retrying %s: %s", _name(job), outcome["reason"])
                        retry.append(job)
                    else:
                        fail(job, outcome)
                    if job.id in state:
                        store.release(job.id, owner)
                        held.discard(job.id)
                        delete_spent_artifacts(job)
                if retry:
                    submit(retry)
    return summary


def _name(job: Job) -> str:
    return f"{job.kind} {job.label}" + (f" on {job.config.task}" if job.kind == "evaluate" else "")


def _cause(error: Exception) -> str:
    """The original exception's one-line message, out of Ray's wrapper."""
    import ray

    if isinstance(error, ray.exceptions.RayTaskError) and error.cause is not None:
        error = error.cause
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"
