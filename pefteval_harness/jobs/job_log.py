"""A job's full log, kept in the store: `jobs/<id>/log.txt`, its logging records, warnings and traceback.

A worker collects every logging record of its process from INFO up (pefteval's own, lm-eval's,
transformers' warnings) and Python warnings, redacted (`secrets`), and writes them when each job ends:
done or failed. Cheap: one handler, one file per job, written once. A batch of evaluations shares one
process, so each of its jobs gets the batch's log. A process killed outright (SIGKILL, its node lost)
writes none: Ray's worker logs on that node are then all there is.
"""

from __future__ import annotations

import logging

from pefteval_harness.secrets import RedactingFormatter, redact_handler
from pefteval_harness.store import Store

log = logging.getLogger(__name__)

FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"


def log_path(job_id: str) -> str:
    return f"jobs/{job_id}/log.txt"


class JobLog(logging.Handler):
    """`with JobLog() as job_log:` collects; `job_log.start()` as a job starts, `job_log.save(store, id)` as it ends."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.setFormatter(RedactingFormatter(logging.Formatter(FORMAT)))
        self.lines: list[str] = []
        self._levels: list[tuple[logging.Logger, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:
            self.handleError(record)

    def __enter__(self) -> JobLog:
        root = logging.getLogger()
        # With no handler of its own, the worker printed warnings to stderr (logging's last resort, which
        # a handler here would turn off): printed there still, for Ray's worker logs and `run --verbose`.
        self._stderr = None if root.handlers else redact_handler(logging.StreamHandler())
        if self._stderr:
            self._stderr.setLevel(logging.WARNING)
            root.addHandler(self._stderr)
        root.addHandler(self)
        logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger, so they are kept too
        for name in ("pefteval_harness", "py.warnings"):  # a worker's root logger stops at WARNING
            logger = logging.getLogger(name)
            self._levels.append((logger, logger.level))
            if logger.getEffectiveLevel() > logging.INFO:
                logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeHandler(self)
        if self._stderr:
            logging.getLogger().removeHandler(self._stderr)
        logging.captureWarnings(False)
        for logger, level in self._levels:
            logger.setLevel(level)

    def start(self) -> None:
        self.lines.clear()

    def save(self, store: Store, job_id: str) -> dict:
        """Write the log collected since `start`; {"log": its store path}, or {} if it could not be written."""
        rel = log_path(job_id)
        try:
            store.write_text(rel, "".join(f"{line}\n" for line in self.lines))
        except Exception as e:  # a full disk: the job's own outcome matters more than its log
            log.warning("log of %s not written: %s: %s", job_id, type(e).__name__, e)
            return {}
        return {"log": rel}
