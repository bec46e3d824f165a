"""Live progress: jobs report their own (training steps, evaluation requests); `status` reads the store alone."""

from __future__ import annotations

import io
import json
import os
import re
import threading
import time
import uuid

import pytest

from pefteval_harness import cli
from pefteval_harness.jobs.types import PLAN_SCHEMA
from pefteval_harness.progress import LiveDisplay, RequestProgress, status_of
from pefteval_harness.store import CLAIM_STALE_SECONDS, DONE, FAILED, Store


class RecordingStore(Store):
    """A real store that also keeps every progress record written, in order."""

    def __init__(self, root):
        super().__init__(root)
        self.writes: list[tuple[str, dict]] = []

    def write_progress(self, job_id: str, progress: dict) -> None:
        self.writes.append((job_id, dict(progress)))
        super().write_progress(job_id, progress)


def _job(job_id: str, label: str, task: str | None = None, **config) -> dict:
    """A job as plan.json holds it, with the fields status reads (the kind is its config's)."""
    config = {"kind": job_id.split("-")[0], **({"task": task} if task else {}), **config}
    return {"id": job_id, "label": label, "deps": [], "config": config}


PLAN = {
    "schema": PLAN_SCHEMA,
    "name": "demo",
    "spec_hash": "x",
    "groups": {},
    "jobs": [
        _job("train-fft", "fft"),
        _job("train-lora", "lora"),
        _job("train-old", "dora"),
        _job("evaluate-a", "lora", "pefteval_x"),
        _job("evaluate-b", "fft", "pefteval_x"),
        _job("evaluate-c", "fft", "pefteval_y", strategy={"kind": "cot", "name": "cot"}),
        _job("evaluate-d", "base", "pefteval_x"),
        _job("evaluate-e", "base", "pefteval_y"),
    ],
}


def _make_stale(store: Store, job_id: str) -> None:
    """As if the claim's holder stopped its heartbeat long ago: a file's mtime, or an object store's record."""
    old = time.time() - CLAIM_STALE_SECONDS - 5
    if store.local:
        os.utime(store.job_dir(job_id) / "claim", (old, old))
    else:
        store.write_json(f"jobs/{job_id}/claim", {**store.read_json(f"jobs/{job_id}/claim"), "time": old})


@pytest.fixture(params=["folder", "memory"])
def run_dir(request, tmp_path):
    """A results folder (or an fsspec store) caught mid-run, written by hand as a run and its jobs write it."""
    if request.param == "folder":
        root = tmp_path
    else:  # memory:// is one filesystem per process: a folder of its own, removed afterwards
        import fsspec

        root = f"memory://progress-{uuid.uuid4().hex[:8]}"
        request.addfinalizer(lambda: fsspec.filesystem("memory").rm(root.removeprefix("memory://"), recursive=True))
    store = Store(root)
    store.write_json("plan.json", PLAN)
    jobs = {job["id"]: job for job in PLAN["jobs"]}
    store.record(jobs["train-fft"], DONE, {})
    store.record(jobs["evaluate-b"], FAILED, reason="ValueError: no answer column", error_class="bad_input")
    # run-1 holds these: one trains, one evaluates, one has not started (a worker is not free yet).
    for job_id in ("train-lora", "evaluate-a", "train-old", "evaluate-c"):
        assert store.claim(job_id, "run-1")
    store.write_progress("train-lora", {"phase": "train", "step": 12, "total": 40, "loss": 1.2345, "run": "run-1"})
    store.write_progress("evaluate-a", {"phase": "evaluate", "task": "pefteval_x", "done": 340, "total": 1000,
                                        "request_type": "loglikelihood", "run": "run-1"})
    # train-old: progress left by an earlier run that died, not by run-1, which has only just claimed it.
    store.write_progress("train-old", {"phase": "train", "step": 3, "total": 40, "loss": 2.0, "run": "run-0"})
    # evaluate-d: held by a run that died (its claim went stale): nobody runs it.
    assert store.claim("evaluate-d", "run-0")
    store.write_progress("evaluate-d", {"phase": "evaluate", "done": 1, "total": 2, "run": "run-0"})
    _make_stale(store, "evaluate-d")
    return root


def test_status_of_counts_and_describes_each_job_from_the_store_alone(run_dir):
    status = status_of(Store(run_dir), PLAN)
    states = {job.id: job.state for job in status.jobs}
    assert states == {
        "train-fft": "done",
        "train-lora": "running",
        "train-old": "queued",
        "evaluate-a": "running",
        "evaluate-b": "failed",
        "evaluate-c": "queued",
        "evaluate-d": "left",
        "evaluate-e": "left",
    }
    assert status.counts() == {"done": 1, "running": 2, "queued": 2, "failed": 1, "left": 2}
    assert status.summary() == "1 done · 2 running · 2 queued · 1 failed · 2 left (of 8)"
    assert [job.line() for job in status.of("running")] == [
        "train lora: step 12/40, loss 1.23",
        "evaluate lora on pefteval_x: 340/1000 requests",
    ]
    (failed,) = status.of("failed")
    assert (failed.reason, failed.error_class) == ("ValueError: no answer column", "bad_input")
    assert not status.finished
    assert 0 <= status.of("running")[0].age_seconds < 60

    # A failed job that a run claims again is being rerun; a left job settles; the summary follows.
    store = Store(run_dir)
    store.claim("evaluate-b", "run-1")
    store.record(PLAN["jobs"][7], DONE, {})
    status = status_of(store, PLAN)
    assert status.summary() == "2 done · 2 running · 3 queued · 0 failed · 1 left (of 8)"


def test_status_command_prints_counts_running_jobs_and_failures(run_dir, capsys):
    assert cli.main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "demo: 1 done · 2 running · 2 queued · 1 failed · 2 left (of 8)"
    running = next(line for line in lines if "train lora" in line)
    assert "step 12/40, loss 1.23" in running and re.search(r"\d+s ago", running) and "train-lora" in running
    assert any("evaluate lora on pefteval_x" in line and "340/1000 requests" in line for line in lines)
    failed = next(line for line in lines if "evaluate fft on pefteval_x" in line)
    assert "bad_input" in failed and "ValueError: no answer column" in failed
    assert "evaluate base" not in out  # left jobs are counted, not listed

    assert cli.main(["status", str(run_dir), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["counts"] == {"done": 1, "running": 2, "queued": 2, "failed": 1, "left": 2} and data["total"] == 8
    by_id = {job["id"]: job for job in data["jobs"]}
    assert by_id["train-lora"]["progress"]["step"] == 12
    assert by_id["evaluate-a"]["line"] == "evaluate lora on pefteval_x: 340/1000 requests"
    assert by_id["evaluate-b"]["reason"] == "ValueError: no answer column"
    assert by_id["evaluate-c"]["line"] == "evaluate fft · cot on pefteval_y: queued"


def test_status_without_a_plan_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["status", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"pefteval: error: {tmp_path}: no plan.json: not a pefteval results folder, " \
        "or its run has not started\n"

    Store(tmp_path).write_json("plan.json", {**PLAN, "schema": 1})  # an older pefteval's run
    assert cli.main(["status", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_status_watch_refreshes_until_nothing_is_left(run_dir, capsys):
    store = Store(run_dir)
    jobs = {job["id"]: job for job in PLAN["jobs"]}

    def finish_the_run():  # as the run does, while `status --watch` looks
        time.sleep(0.5)
        for job_id in jobs:
            if not store.is_done(job_id):
                store.record(jobs[job_id], DONE, {})
                store.release(job_id, "run-1")

    finisher = threading.Thread(target=finish_the_run)
    finisher.start()
    assert cli.main(["status", str(run_dir), "--watch", "0.2"]) == 0
    finisher.join()
    headers = [line for line in capsys.readouterr().out.splitlines() if line.startswith("demo: ")]
    assert len(headers) >= 2 and headers[-1] == "demo: 8 done · 0 running · 0 failed · 0 left (of 8)"


def test_live_display_prints_when_the_store_changes_and_not_otherwise(run_dir):
    store = Store(run_dir)
    stream = io.StringIO()  # not a terminal: a line only when something changed

    def wait_for(condition, seconds=5.0):
        deadline = time.monotonic() + seconds
        while not condition():
            assert time.monotonic() < deadline, stream.getvalue()
            time.sleep(0.02)

    with LiveDisplay(PLAN, store, stream=stream, every=0.05):
        wait_for(lambda: stream.getvalue())
        first = stream.getvalue()
        assert first.splitlines() == [
            "1 done · 2 running · 2 queued · 1 failed · 2 left (of 8)",
            "  train lora: step 12/40, loss 1.23",
            "  evaluate lora on pefteval_x: 340/1000 requests",
        ]
        time.sleep(0.4)  # about 8 refreshes with nothing new
        assert stream.getvalue() == first
        store.write_progress("train-lora", {"phase": "train", "step": 13, "total": 40, "loss": 1.2, "run": "run-1"})
        wait_for(lambda: "step 13/40" in stream.getvalue())
    assert stream.getvalue().count("(of 8)") == 2
    assert stream.getvalue()[len(first):].splitlines()[1] == "  train lora: step 13/40, loss 1.2"


def test_training_reports_its_step_and_loss(tmp_path, tiny_model_dir):
    """A real Trainer run of a few steps on the tiny model, with the callback the train job adds."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from pefteval_harness.jobs.train import PadCollator
    from pefteval_harness.progress import TrainProgress

    store = RecordingStore(tmp_path / "store")
    assert store.claim("train-x", "run-1")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows = [{"input_ids": [5, 6, 7, 8 + i], "labels": [-100, 6, 7, 8 + i], "attention_mask": [1] * 4} for i in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=3, per_device_train_batch_size=2, logging_steps=1,
        report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True, remove_unused_columns=False,
    )
    progress = TrainProgress(store, "train-x", every_seconds=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=PadCollator(0), callbacks=[progress])
    trainer.train()

    steps = [p["step"] for _, p in store.writes]
    assert steps[0] == 0 and steps == sorted(steps) and {1, 2, 3} <= set(steps)
    assert all(p["total"] == 3 and p["phase"] == "train" and p["run"] == "run-1" for _, p in store.writes)
    final = store.progress("train-x")
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert (final["step"], final["total"]) == (3, 3) and final["loss"] == pytest.approx(losses[-1])
    assert status_of(store, {"name": "t", "jobs": [_job("train-x", "lora")]}).of("running")[0].line() == (
        f"train lora: step 3/3, loss {losses[-1]:.3g}"
    )

    # Rate-limited: a long interval leaves the forced writes only (start and end).
    store.writes.clear()
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=PadCollator(0),
                      callbacks=[TrainProgress(store, "train-x", every_seconds=3600)])
    trainer.train()
    assert [p["step"] for _, p in store.writes] == [0, 3]


def test_evaluation_reports_requests_done_per_task(tmp_path, tiny_model_dir, isolated_process_state):
    """A real evaluation worker: two tasks of two request types scored in one lm-eval call."""
    from pefteval_harness.jobs.evaluate import evaluate_batch
    from pefteval_harness.plan import build_plan
    from pefteval_harness.spec import Spec

    tasks = ["pefteval_quick_sentiment", "pefteval_quick_arithmetic"]  # multiple choice; generate_until
    spec = Spec.model_validate({"base_model": str(tiny_model_dir), "evaluate": {"tasks": tasks, "limit": 8}})
    plan = build_plan(spec)
    jobs = [job for job in plan.jobs if job.kind == "evaluate"]
    store = RecordingStore(tmp_path / "store")
    for job in jobs:
        store.claim(job.id, "run-1")
    results = evaluate_batch(jobs, store)
    assert all(isinstance(results[job.id], dict) for job in jobs), results

    final = {job.config.task: store.progress(job.id) for job in jobs}
    sentiment, arithmetic = final["pefteval_quick_sentiment"], final["pefteval_quick_arithmetic"]
    assert (sentiment["done"], sentiment["total"], sentiment["request_type"]) == (16, 16, "loglikelihood")  # 2 choices
    assert (arithmetic["done"], arithmetic["total"], arithmetic["request_type"]) == (8, 8, "generate_until")
    assert sentiment["run"] == arithmetic["run"] == "run-1"
    seen = [(p["task"], p["done"], p["total"]) for _, p in store.writes]
    # Before lm-eval reaches a task's request type its total is unknown; then it counts up to the total.
    assert ("pefteval_quick_arithmetic", 0, None) in seen and ("pefteval_quick_arithmetic", 0, 8) in seen
    assert seen.index(("pefteval_quick_sentiment", 16, 16)) < seen.index(("pefteval_quick_arithmetic", 0, 8))
    # `status` reads this real plan: claimed, progress written, no status yet (the worker records it next).
    assert [job.line() for job in status_of(store, plan.to_json()).of("running")] == [
        "evaluate base on pefteval_quick_sentiment: 16/16 requests",
        "evaluate base on pefteval_quick_arithmetic: 8/8 requests",
    ]


def test_rolling_loglikelihood_requests_are_counted_once_each(tmp_path, tiny_model_dir):
    """Perplexity tasks: each request is split into windows, and still counts as one request."""
    from lm_eval.api.instance import Instance

    from pefteval_harness.jobs.evaluate import load_lm

    lm = load_lm(pretrained=str(tiny_model_dir), device="cpu", batch_size=2, max_length=16)
    store = Store(tmp_path)
    counter = RequestProgress(lm, store)
    texts = ["one two three " * 12, "short", "four five six seven " * 6]  # several windows each, but one
    requests = [Instance("loglikelihood_rolling", {}, (t,), i, ("wikitext_x", i, 1)) for i, t in enumerate(texts)]
    with counter.scoring({"evaluate-w": "wikitext_x"}):
        assert len(lm.loglikelihood_rolling(requests, disable_tqdm=True)) == 3
    progress = store.progress("evaluate-w")
    assert (progress["done"], progress["total"], progress["request_type"]) == (3, 3, "loglikelihood_rolling")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True

    def screen(self) -> list[str]:
        """What a terminal shows after this output: handles the display's own two escape codes only."""
        rows: list[str] = []
        for part in re.split(r"(\x1b\[\d+F\x1b\[J)", self.getvalue()):
            if erase := re.fullmatch(r"\x1b\[(\d+)F\x1b\[J", part):
                del rows[len(rows) - int(erase.group(1)):]
            else:
                rows.extend(part.splitlines())
        return rows


def test_live_display_on_a_terminal_rewrites_its_lines_and_keeps_log_lines_above(run_dir):
    import logging

    store = Store(run_dir)
    terminal = Terminal()
    handler = logging.StreamHandler(terminal)
    logging.getLogger().addHandler(handler)
    runner_log = logging.getLogger("pefteval_harness.runner")
    runner_log.setLevel(logging.INFO)
    try:
        with LiveDisplay(PLAN, store, stream=terminal, every=0.05):
            time.sleep(0.2)
            runner_log.info("submitted train train-lora")
            store.write_progress("train-lora", {"phase": "train", "step": 14, "total": 40, "loss": 1.1, "run": "run-1"})
            time.sleep(0.2)
        assert handler.stream is terminal  # given back
        runner_log.info("after the run")
    finally:
        logging.getLogger().removeHandler(handler)
        runner_log.setLevel(logging.NOTSET)
    assert "\x1b[3F\x1b[J" in terminal.getvalue()  # it did rewrite in place
    assert terminal.screen() == [
        "submitted train train-lora",
        "1 done · 2 running · 2 queued · 1 failed · 2 left (of 8)",
        "  train lora: step 14/40, loss 1.1",
        "  evaluate lora on pefteval_x: 340/1000 requests",
        "after the run",
    ]
