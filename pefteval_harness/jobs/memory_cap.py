"""A job's host memory cap, `resources.memory_gb`, held in the job's own process.

Ray's `memory` resource is only bookkeeping: it keeps Ray from packing more jobs on a node than their
memory_gb add up to, but a job may use more, up to taking its node down. So each worker also watches
itself: a thread samples the resident memory (RSS) of its process and child processes every
`POLL_SECONDS`; over the cap, it raises `MemoryCapExceeded` (a MemoryError: class out_of_memory) in the
job's thread, which fails the job as any error does, with its reason and log. Python delivers that
exception between bytecodes, so a long native call (one torch operation) finishes first. If the process
is still over the cap `GRACE_SECONDS` later (the exception was swallowed, or a native call never
returns), the watchdog kills its process: Ray then reports a lost worker (class killed).

Not an rlimit: RLIMIT_RSS is not enforced by Linux, and RLIMIT_AS / RLIMIT_DATA count address space,
which a Ray worker (the object store's mapping) and torch reserve far beyond what they use.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time

import psutil

from pefteval_harness.errors import MemoryCapExceeded

log = logging.getLogger(__name__)

GiB = 2**30
POLL_SECONDS = 0.2
RAISE_EVERY_SECONDS = 1.0  # again while still over: a library may have swallowed the first one
GRACE_SECONDS = 10.0


def _raise_in(thread_id: int, error: type[BaseException] | None) -> None:
    """Raise `error` in that thread at its next bytecode; None drops one not delivered yet."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(error) if error else None)


def resident_bytes(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # a child that just ended
            pass
    return total


class MemoryCap:
    """`with MemoryCap(resources.memory_gb):` around a job's work in its worker; no cap when None."""

    def __init__(self, memory_gb: float | None):
        self.memory_gb = memory_gb
        self._stop = threading.Event()
        self._lock = threading.Lock()  # raising and leaving never cross: nothing is raised after __exit__
        self._thread: threading.Thread | None = None

    def __enter__(self) -> MemoryCap:
        if self.memory_gb:
            self._target = threading.get_ident()
            self._thread = threading.Thread(target=self._watch, name="pefteval-memory-cap", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            return
        with self._lock:
            self._stop.set()
            _raise_in(self._target, None)
        self._thread.join()

    def _watch(self) -> None:
        process = psutil.Process()
        limit = self.memory_gb * GiB
        over_since = raised = None
        while not self._stop.wait(POLL_SECONDS):
            used = resident_bytes(process)
            if used <= limit:
                over_since = None
                continue
            now = time.monotonic()
            over_since = over_since or now
            if now - over_since > GRACE_SECONDS:
                log.error("still over the memory cap %.0f s after it was raised: killing the process", GRACE_SECONDS)
                os.kill(os.getpid(), signal.SIGKILL)
            if raised is not None and now - raised < RAISE_EVERY_SECONDS:
                continue
            with self._lock:
                if self._stop.is_set():
                    return
                MemoryCapExceeded.detail = (
                    f"the job's process used {used / GiB:.2f} GB of memory, over its cap of"
                    f" {self.memory_gb:g} GB (resources.memory_gb)"
                )
                log.error("%s", MemoryCapExceeded.detail)
                _raise_in(self._target, MemoryCapExceeded)
                raised = now
