"""The report: tidy records from hand-built stores, group aggregates, and the three renderings.

Stores are written by hand in lm-eval's results format (no model, no Ray), so these tests are fast.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest

from pefteval_harness.errors import BadInput
from pefteval_harness.report.leaderboard import FORMATS, Report, collect, render, write_reports
from pefteval_harness.report.records import FIELDS, Record

# --- building stores by hand -----------------------------------------------------------------------------


def lm_eval_result(tasks: dict[str, dict], groups: dict[str, dict] | None = None) -> dict:
    """lm-eval's results dict. tasks: name -> {"scores": {"acc,none": .5, "acc_stderr,none": .1, ...},
    "n": effective samples, "metrics": [metric_list names], "filters": [filter names], "metadata": {...},
    "higher": {metric: bool}}; groups: name -> {"scores": ..., "subtasks": [...], "higher": ...}."""
    groups = groups or {}
    result: dict = {
        "results": {},
        "group_subtasks": {g: spec["subtasks"] for g, spec in groups.items()},
        "configs": {},
        "versions": {},
        "n-shot": {},
        "higher_is_better": {},
        "n-samples": {},
        "config": {"model": "hf", "model_args": "pretrained=/models/tiny"},
    }
    for name, spec in tasks.items():
        result["results"][name] = {"alias": name, "name": name, "sample_len": spec["n"], **spec["scores"]}
        config = {
            "task": name,
            "output_type": "multiple_choice",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in spec["metrics"]],
            "metadata": {"version": 1.0, **spec.get("metadata", {})},
        }
        if spec.get("filters"):
            config["filter_list"] = [{"name": f, "filter": [{"function": "take_first"}]} for f in spec["filters"]]
        result["configs"][name] = config
        result["versions"][name] = 1.0
        result["n-shot"][name] = 0
        result["higher_is_better"][name] = spec.get("higher", dict.fromkeys(spec["metrics"], True))
        result["n-samples"][name] = {"original": spec["n"] * 2, "effective": spec["n"]}
    for name, spec in groups.items():
        result["results"][name] = {"alias": name, "name": name, "sample_len": spec["n"], **spec["scores"]}
        result["higher_is_better"][name] = spec.get("higher", {})
        result.setdefault("groups", {})[name] = result["results"][name]
    return result


def acc_task(acc: float, n: int = 10, stderr: float | str = 0.1, **extra) -> dict:
    return {"scores": {"acc,none": acc, "acc_stderr,none": stderr}, "n": n, "metrics": ["acc"], **extra}


def lineage(model: str, method: str, trained_on=(), merge: dict | None = None, base: str = "tiny") -> dict:
    return {"model": model, "method": method, "base": base, "trained_on": list(trained_on), "merge": merge}


class StoreBuilder:
    """A store folder: plan.json (schema 2) and jobs/<id>/{job,status,result}.json."""

    def __init__(self, root: Path, groups: dict | None = None, schema: int | None = 2):
        self.root, self.groups, self.schema, self.jobs = root, groups or {}, schema, []

    def job(self, kind: str, label: str, config: dict, state: str | None = "done", result=None, lin=None,
            **status) -> str:  # fmt: skip
        job_id = f"{kind}-{len(self.jobs):016x}"
        lin = lin or lineage(label, config.get("method", kind))
        job = {"id": job_id, "label": label, "lineage": lin, "deps": [], "spec_hash": "abc",
               "resources": {"num_cpus": 1}, "config": {"kind": kind, **config}}  # fmt: skip
        self.jobs.append(job)
        folder = self.root / "jobs" / job_id
        folder.mkdir(parents=True)
        (folder / "job.json").write_text(json.dumps(job))
        if result is not None:
            (folder / "result.json").write_text(json.dumps({**result, "pefteval": {"job_id": job_id}}))
        if state is not None:
            (folder / "status.json").write_text(json.dumps({"state": state, **status}))
        return job_id

    def evaluate(self, label: str, task: str, result: dict | None, lin: dict | None = None, **kw) -> str:
        config = {"task": task, "task_identity": "x", "seed": 1234}
        return self.job("evaluate", label, config, result=result, lin=lin or lineage(label, "lora"), **kw)

    def write(self) -> Path:
        plan = {"spec_hash": "abc", "name": "test", "groups": self.groups, "jobs": self.jobs}
        if self.schema is not None:
            plan["schema"] = self.schema
        (self.root / "plan.json").write_text(json.dumps(plan))
        return self.root


def md_table(markdown: str) -> dict[str, list[str]]:
    """The first markdown table as {first cell: cells}; the header row under "model"."""
    rows = {}
    for line in markdown.split("\n\n")[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not set(cells[0]) <= {"-"}:
            rows[cells[0]] = cells
    return rows


def of(report: Report, kind: str, **match) -> list[Record]:
    return [r for r in report.records if r.record == kind and all(getattr(r, k) == v for k, v in match.items())]


# --- tidy records ----------------------------------------------------------------------------------------


def test_score_records_are_tidy(tmp_path):
    store = StoreBuilder(tmp_path, groups={"g": {"tasks": ["t1", "t9"], "aggregate": []}})
    task = {"scores": {"acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.75, "acc_norm_stderr,none": "N/A"},
            "n": 12, "metrics": ["acc", "acc_norm"], "higher": {"acc": True, "acc_norm": True}}  # fmt: skip
    job = store.evaluate("lora", "t1", lm_eval_result({"t1": task}), lineage("lora", "lora", ["t1", "t2"]))
    report = collect(store.write())

    acc, norm = of(report, "score")
    assert acc == Record(
        model="lora", method="lora", task="t1", metric="acc", value=0.5, stderr=0.1, job_id=job, record="score",
        filter="none", primary=True, higher_is_better=True, n=12, groups=["g"], base="tiny",
        trained_on=["t1", "t2"],
    )  # fmt: skip
    assert (norm.metric, norm.value, norm.stderr, norm.primary, norm.n) == ("acc_norm", 0.75, None, False, 12)
    assert [r.record for r in report.records] == ["score", "score"]  # no aggregate: "g" has none


def test_several_filters_give_one_row_each_and_the_primary_follows_the_config(tmp_path):
    scores = {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.05,
              "exact_match,flexible-extract": 0.5, "exact_match_stderr,flexible-extract": 0.07}  # fmt: skip
    plain = {"scores": scores, "n": 8, "metrics": ["exact_match"], "filters": ["strict-match", "flexible-extract"]}
    chosen = {**plain, "metadata": {"primary_filter": "flexible-extract"}}
    store = StoreBuilder(tmp_path)
    store.evaluate("a", "gsm", lm_eval_result({"gsm": plain}))
    store.evaluate("b", "gsm", lm_eval_result({"gsm": chosen}), lineage("b", "full"))
    report = collect(store.write())

    for model, primary_filter in (("a", "strict-match"), ("b", "flexible-extract")):
        rows = of(report, "score", model=model)
        assert [(r.filter, r.value) for r in rows] == [("strict-match", 0.25), ("flexible-extract", 0.5)]
        assert [r.filter for r in rows if r.primary] == [primary_filter]
    header = render(report, "markdown").splitlines()[0]
    assert "| gsm (exact_match, strict-match / exact_match, flexible-extract) " in header  # models differ
    assert "| average (exact_match) " in header


def test_primary_metric_from_task_metadata(tmp_path):
    task = {"scores": {"acc,none": 0.5, "f1,none": 0.4}, "n": 4, "metrics": ["acc", "f1"]}
    store = StoreBuilder(tmp_path)
    store.evaluate("a", "t", lm_eval_result({"t": {**task, "metadata": {"primary_metric": "f1"}}}))
    assert [r.metric for r in of(collect(store.write()), "score", primary=True)] == ["f1"]


def test_merge_rows_carry_lineage_as_fields(tmp_path):
    merge = {"method": "ties", "experts": ["ex:t1", "ex:t2"], "k": 2, "seed": 7}
    store = StoreBuilder(tmp_path)
    store.evaluate("m", "t1", lm_eval_result({"t1": acc_task(0.5)}), lineage("m", "merge:ties", ["t1", "t2"], merge))
    report = collect(store.write())

    (row,) = of(report, "score")
    assert (row.method, row.merge_method, row.experts, row.k, row.seed) == (
        "merge:ties",
        "ties",
        ["ex:t1", "ex:t2"],
        2,
        7,
    )
    (item,) = json.loads(render(report, "json"))
    assert item["experts"] == ["ex:t1", "ex:t2"] and item["merge_method"] == "ties" and item["k"] == 2
    (line,) = csv.DictReader(io.StringIO(render(report, "csv")))
    assert line["experts"] == "ex:t1;ex:t2" and line["trained_on"] == "t1;t2" and line["seed"] == "7"


# --- group aggregates ------------------------------------------------------------------------------------

GROUPS = {
    "weighted": {
        "tasks": ["t1", "t2"],
        "aggregate": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True, "filter_list": ["none"]}],
    },  # fmt: skip
    "plain": {
        "tasks": ["t1", "t2"],
        "aggregate": [{"metric": "acc", "aggregation": "mean", "weight_by_size": False, "filter_list": ["none"]}],
    },  # fmt: skip
    "no-aggregate": {"tasks": ["t1", "t2"]},
}


def test_group_aggregates_weighted_unweighted_and_missing_leaf(tmp_path):
    from lm_eval.api.metrics import pooled_sample_stderr, unweighted_mean_stderr

    store = StoreBuilder(tmp_path, groups=GROUPS)
    store.evaluate("a", "t1", lm_eval_result({"t1": acc_task(0.5, n=10, stderr=0.1)}))
    store.evaluate("a", "t2", lm_eval_result({"t2": acc_task(0.9, n=30, stderr=0.05)}))
    store.evaluate("b", "t1", lm_eval_result({"t1": acc_task(0.4)}), lineage("b", "full"))
    store.evaluate("b", "t2", None, lineage("b", "full"), state="failed", reason="RuntimeError: x", error_class="error")
    report = collect(store.write())

    weighted, plain = of(report, "aggregate", model="a")
    assert (weighted.group, weighted.task, weighted.metric, weighted.filter) == ("weighted", None, "acc", "none")
    assert math.isclose(weighted.value, (0.5 * 10 + 0.9 * 30) / 40) and weighted.n == 40
    assert math.isclose(weighted.stderr, pooled_sample_stderr([0.1, 0.05], [10, 30]))  # as lm-eval computes it
    assert math.isclose(plain.value, 0.7) and math.isclose(plain.stderr, unweighted_mean_stderr([0.1, 0.05]))
    assert weighted.primary and weighted.higher_is_better is True and weighted.method == "lora"
    for row in of(report, "aggregate", model="b"):
        assert row.value is None and row.error == "missing t2"
    assert not of(report, "aggregate", group="no-aggregate")

    table = md_table(render(report, "markdown"))
    assert table["model"] == [
        "model",
        "method",
        "t1 (acc)",
        "t2 (acc)",
        "plain (acc)",
        "weighted (acc)",
        "average (acc)",
    ]
    assert table["a"] == ["a", "lora", "0.500", "0.900", "0.700", "0.800", "0.700"]
    assert table["b"] == ["b", "full", "0.400", "FAILED", "-", "-", "-"]


# --- mixed stores: plain lm-eval files, failures, costs --------------------------------------------------


def test_a_store_and_a_plain_lm_eval_results_file_in_a_subfolder(tmp_path):
    store = StoreBuilder(tmp_path)
    job = store.evaluate("lora", "t1", lm_eval_result({"t1": acc_task(0.5)}))
    store.write()
    plain = lm_eval_result(
        {"t1": acc_task(0.6), "t2": acc_task(0.8, n=30)},
        groups={
            "grp": {
                "subtasks": ["t1", "t2"],
                "n": 40,
                "scores": {"acc,none": 0.75, "acc_stderr,none": "N/A"},
                "higher": {"acc": True},
            }
        },  # fmt: skip
    )
    (tmp_path / "lm-eval" / "tiny").mkdir(parents=True)
    (tmp_path / "lm-eval" / "tiny" / "results_2025.json").write_text(json.dumps(plain))
    (tmp_path / "jobs" / job / "stray.json").write_text(json.dumps(plain))  # under jobs/: never read
    report = collect(tmp_path)

    assert [(r.model, r.method, r.task) for r in of(report, "score")] == [
        ("lora", "lora", "t1"),
        ("pretrained=/models/tiny", "lm-eval", "t1"),
        ("pretrained=/models/tiny", "lm-eval", "t2"),
    ]
    assert {r.job_id for r in of(report, "score", method="lm-eval")} == {"lm-eval/tiny/results_2025.json"}
    assert of(report, "score", task="t2")[0].groups == ["grp"]
    (group,) = of(report, "aggregate")  # lm-eval's own group row, kept as it wrote it
    assert (group.group, group.value, group.stderr, group.n, group.primary) == ("grp", 0.75, None, 40, True)


def test_failures_and_training_costs(tmp_path):
    store = StoreBuilder(tmp_path)
    store.job("base", "base", {"builder": "tiny", "fingerprint": "f"})
    train = {"method": "lora", "train": {"tasks": ["t1"]}, "base": {"kind": "local", "path": "/m", "fingerprint": "f"}}
    cost = {"method": "lora", "tasks": ["t1"], "examples": 20, "examples_without_answer": 1, "truncated_prompts": 0,
            "steps": 5, "train_loss": 1.0, "loss_history": [2.0, 1.0], "trainable_params": 1000,
            "total_params": 100000, "train_seconds": 2.5, "peak_rss_mb": 512.0, "artifact_bytes": 2**20}  # fmt: skip
    train_id = store.job("train", "lora", train, result=cost, lin=lineage("lora", "lora", ["t1"], base="/m"))
    broken = store.job("train", "full", {**train, "method": "full"}, state="failed", reason="OSError: no weights",
                       error_class="error", attempts=1)  # fmt: skip
    merge_lineage = {"method": "ties", "experts": ["lora", "full"], "k": 2, "seed": 3}
    merged = lineage("m", "merge:ties", ["t1"], merge_lineage, base="/m")
    store.job("merge", "m", {"method": "ties", "experts": [train_id, broken], "seed": 3, "base": train["base"]},
              state="failed", reason=f"upstream job {broken} failed", error_class="upstream", lin=merged)  # fmt: skip
    store.job("train", "pending", train, state=None)  # not run yet: nothing
    store.evaluate("lora", "t1", lm_eval_result({"t1": acc_task(0.5)}), lineage("lora", "lora", ["t1"]))
    failed_eval = store.evaluate("full", "t1", None, lineage("full", "full", ["t1"]), state="failed",
                                 reason=f"upstream job {broken} failed", error_class="upstream")  # fmt: skip
    report = collect(store.write())

    costs = {r.metric: r.value for r in of(report, "cost")}
    assert costs == {"trainable_params": 1000, "trainable_share": 0.01, "steps": 5, "train_seconds": 2.5,
                     "peak_rss_mb": 512.0, "artifact_mb": 1.0, "examples_without_answer": 1}  # fmt: skip
    assert {(r.job_id, r.task, tuple(r.trained_on)) for r in of(report, "cost")} == {(train_id, None, ("t1",))}
    failures = of(report, "failure")
    assert [(r.model, r.task, r.error_class) for r in failures] == [
        ("full", None, "error"), ("m", None, "upstream"), ("full", "t1", "upstream"),
    ]  # fmt: skip
    assert failures[0].error == "OSError: no weights" and failures[2].job_id == failed_eval
    merge = failures[1]  # no evaluation describes it: its lineage is the job's own
    assert (merge.method, merge.merge_method, merge.experts, merge.k, merge.seed, merge.base) == (
        "merge:ties", "ties", ["lora", "full"], 2, 3, "/m",
    )  # fmt: skip

    markdown = render(report, "markdown")
    table = md_table(markdown)
    assert table["lora"] == ["lora", "lora", "0.500", "0.500"] and table["full"] == ["full", "full", "FAILED", "-"]
    assert "Training cost" in markdown and "1,000 (1.0%)" in markdown
    assert "Failed jobs:" in markdown and "OSError: no weights" in markdown


def test_the_average_is_over_comparable_primary_metrics_only(tmp_path):
    perplexity = {"scores": {"word_perplexity,none": 12.5}, "n": 5, "metrics": ["word_perplexity"],
                  "higher": {"word_perplexity": False}}  # fmt: skip
    exact = {"scores": {"exact_match,none": 0.5}, "n": 5, "metrics": ["exact_match"]}
    store = StoreBuilder(tmp_path)
    for label, acc in (("a", 0.25), ("b", 0.75)):
        store.evaluate(label, "t-acc", lm_eval_result({"t-acc": acc_task(acc)}), lineage(label, "lora"))
        store.evaluate(label, "t-ppl", lm_eval_result({"t-ppl": perplexity}), lineage(label, "lora"))
    store.evaluate("a", "t-em", lm_eval_result({"t-em": exact}))
    markdown = render(collect(store.write()), "markdown")

    table = md_table(markdown)
    assert table["model"][2:] == ["t-acc (acc)", "t-em (exact_match)", "t-ppl (word_perplexity)",
                                  "average (acc, exact_match)"]  # fmt: skip
    assert table["a"] == ["a", "lora", "0.250", "0.500", "12.500", "0.375"]
    assert table["b"] == ["b", "lora", "0.750", "-", "12.500", "-"]  # no t-em: no average
    assert "leaves out" in markdown and "t-ppl" in markdown


# --- renderings ------------------------------------------------------------------------------------------


def test_renderings_csv_json_markdown(tmp_path):
    store = StoreBuilder(tmp_path, groups=GROUPS)
    store.evaluate("a", "t1", lm_eval_result({"t1": acc_task(0.5)}))
    store.evaluate("a", "t2", lm_eval_result({"t2": acc_task(0.9)}))
    report = collect(store.write())
    assert FORMATS == ("markdown", "csv", "json")

    rows = json.loads(render(report, "json"))
    assert isinstance(rows, list) and len(rows) == len(report.records) == 4
    assert all({"record", "model", "task", "metric", "value", "job_id"} <= row.keys() for row in rows)
    assert all(list(row) == FIELDS for row in rows)
    assert [r["record"] for r in rows] == ["score", "score", "aggregate", "aggregate"]

    table = list(csv.reader(io.StringIO(render(report, "csv"))))
    assert table[0] == FIELDS and table[0][:5] == ["model", "method", "task", "metric", "value"]
    assert len(table) == 1 + len(report.records)
    first = dict(zip(table[0], table[1], strict=True))
    assert (
        first["value"] == "0.5"
        and first["primary"] == "true"
        and first["error"] == ""
        and first["groups"] == "no-aggregate;plain;weighted"
    )

    table = md_table(render(report, "markdown"))
    assert table["model"] == [
        "model",
        "method",
        "t1 (acc)",
        "t2 (acc)",
        "plain (acc)",
        "weighted (acc)",
        "average (acc)",
    ]
    assert table["a"] == ["a", "lora", "0.500", "0.900", "0.700", "0.700", "0.700"]
    assert render(Report(), "markdown") == "No results yet.\n"
    with pytest.raises(BadInput):
        render(report, "html")


def test_write_reports_writes_three_files_and_returns_the_markdown(tmp_path):
    store = StoreBuilder(tmp_path)
    store.evaluate("a", "t1", lm_eval_result({"t1": acc_task(0.5)}))
    markdown = write_reports(store.write())
    assert markdown == (tmp_path / "leaderboard.md").read_text() == render(collect(tmp_path), "markdown")
    assert json.loads((tmp_path / "leaderboard.json").read_text())[0]["value"] == 0.5
    assert (tmp_path / "leaderboard.csv").read_text().startswith("model,method,task,metric,value,")
    assert collect(tmp_path).records == collect(tmp_path).records  # its own files are not read back


def test_a_plan_of_an_older_schema_is_refused(tmp_path):
    store = StoreBuilder(tmp_path, schema=None)
    store.evaluate("a", "t1", lm_eval_result({"t1": acc_task(0.5)}))
    store.write()
    with pytest.raises(BadInput) as error:
        collect(tmp_path)
    assert str(error.value) == (
        f"{tmp_path}/plan.json: written by an older pefteval (plan schema 1); this version reads schema 2: "
        "rerun into a new --output folder"
    )


# --- task families -----------------------------------------------------------------------------------------

FAMILIES = {f"pefteval-peft-{family}": [f"{family[:3]}{i}" for i in range(4)]
            for family in ("classification", "generation", "reasoning", "instruction")}  # fmt: skip
MEAN = [{"metric": "acc", "aggregation": "mean", "weight_by_size": False, "filter_list": ["none"]}]


def md_section(markdown: str, heading: str) -> dict[str, list[str]]:
    """The first table under a `## heading` line, as md_table reads it."""
    after = ("\n" + markdown).split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return md_table(next(block for block in after.split("\n\n") if block.lstrip().startswith("|")))


def family_store(root: Path) -> Path:
    """16 tasks in four families, an umbrella group over all of them, one task in no group; two models."""
    groups = {name: {"tasks": tasks, "aggregate": MEAN} for name, tasks in FAMILIES.items()}
    groups["pefteval-peft15"] = {"tasks": [t for tasks in FAMILIES.values() for t in tasks], "aggregate": MEAN}
    store = StoreBuilder(root, groups=groups)
    for label, method, offset in (("lora", "lora", 0.0), ("fft", "full", 0.1)):
        for i, task in enumerate([*groups["pefteval-peft15"]["tasks"], "solo"]):
            result = lm_eval_result({task: acc_task(round(0.3 + 0.02 * i + offset, 2))})
            store.evaluate(label, task, result, lineage(label, method))
    return store.write()


def test_many_tasks_one_table_per_family_and_aggregates_up_front(tmp_path):
    markdown = render(collect(family_store(tmp_path)), "markdown")

    overview = md_table(markdown)  # 17 tasks: aggregates, the task in no family, the average
    assert overview["model"] == ["model", "method", "solo (acc)", "pefteval-peft-classification (acc)",
                                 "pefteval-peft-generation (acc)", "pefteval-peft-instruction (acc)",
                                 "pefteval-peft-reasoning (acc)", "pefteval-peft15 (acc)", "average (acc)"]  # fmt: skip
    # classification: tasks 0-3 (0.30..0.36), generation 4-7, reasoning 8-11, instruction 12-15, solo 16
    assert overview["lora"] == ["lora", "lora", "0.620", "0.330", "0.410", "0.570", "0.490", "0.450", "0.460"]
    assert overview["fft"][2:4] == ["0.720", "0.430"]
    for name, tasks in FAMILIES.items():
        table = md_section(markdown, name)
        assert table["model"] == ["model", "method", *(f"{t} (acc)" for t in tasks), f"{name} (acc)"]
    reasoning = md_section(markdown, "pefteval-peft-reasoning")
    assert reasoning["lora"] == ["lora", "lora", "0.460", "0.480", "0.500", "0.520", "0.490"]
    assert reasoning["fft"] == ["fft", "full", "0.560", "0.580", "0.600", "0.620", "0.590"]
    assert "\n## pefteval-peft15\n" not in markdown  # an umbrella over the families: its aggregate is up front


def test_family_tables_only_when_the_first_table_does_not_show_them(tmp_path):
    one = StoreBuilder(tmp_path / "one", groups={"quick": {"tasks": ["t1", "t2"]}})
    two = StoreBuilder(tmp_path / "two", groups={"g1": {"tasks": ["t1"], "aggregate": MEAN}, "g2": {"tasks": ["t2"]}})
    for store in (one, two):
        store.root.mkdir()
        for task, acc in (("t1", 0.5), ("t2", 0.7)):
            store.evaluate("a", task, lm_eval_result({task: acc_task(acc)}))
    single = render(collect(one.write()), "markdown")
    assert "## " not in single and md_table(single)["a"] == ["a", "lora", "0.500", "0.700", "0.600"]

    double = render(collect(two.write()), "markdown")
    assert md_table(double)["a"] == ["a", "lora", "0.500", "0.700", "0.500", "0.600"]  # all tasks, g1, average
    assert md_section(double, "g1")["a"] == ["a", "lora", "0.500", "0.500"]  # its aggregate, no average
    assert md_section(double, "g2")["a"] == ["a", "lora", "0.700", "0.700"]  # no aggregate: the average


# --- robustness gaps ---------------------------------------------------------------------------------------


def adversarial_store(root: Path) -> Path:
    store = StoreBuilder(root)
    partner = {"metadata": {"clean_partner": "clean1"}}
    partner2 = {"metadata": {"clean_partner": "clean2"}}
    scores = {"a": {"clean1": 0.8, "adv1": 0.5, "clean2": 0.6, "adv2": 0.55},
              "b": {"clean1": 0.7, "adv1": None, "clean2": 0.9, "adv2": 0.9}}  # fmt: skip
    for label, tasks in scores.items():
        for task, acc in tasks.items():
            extra = {"adv1": partner, "adv2": partner2}.get(task, {})
            if acc is None:
                store.evaluate(label, task, None, lineage(label, "lora"), state="failed", reason="boom",
                               error_class="error")  # fmt: skip
            else:
                store.evaluate(label, task, lm_eval_result({task: acc_task(acc, **extra)}), lineage(label, "lora"))
    exact = {"scores": {"exact_match,none": 0.25}, "n": 4, "metrics": ["exact_match"], **partner}
    store.evaluate("c", "clean1", lm_eval_result({"clean1": acc_task(0.75)}), lineage("c", "ia3"))
    store.evaluate("c", "adv1", lm_eval_result({"adv1": exact}), lineage("c", "ia3"))
    return store.write()


def test_robustness_gaps_pair_tasks_by_their_clean_partner(tmp_path):
    report = collect(adversarial_store(tmp_path))

    assert {r.task: r.clean_partner for r in of(report, "score", model="a")} == {
        "clean1": None, "adv1": "clean1", "clean2": None, "adv2": "clean2"
    }  # fmt: skip
    gaps = {(r.model, r.task): r for r in of(report, "gap")}
    assert math.isclose(gaps["a", "adv1"].value, 0.8 - 0.5) and math.isclose(gaps["a", "adv2"].value, 0.6 - 0.55)
    assert (gaps["a", "adv1"].metric, gaps["a", "adv1"].clean_partner, gaps["a", "adv1"].higher_is_better) == (
        "acc", "clean1", False
    )  # fmt: skip
    assert math.isclose(gaps["a", None].value, (0.3 + 0.05) / 2) and gaps["a", None].n == 2
    assert gaps["a", None].metric == "mean"
    assert gaps["b", "adv1"].value is None and gaps["b", "adv1"].error == "no score for adv1"
    assert gaps["b", "adv2"].value == 0.0
    assert gaps["b", None].value is None and gaps["b", None].error == "missing adv1"
    assert gaps["c", "adv1"].error == "primary metrics differ: clean1 acc, adv1 exact_match"
    assert ("c", "adv2") not in gaps  # never scored there: no row

    markdown = render(report, "markdown")
    summary = md_section(markdown, "Robustness")
    assert summary["model"] == ["model", "method", "adversarial tasks", "clean (mean)", "adversarial (mean)",
                                "gap (mean)"]  # fmt: skip
    assert summary["a"] == ["a", "lora", "2", "0.700", "0.525", "+0.175"]
    assert summary["b"] == ["b", "lora", "2", "-", "-", "-"]
    detail = markdown.split("\n## Robustness\n", 1)[1].split("| adversarial task", 1)[1].splitlines()
    assert "| adv1 | clean1 | acc | a | lora | 0.800 | 0.500 | +0.300 |" in [" ".join(line.split()) for line in detail]
    assert "- no gap for c on adv1: primary metrics differ: clean1 acc, adv1 exact_match\n" in markdown
    rows = json.loads(render(report, "json"))  # every record, gaps included, after the aggregates
    shown = [(row["model"], row["task"], row["value"]) for row in rows if row["record"] == "gap"]
    assert shown[:3] == [(model, task, gaps[model, task].value) for model, task in (("a", "adv1"), ("a", "adv2"),
                                                                                      ("a", None))]  # fmt: skip


def test_no_robustness_section_without_an_adversarial_task(tmp_path):
    store = StoreBuilder(tmp_path)
    store.evaluate("a", "t1", lm_eval_result({"t1": acc_task(0.5)}))
    report = collect(store.write())
    assert not of(report, "gap") and "Robustness" not in render(report, "markdown")


# --- training costs ----------------------------------------------------------------------------------------

TRAIN = {"method": "lora", "train": {"tasks": ["t1"]}, "base": {"kind": "local", "path": "/m", "fingerprint": "f"}}


def test_cost_columns_for_tokens_throughput_and_accelerator_memory(tmp_path):
    store = StoreBuilder(tmp_path)
    common = {"steps": 5, "trainable_params": 1000, "total_params": 100000, "train_seconds": 2.5,
              "peak_rss_mb": 512.0, "artifact_bytes": 2**20, "examples_without_answer": 0}  # fmt: skip
    store.job("train", "cpu", TRAIN, result={**common, "trained_tokens": 12345, "tokens_per_second": 4938.0,
                                             "peak_accelerator_mb": None})  # fmt: skip
    store.job("train", "gpu", TRAIN, result={**common, "trained_tokens": 12345, "tokens_per_second": 90000.4,
                                             "peak_accelerator_mb": 2048.0})  # fmt: skip
    report = collect(store.write())

    assert {r.metric: r.value for r in of(report, "cost", model="gpu")}.items() >= {
        ("trained_tokens", 12345), ("tokens_per_second", 90000.4), ("peak_accelerator_mb", 2048.0)
    }  # fmt: skip
    assert "peak_accelerator_mb" not in {r.metric for r in of(report, "cost", model="cpu")}  # None: no record
    table = md_section(render(report, "markdown"), "Training cost")
    assert table["model"] == ["model", "method", "trainable params", "steps", "tokens", "train s", "tokens/s",
                              "peak RSS MB", "peak accelerator MB", "artifact MB",
                              "examples without answer"]  # fmt: skip
    assert table["cpu"] == ["cpu", "lora", "1,000 (1.0%)", "5", "12,345", "2.5", "4,938", "512", "-", "1.00", "0"]
    assert table["gpu"][6:9] == ["90,000", "512", "2048"]


def test_cost_columns_no_job_has_are_left_out(tmp_path):
    store = StoreBuilder(tmp_path)  # a train result of before tokens and accelerator memory were recorded
    store.job("train", "old", TRAIN, result={"steps": 5, "trainable_params": 10, "train_seconds": 1.0})
    table = md_section(render(collect(store.write()), "markdown"), "Training cost")
    assert table["model"] == ["model", "method", "trainable params", "steps", "train s"]


# --- weight-update analyses --------------------------------------------------------------------------------


def module(name: str, layer: int | None, overlap: float | None, rank: int = 4) -> dict:
    return {"module": name, "layer": layer, "kind": name.rsplit(".", 1)[-1], "shape": [8, 8], "rank": rank,
            "effective_rank": rank - 0.5, "frobenius": 0.25, "relative_frobenius": 0.01,
            "subspace_overlap": overlap, "principal_angles_deg": None if overlap is None else [10.0, 20.0],
            "right_subspace_overlap": None if overlap is None else overlap / 2}  # fmt: skip


def analysis(modules: list[dict], overlap: float | None) -> dict:
    summary = {"modules": len(modules), "rank": 4.0, "effective_rank": 3.5, "frobenius": 0.5,
               "relative_frobenius": 0.0123, "subspace_overlap": overlap,
               "right_subspace_overlap": None if overlap is None else 0.125}  # fmt: skip
    return {"weight_update": True, "reason": None, "method": "lora", "reference": overlap is not None,
            "settings": {"rank_tolerance": 0.001, "top_k": 8}, "modules": modules, "summary": summary}  # fmt: skip


PROMPT_REASON = "prompt_tuning learns virtual token embeddings: no weight of the model changes"


def analysis_store(root: Path) -> Path:
    store = StoreBuilder(root)
    config = {"method": "lora", "settings": {"rank_tolerance": 0.001, "top_k": 8}}
    lora = [module("model.layers.0.self_attn.q_proj", 0, 0.2), module("model.layers.0.self_attn.v_proj", 0, 0.4),
            module("model.layers.1.self_attn.q_proj", 1, 0.9), module("lm_head", None, 0.5)]  # fmt: skip
    store.job("analyze", "lora", config, result=analysis(lora, 0.5), lin=lineage("lora", "lora", ["t1"]))
    fft = [module("model.layers.0.self_attn.q_proj", 0, None, rank=8)]
    store.job("analyze", "fft", {**config, "method": "full"}, result={**analysis(fft, None), "method": "full"},
              lin=lineage("fft", "full", ["t1"]))  # fmt: skip
    prompt = {"weight_update": False, "reason": PROMPT_REASON, "method": "prompt_tuning", "reference": True,
              "settings": {"rank_tolerance": 0.001, "top_k": 8}, "modules": [],
              "summary": {"modules": 0, "rank": 0.0, "effective_rank": 0.0, "frobenius": 0.0,
                          "relative_frobenius": 0.0, "subspace_overlap": None}}  # fmt: skip
    store.job("analyze", "prompt", {**config, "method": "prompt_tuning"}, result=prompt,
              lin=lineage("prompt", "prompt_tuning", ["t1"]))  # fmt: skip
    store.job("analyze", "ia3", {**config, "method": "ia3"}, state="failed", reason="RuntimeError: x",
              error_class="error", lin=lineage("ia3", "ia3", ["t1"]))  # fmt: skip
    return store.write()


def test_analysis_records_per_module_and_summary(tmp_path):
    report = collect(analysis_store(tmp_path))

    lora = of(report, "analysis", model="lora")
    assert [(r.metric, r.value, r.n) for r in lora if r.module is None] == [
        ("weight_update", 1.0, None), ("rank", 4.0, 4), ("effective_rank", 3.5, 4), ("frobenius", 0.5, 4),
        ("relative_frobenius", 0.0123, 4), ("subspace_overlap", 0.5, 4), ("right_subspace_overlap", 0.125, 4),
    ]  # fmt: skip
    q0 = [r for r in lora if r.module == "model.layers.0.self_attn.q_proj"]
    assert [(r.metric, r.value, r.layer) for r in q0] == [("rank", 4.0, 0), ("effective_rank", 3.5, 0),
        ("frobenius", 0.25, 0), ("relative_frobenius", 0.01, 0), ("subspace_overlap", 0.2, 0),
        ("right_subspace_overlap", 0.1, 0)]  # fmt: skip
    assert {r.layer for r in lora if r.module == "lm_head"} == {None}
    fft = {r.metric for r in of(report, "analysis", model="fft")}
    assert not {"subspace_overlap", "right_subspace_overlap"} & fft  # it is the reference: no overlap
    (prompt,) = of(report, "analysis", model="prompt")  # no ΔW: no zeros either
    assert (prompt.metric, prompt.value, prompt.note, prompt.method) == (
        "weight_update", 0.0, PROMPT_REASON, "prompt_tuning"
    )  # fmt: skip
    (failure,) = of(report, "failure")
    assert (failure.model, failure.task, failure.error) == ("ia3", None, "RuntimeError: x")
    rows = list(csv.DictReader(io.StringIO(render(report, "csv"))))
    assert {(row["module"], row["layer"]) for row in rows if row["model"] == "lora"} >= {
        ("", ""), ("model.layers.1.self_attn.q_proj", "1"), ("lm_head", "")
    }  # fmt: skip


def test_analysis_tables_per_method_and_per_layer(tmp_path):
    markdown = render(collect(analysis_store(tmp_path)), "markdown")

    summary = md_section(markdown, "Weight updates")
    assert summary["model"] == ["model", "method", "modules", "rank", "effective rank", "Frobenius norm",
                                "relative norm", "subspace overlap with FFT"]  # fmt: skip
    assert summary["lora"] == ["lora", "lora", "4", "4.0", "3.5", "0.5", "0.0123", "0.500"]
    assert summary["fft"] == ["fft", "full", "1", "4.0", "3.5", "0.5", "0.0123", "-"]
    assert summary["prompt"] == ["prompt", "prompt_tuning", "no ΔW (prompt learning)", "-", "-", "-", "-", "-"]
    assert f"- prompt: {PROMPT_REASON}\n" in markdown
    per_layer = md_table(markdown.split("per layer (mean over the layer's modules):\n\n", 1)[1])
    assert per_layer["layer"] == ["layer", "lora"]  # fft has no overlap (it is the reference); lm_head no layer
    assert per_layer["0"] == ["0", "0.300"] and per_layer["1"] == ["1", "0.900"]


# --- sweeps ------------------------------------------------------------------------------------------------


def test_sweep_points_carry_their_sweep_on_every_record(tmp_path):
    store = StoreBuilder(tmp_path, groups={"g": {"tasks": ["t1"], "aggregate": MEAN}})
    point = {**lineage("lora[r=4]", "lora", ["t1"]), "sweep_of": "lora", "sweep": {"config.r": 4}}
    store.job("train", "lora[r=4]", TRAIN, result={"steps": 5, "trainable_params": 10}, lin=point)
    store.evaluate("lora[r=4]", "t1", lm_eval_result({"t1": acc_task(0.5)}), point)
    store.evaluate("fft", "t1", lm_eval_result({"t1": acc_task(0.6)}), lineage("fft", "full"))
    report = collect(store.write())

    swept = [r for r in report.records if r.model == "lora[r=4]"]
    assert {r.record for r in swept} == {"score", "aggregate", "cost"}
    assert all(r.sweep_of == "lora" and r.sweep == {"config.r": 4} for r in swept)
    assert all(r.sweep_of is None and r.sweep == {} for r in report.records if r.model == "fft")
    assert FIELDS[-10:] == ["clean_partner", "sweep_of", "sweep", "module", "layer", "note", "strategy", "affect",
                            "form", "log"]  # new columns last  # fmt: skip
    (item, *_) = json.loads(render(report, "json"))
    assert item["sweep"] == {"config.r": 4} and item["sweep_of"] == "lora"
    line = next(csv.DictReader(io.StringIO(render(report, "csv"))))
    assert json.loads(line["sweep"]) == {"config.r": 4} and line["sweep_of"] == "lora"


def test_an_aggregate_leaves_out_leaves_without_its_metric_but_not_failed_leaves(tmp_path):
    exact = {"scores": {"exact_match,none": 0.1}, "n": 10, "metrics": ["exact_match"]}  # gsm8k in an acc mean
    groups = {"reasoning": {"tasks": ["arc", "gsm", "wino"], "aggregate": MEAN},
              "gen": {"tasks": ["gsm"], "aggregate": MEAN}}  # fmt: skip
    store = StoreBuilder(tmp_path, groups=groups)
    for label, wino in (("a", 0.75), ("b", None)):
        store.evaluate(label, "arc", lm_eval_result({"arc": acc_task(0.25)}))
        store.evaluate(label, "gsm", lm_eval_result({"gsm": exact}))
        if wino is None:
            store.evaluate(label, "wino", None, state="failed", reason="boom", error_class="error")
        else:
            store.evaluate(label, "wino", lm_eval_result({"wino": acc_task(wino)}))
    report = collect(store.write())

    (a,) = of(report, "aggregate", model="a", group="reasoning")
    assert math.isclose(a.value, (0.25 + 0.75) / 2) and a.n == 20  # as lm-eval: gsm reports no acc
    (b,) = of(report, "aggregate", model="b", group="reasoning")
    assert b.value is None and b.error == "missing wino"  # a failed leaf is not silently dropped
    (none,) = of(report, "aggregate", model="a", group="gen")
    assert none.value is None and none.error == "no leaf task reports acc (none)"
