"""Failures classified, logs kept, no secret written (issue 10).

One `pefteval run` does it all, as a user runs it, with two planted secrets in its environment:
- a LoRA whose adapter (560 KB) is over the file-size limit its Ray workers run under: out_of_disk;
- a LoRA capped at 50 MB of memory (resources.memory_gb), which any worker is over: out_of_memory;
- a LoRA whose spec names a module after a secret, so that its error (and log) would say it: error,
  retried once; the other two classes are never retried.
The same spec less those two, run again without the limit, then completes the big LoRA. Every file of
the store, artifacts included, and everything printed, is then searched for the secrets.

The file-size limit is a real RLIMIT_FSIZE, set in the Ray workers only (by a sitecustomize on their
PYTHONPATH): set on `pefteval run` itself, it is inherited by its local Ray's raylet, which dies creating
its object store (a /dev/shm file of GBs: SIGXFSZ). Python ignores SIGXFSZ, so a worker's write past the
limit fails with EFBIG, as on a full disk with ENOSPC.
"""

from __future__ import annotations

import errno
import json
import os
import secrets as random_secrets
import signal
import subprocess
import threading
import time

import pytest

from pefteval_harness.store import Store
from tests.conftest import PEFTEVAL, REPO
from tests.test_pipeline import pefteval_here

FILE_SIZE_LIMIT = 200_000  # bytes: over every JSON file and log a job writes here, under the big adapter

SITECUSTOMIZE = f"""\
import resource
import sys

if sys.argv and sys.argv[0].endswith("default_worker.py"):  # Ray's workers only: not its raylet
    resource.setrlimit(resource.RLIMIT_FSIZE, ({FILE_SIZE_LIMIT}, {FILE_SIZE_LIMIT}))
"""

SPEC = """\
name: failures
base_model: {model}
train: {{tasks: [pefteval_quick_sentiment], max_steps: 2, batch_size: 4}}
finetunes:
  big: {{method: lora, config: {{r: 64, target_modules: all-linear}}}}
{others}
evaluate: {{tasks: [pefteval_quick_sentiment], limit: 4}}
resources: {{max_retries: 1}}
"""
OTHERS = """\
  capped: {{method: lora, config: {{r: 4}}, resources: {{memory_gb: 0.05}}}}
  leaky: {{method: lora, config: {{r: 4, target_modules: [{secret}]}}}}
"""


# --- classes, redaction, the memory cap: in this process ------------------------------------------------------


def test_exceptions_are_classified():
    import torch

    from pefteval_harness.errors import BadInput, failure_class

    try:
        torch.empty(2**50, dtype=torch.uint8)  # a petabyte: torch's CPU allocator refuses
    except RuntimeError as e:
        allocation = e
    disk_full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    try:
        try:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        except OSError as e:
            raise RuntimeError("could not save the model") from e
    except RuntimeError as e:
        wrapped = e
    try:
        try:
            raise MemoryError
        except MemoryError:
            raise ValueError("unrelated") from None  # the context is suppressed: not a memory error
    except ValueError as e:
        suppressed = e
    assert failure_class(allocation) == "out_of_memory", allocation
    assert failure_class(MemoryError()) == "out_of_memory"
    assert failure_class(disk_full) == "out_of_disk"
    assert failure_class(wrapped) == "out_of_disk"
    assert failure_class(BadInput("spec.yaml: train.epochs: not a number")) == "bad_input"
    assert failure_class(suppressed) == "error"
    assert failure_class(KeyError("x")) == "error"


def test_secret_values_are_redacted_from_store_files_and_logs(tmp_path, monkeypatch):
    import logging

    from pefteval_harness.secrets import REDACTED, RedactingFormatter, redact

    token, key, password = "hf_" + random_secrets.token_hex(8), random_secrets.token_hex(8), "correct horse"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("my_api_key", key)  # any case
    monkeypatch.setenv("DB_PASSWORD", password)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # a short value: a flag, not a secret
    text = f"{token} {key} {password} false"
    assert redact(text) == f"{REDACTED} {REDACTED} {REDACTED} false"

    Store(tmp_path).write_json("jobs/x/status.json", {"reason": f"401 for token {token}"})
    assert json.loads((tmp_path / "jobs/x/status.json").read_text())["reason"] == f"401 for token {REDACTED}"
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "key %s", (key,), None)
    assert RedactingFormatter(logging.Formatter("%(message)s")).format(record) == f"key {REDACTED}"


def test_the_memory_cap_fails_the_job_in_its_own_thread_and_stops_with_it():
    from pefteval_harness.errors import MemoryCapExceeded, failure_class
    from pefteval_harness.jobs.memory_cap import MemoryCap

    start = time.monotonic()
    with pytest.raises(MemoryCapExceeded) as caught, MemoryCap(0.001):  # 1 MB: this process is far over it
        while time.monotonic() - start < 10:
            time.sleep(0.01)
    assert time.monotonic() - start < 2
    assert "over its cap of 0.001 GB (resources.memory_gb)" in str(caught.value)
    assert failure_class(caught.value) == "out_of_memory"
    assert not [t for t in threading.enumerate() if t.name == "pefteval-memory-cap"]
    time.sleep(0.5)  # nothing raised after the block: this would fail here
    with MemoryCap(None):  # no cap, no thread
        assert not [t for t in threading.enumerate() if t.name == "pefteval-memory-cap"]


# --- the run ------------------------------------------------------------------------------------------------


def _run(args: list, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """`pefteval ARGS` in its own session; on a timeout, it and its local Ray are killed, only they."""
    process = subprocess.Popen(
        [*PEFTEVAL, *map(str, args)], cwd=REPO, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.mark.slow  # a run of a small spec with its own local Ray, then one on the session's
def test_failures_are_classified_with_logs_the_disk_job_resumes_and_no_secret_is_written(
    tiny_model_dir, local_ray, tmp_path
):
    secret_values = ["hf_" + random_secrets.token_hex(12), random_secrets.token_hex(12)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HF_TOKEN=secret_values[0], MY_API_KEY=secret_values[1])
    spec, big_only = tmp_path / "spec.yaml", tmp_path / "big.yaml"
    spec.write_text(SPEC.format(model=tiny_model_dir, others=OTHERS.format(secret=secret_values[1])))
    big_only.write_text(SPEC.format(model=tiny_model_dir, others=""))  # the same jobs, less the other two
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    out = tmp_path / "out"

    site = os.pathsep.join(filter(None, [str(tmp_path / "site"), env.get("PYTHONPATH")]))
    limited = _run(["run", spec, "--output", out], {**env, "PYTHONPATH": site})
    assert limited.returncode == 1, limited.stderr[-3000:]
    jobs = {job["label"]: (job, status) for job, status in _jobs(out) if job["config"]["kind"] == "train"}
    statuses = {label: status for label, (_, status) in jobs.items()}
    ids = {label: job["id"] for label, (job, _) in jobs.items()}
    assert {label: (s["state"], s["error_class"], s["attempts"]) for label, s in statuses.items()} == {
        "big": ("failed", "out_of_disk", 1),  # never retried: the disk stays full
        "capped": ("failed", "out_of_memory", 1),  # never retried: same job, same cap
        "leaky": ("failed", "error", 2),  # retried once (max_retries: 1)
    }, limited.stderr[-3000:]
    assert statuses["big"]["reason"].endswith("File too large (os error 27)"), statuses["big"]
    assert "over its cap of 0.05 GB (resources.memory_gb)" in statuses["capped"]["reason"]
    assert "[redacted]" in statuses["leaky"]["reason"], statuses["leaky"]
    for label, status in statuses.items():
        assert "\n" not in status["reason"]
        assert status["log"] == f"jobs/{ids[label]}/log.txt"
        log = (out / status["log"]).read_text()
        assert "Traceback" in log and status["reason"].split(":")[0] in log, log[-2000:]
    big_dir = out / "jobs" / ids["big"]
    assert not (big_dir / "artifact").exists() and not list(big_dir.glob(".artifact*"))  # nothing half-written

    status = _run(["status", out], env)
    assert status.returncode == 0, status.stderr
    for label in statuses:
        assert str(out / statuses[label]["log"]) in status.stdout, status.stdout
    assert "- out_of_disk: no space left on the device" in status.stdout
    leaderboard = (out / "leaderboard.md").read_text()
    assert f"[log](jobs/{ids['capped']}/log.txt)" in leaderboard
    assert "- out_of_memory: MemoryError" in leaderboard and "retried: never" in leaderboard

    # No limit (the session's Ray), no secret in its environment: the big LoRA is trained and scored.
    code, resumed = pefteval_here("run", big_only, "--output", out)
    assert code == 0, resumed[-3000:]
    assert "1 already done" in resumed  # the base model's evaluation
    assert Store(out).is_done(ids["big"])
    assert (out / "jobs" / ids["big"] / "artifact" / "adapter_model.safetensors").stat().st_size > FILE_SIZE_LIMIT

    printed = [limited.stdout, limited.stderr, status.stdout, status.stderr, resumed]
    written = [(path, path.read_bytes()) for path in sorted(out.rglob("*")) if path.is_file()]
    assert len(written) > 20 and any(b"[redacted]" in data for _, data in written)
    for value in secret_values:
        assert not [path for path, data in written if value.encode() in data]
        assert not [text for text in printed if value in text]


def _jobs(out) -> list[tuple[dict, dict]]:
    return list(Store(out).jobs())
