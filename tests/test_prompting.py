"""Prompting strategies (zero-shot, k-shot, chain-of-thought) as an axis of the spec: validation, planning
(one evaluation per model, task and strategy), and what each does to the prompts lm-eval builds."""

from __future__ import annotations

import json

import pytest
import yaml

from pefteval_harness.errors import BadInput
from pefteval_harness.jobs.types import EvaluateConfig, identity_fields
from pefteval_harness.plan import build_plan
from pefteval_harness.prompting import COT_INSTRUCTION, ChainOfThought, KShot, ZeroShot
from pefteval_harness.spec import load_spec

QUICK = ["pefteval_quick_sentiment", "pefteval_quick_echo"]


def write_spec(tmp_path, evaluate: dict, **top) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"evaluate": {"tasks": QUICK, **evaluate}, **top}))
    return str(path)


def plan_of(tmp_path, evaluate: dict, **top):
    spec, _ = load_spec(write_spec(tmp_path, evaluate, **top))
    return build_plan(spec)


def evaluations(plan) -> list[tuple[str, str, str | None]]:
    return [
        (job.label, job.config.task, job.config.strategy.name if job.config.strategy else None)
        for job in plan.jobs
        if job.kind == "evaluate"
    ]


def test_strategies_are_named_from_their_parameters():
    assert ZeroShot().name == "zero-shot"
    assert KShot(k=3).name == "3-shot" and KShot(k=3).pool_size == 3 and KShot(k=3, pool=8).pool_size == 8
    assert ChainOfThought().name == "cot"
    assert KShot(k=2, name="two").name == "two"


@pytest.mark.parametrize(
    ("strategies", "expected"),
    [
        (
            ["zero_shot", "chain"],
            "evaluate.strategies[1]: unknown prompting strategy 'chain' (known: zero_shot, k_shot, cot)",
        ),
        ([{"kind": "k_shot", "k": 5, "pool": 4}], "k = 5 is larger than the pool of 4 examples"),
        ([{"kind": "k_shot", "k": 0}], "evaluate.strategies[0].k_shot.k: Input should be greater than or equal to 1"),
        ([{"kind": "cot", "shots": 2}], "evaluate.strategies[0].cot.shots: unknown key"),
        (["zero_shot", {"kind": "zero_shot"}], "evaluate.strategies[1].name: 'zero-shot' is used twice"),
        ([42], "evaluate.strategies[0]: expected a strategy name or a mapping with 'kind', got 42"),
    ],
)
def test_bad_strategies_are_refused_at_load(tmp_path, strategies, expected):
    with pytest.raises(BadInput, match="^" + str(tmp_path / "spec.yaml").replace(".", r"\.")) as error:
        load_spec(write_spec(tmp_path, {"strategies": strategies}))
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_a_shot_count_set_beside_strategies_is_refused(tmp_path):
    with pytest.raises(BadInput, match="evaluate.num_fewshot: not with strategies"):
        load_spec(write_spec(tmp_path, {"strategies": ["zero_shot"], "num_fewshot": 2}))
    with pytest.raises(BadInput, match=r"per_task.pefteval_quick_echo.num_fewshot: not with strategies"):
        load_spec(write_spec(tmp_path, {"strategies": ["zero_shot"], "per_task": {QUICK[1]: {"num_fewshot": 1}}}))


def test_each_model_is_evaluated_on_each_task_under_each_strategy_that_applies(tmp_path):
    strategies = [
        "zero_shot",
        {"kind": "k_shot", "k": 2},
        {"kind": "k_shot", "k": 1, "name": "one", "tasks": [QUICK[1]]},
    ]
    plan = plan_of(
        tmp_path,
        {"strategies": strategies},
        finetunes={"lora": {"method": "lora"}},
        train={"tasks": [QUICK[0]], "limit": 8},
    )
    found = evaluations(plan)
    expected = [
        (model, task, strategy)
        for model in ("base", "lora")
        for strategy, tasks in (("zero-shot", QUICK), ("2-shot", QUICK), ("one", [QUICK[1]]))
        for task in tasks
    ]
    assert sorted(found) == sorted(expected)
    assert len({job.id for job in plan.jobs}) == len(plan.jobs)
    # `tasks` chooses where a strategy applies; it is not part of what the job does (nor of its id)
    one = next(
        job for job in plan.jobs if job.kind == "evaluate" and job.config.strategy and job.config.strategy.name == "one"
    )
    assert "tasks" not in one.config.model_dump(mode="json")["strategy"]
    assert "(one)" in plan.describe()


def test_a_plan_without_strategies_keeps_its_ids(tmp_path):
    """Unset strategy and judge are left out of an evaluation's identity: stores of earlier runs still resume."""
    plan = plan_of(tmp_path, {})
    job = next(job for job in plan.jobs if job.kind == "evaluate")
    assert job.config.strategy is None and job.config.judge is None
    assert set(identity_fields(job.config)) == set(EvaluateConfig.model_fields) - {"strategy", "judge"}
    with_strategy = identity_fields(job.config.model_copy(update={"strategy": ZeroShot()}))
    assert with_strategy["strategy"] == {"kind": "zero_shot", "name": "zero-shot"}


def test_a_strategy_that_applies_to_no_task_is_refused(tmp_path):
    with pytest.raises(BadInput, match=r"evaluate.strategies\[0\] \(cot\): applies to none of the evaluated tasks"):
        plan_of(tmp_path, {"strategies": ["cot"]})


def test_k_shot_larger_than_the_local_training_pool_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    """`pefteval run` in this process (its CLI entry point): a subprocess costs seconds of imports."""
    from pefteval_harness.cli import main

    data = tmp_path / "data" / "sst2"
    data.mkdir(parents=True)
    records = [{"sentence": f"s{i}", "label": i % 2, "idx": i} for i in range(3)]
    for split in ("train", "validation"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump({"evaluate": {"tasks": ["pefteval_peft_sst2"], "strategies": [{"kind": "k_shot", "k": 4}]}})
    )
    monkeypatch.setenv("PEFTEVAL_DATA_DIR", str(tmp_path / "data"))
    assert main(["run", str(spec), "--output", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert (
        len(lines) == 1
        and "k-shot needs a pool of 4 examples, but pefteval_peft_sst2's few-shot split has 3" in lines[0]
    )
    assert not (tmp_path / "out").exists()


def test_k_shot_draws_every_example_from_one_seeded_pool():
    from pefteval_harness.prompting import KShot
    from pefteval_harness.tasks import build_task, manager_for

    manager = manager_for([QUICK[0]])
    task = build_task(manager, QUICK[0])
    strategy = KShot(k=2, pool=4)
    overrides = strategy.overrides(task, seed=7)
    assert overrides == strategy.overrides(build_task(manager, QUICK[0]), seed=7)  # the same pool every time
    assert overrides != strategy.overrides(task, seed=8)
    pool = overrides["fewshot_config"]["samples"]
    assert len(pool) == 4 and all(doc in list(task.fewshot_docs()) for doc in pool)
    shot = build_task(manager, QUICK[0], overrides)
    shot.set_fewshot_seed(7)
    doc = shot.test_docs()[0]
    prompt = shot.fewshot_context(doc, num_fewshot=2)
    shown = [example for example in pool if f"Review: {example['sentence']}" in prompt]
    assert len(shown) == 2 and prompt.endswith(f"Review: {doc['sentence']}\nSentiment:")
    with pytest.raises(BadInput, match="a pool of 10000 examples is larger than the"):
        KShot(k=2, pool=10000).overrides(task, seed=7)


def test_chain_of_thought_asks_for_reasons_and_reads_the_last_answer_line():
    from pefteval_harness.tasks import build_task, manager_for

    name = "pefteval_merge_meld"  # a generative task; CoT's overrides do not depend on its metadata
    manager = manager_for([name])
    plain = build_task(manager, name)
    cot = build_task(manager, name, ChainOfThought(max_gen_toks=40).overrides(plain, seed=1))
    assert cot.config.description.startswith(COT_INSTRUCTION)
    assert cot.config.gen_prefix == "Let's think step by step."
    assert cot.config.generation_kwargs["max_gen_toks"] == 40 and cot.config.generation_kwargs["until"] == ["\n\n\n"]
    [ensemble] = cot._filters
    assert ensemble.name == "cot"
    replies = [["anger? no. Answer: joy maybe\nAnswer: sadness\nthe end"], ["I cannot tell"], ["answer:fear"]]
    filtered = replies
    for step in ensemble.filters:
        filtered = list(step().apply(filtered, [{}] * len(filtered)))
    assert filtered == ["sadness", "", "fear"]
    doc = cot.test_docs()[0]
    assert cot.fewshot_context(doc, num_fewshot=0).startswith(COT_INSTRUCTION)
    with pytest.raises(BadInput, match="is not generative"):
        ChainOfThought().overrides(build_task(manager, "pefteval_merge_meld_mc"), seed=1)
