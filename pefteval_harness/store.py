"""The store: one folder per job id, results written atomically, a job done iff its status says so.

`Store(root)` is a local folder (or a shared one that every node mounts at the same path), or, given an
fsspec URL (`s3://`, `gs://`, `abfs://`, `file://`, `memory://`), a `RemoteStore` on that filesystem, where
artifacts are uploaded from a scratch folder and read from a node-local cache. The layout, what is atomic
where and how claims behave on object storage: docs/store.md. The report reads nothing but the store, so a
store can be copied, merged or re-reported anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

DONE, FAILED = "done", "failed"
# A claim whose holder stopped refreshing it this long ago is stale: that run died, another may take over.
CLAIM_STALE_SECONDS = 120.0
# A file being written is renamed into place within seconds; a temporary one older than this was left by a
# writer that was killed (another run's write under way is younger).
STALE_TEMPORARY_SECONDS = 600.0
_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}$")  # `write_atomic_bytes`': "." + the name + mkstemp's 8 characters
CACHE_ENV = "PEFTEVAL_CACHE"  # where a remote store's artifacts are cached on each node
PLAN, MANIFEST = "plan.json", "artifact.json"
RUNS = "runs"  # runs/<run id>/plan.json and spec.yaml: every run's own

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: the process umask, restored at once


def umask_mode(mode: int) -> int:
    """`mode` as the user's umask allows it: for files and folders made private by mkstemp/mkdtemp (0600/0700)."""
    return mode & ~_UMASK


def _pid_namespace() -> str | None:
    """Two containers may share a hostname but not their pids: a pid is only checked within one namespace."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux
        return None


_HOST, _PID_NS = socket.gethostname(), _pid_namespace()


def write_atomic_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old content or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode(0o644))  # mkstemp makes 0600; results are for everyone the umask allows
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _follow_umask(folder: Path) -> None:
    """Files 0644 and folders 0755 as the umask allows: mkdtemp makes 0700, and some writers (safetensors)
    make 0600, which would hide models from the teammates a shared results folder is for."""
    folder.chmod(umask_mode(0o755))
    for parent, subfolders, files in os.walk(folder):
        for name in subfolders:
            os.chmod(os.path.join(parent, name), umask_mode(0o755))
        for name in files:
            os.chmod(os.path.join(parent, name), umask_mode(0o644))


def write_atomic(path: Path, text: str) -> None:
    write_atomic_bytes(Path(path), text.encode())


def _dump_json(obj: Any) -> str:
    from lm_eval.utils import handle_non_serializable  # lm-eval's own encoder for its results

    return json.dumps(obj, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n"


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, _dump_json(obj))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def _check_plan(plan: Any, where: str) -> dict:
    from pefteval_harness.errors import BadInput
    from pefteval_harness.jobs.types import PLAN_SCHEMA

    schema = plan.get("schema", 1) if isinstance(plan, dict) else 1
    if schema != PLAN_SCHEMA:
        older = isinstance(schema, int) and schema < PLAN_SCHEMA
        raise BadInput(
            f"{where}: written by an {'older' if older else 'unknown or newer'} pefteval (plan schema {schema}); "
            f"this version reads schema {PLAN_SCHEMA}: rerun into a new --output folder"
        )
    return plan


def _parse_plan(text: bytes | str, where: str) -> dict:
    from pefteval_harness.errors import BadInput

    try:
        plan = json.loads(text)
    except ValueError as e:
        raise BadInput(f"{where}: not a readable plan ({type(e).__name__}: {e})") from None
    return _check_plan(plan, where)


def new_run_id() -> str:
    """Its start (UTC, so that run ids sort by time), host, pid and a random part."""
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{started}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://|::")  # a scheme (two letters at least: not a drive), or a chain


def is_url(root: str | Path) -> bool:
    return isinstance(root, str) and bool(_URL.search(root))


def _process_start(pid: int) -> int | None:
    """When a process started (clock ticks since boot, from /proc; None where there is none): with its pid,
    it names one process, even after the pid is given to another."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])  # field 22; the command name in (...) may hold spaces


def _claim_record(owner: str) -> bytes:
    pid = os.getpid()
    record = {"owner": owner, "host": _HOST, "pid": pid, "pid_ns": _PID_NS, "started": _process_start(pid)}
    return json.dumps({**record, "time": time.time()}).encode()


def _holder_died_here(record: dict) -> bool:
    """The claim's holder ran on this host (same pid namespace) and its process is gone: its run died. A
    process with its pid but another start time took the pid over after the holder died."""
    pid = record.get("pid")
    if record.get("host") != _HOST or record.get("pid_ns") != _PID_NS or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    started = record.get("started")
    return started is not None and _process_start(pid) not in (None, started)


class Store:
    """A results folder on this machine's filesystem (shared ones included: same mount path on every node).

    `Store(url)` with an fsspec URL makes a `RemoteStore`; both have the same interface. Paths below the root
    are given relative to it ("jobs/<id>/status.json")."""

    local = True  # artifacts are folders of the store itself: no upload, no cache
    shared_across_processes = True

    def __new__(cls, root: str | Path | None = None):
        if cls is Store and root is not None and is_url(root):
            cls = RemoteStore
        return super().__new__(cls)

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __reduce__(self):  # a Store pickles as its url: Store(url) again on the other side
        return Store, (self.url,)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    @property
    def url(self) -> str:
        """What `Store(...)` accepts again: what a Ray task is given."""
        return str(self.root)

    def location(self, rel: str = "") -> str:
        """A path below the root as users would type it (messages, the run's summary line)."""
        return str(self.root / rel) if rel else self.url

    # --- files below the root -----------------------------------------------------------------------------

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            return (self.root / rel).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Readers see the old content or the new one, never a torn one."""
        write_atomic_bytes(self.root / rel, data)

    def exists(self, rel: str = "") -> bool:
        return (self.root / rel).exists()

    def is_folder(self, rel: str = "") -> bool:
        return (self.root / rel).is_dir()

    def delete(self, rel: str) -> None:
        (self.root / rel).unlink(missing_ok=True)

    def listdir(self, rel: str) -> list[str]:
        """Names in a folder, sorted; none if it does not exist."""
        try:
            return sorted(p.name for p in (self.root / rel).iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def find(self, suffix: str, skip: str) -> list[str]:
        """Files ending in `suffix` below the root, outside every folder named `skip`; sorted."""
        found = []
        for folder, subfolders, files in os.walk(self.root):
            subfolders[:] = sorted(d for d in subfolders if d != skip)
            found += [str((Path(folder) / f).relative_to(self.root)) for f in files if f.endswith(suffix)]
        return sorted(found)

    def _read_many(self, rels: list[str]) -> dict[str, bytes]:
        """The contents of those of `rels` that exist (one request for all on an object store)."""
        found = {rel: self.read_bytes(rel) for rel in rels}
        return {rel: data for rel, data in found.items() if data is not None}

    def read_text(self, rel: str) -> str | None:
        data = self.read_bytes(rel)
        return None if data is None else data.decode()

    def write_text(self, rel: str, text: str) -> None:
        """Every text and JSON file goes through here: no secret-looking environment value is written."""
        from pefteval_harness.secrets import redact

        self.write_bytes(rel, redact(text).encode())

    def read_json(self, rel: str) -> Any:
        data = self.read_bytes(rel)
        return None if data is None else json.loads(data)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_text(rel, _dump_json(obj))

    def plan(self) -> dict | None:
        """The run's plan.json (None before the first run), refused with one line if another version wrote it."""
        data = self.read_bytes(PLAN)
        return None if data is None else _parse_plan(data, self.location(PLAN))

    # --- jobs ---------------------------------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def artifact(self, job_id: str) -> Path:
        """The artifact folder in a local store (readers of any store: `local_artifact`)."""
        return self.job_dir(job_id) / "artifact"

    def status(self, job_id: str) -> dict | None:
        return self.read_json(f"jobs/{job_id}/status.json")

    def is_done(self, job_id: str) -> bool:
        status = self.status(job_id)
        return bool(status) and status["state"] == DONE

    def result(self, job_id: str) -> dict | None:
        return self.read_json(f"jobs/{job_id}/result.json")

    def write_progress(self, job_id: str, progress: dict) -> None:
        """A running job's own progress (training step, evaluation requests), for `pefteval status`."""
        self.write_json(f"jobs/{job_id}/progress.json", {**progress, "time": time.time()})

    def progress(self, job_id: str) -> dict | None:
        try:
            return self.read_json(f"jobs/{job_id}/progress.json")
        except (OSError, ValueError):  # being replaced this instant (a shared filesystem), or unreadable
            return None

    def record(self, job: dict, state: str, result: dict | None = None, **status: Any) -> None:
        """Write the job's definition, its result, and last its status (the commit point)."""
        job_dir = f"jobs/{job['id']}"
        self.write_json(f"{job_dir}/job.json", job)
        if result is not None:
            self.write_json(f"{job_dir}/result.json", result)
        self.write_json(f"{job_dir}/status.json", {"state": state, **status})
        self.remove_leftovers(job["id"])

    def remove_stale_temporaries(self, folders: tuple[str, ...] = ("", "plots")) -> None:
        """Delete the temporary files that writers killed while writing the run's own files (the plan, the
        reports, the plots) left there, once older than STALE_TEMPORARY_SECONDS. A job's folder is its
        holder's to clean (`remove_leftovers`)."""
        for folder in folders:
            for name in self.listdir(folder):
                rel = f"{folder}/{name}" if folder else name
                # An age of inf: gone meanwhile (renamed into place), or a filesystem that keeps no times.
                if self._is_temporary(name) and STALE_TEMPORARY_SECONDS < self._file_age(rel) < float("inf"):
                    self.delete(rel)

    @staticmethod
    def _is_temporary(name: str) -> bool:
        return bool(_TEMPORARY.match(name))

    def remove_leftovers(self, job_id: str) -> None:
        """Delete what killed attempts of the job left in its folder: temporary files and staging folders
        (their names start with a dot; nothing else's does). Called by the job's holder only: as its
        attempt starts building an artifact, and once it is recorded. A claim being written by another run
        this instant (".claim.<random>") is not a leftover (`_claim_being_written`)."""
        for entry in self.job_dir(job_id).glob(".*"):
            if entry.name.startswith(".claim.") and self._claim_being_written(f"jobs/{job_id}/{entry.name}"):
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def _claim_being_written(self, rel: str) -> bool:
        """A claim written aside (`_create_exclusive`) by a run that may still link it in place: younger than
        CLAIM_STALE_SECONDS, and not one whose writer died on this host (killed between writing and
        linking it: the same test as for a claim's holder)."""
        if self._file_age(rel) > CLAIM_STALE_SECONDS:
            return False
        try:
            record = json.loads(self.read_bytes(rel) or b"")
        except ValueError:  # being written
            return True
        return not (isinstance(record, dict) and _holder_died_here(record))

    def jobs(self) -> Iterator[tuple[dict, dict]]:
        """(job definition, status) of every job that has a status."""
        ids = self.listdir("jobs")
        found = self._read_many([f"jobs/{i}/{name}" for i in ids for name in ("job.json", "status.json")])
        for job_id in ids:
            job, status = found.get(f"jobs/{job_id}/job.json"), found.get(f"jobs/{job_id}/status.json")
            if job is not None and status is not None:
                yield json.loads(job), json.loads(status)

    # --- artifacts: written once through `staging`, read through `local_artifact` -------------------------

    @contextmanager
    def staging(self, job_id: str) -> Iterator[Path]:
        """A scratch folder that becomes the job's artifact only if the block finishes."""
        job_dir = self.job_dir(job_id)
        job_dir.mkdir(parents=True, exist_ok=True)
        self.remove_leftovers(job_id)  # a killed attempt's staging folder may hold a whole model
        tmp = Path(tempfile.mkdtemp(prefix=".artifact.", dir=job_dir))
        try:
            yield tmp
            _follow_umask(tmp)
            final = self.artifact(job_id)
            if final.exists():  # left by an attempt that died before its status was written
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def local_artifact(self, job_id: str) -> Path:
        """A local folder with the job's artifact: in a local store, the store's own."""
        return self.artifact(job_id)

    def delete_artifact(self, job_id: str) -> None:
        """Delete a done job's artifact to save disk, and say so in its status (its result is kept).

        The status is rewritten first: a crash in between leaves a status that says "deleted" over a
        folder that is still there (rebuilt if needed), never the other way round."""
        status = self.status(job_id)
        if not status or status["state"] != DONE or status.get("artifact_deleted"):
            return
        self.write_json(f"jobs/{job_id}/status.json", {**status, "artifact_deleted": True})
        self._delete_artifact_files(job_id)

    def _delete_artifact_files(self, job_id: str) -> None:
        shutil.rmtree(self.artifact(job_id), ignore_errors=True)

    def artifact_deleted(self, job_id: str) -> bool:
        status = self.status(job_id)
        return bool(status and status.get("artifact_deleted"))

    # --- claims: two runs sharing a store never run the same job at once --------------------------------

    def claim(self, job_id: str, owner: str) -> bool:
        """Take the job for `owner` (a run id); False if another live run holds it.

        The claim is a file created exclusively; its holder refreshes it (`refresh_claims`) while it works,
        so a claim left by a run that died goes stale and is taken over: at once when the holder ran on
        this host and its process is gone, else after CLAIM_STALE_SECONDS without a refresh.
        """
        rel = f"jobs/{job_id}/claim"
        if self._create_exclusive(rel, _claim_record(owner)):
            return True
        record = self._claim(job_id)
        if record is None:
            # Unreadable: another run created it and is writing it this instant (recent), or died doing so.
            if self.exists(rel) and self._file_age(rel) <= CLAIM_STALE_SECONDS:
                return False
        elif record["owner"] == owner:
            return True
        elif not self._is_stale(job_id, record):
            return False
        # A stale claim: take it over, then check nobody else did too. Two runs taking over the same
        # stale claim in the same instant may both read their own record back (rare; not locked).
        self.write_bytes(rel, _claim_record(owner))
        return self.claim_holder(job_id) == owner

    def claim_holder(self, job_id: str) -> str | None:
        record = self._claim(job_id)
        return record.get("owner") if record else None

    def claim_is_live(self, job_id: str) -> bool:
        record = self._claim(job_id)
        return record is not None and not self._is_stale(job_id, record)

    def refresh_claims(self, job_ids: list[str], owner: str) -> None:
        for job_id in job_ids:
            if self.claim_holder(job_id) == owner:
                self._refresh(job_id, owner)

    def release(self, job_id: str, owner: str) -> None:
        if self.claim_holder(job_id) == owner:
            self.delete(f"jobs/{job_id}/claim")

    def _claim(self, job_id: str) -> dict | None:
        try:
            record = self.read_json(f"jobs/{job_id}/claim")
        except (OSError, ValueError):  # being created this instant
            return None
        return record if isinstance(record, dict) and "owner" in record else None

    def _is_stale(self, job_id: str, record: dict) -> bool:
        return _holder_died_here(record) or self._claim_age(job_id, record) > CLAIM_STALE_SECONDS

    def _create_exclusive(self, rel: str, data: bytes) -> bool:
        """Whole or not at all: the record is written under a temporary name, then hard-linked to `rel`,
        which fails if `rel` exists. (Created empty, then written, a claim whose writer was killed in
        between stays unreadable, so "live", for CLAIM_STALE_SECONDS: the fallback where a filesystem
        has no hard links.)"""
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, umask_mode(0o644))
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some network and FUSE filesystems)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, umask_mode(0o644))
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return self.read_bytes(rel) == data  # not taken over while it was empty (see `claim`)
        finally:
            os.unlink(tmp)

    def _file_age(self, rel: str) -> float:
        try:
            return time.time() - (self.root / rel).stat().st_mtime
        except FileNotFoundError:
            return float("inf")

    def _claim_age(self, job_id: str, record: dict) -> float:
        """Since the claim file's last touch (the holder's heartbeat: `os.utime`)."""
        return self._file_age(f"jobs/{job_id}/claim")

    def _refresh(self, job_id: str, owner: str) -> None:
        os.utime(self.job_dir(job_id) / "claim")


# Filesystems where one put replaces a whole object (readers see the old or the new one) and folders do not
# exist. Any other fsspec filesystem (file://, sftp, hdfs, ...) writes in place: a temporary name, then a
# rename, and folders made first.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oci", "memory"})
# Filesystems only this process sees: a run's Ray workers could not write into them.
PROCESS_LOCAL = frozenset({"memory"})
# Options for `fsspec.url_to_fs` by protocol: a local filesystem makes parent folders as it writes.
STORAGE_OPTIONS = {"file": {"auto_mkdir": True}, "local": {"auto_mkdir": True}}
_PROCESS_LOCK = threading.Lock()
_TMP_SUFFIX = ".tmp"  # a remote store's file being written: "<name>.<random>.tmp", renamed when whole


def cache_root() -> Path:
    """Where this node keeps remote stores' artifacts: $PEFTEVAL_CACHE, else ~/.cache/pefteval/artifacts."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pefteval" / "artifacts").expanduser()


class RemoteStore(Store):
    """A store on any fsspec filesystem. JSON files are one put each; artifacts are uploaded from a local
    scratch folder once the job's block finishes and read from a node-local cache (`local_artifact`)."""

    local = False

    def __init__(self, root: str):
        import fsspec
        from fsspec.core import split_protocol

        from pefteval_harness.errors import BadInput

        self._url = root.rstrip("/")
        protocol = split_protocol(self._url)[0] or "file"
        try:
            self.fs, path = fsspec.core.url_to_fs(self._url, **STORAGE_OPTIONS.get(protocol, {}))
        except ImportError as e:  # fsspec names the package: "Install s3fs to access S3"
            raise BadInput(f"{root}: {e} (needed on the driver and on every Ray node)") from None
        except ValueError as e:
            raise BadInput(f"{root}: not a store location fsspec can open ({e})") from None
        self._path = path.rstrip("/")
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        if protocol == "file":  # file://relative/path: absolute, as a local path is, for workers elsewhere
            self._url = f"file://{self._path}"
        self.object_store = bool(protocols & OBJECT_STORES)
        self.shared_across_processes = not protocols & PROCESS_LOCAL
        self.root = self._url  # str(store.root) is a URL Store() accepts again, as for a local store

    @property
    def url(self) -> str:
        return self._url

    def location(self, rel: str = "") -> str:
        return f"{self._url}/{rel}" if rel else self._url

    def _abs(self, rel: str) -> str:
        return f"{self._path}/{rel}" if rel else self._path

    def job_dir(self, job_id: str) -> str:  # type: ignore[override]  # a location on the filesystem, not a Path
        return self.location(f"jobs/{job_id}")

    def artifact(self, job_id: str) -> Path:
        raise TypeError(f"{self.url}: a remote store's artifact is not a local folder: use local_artifact({job_id!r})")

    # --- files ----------------------------------------------------------------------------------------------

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._abs(rel))
        except FileNotFoundError:
            return None

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self._abs(rel)
        if self.object_store:
            self.fs.pipe_file(path, data)  # one put: atomic for readers
            return
        tmp = f"{path}.{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}"
        self.fs.pipe_file(tmp, data)
        try:
            self.fs.mv(tmp, path)  # a rename on a filesystem with folders
        except BaseException:
            self.fs.rm_file(tmp)
            raise

    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self._abs(rel))

    def remove_leftovers(self, job_id: str) -> None:
        """Temporary files of killed writers (filesystems with folders; an object store's puts leave none).
        A killed upload's files are replaced by the next one (`_upload`)."""
        if self.object_store:
            return
        for name in self.listdir(f"jobs/{job_id}"):
            if self._is_temporary(name):
                self.delete(f"jobs/{job_id}/{name}")

    def remove_stale_temporaries(self, folders: tuple[str, ...] = ("", "plots")) -> None:
        if not self.object_store:  # a put leaves nothing behind
            super().remove_stale_temporaries(folders)

    @staticmethod
    def _is_temporary(name: str) -> bool:
        return name.endswith(_TMP_SUFFIX)

    def is_folder(self, rel: str = "") -> bool:  # on an object store: a prefix with objects below it
        return self.fs.isdir(self._abs(rel))

    def delete(self, rel: str) -> None:
        try:
            self.fs.rm_file(self._abs(rel))
        except FileNotFoundError:
            pass

    def listdir(self, rel: str) -> list[str]:
        try:
            entries = self.fs.ls(self._abs(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def find(self, suffix: str, skip: str) -> list[str]:
        found = []
        for folder, subfolders, files in self.fs.walk(self._path):
            subfolders[:] = sorted(d for d in subfolders if d != skip)
            found += [f"{folder}/{f}"[len(self._path) + 1 :] for f in files if f.endswith(suffix)]
        return sorted(found)

    def _read_many(self, rels: list[str]) -> dict[str, bytes]:
        if not rels:
            return {}
        found = self.fs.cat([self._abs(rel) for rel in rels], on_error="omit")
        by_path = {self.fs._strip_protocol(p): data for p, data in found.items()}
        return {rel: by_path[self._abs(rel)] for rel in rels if self._abs(rel) in by_path}

    def put_folder(self, local: Path, rel: str) -> None:
        """Make the store's folder `rel` hold exactly the files of the local folder (the report's plots)."""
        files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        for name in files:
            self.write_bytes(f"{rel}/{name}", (local / name).read_bytes())
        for name in set(self.listdir(rel)) - {f.split("/")[0] for f in files}:
            self.fs.rm(self._abs(f"{rel}/{name}"), recursive=True)

    # --- artifacts ------------------------------------------------------------------------------------------

    def _cache_dir(self, job_id: str) -> Path:
        return cache_root() / hashlib.sha256(self._url.encode()).hexdigest()[:16] / job_id

    @contextmanager
    def staging(self, job_id: str) -> Iterator[Path]:
        """A local scratch folder, uploaded as the job's artifact only if the block finishes.

        The files go first, then the manifest (jobs/<id>/artifact.json, what readers download); the
        job's status, written after, is the commit. The staged folder then becomes this node's cached
        copy (a rename), since the next jobs to read it often run here."""
        scratch = cache_root() / ".staging"
        scratch.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{job_id}.", dir=scratch))
        try:
            yield tmp
            self._upload(job_id, tmp)
            cached = self._cache_dir(job_id)
            if not cached.exists():
                cached.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.rename(tmp, cached)
                except OSError:  # another process on this node cached it first, or another disk: keep theirs
                    pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _upload(self, job_id: str, folder: Path) -> None:
        files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
        # An attempt that died after uploading left a manifest: removed first, so no reader trusts the
        # folder while it is replaced.
        self.delete(f"jobs/{job_id}/{MANIFEST}")
        self._delete_remote_folder(f"jobs/{job_id}/artifact")
        remote = self._abs(f"jobs/{job_id}/artifact")
        if files:
            self.fs.put([str(folder / f) for f in files], [f"{remote}/{f}" for f in files])
        self.write_json(f"jobs/{job_id}/{MANIFEST}", {"files": files})

    def _delete_remote_folder(self, rel: str) -> None:
        if self.fs.exists(self._abs(rel)):
            self.fs.rm(self._abs(rel), recursive=True)

    def local_artifact(self, job_id: str) -> Path:
        """The job's artifact in this node's cache, downloaded on first use.

        Downloaded into a temporary folder next to the cache entry and renamed into place, so concurrent
        readers on one node end with one whole copy (a loser of the rename uses the winner's)."""
        final = self._cache_dir(job_id)
        if final.is_dir():
            return final
        manifest = self.read_json(f"jobs/{job_id}/{MANIFEST}")
        if manifest is None:
            raise FileNotFoundError(f"{self.location(f'jobs/{job_id}/artifact')}: no artifact (not built, or deleted)")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{job_id}.", dir=final.parent))
        try:
            files = manifest["files"]
            remote = self._abs(f"jobs/{job_id}/artifact")
            if files:
                self.fs.get([f"{remote}/{f}" for f in files], [str(tmp / f) for f in files])
            for name, size in files.items():
                if (tmp / name).stat().st_size != size:
                    raise OSError(f"{remote}/{name}: downloaded {(tmp / name).stat().st_size} bytes, expected {size}")
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _delete_artifact_files(self, job_id: str) -> None:
        self.delete(f"jobs/{job_id}/{MANIFEST}")
        self._delete_remote_folder(f"jobs/{job_id}/artifact")
        shutil.rmtree(self._cache_dir(job_id), ignore_errors=True)

    # --- claims ---------------------------------------------------------------------------------------------

    def _create_exclusive(self, rel: str, data: bytes) -> bool:
        """Exclusive create where the filesystem has one (`xb`: local files, memory, and object stores with
        conditional writes), then the record read back.

        Where `xb` is not exclusive, or not supported, this is check-then-write: two runs that both find no
        claim and write theirs within the same instant may each read their own record back and both run the
        job (docs/store.md). Its result is the same; the cost is the duplicate work."""
        path = self._abs(rel)
        # memory://'s `xb` checks, then creates: between threads, only a lock makes it exclusive.
        with _PROCESS_LOCK if not self.shared_across_processes else nullcontext():
            if self.fs.exists(path):
                return False
            try:
                with self.fs.open(path, "xb") as f:
                    f.write(data)
            except FileExistsError:
                return False
            except (ValueError, NotImplementedError):  # no exclusive mode here: plain write, read back below
                self.write_bytes(rel, data)
        return self.read_bytes(rel) == data

    def _file_age(self, rel: str) -> float:
        try:
            modified = self.fs.modified(self._abs(rel))
        except (FileNotFoundError, NotImplementedError):
            return float("inf")
        return time.time() - modified.timestamp()

    def _claim_age(self, job_id: str, record: dict) -> float:
        """Since the holder last wrote its record (object stores have no mtime to touch: the heartbeat
        rewrites the record with its time). Hosts' clocks must agree to well within CLAIM_STALE_SECONDS."""
        written = record.get("time")
        return time.time() - written if isinstance(written, (int, float)) else float("inf")

    def _refresh(self, job_id: str, owner: str) -> None:
        self.write_bytes(f"jobs/{job_id}/claim", _claim_record(owner))
