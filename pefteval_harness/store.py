"""The store: one folder per job id, results written atomically, a job done iff its status says so.

    OUTPUT/
      spec.yaml, plan.json              the run's spec as given and its plan
      jobs/<job id>/job.json            the job's definition
      jobs/<job id>/artifact/           a model or adapter folder (train, merge, base jobs)
      jobs/<job id>/result.json         train: costs; evaluate: lm-eval's results JSON plus provenance
      jobs/<job id>/status.json         {"state": "done" | "failed", ...}, written last
      leaderboard.md / .csv / .json     written by the report, from the store alone

The report reads nothing else, so a store can be copied, merged or re-reported anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DONE, FAILED = "done", "failed"


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    from lm_eval.utils import handle_non_serializable  # lm-eval's own encoder for its results

    write_atomic(path, json.dumps(obj, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def artifact(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "artifact"

    def status(self, job_id: str) -> dict | None:
        path = self.job_dir(job_id) / "status.json"
        return read_json(path) if path.exists() else None

    def is_done(self, job_id: str) -> bool:
        status = self.status(job_id)
        return bool(status) and status["state"] == DONE

    def result(self, job_id: str) -> dict | None:
        path = self.job_dir(job_id) / "result.json"
        return read_json(path) if path.exists() else None

    @contextmanager
    def staging(self, job_id: str) -> Iterator[Path]:
        """A scratch folder that becomes the job's artifact only if the block finishes."""
        job_dir = self.job_dir(job_id)
        job_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".artifact.", dir=job_dir))
        try:
            yield tmp
            final = self.artifact(job_id)
            if final.exists():  # left by an attempt that died before its status was written
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def record(self, job: dict, state: str, result: dict | None = None, **status: Any) -> None:
        """Write the job's definition, its result, and last its status (the commit point)."""
        job_dir = self.job_dir(job["id"])
        write_json(job_dir / "job.json", job)
        if result is not None:
            write_json(job_dir / "result.json", result)
        write_json(job_dir / "status.json", {"state": state, **status})

    def jobs(self) -> Iterator[tuple[dict, dict]]:
        """(job definition, status) of every job that has a status."""
        for job_dir in sorted((self.root / "jobs").glob("*")):
            if (job_dir / "status.json").exists() and (job_dir / "job.json").exists():
                yield read_json(job_dir / "job.json"), read_json(job_dir / "status.json")
