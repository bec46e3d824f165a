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
