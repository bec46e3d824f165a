"""Errors that the CLI turns into exit codes (2 = bad input, 1 = runtime failure), and the classes of a
failed job (`FAILURE_CLASSES`: what the runner retries, what `pefteval status` and the leaderboard show)."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass


class BadInput(Exception):
    """A spec, config or argument is wrong. The message is one line naming what and where.

    Raised before anything is written; the CLI prints it without a traceback and exits with 2.
    """


class JobFailed(RuntimeError):
    """A job failed after its retries; the store records the reason and a rerun resumes."""


class MemoryCapExceeded(MemoryError):
    """Raised in a job's thread when its process outgrew the job's `resources.memory_gb` (`jobs.memory_cap`)."""

    detail = "the job's memory cap"  # set by the watchdog before it raises (an async exception takes no arguments)

    def __init__(self, *args):
        super().__init__(*(args or (self.detail,)))


@dataclass(frozen=True)
class FailureClass:
    description: str
    retried: bool  # by the driver, up to `max_retries`; the others would only fail again
    retries: str  # what the README and the docs say about its retries


FAILURE_CLASSES: dict[str, FailureClass] = {
    "bad_input": FailureClass("the job's input is wrong (BadInput)", False, "never"),
    "out_of_memory": FailureClass(
        "MemoryError, torch's allocator, Ray's OutOfMemoryError, or the job's memory cap (resources.memory_gb)",
        False,
        "never: the same job under the same cap needs the same memory (Ray retries its own OOM kills first)",
    ),
    "out_of_disk": FailureClass(
        "no space left on the device, or a file-size limit (OSError ENOSPC / EFBIG)",
        False,
        "never: the disk stays full until someone frees it; the next run resumes",
    ),
    "timeout": FailureClass("still running after its kind's timeout_minutes", False, "never"),
    "killed": FailureClass(
        "its process or node died (SIGKILL, Ray's WorkerCrashedError, NodeDiedError...)",
        False,
        "by Ray, up to max_retries, before it is recorded",
    ),
    "upstream": FailureClass("a job it reads failed", False, "never"),
    "error": FailureClass("anything else", True, "up to max_retries"),
}


def failure_classes_legend(classes) -> str:
    """What the classes shown mean and how they are retried: one line each, for `pefteval status` and the report."""
    shown = sorted({c for c in classes if c in FAILURE_CLASSES})
    return "\n".join(f"- {c}: {FAILURE_CLASSES[c].description}; retried: {FAILURE_CLASSES[c].retries}" for c in shown)


_MEMORY_MESSAGES = ("can't allocate memory", "out of memory")  # torch's CPU allocator; CUDA's
_DISK_ERRNOS = (errno.ENOSPC, errno.EFBIG)
# Writers in other languages raise their own errors with the OS message (safetensors: "File too large (os error 27)").
_DISK_MESSAGES = tuple(os.strerror(code) for code in _DISK_ERRNOS)


# transformers refusing a model's own code (trust_remote_code off): only a changed spec can help.
_BAD_INPUT_MESSAGES = ("trust_remote_code=True",)


def failure_class(error: BaseException) -> str:
    """The class of a job's exception: its own type, or the error it was raised from or while handling."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, BadInput):
            return "bad_input"
        text = str(error)
        if isinstance(error, ValueError) and any(m in text for m in _BAD_INPUT_MESSAGES):
            return "bad_input"
        if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
            return "out_of_memory"
        if isinstance(error, RuntimeError) and any(m in text for m in _MEMORY_MESSAGES):
            return "out_of_memory"
        if isinstance(error, OSError) and error.errno in _DISK_ERRNOS:
            return "out_of_disk"
        if any(m in text for m in _DISK_MESSAGES):
            return "out_of_disk"
        # As a traceback shows the chain: `raise ... from e`, else the error being handled, unless suppressed.
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return "error"
