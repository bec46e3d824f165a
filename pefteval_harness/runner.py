"""Execution on Ray: the driver walks the plan's DAG and submits each job once its inputs are done.

- A job whose result is in the store is never run again; a job another live run holds (its claim in
  the store) is waited for, not run twice.
- Ready evaluation jobs of one model (same model, batch size and resources) go to one worker, which
  loads the model once (up to `tasks_per_worker` tasks each); each job is recorded on its own.
- Critical path first, packed: ready jobs go in priority order (the longest estimated chain of work
  from them to the end of the DAG), and only as many as fit in the cluster's free resources right now
  (the driver's model of its nodes, `scheduling.Cluster`), so Ray's own queue, which is not in priority
  order across resource shapes, never holds low-priority work ahead of the critical path. When the
  next job must wait for room, lower ones run meanwhile only if they cannot delay it (EASY backfilling
  on the estimates). A job no node can ever hold fails at once (bad input); on an autoscaling cluster
  that check would have to allow for nodes yet to come.
- A gang fine-tune (`workers > 1`) runs as a coordinator task that holds nothing; the driver counts
  its workers' resources as in use while it runs.
- A job still running after its kind's `timeout_minutes` (from its submission) is cancelled and
  recorded failed, class "timeout", never retried; a batch of n jobs gets n times the timeout.
- A failed job is retried up to `max_retries` times if its class says a retry can help
  (`errors.FAILURE_CLASSES`: only "error"); then it is recorded as failed with its reason, class and
  log, and every job downstream of it as failed because of it. Ray itself retries a task whose worker
  or node dies (`max_retries` on the task); when none is left it is recorded failed with Ray's reason,
  class "killed" ("out_of_memory" when Ray's memory monitor killed it).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

from pefteval_harness import scheduling
from pefteval_harness.errors import FAILURE_CLASSES, BadInput, failure_class
from pefteval_harness.jobs.types import Job, Resources
from pefteval_harness.plan import Plan
from pefteval_harness.store import DONE, FAILED, Store, new_run_id

log = logging.getLogger(__name__)

# Local Ray stays on loopback: Ray otherwise binds the machine's network address, and token
# authentication (on by default in Ray 2.60) is pointless for a Ray only this process uses.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
POLL_SECONDS = 2.0  # how often the driver looks at jobs another run is doing
# Joining a cluster fails within this, naming the address: a TCP probe of it first (PROBE_SECONDS), then one
# connection attempt of Ray's of about 20 s (5 s for the GCS channel, 5 for its pubsub, JOIN_ENV's 10 for an
# answer). Ray's own default is 20 attempts of about 40 s: a dead address hung a run for 14 minutes. Set for
# the join only (the attempts count would also cut a local Ray's start short), and before Ray is imported
# (when it reads the answer's timeout; a process that imported Ray before waits Ray's 30 s for it instead).
# Values the user set win.
JOIN_TIMEOUT_SECONDS = 30
PROBE_SECONDS = 5.0
JOIN_ENV = {"RAY_gcs_server_port_wait_time_s": "1", "RAY_py_gcs_connect_timeout_s": "10"}
# Tasks (jobs, or batches of evaluations) a shared worker process runs before Ray replaces it: bounds
# what a long run's workers accumulate.
JOBS_PER_WORKER = 16
SHARED_WORKERS = {"env_vars": {"PEFTEVAL_WORKER": "shared"}}  # a worker pool of their own
LOCAL_START_ATTEMPTS = 2  # a local Ray whose raylet died starting (a loaded machine) is started again once
CANCEL_WAIT_SECONDS = 10.0  # a stopped run waits this long at most for its cancelled tasks to end


@dataclass
class RunSummary:
    skipped: list[str] = field(default_factory=list)  # already done in the store
    ran: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # job id -> reason


def init_ray(address: str | None, num_cpus: int | None = None, verbose: bool = False) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS, as `ray job submit` sets); else start a new local Ray.

    A plain run never joins a Ray it was not told about: `address="local"` starts a fresh one even when
    the machine's Ray temp folder names another (possibly dead) cluster. `--address auto` joins that one.
    Joining fails within JOIN_TIMEOUT_SECONDS, with a BadInput naming the address, if nothing answers there.
    """
    from pefteval_harness.numerics import NUMERICS_ENV

    given = f"--address {address}" if address else f"RAY_ADDRESS={os.environ.get('RAY_ADDRESS')}"
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        _join(address, given, verbose)
        return
    # Ray reads these when it is imported: set them before the import, and check that it worked. The
    # numerics pins too: a local Ray's workers inherit them from the start (on a cluster, each job sets them
    # itself before torch computes anything: `numerics.pin_numerics`).
    os.environ.update({**LOOPBACK_ENV, **NUMERICS_ENV})
    import ray

    if ray.is_initialized():
        return
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:
        raise RuntimeError(
            "ray was imported before pefteval could keep the local Ray on 127.0.0.1:"
            " set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before importing ray"
        )
    _start_local_ray(num_cpus, verbose)
    addresses = {node["NodeManagerAddress"] for node in ray.nodes()}
    if addresses != {"127.0.0.1"}:
        ray.shutdown()
        raise RuntimeError(f"the local Ray bound to {addresses}, not 127.0.0.1; stopped it")


def _start_local_ray(num_cpus: int | None, verbose: bool) -> None:
    """ray.init of a new local Ray, started again once if it dies starting.

    On a loaded machine Ray's raylet can abort at start-up: it waits a fixed 15 s for its dashboard agent's
    ports, and the agent (a Python process importing much of Ray) can take longer. ray.init then fails after
    about 35 s and leaves the dead node's other processes running: they are stopped (only those this call
    started), and a second start, with the imports now in the page cache, is tried before giving up.
    """
    import psutil
    import ray

    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        before = {child.pid for child in psutil.Process().children(recursive=True)}
        try:
            with _callers_sigterm_handler():
                ray.init(
                    address="local",
                    _node_ip_address="127.0.0.1",
                    include_dashboard=False,
                    num_cpus=num_cpus,
                    log_to_driver=verbose,  # the jobs' own output; Ray keeps it in its session logs either way
                )
            return
        except Exception as e:
            ray.shutdown()
            for child in psutil.Process().children(recursive=True):
                if child.pid not in before:
                    with suppress(psutil.Error):
                        child.kill()
            if attempt == LOCAL_START_ATTEMPTS:
                raise RuntimeError(f"the local Ray did not start, {attempt} times: {_first_line(e)}") from e
            log.warning("the local Ray did not start (%s); starting it again", _first_line(e))


def _join(address: str, given: str, verbose: bool) -> None:
    """ray.init(address), bounded: a BadInput naming the address when nothing answers there as a Ray cluster."""
    added = {name: value for name, value in JOIN_ENV.items() if name not in os.environ}
    os.environ.update(added)
    try:
        import ray

        host_port = _answering(address, given)  # checked even when this process is connected already
        if not ray.is_initialized():
            _connect(address, host_port, given, verbose)
    finally:
        for name in added:
            os.environ.pop(name, None)


def _answering(address: str, given: str) -> str:
    """The host:port Ray would connect to for `address`, once something listens there; BadInput otherwise."""
    from ray._common.utils import get_ray_address_file
    from ray._private import services

    try:  # what Ray will connect to: "auto" is the cluster the machine's Ray temp folder names
        target = address if "://" in address else services.canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as e:
        raise BadInput(f"{given}: {_first_line(e)}") from None
    if address == "auto" and target == services.find_bootstrap_address(None):  # a stale one is then deleted
        given += f" (the cluster {get_ray_address_file(None)} names)"
    host_port = target.split("://")[-1].split("/")[0]
    host, _, port = host_port.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS).close()
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise BadInput(f"{given}: no Ray cluster answers at {host_port} ({why})") from None
    return host_port


def _connect(address: str, host_port: str, given: str, verbose: bool) -> None:
    import ray

    try:
        with _callers_sigterm_handler():
            ray.init(address=address, log_to_driver=verbose)
    except ConnectionError:  # the port is open, but no Ray answered behind it
        raise BadInput(f"{given}: no Ray cluster answered at {host_port} within {JOIN_TIMEOUT_SECONDS} s") from None
    except (RuntimeError, TimeoutError) as e:  # another Ray version, an auth mismatch...
        raise BadInput(f"{given}: could not join the Ray cluster at {host_port}: {_first_line(e)}") from None


def _first_line(error: Exception) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


@contextmanager
def ray_of_this_block() -> Iterator[None]:
    """Ray is shut down when the block ends if the block connected this process to it: a run's own local Ray
    stops with the run (at once, not at exit), a joined cluster is only left. A Ray connected before stays."""
    import sys

    connected_before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    try:
        yield
    finally:
        ray = sys.modules.get("ray")
        if not connected_before and ray is not None and ray.is_initialized():
            ray.shutdown()


@contextmanager
def _callers_sigterm_handler() -> Iterator[None]:
    """ray.init replaces the SIGTERM handler with its own (sys.exit(15)): one the caller set (`StopSignals`) is put
    back. The default (terminate) is left to Ray's."""
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(before) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, before)


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM stop a run: `with StopSignals() as stop:` around it; `stop.exit_code` after.

    The first signal raises KeyboardInterrupt in the main thread (Ray's blocking calls turn whatever a handler
    raises into that one), and is remembered for the exit code (128 + its number: 130, 143); further ones are
    ignored while the run cancels its jobs and shuts its Ray down (seconds). The handlers before are restored.
    Outside the main thread it does nothing (Python runs handlers there only)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._before: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._before = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._before.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            log.warning("%s: already stopping", signal.Signals(signum).name)
            return
        self.received = signum
        raise KeyboardInterrupt

    @property
    def name(self) -> str:
        return signal.Signals(self.received or signal.SIGINT).name

    @property
    def exit_code(self) -> int:
        return 128 + (self.received or signal.SIGINT)  # a KeyboardInterrupt from elsewhere counts as Ctrl-C


def _batch_key(job: Job) -> str | None:
    """Evaluations that one worker can run on one loaded model share a key; other jobs run alone."""
    if job.kind != "evaluate":
        return None
    return job.config.model.model_dump_json() + str(job.config.settings.batch_size) + job.resources.model_dump_json()


@contextmanager
def _cancelled_when_stopped(in_flight: dict) -> Iterator[None]:
    """A stopped run (KeyboardInterrupt, as `StopSignals` raises) cancels its running tasks, and waits a little for
    them to end before its claims are released (`_Heartbeat`, exited after). Nothing is recorded for them: they
    are not done, and the next run runs them. A store write cut short leaves no torn file (writes are atomic),
    and a cancelled job's staging folder is never an artifact (`Store.staging`)."""
    try:
        yield
    except KeyboardInterrupt:
        import ray

        refs = list(in_flight)
        for ref in refs:
            ray.cancel(ref, force=True)  # force: kill the worker, a job's own code never checks for a cancel
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=CANCEL_WAIT_SECONDS)
        log.warning("stopped: %d running tasks cancelled", len(refs))
        raise


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


def execute(
    plan: Plan,
    store: Store,
    max_retries: int = 1,
    tasks_per_worker: int = 24,
    *,
    task: Callable | None = None,
    estimate: Callable[[Job], float] | None = None,
    prioritize: bool = True,
    run_id: str | None = None,
) -> RunSummary:
    """Run the plan's pending jobs on the connected Ray cluster; return what ran, was skipped and failed.

    A model's ready evaluations share a worker (one process start and model load) in groups of at most
    `tasks_per_worker` tasks: fewer spreads one model's tasks over more workers, more saves start-ups.
    Ready jobs go in priority order (the longest estimated chain to the end first; `prioritize=False`:
    plan order), each only once it fits in the cluster's free resources (see the module docstring).

    `task` is what a Ray task runs for a batch (default `jobs.run_batch`; a fresh worker process each
    time); a `ray.remote` function is used as it is. `estimate` gives a job's expected seconds
    (default `scheduling.estimate_seconds`, by kind). `run_id` names this run in its claims (default: a new id).
    """
    import ray

    from pefteval_harness.jobs import run_batch

    estimate = estimate or scheduling.estimate_seconds
    task = task or run_batch
    # Jobs reuse their worker process (a new one costs seconds of imports and set-up per job), except those
    # that set process-wide state: DeepSpeed (torch.distributed, its environment) and gang coordinators
    # (Ray Train). The shared workers' own runtime env keeps Ray from handing one of them to such a job.
    if isinstance(task, ray.remote_function.RemoteFunction):
        remote = {"fresh": task, "shared": task}
    else:
        remote = {
            "fresh": ray.remote(max_calls=1)(task),
            "shared": ray.remote(max_calls=JOBS_PER_WORKER, runtime_env=SHARED_WORKERS)(task),
        }
    store_url = getattr(store, "url", None) or str(store.root)
    gpu_memory_gb = plan.spec.resources.gpu_memory_gb
    order = scheduling.priorities(plan.jobs, estimate) if prioritize else {}
    position = {job.id: i for i, job in enumerate(plan.jobs)}
    summary = RunSummary()
    owner = run_id or new_run_id()  # what this run's claims say
    state: dict[str, str] = {}  # job id -> done | failed (settled jobs only)
    attempts: dict[str, int] = {}
    in_flight: dict[ray.ObjectRef, _Running] = {}
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

    def settle(job: Job, outcome: dict) -> None:
        """Record a job's end (done by its worker, or failed here) and let go of it."""
        if outcome["state"] == DONE:
            state[job.id] = DONE
            summary.ran.append(job.id)
            log.info("done %s", _name(job))
        else:
            state[job.id] = FAILED
            summary.failed[job.id] = outcome["reason"]
            store.record(
                job.model_dump(mode="json"),
                FAILED,
                reason=outcome["reason"],
                error_class=outcome["error_class"],
                attempts=attempts.get(job.id, 0),
                **({"log": outcome["log"]} if outcome.get("log") else {}),
            )
            log.error("FAILED %s: %s", _name(job), outcome["reason"])
        if job.id in held:
            store.release(job.id, owner)
            held.discard(job.id)
        delete_spent_artifacts(job)

    def resources_of(job: Job) -> Resources:
        return scheduling.gpu_share(job.resources, gpu_memory_gb)

    def claimed(batch: list[Job]) -> list[Job]:
        """The jobs of a batch this run takes: not finished by another run meanwhile, and claimed here."""
        mine = []
        for job in batch:
            if done_in_store(job):  # another run finished it
                state[job.id] = DONE
                summary.skipped.append(job.id)
                elsewhere.discard(job.id)
            elif store.claim(job.id, owner):
                elsewhere.discard(job.id)
                held.add(job.id)
                mine.append(job)
            else:
                if job.id not in elsewhere:
                    log.info("%s is being run by another run; waiting for it", _name(job))
                elsewhere.add(job.id)
        return mine

    def submit(batch: list[Job], res: Resources) -> None:
        for job in batch:
            attempts[job.id] = attempts.get(job.id, 0) + 1
        gang = res.workers > 1
        options = dict(
            # A gang's coordinator holds nothing: its Ray Train workers ask for the job's resources.
            num_cpus=0 if gang else res.num_cpus,
            num_gpus=0 if gang else res.num_gpus,
            max_retries=max_retries,  # the worker process or its node died: Ray runs the task again
            name=f"{batch[0].kind}:{batch[0].label}" + (f" ({len(batch)} tasks)" if len(batch) > 1 else ""),
        )
        if res.memory_gb and not gang:
            options["memory"] = int(res.memory_gb * 2**30)
        threads = max(1, int(res.num_cpus))
        jobs = [j.model_copy(update={"resources": res}).model_dump(mode="json") for j in batch]
        fresh = gang or getattr(batch[0].config, "deepspeed", None) is not None
        ref = remote["fresh" if fresh else "shared"].options(**options).remote(jobs, store_url, threads)
        # A batch's timeout is the per-job one times its jobs: they run one after the other.
        timeout = res.timeout_minutes * 60 * len(batch) if res.timeout_minutes else None
        now = time.monotonic()
        in_flight[ref] = _Running(batch, res, now, now + sum(estimate(j) for j in batch), timeout)
        log.info("submitted %s %s", batch[0].kind, ", ".join(j.id for j in batch))

    with _Heartbeat(store, owner, held), _cancelled_when_stopped(in_flight):
        while True:
            # Settle what upstream failures decide; the rest whose inputs are done are ready.
            settled_before = len(state)
            running = {j.id for r in in_flight.values() for j in r.jobs}
            ready: list[Job] = []
            for job in plan.jobs:
                if job.id in state or job.id in running:
                    continue
                failed_inputs = [d for d in job.deps if state.get(d) == FAILED]
                if failed_inputs:
                    settle(job, _failure(f"upstream job {failed_inputs[0]} failed", "upstream"))
                elif all(state.get(d) == DONE for d in job.deps):
                    ready.append(job)
            groups: dict[str, list[Job]] = {}
            for job in sorted(ready, key=lambda j: (-order.get(j.id, 0), position[j.id])):
                groups.setdefault(_batch_key(job) or job.id, []).append(job)
            batches = [g[i : i + tasks_per_worker] for g in groups.values() for i in range(0, len(g), tasks_per_worker)]
            if prioritize:  # a batch runs its jobs one after the other: its chain is their sum, then the longest after
                batches.sort(key=lambda b: -(sum(map(estimate, b)) + max(order[j.id] - estimate(j) for j in b)))
            else:
                batches.sort(key=lambda b: position[b[0].id])

            # Pack: the cluster as it is now (live nodes; nodes come and go), minus what runs on it.
            totals = scheduling.Cluster.of_ray()
            free = totals.copy()
            for run in in_flight.values():
                free.place(run.resources)
            now = time.monotonic()
            reserved: tuple[float, scheduling.Cluster] | None = None  # for the first job that must wait
            for batch in batches:
                try:
                    res = resources_of(batch[0])
                    why = scheduling.infeasible(res, totals)
                except BadInput as e:
                    why = str(e)
                if why:  # never placeable here: fail now rather than wait forever
                    for job in batch:
                        settle(job, _failure(f"{_name(job)} {why}", "bad_input"))
                    continue
                if reserved is None:
                    if not free.fits(res):
                        running_now = [(r.resources, r.expected_end) for r in in_flight.values()]
                        reserved = scheduling.shadow(running_now, totals, res, now)
                        log.debug("%s waits for room, in about %.0f s", _name(batch[0]), reserved[0] - now)
                        continue
                    ends_in_time = True
                else:
                    # Backfill: runs now only if it cannot delay the waiting job (EASY backfilling).
                    ends_in_time = now + sum(map(estimate, batch)) <= reserved[0]
                    if not free.fits(res) or not (ends_in_time or reserved[1].fits(res)):
                        continue
                batch = claimed(batch)
                if batch:
                    free.place(res)
                    if not ends_in_time:
                        reserved[1].place(res)
                    submit(batch, res)

            if not in_flight:
                if all(job.id in state for job in plan.jobs):
                    break
                if elsewhere:  # only jobs of another run left: look again in a moment
                    time.sleep(POLL_SECONDS)
                continue  # else jobs settled above made others ready
            # Wake up for the first finished batch, the next deadline, or to look at other runs' jobs.
            now = time.monotonic()
            wait = [r.deadline - now for r in in_flight.values() if r.deadline is not None]
            wait += [POLL_SECONDS] if elsewhere else []
            wait += [0] if len(state) > settled_before else []  # jobs settled here may have made others ready
            done_refs, _ = ray.wait(list(in_flight), num_returns=1, timeout=max(0, min(wait)) if wait else None)
            for ref in done_refs:
                run = in_flight.pop(ref)
                try:
                    outcomes = ray.get(ref)
                except Exception as e:  # the worker (or its node) died every time Ray tried it
                    outcomes = {j.id: _failure(_cause(e), _error_class(e)) for j in run.jobs}
                retry = []
                for job in run.jobs:
                    outcome = outcomes[job.id]
                    failed = outcome["state"] != DONE
                    if failed and FAILURE_CLASSES[outcome["error_class"]].retried and attempts[job.id] <= max_retries:
                        log.warning("retrying %s: %s", _name(job), outcome["reason"])
                        retry.append(job)
                    else:
                        settle(job, outcome)
                if retry:
                    submit(retry, run.resources)
            for ref, run in list(in_flight.items()):
                if run.deadline is not None and time.monotonic() >= run.deadline:
                    ray.cancel(ref, force=True)
                    del in_flight[ref]
                    minutes = f"{run.resources.timeout_minutes * len(run.jobs):g}"
                    for job in run.jobs:  # a batch's jobs its worker finished before are done
                        timed_out = _failure(f"timeout: still running after {minutes} min", "timeout")
                        settle(job, {"state": DONE} if store.is_done(job.id) else timed_out)
    return summary


@dataclass
class _Running:
    """A submitted batch: its jobs, the resources each of its workers holds, and when it should end."""

    jobs: list[Job]
    resources: Resources
    started: float  # time.monotonic() at submission (with packing, about when it starts)
    expected_end: float
    timeout: float | None  # seconds

    @property
    def deadline(self) -> float | None:
        return self.started + self.timeout if self.timeout is not None else None


def _name(job: Job) -> str:
    return f"{job.kind} {job.label}" + (f" on {job.config.task}" if job.kind == "evaluate" else "")


def _cause(error: Exception) -> str:
    """The original exception's one-line message, out of Ray's wrapper.

    A job's own error says what went wrong on its last line (Python's convention); Ray's system errors
    (the worker, its node or the driver that owned it died) say it on their first."""
    import ray

    if isinstance(error, ray.exceptions.RayTaskError) and error.cause is not None:
        error = error.cause
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    system = isinstance(error, ray.exceptions.RayError) and not isinstance(error, ray.exceptions.RayTaskError)
    line = (lines[0] if system else lines[-1]) if lines else ""
    return f"{type(error).__name__}: {line.strip()}"


def _failure(reason: str, error_class: str) -> dict:
    return {"state": FAILED, "reason": reason, "error_class": error_class}


def _error_class(error: Exception) -> str:
    """Class out_of_memory when Ray's memory monitor killed the worker; killed when Ray lost the worker or its
    node otherwise (WorkerCrashedError, NodeDiedError, OwnerDiedError...); else the job's own error's class."""
    import ray

    if isinstance(error, ray.exceptions.OutOfMemoryError):
        return "out_of_memory"
    if isinstance(error, ray.exceptions.RayError) and not isinstance(error, ray.exceptions.RayTaskError):
        return "killed"
    return failure_class(error.cause if isinstance(error, ray.exceptions.RayTaskError) and error.cause else error)
