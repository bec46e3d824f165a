"""The store: one folder per job id, results written atomically, a job done iff its status says so.

    OUTPUT/
      spec.yaml, plan.json              the run's spec as given and its plan
      jobs/<job id>/job.json            the job's definition
      jobs/<job id>/artifact/           a model or adapter folder (train, merge, base jobs)
      jobs/<job id>/result.json         train: costs; evaluate: lm-eval's results JSON plus provenance
      jobs/<job id>/status.json         {"state": "done" | "failed", ...}, written last; "artifact_deleted"
                                        when a merge made with `keep_model: false` was deleted once scored
      jobs/<job id>/claim               which run is working on the job (two runs may share a store)
      leaderboard.md / .csv / .json     written by the report, from the store alone

The report reads nothing else, so a store can be copied, merged or re-reported anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DONE, FAILED = "done", "failed"
# A claim whose holder stopped refreshing it this long ago is stale: that run died, another may take over.
CLAIM_STALE_SECONDS = 120.0


_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: the process umask, restored at once


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that readers see the old content or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644 & ~_UMASK)  # mkstemp makes 0600; results are for everyone the umask allows
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    from lm_eval.utils import handle_non_serializable  # lm-eval's own encoder for its results

    write_atomic(path, json.dumps(obj, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def read_plan(path: Path) -> dict:
    """plan.json of the schema this version reads; an older (or newer) one is refused with one line."""
    from pefteval_harness.errors import BadInput
    from pefteval_harness.jobs.types import PLAN_SCHEMA

    try:
        plan = read_json(path)
    except (OSError, ValueError) as e:
        raise BadInput(f"{path}: not a readable plan ({type(e).__name__}: {e})") from None
    schema = plan.get("schema", 1) if isinstance(plan, dict) else 1
    if schema != PLAN_SCHEMA:
        older = isinstance(schema, int) and schema < PLAN_SCHEMA
        raise BadInput(
            f"{path}: written by an {'older' if older else 'unknown or newer'} pefteval (plan schema {schema}); "
            f"this version reads schema {PLAN_SCHEMA}: rerun into a new --output folder"
        )
    return plan


def check_store_schema(root: Path) -> None:
    """Refuse a results folder whose plan.json another pefteval version wrote (its records differ)."""
    if (Path(root) / "plan.json").exists():
        read_plan(Path(root) / "plan.json")


def new_run_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


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

    def delete_artifact(self, job_id: str) -> None:
        """Delete a done job's artifact to save disk, and say so in its status (its result is kept).

        The status is rewritten first: a crash in between leaves a status that says "deleted" over a
        folder that is still there (rebuilt if needed), never the other way round."""
        status = self.status(job_id)
        if not status or status["state"] != DONE or status.get("artifact_deleted"):
            return
        write_json(self.job_dir(job_id) / "status.json", {**status, "artifact_deleted": True})
        shutil.rmtree(self.artifact(job_id), ignore_errors=True)

    def artifact_deleted(self, job_id: str) -> bool:
        status = self.status(job_id)
        return bool(status and status.get("artifact_deleted"))

    # --- claims: two runs sharing a store never run the same job at once --------------------------------

    def _claim_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "claim"

    def claim(self, job_id: str, owner: str) -> bool:
        """Take the job for `owner` (a run id); False if another live run holds it.

        The claim is a file created exclusively; its holder refreshes its mtime (`refresh_claims`) while
        it works, so a claim left by a run that died goes stale and is taken over.
        """
        path = self._claim_path(job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"owner": owner, "host": socket.gethostname(), "pid": os.getpid()})
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = self.claim_holder(job_id)
            if holder == owner:
                return True
            if holder is not None and not self._claim_is_stale(path):
                return False
            # A stale claim: take it over, then check nobody else did too. Two runs taking over the same
            # stale claim in the same instant may both read their own record back (rare; not locked).
            write_atomic(path, record)
            return self.claim_holder(job_id) == owner
        with os.fdopen(fd, "w") as f:
            f.write(record)
        return True

    def claim_holder(self, job_id: str) -> str | None:
        try:
            return json.loads(self._claim_path(job_id).read_text())["owner"]
        except (OSError, ValueError, KeyError):
            return None

    def _claim_is_stale(self, path: Path) -> bool:
        try:
            return time.time() - path.stat().st_mtime > CLAIM_STALE_SECONDS
        except FileNotFoundError:
            return True

    def claim_is_live(self, job_id: str) -> bool:
        return self.claim_holder(job_id) is not None and not self._claim_is_stale(self._claim_path(job_id))

    def refresh_claims(self, job_ids: list[str], owner: str) -> None:
        for job_id in job_ids:
            if self.claim_holder(job_id) == owner:
                os.utime(self._claim_path(job_id))

    def release(self, job_id: str, owner: str) -> None:
        if self.claim_holder(job_id) == owner:
            self._claim_path(job_id).unlink(missing_ok=True)

    def jobs(self) -> Iterator[tuple[dict, dict]]:
        """(job definition, status) of every job that has a status."""
        for job_dir in sorted((self.root / "jobs").glob("*")):
            if (job_dir / "status.json").exists() and (job_dir / "job.json").exists():
                yield read_json(job_dir / "job.json"), read_json(job_dir / "status.json")
