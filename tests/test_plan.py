"""The plan is a pure function of the spec; job ids change exactly when a job's output could."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from pefteval_harness import finetuning, jobs
from pefteval_harness.errors import BadInput
from pefteval_harness.plan import build_plan
from pefteval_harness.spec import Spec
from tests.conftest import REPO

SPEC = {
    "train": {"tasks": ["pefteval_quick_sentiment", "pefteval_quick_topic"], "max_steps": 2},
    "finetunes": {
        "fft": {"method": "full"},
        "lora": {"method": "lora"},
        "ex": {"method": "lora", "per_task": True},
    },
    "merges": {"m": {"method": "ties", "experts": "ex"}},
    "evaluate": {"tasks": ["pefteval_quick_sentiment*"], "limit": 4},
}
MODELS = ("base", "fft", "lora", "ex/pefteval_quick_sentiment", "ex/pefteval_quick_topic", "m")
EVALUATED = ("pefteval_quick_sentiment", "pefteval_quick_sentiment_adv")


def ids(spec: dict) -> dict[tuple[str, ...], str]:
    plan = build_plan(Spec.model_validate(spec))
    return {(job.kind, job.label, getattr(job.config, "task", "")): job.id for job in plan.jobs}


def changed(before: dict, after: dict) -> set[tuple[str, ...]]:
    return {key for key in before if before[key] != after[key]}


def test_jobs_dependencies_and_labels():
    plan = build_plan(Spec.model_validate(SPEC))
    by_key = {(j.kind, j.label, getattr(j.config, "task", "")): j for j in plan.jobs}
    assert set(by_key) == {
        ("base", "base", ""),
        *(("train", name, "") for name in MODELS[1:5]),
        ("merge", "m", ""),
        *(("evaluate", model, task) for model in MODELS for task in EVALUATED),  # one per (model, task)
    }
    base = by_key["base", "base", ""].id
    assert by_key["merge", "m", ""].deps == [
        base,
        by_key["train", "ex/pefteval_quick_sentiment", ""].id,
        by_key["train", "ex/pefteval_quick_topic", ""].id,
    ]
    fft_eval = by_key["evaluate", "fft", "pefteval_quick_sentiment"]
    assert fft_eval.deps == [by_key["train", "fft", ""].id]  # the FFT model stands alone
    assert by_key["evaluate", "lora", "pefteval_quick_sentiment"].deps == [base, by_key["train", "lora", ""].id]
    merged = by_key["evaluate", "m", "pefteval_quick_sentiment_adv"].lineage
    assert (merged.merge.method, merged.merge.k, merged.merge.experts) == ("ties", 2, list(MODELS[3:5]))
    order = [j.id for j in plan.jobs]
    assert all(order.index(d) < order.index(j.id) for j in plan.jobs for d in j.deps)  # dependency order
    assert json.loads(json.dumps(plan.to_json()))["schema"] == 2


def test_ids_are_stable_and_change_only_downstream_of_a_change():
    before = ids(SPEC)
    assert ids(SPEC) == before
    lr = ids({**SPEC, "finetunes": {**SPEC["finetunes"], "lora": {"method": "lora", "train": {"learning_rate": 0.5}}}})
    assert changed(before, lr) == {("train", "lora", "")} | {("evaluate", "lora", t) for t in EVALUATED}
    limit = ids({**SPEC, "evaluate": {**SPEC["evaluate"], "limit": 5}})
    assert changed(before, limit) == {key for key in before if key[0] == "evaluate"}
    seed = ids({**SPEC, "seed": 7})
    assert changed(before, seed) == set(before) - {("base", "base", "")}  # the tiny base is built without it
    density = ids({**SPEC, "merges": {"m": {"method": "ties", "experts": "ex", "parameters": {"density": 0.5}}}})
    assert changed(before, density) == {("merge", "m", "")} | {("evaluate", "m", t) for t in EVALUATED}
    fewshot = ids({**SPEC, "evaluate": {**SPEC["evaluate"], "per_task": {"*_adv": {"num_fewshot": 1}}}})
    assert changed(before, fewshot) == {("evaluate", m, "pefteval_quick_sentiment_adv") for m in MODELS}


def test_per_task_settings_reach_only_their_tasks():
    spec = {**SPEC, "evaluate": {**SPEC["evaluate"], "num_fewshot": 0,
                                 "per_task": {"*_adv": {"num_fewshot": 2, "gen_kwargs": {"max_gen_toks": 4}}}}}
    plan = build_plan(Spec.model_validate(spec))
    settings = {j.config.task: j.config.settings for j in plan.jobs if j.kind == "evaluate" and j.label == "base"}
    assert settings["pefteval_quick_sentiment"].num_fewshot == 0
    assert settings["pefteval_quick_sentiment_adv"].num_fewshot == 2
    assert settings["pefteval_quick_sentiment_adv"].gen_kwargs == {"max_gen_toks": 4}
    assert not settings["pefteval_quick_sentiment"].confirm_run_unsafe_code  # off unless the user turns it on


def test_a_method_version_bump_reruns_only_that_methods_jobs(monkeypatch):
    before = ids(SPEC)
    lora = finetuning.FINETUNE_METHODS["lora"]
    monkeypatch.setitem(finetuning.FINETUNE_METHODS, "lora", replace(lora, version=lora.version + 1))
    bumped = changed(before, ids(SPEC))
    assert bumped and all(key[1] in ("lora", "m") or key[1].startswith("ex/") for key in bumped)
    assert not any(key[1] in ("base", "fft") for key in bumped)
    monkeypatch.setitem(finetuning.FINETUNE_METHODS, "lora", lora)
    kind = jobs.JOB_KINDS["merge"]
    monkeypatch.setitem(jobs.JOB_KINDS, "merge", replace(kind, version=kind.version + 1))
    assert changed(before, ids(SPEC)) == {("merge", "m", "")} | {("evaluate", "m", t) for t in EVALUATED}


def test_editing_one_task_file_reruns_only_that_task(tmp_path):
    tasks = tmp_path / "mytasks"
    shutil.copytree(REPO / "task_configs" / "quickstart", tasks)
    for path in tasks.glob("*.yaml"):  # the same tasks under other names, so both folders load
        path.write_text(path.read_text().replace("pefteval_quick_", "mine_").replace("pefteval-quick", "mine-quick"))
    spec = {**SPEC, "include_paths": [str(tasks)], "evaluate": {"tasks": ["mine_topic", "mine_echo"], "limit": 4}}
    before = ids(spec)
    (tasks / "topic.yaml").write_text((tasks / "topic.yaml").read_text().replace("Topic:", "Subject:"))
    assert changed(before, ids(spec)) == {key for key in before if key[0] == "evaluate" and key[2] == "mine_topic"}


def test_planning_refuses_what_only_expansion_reveals():
    with pytest.raises(BadInput, match=r"merges.m.weights: 3 weights for 2 experts"):
        build_plan(Spec.model_validate({**SPEC, "merges": {"m": {"method": "ties", "experts": "ex",
                                                                 "weights": [1, 1, 1]}}}))
    with pytest.raises(BadInput, match="evaluate.tasks: no task matches 'nope'"):
        build_plan(Spec.model_validate({**SPEC, "evaluate": {"tasks": ["nope"]}}))


def test_trained_tasks_only_scores_a_model_on_what_it_was_trained_for():
    spec = {**SPEC, "evaluate": {"tasks": ["pefteval_quick_*"], "limit": 4, "trained_tasks_only": True}}
    plan = build_plan(Spec.model_validate(spec))
    scored: dict[str, set[str]] = {}
    for job in plan.jobs:
        if job.kind == "evaluate":
            scored.setdefault(job.label, set()).add(job.config.task)
    sentiment = {"pefteval_quick_sentiment", "pefteval_quick_sentiment_adv"}  # the adversarial twin follows
    assert scored["ex/pefteval_quick_sentiment"] == sentiment
    assert scored["ex/pefteval_quick_topic"] == {"pefteval_quick_topic"}
    assert scored["lora"] == scored["m"] == sentiment | {"pefteval_quick_topic"}
    assert len(scored["base"]) == 5  # the base model on every task
    only_arithmetic = {**spec, "evaluate": {**spec["evaluate"], "tasks": ["pefteval_quick_arithmetic"]}}
    with pytest.raises(BadInput, match="evaluate.trained_tasks_only: fft is trained on pefteval_quick_sentiment"):
        build_plan(Spec.model_validate(only_arithmetic))
