"""The affective comparison end to end: prompting strategies on AU and AG tasks, with the local judge,
through `pefteval run` (its CLI entry point, on the session's Ray); and the bad inputs that stop it before
it starts. (Strategies crossed with fine-tuned models: tests/test_prompting.py plans it,
tests/test_affect_report.py reports it, and examples/affective_small.yaml runs it.)"""

from __future__ import annotations

import json
import os

import pytest
import yaml

from tests.test_pipeline import pefteval_here

DATA = os.environ.get("PEFTEVAL_DATA_DIR")
needs_data = pytest.mark.skipif(not DATA, reason="needs real records: set PEFTEVAL_DATA_DIR (see README, Tests)")

AU = ["pefteval_affect_sst2", "pefteval_affect_sst2_gen"]
AG = "pefteval_affect_esconv"


def run(spec: dict, tmp_path) -> tuple[int, str]:
    """`pefteval run` in this process (on the session's Ray): its exit code and what it printed."""
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return pefteval_here("run", path, "--output", tmp_path / "out")


@needs_data
@pytest.mark.parametrize(
    ("evaluate", "expected"),
    [
        ({"strategies": ["zero_shot", "few_shot"]}, "evaluate.strategies[1]: unknown prompting strategy 'few_shot'"),
        ({"strategies": [{"kind": "k_shot", "k": 2, "pool": 500}]}, "k-shot needs a pool of 500 examples, but"),
        ({"judge": {"model": "./no-such-judge"}}, "evaluate.judge.model: no such model folder './no-such-judge'"),
        ({"judge": {"model": "nobody/no-such-judge"}}, "evaluate.judge.model: 'nobody/no-such-judge' is not a local"),
    ],
)
def test_bad_affective_specs_stop_with_one_line_and_exit_2(tmp_path, capsys, evaluate, expected):
    """`pefteval run` in this process (its CLI entry point; a subprocess costs seconds of imports)."""
    from pefteval_harness.cli import main

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"evaluate": {"tasks": [*AU, AG], **evaluate}}))
    assert main(["run", str(path), "--output", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pefteval: error: ") and expected in lines[0]
    assert not (tmp_path / "out").exists()


@needs_data
@pytest.mark.slow
def test_strategies_with_a_judge_end_to_end(tmp_path, tiny_model_dir, local_ray):
    spec = {
        "name": "affective_tiny",
        "base_model": str(tiny_model_dir),  # the session's tiny model, used in place (no build job)
        "evaluate": {
            "tasks": [*AU, AG],
            "limit": 3,
            "strategies": [
                "zero_shot",
                {"kind": "k_shot", "k": 2, "pool": 4, "tasks": ["pefteval_affect_sst2*"]},
                {"kind": "cot", "max_gen_toks": 12},
            ],
            "judge": {"model": str(tiny_model_dir), "max_new_tokens": 8},
        },
    }
    code, printed = run(spec, tmp_path)
    assert code == 0, printed[-3000:]
    assert "0 failed" in printed
    # sst2 in both forms zero- and 2-shot, its generative form under CoT; ESConv zero-shot
    assert "6 jobs ran" in printed

    records = json.loads((tmp_path / "out" / "leaderboard.json").read_text())
    scores = [r for r in records if r["record"] == "score"]
    cells = {(r["model"], r["strategy"], r["task"]) for r in scores}
    for model in ("base",):
        assert {(model, s, t) for s in ("zero-shot", "2-shot") for t in AU} <= cells
        assert (model, "cot", "pefteval_affect_sst2_gen") in cells and (
            model,
            "cot",
            "pefteval_affect_sst2",
        ) not in cells
        assert (model, "zero-shot", AG) in cells and (model, "2-shot", AG) not in cells
    parse_rates = [r for r in scores if r["metric"] == "parsed"]
    assert {r["task"] for r in parse_rates} == {"pefteval_affect_sst2_gen", AG}
    assert all(0 <= r["value"] <= 1 for r in parse_rates)
    assert any(r["metric"] == "acc" and r["filter"] == "cot" for r in scores)  # CoT's answer-line filter
    assert {r["affect"] for r in scores} == {"understanding", "generation"}

    # the judge's metrics join ESConv's, and its prompts and raw judgements are kept with the result
    judged = [r for r in scores if r["task"] == AG and r["metric"] in ("judge_score", "judge_parsed")]
    assert {r["metric"] for r in judged} >= {"judge_parsed"}
    job = next(r["job_id"] for r in scores if r["task"] == AG)
    result = json.loads((tmp_path / "out" / "jobs" / job / "result.json").read_text())
    block = result["pefteval_judge"]
    assert block["rubric"].startswith("This is the pefteval-harness rubric") and len(block["judgements"]) == 3
    assert all({"prompt", "reply", "judgement", "score"} <= set(j) for j in block["judgements"])
    assert any(j["reply"] and j["reply"] in j["prompt"] and block["rubric"] in j["prompt"] for j in block["judgements"])
    assert "samples" not in result  # lm-eval's results format, as without a judge

    board = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "## Affective understanding (AU)" in board and "## Affective generation (AG)" in board
    assert "% parseable" in board and "cot" in board and "2-shot" in board
    assert "plots/affective_au.png" in board and (tmp_path / "out" / "plots" / "affective_au.png").is_file()
