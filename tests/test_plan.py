"""The plan is a pure function of the spec; job ids change exactly when a job's output could."""

from __future__ import annotations

import shutil

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


def ids(spec: dict) -> dict[tuple[str, str], str]:
    return {(job.kind, job.label): job.id for job in build_plan(Spec.model_validate(spec)).jobs}


def changed(before: dict, after: dict) -> set[tuple[str, str]]:
    return {key for key in before if before[key] != after[key]}


def test_jobs_dependencies_and_labels():
    plan = build_plan(Spec.model_validate(SPEC))
    jobs = {(j.kind, j.label): j for j in plan.jobs}
    assert set(jobs) == {
        ("base", "base"),
        *(("train", name) for name in ("fft", "lora", "ex/pefteval_quick_sentiment", "ex/pefteval_quick_topic")),
        ("merge", "m"),
        *(
            ("evaluate", m)
            for m in ("base", "fft", "lora", "ex/pefteval_quick_sentiment", "ex/pefteval_quick_topic", "m")
        ),
    }
    base = jobs["base", "base"].id
    assert jobs["merge", "m"].deps == (
        base,
        jobs["train", "ex/pefteval_quick_sentiment"].id,
        jobs["train", "ex/pefteval_quick_topic"].id,
    )
    assert jobs["evaluate", "fft"].deps == (jobs["train", "fft"].id,)  # the FFT model stands alone
    assert jobs["evaluate", "lora"].deps == (base, jobs["train", "lora"].id)  # base + adapter
    assert jobs["evaluate", "m"].config["tasks"] == ["pefteval_quick_sentiment", "pefteval_quick_sentiment_adv"]
    order = [j.id for j in plan.jobs]
    assert all(order.index(d) < order.index(j.id) for j in plan.jobs for d in j.deps)  # dependency order


def test_ids_are_stable_and_change_only_downstream_of_a_change():
    before = ids(SPEC)
    assert ids(SPEC) == before
    lr = ids({**SPEC, "finetunes": {**SPEC["finetunes"], "lora": {"method": "lora", "train": {"learning_rate": 0.5}}}})
    assert changed(before, lr) == {("train", "lora"), ("evaluate", "lora")}
    limit = ids({**SPEC, "evaluate": {**SPEC["evaluate"], "limit": 5}})
    assert changed(before, limit) == {key for key in before if key[0] == "evaluate"}
    seed = ids({**SPEC, "seed": 7})
    assert changed(before, seed) == set(before) - {("base", "base")}  # the tiny base is built without it
    density = ids({**SPEC, "merges": {"m": {"method": "ties", "experts": "ex", "parameters": {"density": 0.5}}}})
    assert changed(before, density) == {("merge", "m"), ("evaluate", "m")}


def test_editing_a_task_file_changes_the_ids_of_the_jobs_that_use_it(tmp_path):
    tasks = tmp_path / "mytasks"
    shutil.copytree(REPO / "task_configs" / "quickstart", tasks)
    for path in tasks.glob("*.yaml"):  # the same tasks under other names, so both folders load
        path.write_text(path.read_text().replace("pefteval_quick_", "mine_").replace("pefteval-quick", "mine-quick"))
    spec = {**SPEC, "include_paths": [str(tasks)], "evaluate": {"tasks": ["mine_topic"], "limit": 4}}
    before = ids(spec)
    (tasks / "topic.yaml").write_text((tasks / "topic.yaml").read_text() + "# edited\n")
    assert changed(before, ids(spec)) == {key for key in before if key[0] == "evaluate"}
    (tasks / "sentiment.yaml").write_text((tasks / "sentiment.yaml").read_text() + "# edited\n")
    assert ids(spec) != before  # the folder's files define every task in it: conservative on purpose
