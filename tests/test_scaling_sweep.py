"""The scaling sweep: a merge over seeded subsets of k of its pool of experts, for each k, each subset its
own merge job and model; the theory setting and keep_model reach the jobs. Planning only."""

from __future__ import annotations

import math
import textwrap

import pytest

from pefteval_harness.cli import main
from pefteval_harness.plan import build_plan, choose_subsets
from pefteval_harness.spec import load_spec

TASKS = ["pefteval_quick_sentiment", "pefteval_quick_topic", "pefteval_quick_arithmetic", "pefteval_quick_echo"]
SPEC = f"""
base_model: tiny
train: {{tasks: {TASKS}, epochs: 1}}
finetunes:
  expert: {{method: lora, per_task: true}}
merges:
  ta: {{method: task_arithmetic, experts: expert, subsets: {{k: [1, 2, 3, 4], per_k: 3}}, theory: true}}
  ties:
    method: ties
    experts: expert
    subsets: {{k: [2, 3], per_k: 2}}
    sweep: {{parameters.density: [0.5, 0.9]}}
    keep_model: false
evaluate: {{tasks: [pefteval_quick_sentiment], limit: 4}}
"""


def plan_of(tmp_path, text: str = SPEC):
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    spec, _ = load_spec(path)
    return build_plan(spec)


def test_each_k_merges_its_seeded_subsets_of_the_pool(tmp_path):
    plan = plan_of(tmp_path)
    experts = {j.id: j.label for j in plan.jobs if j.kind == "train"}
    ta = [j for j in plan.jobs if j.kind == "merge" and j.lineage.sweep_of == "ta"]
    # C(4,1)=4 > 3: three subsets; C(4,2)=6: three; C(4,3)=4: three; C(4,4)=1: the one there is
    assert [(j.lineage.sweep["k"], j.lineage.sweep["subset"]) for j in ta] == [
        (k, s) for k, n in ((1, 3), (2, 3), (3, 3), (4, 1)) for s in range(1, n + 1)
    ]
    for job in ta:
        k = job.lineage.sweep["k"]
        assert job.label == f"ta[k={k},s={job.lineage.sweep['subset']}]"
        assert len(job.config.experts) == k == job.lineage.merge.k
        assert len(set(job.config.experts)) == k and set(job.config.experts) <= set(experts)
        assert job.lineage.merge.experts == [experts[e] for e in job.config.experts]
        assert job.config.theory is not None and job.config.theory.width_samples == 1024
        assert job.keep_artifact
    per_k = {}
    for job in ta:
        per_k.setdefault(job.lineage.sweep["k"], []).append(frozenset(job.config.experts))
    assert all(len(set(subsets)) == len(subsets) for subsets in per_k.values())  # distinct subsets
    evaluated = {j.label for j in plan.jobs if j.kind == "evaluate"}
    assert {j.label for j in ta} <= evaluated


def test_methods_share_subsets_and_sweeps_combine_with_k(tmp_path):
    plan = plan_of(tmp_path)
    merges = [j for j in plan.jobs if j.kind == "merge"]
    ties = [j for j in merges if j.lineage.sweep_of == "ties"]
    assert [j.label for j in ties[:2]] == ["ties[density=0.5,k=2,s=1]", "ties[density=0.5,k=2,s=2]"]
    assert len(ties) == 2 * 2 * 2 and all(not j.keep_artifact and j.config.theory is None for j in ties)
    assert ties[0].lineage.sweep == {"parameters.density": 0.5, "k": 2, "subset": 1}
    ta_k2 = [set(j.config.experts) for j in merges if j.lineage.sweep_of == "ta" and j.lineage.sweep["k"] == 2]
    ties_k2 = [set(j.config.experts) for j in ties if j.lineage.sweep["k"] == 2]
    assert ties_k2[:2] == ta_k2[:2]  # the same subsets, whatever the method: the curves compare like for like


def test_subsets_are_reproducible_and_distinct():
    assert choose_subsets(10, 3, 5, seed=7) == choose_subsets(10, 3, 5, seed=7)
    assert choose_subsets(10, 3, 5, seed=7) != choose_subsets(10, 3, 5, seed=8)
    drawn = choose_subsets(10, 3, 20, seed=1)
    assert len(set(drawn)) == 20 and all(len(s) == 3 and list(s) == sorted(s) for s in drawn)
    assert choose_subsets(5, 2, 100, seed=1) == [tuple(c) for c in __import__("itertools").combinations(range(5), 2)]
    assert len(choose_subsets(5, 2, 100, seed=1)) == math.comb(5, 2)


@pytest.mark.parametrize(
    ("merge", "message"),
    [
        ("{method: ties, experts: expert, subsets: {k: [5]}}", "merges.m.subsets.k: 5 is larger than the pool of 4"),
        ("{method: ties, experts: expert, subsets: {k: [0]}}", "merges.m.subsets.k[0]: Input should be greater"),
        ("{method: ties, experts: expert, subsets: {k: [2, 2]}}", "a k is listed twice"),
        ("{method: ties, experts: expert, subsets: {k: [2]}, weights: [1, 1]}", "merges.m.weights: not with subsets"),
        ("{method: ties, experts: expert, subsets: {k: [2], per_k: 0}}", "merges.m.subsets.per_k"),
        ("{method: slerp, experts: expert, subsets: {k: [2, 3]}}", "merges.m: merge method 'slerp' takes exactly 2"),
        ("{method: slerp, experts: expert}", "merges.m: merge method 'slerp' takes exactly 2 experts, got 4"),
        ("{method: ties, experts: expert, theory: {width_samples: 1}}", "merges.m.theory.width_samples"),
        ("{method: ties, experts: expert, parameters: {density: 1.5}}", "merges.m.parameters"),
        ("{method: dare_ties, experts: expert, parameters: {drop: 0.1}}", "unknown parameter 'drop'"),
        ("{method: rht, experts: expert, space: factor, theory: true}", "merges.m.theory: not in factor space"),
    ],
)
def test_bad_scaling_sweeps_are_one_line_before_anything_runs(tmp_path, capsys, merge, message):
    path = tmp_path / "spec.yaml"
    path.write_text(
        f"base_model: tiny\ntrain: {{tasks: {TASKS}}}\nfinetunes: {{expert: {{method: lora, per_task: true}}}}\n"
        f"merges: {{m: {merge}}}\nevaluate: {{tasks: [pefteval_quick_sentiment]}}\n"
    )
    out = tmp_path / "out"
    assert main(["run", str(path), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()
