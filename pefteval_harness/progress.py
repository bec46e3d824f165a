"""Live progress: jobs write their own (`Store.write_progress`), `pefteval status` and the run read it.

A training job reports its optimiser step and last logged loss (`TrainProgress`, a Trainer callback); an
evaluation worker reports, per task, the requests scored so far (`RequestProgress`, on lm-eval's LM).
Writes are rate-limited and never fail a job: progress is for people watching, results are the store's.
`status_of` reads a run's state from the store alone, so it works on a run another process (or cluster)
is doing; `LiveDisplay` prints it while `pefteval run` runs.
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from pefteval_harness.errors import failure_classes_legend
from pefteval_harness.store import Store

log = logging.getLogger(__name__)

WRITE_EVERY_SECONDS = 2.0


class ProgressWriter:
    """Writes one job's progress at most every `every_seconds` (or when forced); a failed write is logged once.

    Each record names the run holding the job's claim when the writer was made, so `status_of` can tell
    this attempt's progress from what an earlier, dead run left behind."""

    def __init__(self, store: Store, job_id: str, every_seconds: float = WRITE_EVERY_SECONDS):
        self.store, self.job_id, self.every = store, job_id, every_seconds
        self._last = float("-inf")
        self._warned = False
        try:
            self.run = store.claim_holder(job_id)
        except Exception:  # unreadable now: the record says nothing of its run, status_of then trusts the claim
            self.run = None

    def __call__(self, progress: dict, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        self._last = now
        try:
            self.store.write_progress(self.job_id, {**progress, "run": self.run})
        except Exception as e:  # a full disk or a flaky remote store must not fail the job it describes
            if not self._warned:
                log.warning("progress of %s not written: %s: %s", self.job_id, type(e).__name__, e)
                self._warned = True


def _train_progress_class():
    from transformers import TrainerCallback

    class TrainProgress(TrainerCallback):
        """Writes {"phase": "train", step, total, loss} on rank 0, every `every_seconds` and at the end."""

        def __init__(self, store: Store, job_id: str, every_seconds: float = WRITE_EVERY_SECONDS):
            self.write = ProgressWriter(store, job_id, every_seconds)
            self.loss: float | None = None

        def _report(self, state, force: bool) -> None:
            if state.is_world_process_zero:
                self.write(
                    {"phase": "train", "step": state.global_step, "total": state.max_steps, "loss": self.loss},
                    force=force,
                )

        def on_train_begin(self, args, state, control, **kwargs):
            self._report(state, force=True)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:  # logged after the step's on_step_end: reported now, rate permitting
                self.loss = float(logs["loss"])
                self._report(state, force=False)

        def on_step_end(self, args, state, control, **kwargs):
            self._report(state, force=False)

        def on_train_end(self, args, state, control, **kwargs):
            self._report(state, force=True)

    TrainProgress.__qualname__ = "TrainProgress"  # pickled by reference: `progress.TrainProgress`
    return TrainProgress


def __getattr__(name: str):
    # TrainProgress subclasses transformers' TrainerCallback, whose import takes seconds: built on first
    # use, so `pefteval status` (which imports this module) stays quick.
    if name == "TrainProgress":
        cls = _train_progress_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- evaluation: requests scored per task ---------------------------------------------------------------

REQUEST_TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until")


def _request_key(request_type: str, args: tuple) -> Any:
    # generate_until reports (context, gen_kwargs) with its group's gen_kwargs (a dict): the context alone.
    return args[0] if request_type == "generate_until" else tuple(args)


class RequestProgress:
    """Counts the requests an lm-eval `HFLM` has scored, per task, and writes each scored job's progress.

    lm-eval calls the LM once per request type with every task's requests of that type (sorted by length,
    tasks mixed). The wrapped `loglikelihood` / `loglikelihood_rolling` / `generate_until` note how many
    requests each task sent; HFLM reports every finished request to its cache hook (`add_partial`, once
    per request, as its batches finish), which is where they are counted: exact, whatever the order.
    Install once per loaded model; wrap each `simple_evaluate` call in `scoring(...)`.
    """

    def __init__(self, lm, store: Store, every_seconds: float = WRITE_EVERY_SECONDS):
        self.store, self.every = store, every_seconds
        self.writers: dict[str, ProgressWriter] = {}  # task -> its job's writer, for the call being scored
        self.total: Counter[str] = Counter()
        self.done: Counter[str] = Counter()
        self.types: dict[str, str] = {}  # task -> its request type
        self.pending: dict[tuple[str, Any], deque[str]] = {}  # (type, request key) -> tasks still waiting
        self._last = float("-inf")
        self._failed = False
        # Other ranks of a distributed lm-eval score shards of the same tasks: rank 0 reports.
        self.installed = getattr(lm, "rank", 0) == 0
        if not self.installed:
            return
        for name in REQUEST_TYPES:
            setattr(lm, name, self._announcing(name, getattr(lm, name)))
        self.hook = lm.cache_hook
        lm.set_cache_hook(self)

    @contextmanager
    def scoring(self, tasks: dict[str, str]) -> Iterator[None]:
        """Report the jobs of one `simple_evaluate` call: `tasks` maps each job id to its task."""
        if not self.installed:
            yield
            return
        self.writers = {task: ProgressWriter(self.store, job_id, 0.0) for job_id, task in tasks.items()}
        for counts in (self.total, self.done, self.types, self.pending):
            counts.clear()
        self._write(force=True)
        try:
            yield
        finally:
            self._write(force=True)
            self.writers = {}

    def _task_of(self, name: str | None) -> str | None:
        if name in self.writers:
            return name
        return next(iter(self.writers)) if len(self.writers) == 1 else None

    def _announcing(self, request_type: str, method):
        def announced(requests, *args, **kwargs):
            self._guarded(self._announce, request_type, requests)
            return method(requests, *args, **kwargs)

        return announced

    def _announce(self, request_type: str, requests: list) -> None:
        for request in requests:
            task = self._task_of(request.task_name)
            if task is None:
                continue
            self.total[task] += 1
            self.types[task] = request_type
            self.pending.setdefault((request_type, _request_key(request_type, request.args)), deque()).append(task)
        self._write(force=True)

    def add_partial(self, attr: str, req, res) -> None:
        """lm-eval's CacheHook call for one finished request: counted, then passed on to the hook it replaced."""
        self._guarded(self._finished, attr, req)
        self.hook.add_partial(attr, req, res)

    def _finished(self, request_type: str, req) -> None:
        waiting = self.pending.get((request_type, _request_key(request_type, tuple(req))))
        if waiting:
            task = waiting.popleft()
        else:  # not a request as announced: any task of this type still waiting, so totals stay right
            left = (t for t, kind in self.types.items() if kind == request_type and self.done[t] < self.total[t])
            task = next(left, None)
        if task is not None:
            self.done[task] += 1
            self._write(force=self.done[task] == self.total[task])

    def _write(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        self._last = now
        for task, write in self.writers.items():
            total = self.total[task] or None  # None: its request type has not come yet
            progress = {"phase": "evaluate", "task": task, "done": self.done[task], "total": total}
            write({**progress, "request_type": self.types.get(task)}, force=True)

    def _guarded(self, step, *args) -> None:
        try:
            step(*args)
        except Exception:  # counting is for people watching: never the reason a task fails
            if not self._failed:
                log.warning("evaluation progress not counted", exc_info=True)
                self._failed = True


# --- the state of a run, from the store alone ---------------------------------------------------------------

STATES = ("done", "running", "queued", "failed", "left")


@dataclass
class JobStatus:
    id: str
    kind: str
    label: str
    task: str | None
    state: str  # one of STATES
    progress: dict | None = None  # running: what the job last wrote
    age_seconds: float | None = None  # running: since it last wrote
    reason: str | None = None  # failed
    error_class: str | None = None  # failed: a key of errors.FAILURE_CLASSES
    log: str | None = None  # failed: where its full log is (a path, or a URL in a remote store)

    @property
    def name(self) -> str:
        return f"{self.kind} {self.label}" + (f" on {self.task}" if self.task else "")

    def describe(self) -> str:
        """What the job is doing: "step 12/40, loss 1.23", "340/1000 requests"."""
        p = self.progress or {}
        phase = p.get("phase")
        if phase == "train":
            loss = p.get("loss")
            return f"step {p.get('step')}/{p.get('total')}" + (f", loss {loss:.3g}" if loss is not None else "")
        if phase == "evaluate":
            if not p.get("total"):
                return "waiting for its requests"
            return f"{p.get('done')}/{p['total']} requests"
        return p.get("message") or self.state

    def line(self) -> str:
        return f"{self.name}: {self.describe()}"


@dataclass
class RunStatus:
    name: str
    jobs: list[JobStatus]

    def counts(self) -> dict[str, int]:
        counted = Counter(job.state for job in self.jobs)
        return {state: counted[state] for state in STATES}

    @property
    def finished(self) -> bool:
        """Nothing running, queued or left: every job is done or failed."""
        return all(job.state in ("done", "failed") for job in self.jobs)

    def of(self, *states: str) -> list[JobStatus]:
        return [job for job in self.jobs if job.state in states]

    def summary(self) -> str:
        """The counts, as "12 done · 2 running · 1 failed · 30 left (of 45)" (queued only when some are)."""
        counts = self.counts()
        shown = [f"{counts[s]} {s}" for s in STATES if counts[s] or s != "queued"]
        return " · ".join(shown) + f" (of {len(self.jobs)})"

    def live_lines(self) -> list[str]:
        """The summary and one line per running job: what `LiveDisplay` prints (no ages: they always change)."""
        return [self.summary(), *(f"  {job.line()}" for job in self.of("running"))]

    def render(self) -> str:
        from tabulate import tabulate

        parts = [f"{self.name}: {self.summary()}"]
        active = self.of("running", "queued")
        if active:
            rows = [[job.name, job.describe(), _age(job.age_seconds), job.id] for job in active]
            parts.append(tabulate(rows, headers=["running", "progress", "updated", "job id"], tablefmt="github"))
        failed = self.of("failed")
        if failed:
            rows = [[job.name, job.error_class or "-", job.reason or "-", job.log or "-", job.id] for job in failed]
            parts.append(tabulate(rows, headers=["failed", "class", "reason", "log", "job id"], tablefmt="github"))
            parts.append(failure_classes_legend(job.error_class for job in failed))
        return "\n\n".join(parts) + "\n"

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "counts": self.counts(),
            "total": len(self.jobs),
            "jobs": [{**asdict(job), "line": job.line()} for job in self.jobs],
        }


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    return f"{seconds}s ago" if seconds < 120 else f"{seconds // 60}m ago"


def status_of(store: Store, plan_json: dict) -> RunStatus:
    """Every planned job's state, from the store alone.

    done / failed: its status says so (a failed job claimed again is being rerun: running or queued).
    running: a live claim and progress written by the run that holds the claim; queued: a live claim
    and no such progress yet (submitted, waiting for a worker, or a job kind that writes no progress).
    left: the rest (waiting for inputs, or held by a run that died)."""
    now = time.time()
    statuses = {job["id"]: status for job, status in store.jobs()}  # read together (one listing on a bucket)
    jobs = []
    for job in plan_json["jobs"]:
        config = job["config"]
        label = job["label"] + (f" · {strategy['name']}" if (strategy := config.get("strategy")) else "")
        entry = JobStatus(job["id"], config["kind"], label, config.get("task"), "left")
        status = statuses.get(job["id"]) or {}
        if status.get("state") == "done":
            entry.state = "done"
        elif store.claim_is_live(job["id"]):
            progress = store.progress(job["id"])
            if progress is not None and progress.get("run") in (None, store.claim_holder(job["id"])):
                entry.state, entry.progress = "running", progress
                entry.age_seconds = now - progress["time"] if "time" in progress else None
            else:
                entry.state = "queued"
        elif status.get("state") == "failed":
            entry.state, entry.reason, entry.error_class = "failed", status.get("reason"), status.get("error_class")
            entry.log = store.location(status["log"]) if status.get("log") else None
        jobs.append(entry)
    return RunStatus(plan_json.get("name", ""), jobs)


# --- printed while a run runs ---------------------------------------------------------------------------------


class LiveDisplay:
    """Prints the run's summary and its running jobs' progress every `every` seconds, from a daemon thread.

    On a terminal the lines are rewritten in place, and log records written to the same terminal (the
    runner's) are printed above them rather than overwritten; elsewhere (CI, `ray job logs`) the lines are
    printed again only when something changed, so logs stay readable.
    `with LiveDisplay(plan, store): runner.execute(...)`.
    """

    def __init__(self, plan, store: Store, stream: TextIO | None = None, every: float = 5.0):
        self.plan_json = plan if isinstance(plan, dict) else plan.to_json()
        self.store, self.every = store, every
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pefteval-progress", daemon=True)
        self._lock = threading.Lock()  # the display and the log handlers write to one stream
        self._shown: list[str] = []
        self._drawn = 0  # lines of the display on the terminal now, below everything else
        self._handlers: list[tuple[logging.StreamHandler, TextIO]] = []

    def __enter__(self) -> LiveDisplay:
        if self.tty:
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream is self.stream:
                    self._handlers.append((handler, handler.setStream(_Above(self))))
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._tick()  # the state the run ended in
        for handler, stream in self._handlers:
            handler.setStream(stream)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._tick()

    def _tick(self) -> None:
        try:
            lines = status_of(self.store, self.plan_json).live_lines()
        except Exception:  # a store read racing a write, a storage hiccup: try again next time
            log.debug("status not read", exc_info=True)
            return
        with self._lock:
            if lines == self._shown and (not self.tty or self._drawn):
                return
            self._shown = lines
            self._write(self._erase() + self._draw())

    def _erase(self) -> str:
        """Back to the display's first line, and clear from there down (terminal only)."""
        text = f"\x1b[{self._drawn}F\x1b[J" if self._drawn else ""
        self._drawn = 0
        return text

    def _draw(self) -> str:
        if not self.tty:
            return "".join(f"{line}\n" for line in self._shown)
        # Cut to the terminal's width: a wrapped line would take two rows, and erasing counts rows.
        width = shutil.get_terminal_size().columns - 1
        self._drawn = len(self._shown)
        return "".join(f"{line[:width]}\n" for line in self._shown)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # the stream was closed under us
            self._stop.set()

    def _above(self, text: str) -> None:
        """Another writer's text: printed where the display was, and the display again below it."""
        with self._lock:
            self._write(self._erase() + text + (self._draw() if text.endswith("\n") else ""))


class _Above:
    """The stream a log handler writes to while a terminal display is live (see `LiveDisplay._above`)."""

    def __init__(self, display: LiveDisplay):
        self.display = display

    def write(self, text: str) -> int:
        self.display._above(text)
        return len(text)

    def flush(self) -> None:
        self.display.stream.flush()

    def __getattr__(self, name: str):
        return getattr(self.display.stream, name)
