"""The report's affective sections (AU, AG) and prompting strategies, from a store built by hand in lm-eval's
results format: three models (base, lora, prompt tuning) × three strategies (zero-shot, 3-shot, CoT) on two AU
tasks in both forms and one AG task, with unparsed answers and one failed job. The strategy × method tables'
numbers are computed by hand below; strategies never mix in the generic tables; the heat maps are PNGs, linked;
and a store without strategies renders as it did before strategies existed."""

from __future__ import annotations

import csv
import io
import json

from pefteval_harness.report.affective import draw_heat_map, heat_map
from pefteval_harness.report.leaderboard import collect, render, write_reports
from pefteval_harness.report.plots import plots
from pefteval_harness.report.records import FIELDS
from tests.test_report import GROUPS, TRAIN, StoreBuilder, acc_task, lineage, lm_eval_result, md_table, of

PNG = b"\x89PNG\r\n\x1a\n"
STRATEGIES = {
    "zero-shot": {"name": "zero-shot", "kind": "zero_shot"},
    "3-shot": {"name": "3-shot", "kind": "k_shot", "num_fewshot": 3},
    "CoT": {"name": "CoT", "kind": "cot"},
}
MODELS = {"base": "base", "lora": "lora", "pt": "prompt_tuning"}
SST5, EMO, ESCONV = "pefteval_affect_sst5", "pefteval_affect_tweet_emotion", "pefteval_affect_esconv"
EQ_BENCH = "pefteval_affect_eq_bench"  # generative, zero-shot only, scored 0-100: in no strategy mean

# (model, strategy) -> (sst5 acc, sst5 macro_f1, tweet_emotion macro_f1): loglikelihood forms (no CoT)
LOGLIKELIHOOD = {
    ("base", "zero-shot"): (0.50, 0.45, 0.30), ("base", "3-shot"): (0.60, 0.55, 0.40),
    ("lora", "zero-shot"): (0.70, 0.65, 0.50), ("lora", "3-shot"): (0.80, 0.75, 0.60),
    ("pt", "zero-shot"): (0.60, 0.55, 0.20), ("pt", "3-shot"): (0.65, 0.60, 0.25),
}  # fmt: skip
# (model, strategy) -> (sst5_gen acc, its parsed, tweet_emotion_gen macro_f1, its parsed); None: the job failed
GENERATIVE = {
    ("base", "zero-shot"): (0.40, 0.5, 0.20, 0.7), ("base", "3-shot"): (0.50, 0.9, 0.30, 1.0),
    ("base", "CoT"): (0.55, 0.6, 0.25, 0.4),
    ("lora", "zero-shot"): (0.80, 1.0, 0.40, 1.0), ("lora", "3-shot"): (0.90, 1.0, 0.50, 0.8),
    ("lora", "CoT"): (0.70, 0.8, 0.30, 0.6),
    ("pt", "zero-shot"): (0.60, 0.2, 0.10, 0.0), ("pt", "3-shot"): (0.70, 0.5, 0.20, 0.3),
    ("pt", "CoT"): (0.65, 0.9, None, None),
}  # fmt: skip
# (model, strategy) -> (bleu2, rougeL, distinct1, distinct2, parsed): ESConv, zero-shot and 3-shot only
GENERATION = {
    ("base", "zero-shot"): (0.05, 0.11, 0.30, 0.50, 0.9), ("base", "3-shot"): (0.07, 0.13, 0.32, 0.52, 1.0),
    ("lora", "zero-shot"): (0.10, 0.16, 0.40, 0.60, 1.0), ("lora", "3-shot"): (0.12, 0.18, 0.42, 0.62, 1.0),
    ("pt", "zero-shot"): (0.02, 0.08, 0.20, 0.30, 0.5), ("pt", "3-shot"): (0.03, 0.09, 0.22, 0.33, 0.75),
}  # fmt: skip
JUDGED = ("lora", "zero-shot")  # its ESConv replies were judged: judge_score, judge_parsed


def task(metadata: dict, scores: dict[str, float], strategy: str, n: int = 20) -> dict:
    """One task's spec for lm_eval_result: CoT scores come under the `cot` filter, the others under "none"."""
    filt = "cot" if strategy == "CoT" else "none"
    spec = {"scores": {f"{m},{filt}": v for m, v in scores.items()}, "n": n, "metrics": list(scores),
            "metadata": {"version": 1.0, **metadata}}  # fmt: skip
    return {**spec, "filters": [filt]} if filt != "none" else spec


def meta(affect: str, form: str, primary: str, strategies: list[str], base_task: str | None = None) -> dict:
    out = {"affect": affect, "form": form, "primary_metric": primary, "strategies": strategies}
    return {**out, "base_task": base_task} if base_task else out


def affect_store(root, trained: dict[str, int] | None = None):
    """The store; `trained`: model -> trainable parameters of a train job of its own."""
    store = StoreBuilder(root, groups={"pefteval-affect-au": {
        "tasks": [SST5, EMO, f"{SST5}_gen", f"{EMO}_gen"],
        "aggregate": [{"metric": "parsed", "aggregation": "mean", "weight_by_size": False}],
    }})  # fmt: skip

    def evaluate(model, strategy, name, spec):
        config = {"task": name, "task_identity": "x", "seed": 1234, "strategy": STRATEGIES[strategy]}
        lin = lineage(model, MODELS[model])
        if spec is None:
            store.job("evaluate", model, config, state="failed", lin=lin, reason="RuntimeError: out of memory",
                      error_class="error")  # fmt: skip
        else:
            store.job("evaluate", model, config, result=lm_eval_result({name: spec}), lin=lin)

    for model, params in (trained or {}).items():
        store.job(
            "train", model, TRAIN, result={"steps": 5, "trainable_params": params}, lin=lineage(model, MODELS[model])
        )
    understanding = ["zero_shot", "k_shot"]
    for model in MODELS:
        for strategy in STRATEGIES:
            if (model, strategy) in LOGLIKELIHOOD:
                acc, f1, emo = LOGLIKELIHOOD[model, strategy]
                evaluate(model, strategy, SST5, task(meta("understanding", "loglikelihood", "acc", understanding),
                                                     {"acc": acc, "macro_f1": f1}, strategy))  # fmt: skip
                evaluate(model, strategy, EMO, task(meta("understanding", "loglikelihood", "macro_f1", understanding),
                                                    {"macro_f1": emo}, strategy))  # fmt: skip
            acc, parsed_sst5, emo, parsed_emo = GENERATIVE[model, strategy]
            gen = [*understanding, "cot"]
            evaluate(model, strategy, f"{SST5}_gen", task(meta("understanding", "generative", "acc", gen, SST5),
                                                          {"acc": acc, "parsed": parsed_sst5}, strategy))  # fmt: skip
            evaluate(model, strategy, f"{EMO}_gen", None if emo is None else task(
                meta("understanding", "generative", "macro_f1", gen, EMO), {"macro_f1": emo, "parsed": parsed_emo},
                strategy))  # fmt: skip
            if (model, strategy) in GENERATION:
                values = dict(zip(("bleu2", "rougeL", "distinct1", "distinct2", "parsed"),
                                  GENERATION[model, strategy], strict=True))  # fmt: skip
                if (model, strategy) == JUDGED:
                    values |= {"judge_score": 3.5, "judge_parsed": 0.75}
                spec = task(meta("generation", "generative", "bleu2", understanding), values, strategy)
                evaluate(model, strategy, ESCONV, spec)
            if strategy == "zero-shot":
                spec = task(meta("understanding", "generative", "eqbench", ["zero_shot"]),
                            {"eqbench": 40.0, "parsed": 0.5}, strategy)  # fmt: skip
                evaluate(model, strategy, EQ_BENCH, spec)
    # the judge's own block in a result is not a task: no record comes from it
    judged = next(j for j in store.jobs if j["config"].get("task") == ESCONV and j["label"] == "lora")
    path = root / "jobs" / judged["id"] / "result.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "pefteval_judge": {"judge_score": 3.5}}))
    return store.write()


def section(markdown: str, heading: str) -> str:
    return markdown.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def table_after(text: str, heading: str) -> tuple[dict[str, list[str]], str]:
    """The table under `heading` (keyed by its first cells, as md_table), and the text that follows it."""
    after = text.split(heading + "\n\n", 1)[1]
    block, rest = after.split("\n\n", 1) if "\n\n" in after else (after, "")
    rows = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not set(cells[0]) <= {"-"}:
            rows[" ".join(cells[:3]) if "strategy" in block.splitlines()[0] else cells[0]] = cells
    return rows, rest


def test_strategy_by_method_tables_per_form_with_parse_rates(tmp_path):
    markdown = render(collect(affect_store(tmp_path)), "markdown")
    au = section(markdown, "Affective understanding (AU)")

    table, notes = table_after(au, "### Strategy × method: loglikelihood form")
    assert table["model"] == ["model", "method", "zero-shot", "3-shot"]  # no CoT run of a loglikelihood form
    assert table["base"] == ["base", "base", "0.400", "0.500"]  # (0.50 + 0.30) / 2, (0.60 + 0.40) / 2
    assert table["lora"] == ["lora", "lora", "0.600", "0.700"]
    assert table["pt"] == ["pt", "prompt_tuning", "0.400", "0.450"]
    assert f"mean over 2 tasks of each one's primary metric (acc, macro_f1): {SST5}, {EMO}." in notes

    table, notes = table_after(au, "### Strategy × method: generative form")
    assert table["model"] == ["model", "method", "zero-shot", "zero-shot % parseable", "3-shot",
                              "3-shot % parseable", "CoT", "CoT % parseable"]  # fmt: skip
    assert table["base"] == ["base", "base", "0.300", "60.0", "0.400", "95.0", "0.400", "50.0"]
    assert table["lora"] == ["lora", "lora", "0.600", "100.0", "0.700", "90.0", "0.500", "70.0"]
    # pt's CoT run of tweet_emotion_gen failed: no mean over the one task left, and said so
    assert table["pt"] == ["pt", "prompt_tuning", "0.350", "10.0", "0.450", "40.0", "– (1/2)", "– (1/2)"]
    assert '"– (n/N)": only n of the N tasks scored' in notes and "% parseable:" in notes
    assert f"Not in the means (see its own table below): {EQ_BENCH} (not evaluated under 3-shot, CoT)." in notes

    ag = section(markdown, "Affective generation (AG)")
    table, notes = table_after(ag, "### Strategy × method: generative form")
    assert table["model"] == ["model", "method", "zero-shot", "zero-shot % parseable", "3-shot",
                              "3-shot % parseable"]  # fmt: skip
    assert table["pt"] == ["pt", "prompt_tuning", "0.020", "50.0", "0.030", "75.0"]
    assert f"mean over 1 task of each one's primary metric (bleu2): {ESCONV}." in notes
    assert "loglikelihood form" not in ag and "(n/N)" not in ag and "Not in" not in ag  # generative only, complete


def test_per_task_tables_show_every_metric_per_model_and_strategy(tmp_path):
    markdown = render(collect(affect_store(tmp_path)), "markdown")
    au = section(markdown, "Affective understanding (AU)")

    sst5, _ = table_after(au, f"#### {SST5}\n\nPrimary metric: acc.")
    assert sst5["model method strategy"] == ["model", "method", "strategy", "acc", "macro_f1"]  # one filter
    assert sst5["lora lora 3-shot"] == ["lora", "lora", "3-shot", "0.800", "0.750"]
    assert len(sst5) == 1 + 6  # 3 models × zero-shot, 3-shot

    emo, _ = table_after(au, f"#### {EMO}_gen\n\nPrimary metric: macro_f1.")
    assert emo["model method strategy"] == ["model", "method", "strategy", "filter", "macro_f1", "% parseable"]
    assert emo["base base CoT"] == ["base", "base", "CoT", "cot", "0.250", "40.0"]  # CoT's answer filter
    assert emo["base base zero-shot"] == ["base", "base", "zero-shot", "none", "0.200", "70.0"]
    assert emo["pt prompt_tuning CoT"] == ["pt", "prompt_tuning", "CoT", "–", "FAILED", "–"]

    esconv, _ = table_after(section(markdown, "Affective generation (AG)"), f"#### {ESCONV}\n\nPrimary metric: bleu2.")
    assert esconv["model method strategy"] == ["model", "method", "strategy", "bleu2", "rougeL", "distinct1",
                                               "distinct2", "judge_score", "judge_parsed", "% parseable"]  # fmt: skip
    assert esconv["lora lora zero-shot"][3:] == ["0.100", "0.160", "0.400", "0.600", "3.500", "0.750", "100.0"]
    assert esconv["lora lora 3-shot"][3:] == ["0.120", "0.180", "0.420", "0.620", "–", "–", "100.0"]  # not judged


def test_strategies_never_mix_in_generic_tables_records_and_aggregates(tmp_path):
    report = collect(affect_store(tmp_path))
    markdown = render(report, "markdown")

    overview = md_table(markdown)  # one row per (model, strategy), none for a model alone
    assert set(overview) == {"model"} | {f"{m} · {s}" for m in MODELS for s in STRATEGIES}
    headers = [h.split(" (", 1)[0] for h in overview["model"]]  # column names without their metrics

    def row(entry):
        return dict(zip(headers, overview[entry], strict=True))

    assert [row("lora · CoT")[t] for t in (SST5, f"{SST5}_gen", f"{EMO}_gen")] == ["-", "0.700", "0.300"]
    assert [row("lora · 3-shot")[t] for t in (SST5, f"{SST5}_gen", EQ_BENCH)] == ["0.800", "0.900", "-"]
    assert row("lora · zero-shot")[f"{SST5}_gen"] == "0.800" and row("lora · zero-shot")[EQ_BENCH] == "40.000"
    assert row("lora · zero-shot")["average"] == "0.500"  # (0.10 + 0.70 + 0.50 + 0.80 + 0.40) / 5: its own runs
    assert row("pt · CoT")[f"{EMO}_gen"] == "FAILED" and row("pt · zero-shot")[f"{EMO}_gen"] == "0.100"
    assert "| pt · CoT | pefteval_affect_tweet_emotion_gen |" in section(markdown, "Failures")

    # the group's parse rate per (model, strategy): CoT's under its own filter, the others under "none"
    parsed = {(r.model, r.strategy, r.filter): r.value for r in of(report, "aggregate")}
    assert parsed["lora", "CoT", "cot"] == 0.7 and parsed["lora", "zero-shot", "none"] == 1.0
    assert parsed["pt", "CoT", "cot"] is None  # its failed leaf leaves it missing
    assert len(parsed) == 9

    score = of(report, "score", model="base", strategy="CoT", task=f"{EMO}_gen", metric="macro_f1")[0]
    assert (score.filter, score.primary, score.affect, score.form) == ("cot", True, "understanding", "generative")
    assert of(report, "score", task=ESCONV, metric="bleu2")[0].affect == "generation"
    assert not of(report, "score", metric="pefteval_judge")
    (line, *_) = csv.DictReader(io.StringIO(render(report, "csv")))
    assert (line["strategy"], line["affect"], line["form"]) == ("zero-shot", "understanding", "loglikelihood")
    assert json.loads(render(report, "json"))[0]["strategy"] == "zero-shot"


def test_plots_keep_strategies_apart_and_a_parse_rate_is_no_headline(tmp_path):
    records = collect(affect_store(tmp_path, trained={"lora": 400, "pt": 50})).records
    (shown,) = plots(records)
    assert shown.ylabel == "average (acc, macro_f1, bleu2)"  # not the group's parse rate
    # a strategy is a line of its own; CoT has no average (no loglikelihood task): no point
    assert {label: [(x, round(y, 3)) for x, y in xy] for label, xy in shown.series.items()} == {
        "lora · zero-shot": [(400, 0.5)], "lora · 3-shot": [(400, 0.584)],
        "prompt_tuning · zero-shot": [(50, 0.304)], "prompt_tuning · 3-shot": [(50, 0.366)],
    }  # fmt: skip


def test_heat_maps_are_pngs_of_the_tables_and_linked(tmp_path):
    root = affect_store(tmp_path)
    markdown = write_reports(root)
    for name in ("affective_au.png", "affective_ag.png"):
        data = (root / "plots" / name).read_bytes()
        assert data.startswith(PNG) and data[12:16] == b"IHDR" and data.endswith(b"IEND\xaeB`\x82")
        assert f"(plots/{name})" in markdown
    from matplotlib.image import imread

    assert imread(root / "plots" / "affective_au.png").ndim == 3

    xs, ys, values = heat_map(collect(root).records, "understanding")
    assert xs == ["zero-shot\n(loglikelihood)", "3-shot\n(loglikelihood)", "zero-shot\n(generative)",
                  "3-shot\n(generative)", "CoT\n(generative)"]  # fmt: skip
    assert ys == ["base (base)", "lora (lora)", "pt (prompt_tuning)"]
    assert [[round(v, 3) if v is not None else None for v in row] for row in values] == [
        [0.4, 0.5, 0.3, 0.4, 0.4],
        [0.6, 0.7, 0.6, 0.7, 0.5],
        [0.4, 0.45, 0.35, 0.45, None],
    ]
    again = draw_heat_map(
        "Affective generation (AG): mean primary score", *heat_map(collect(root).records, "generation")
    )
    assert (root / "plots" / "affective_ag.png").read_bytes() == again  # deterministic


# What this store rendered before strategies and the affective sections existed (same code's output, kept;
# since issue 10 its failures table has a log column and a legend of the classes shown).
BEFORE = """\
| model   | method   | t1 (acc)   | t2 (acc)   | plain (acc)   | weighted (acc)   | average (acc)   |
|---------|----------|------------|------------|---------------|------------------|-----------------|
| a       | lora     | 0.500      | 0.900      | 0.700         | 0.800            | 0.700           |
| b       | full     | 0.400      | FAILED     | -             | -                | -               |

## Failures

Failed jobs: 1.

| model   | task   | job id                    | class   | reason          | log   |
|---------|--------|---------------------------|---------|-----------------|-------|
| b       | t2     | evaluate-0000000000000003 | error   | RuntimeError: x | -     |

- error: anything else; retried: up to max_retries
"""
OLD_FIELDS = FIELDS[: FIELDS.index("note") + 1]


def test_a_store_without_strategies_renders_as_before(tmp_path):
    store = StoreBuilder(tmp_path, groups=GROUPS)
    store.evaluate("a", "t1", lm_eval_result({"t1": acc_task(0.5, n=10)}))
    store.evaluate("a", "t2", lm_eval_result({"t2": acc_task(0.9, n=30)}))
    store.evaluate("b", "t1", lm_eval_result({"t1": acc_task(0.4)}), lineage("b", "full"))
    store.evaluate("b", "t2", None, lineage("b", "full"), state="failed", reason="RuntimeError: x", error_class="error")
    markdown = write_reports(store.write())

    assert markdown == BEFORE
    assert not (tmp_path / "plots").exists()
    assert FIELDS == [*OLD_FIELDS, "strategy", "affect", "form", "log"]  # the new columns come last
    lines = (tmp_path / "leaderboard.csv").read_text().splitlines()
    assert lines[0] == ",".join(OLD_FIELDS) + ",strategy,affect,form,log"
    assert all(line.endswith(",,,,") for line in lines[1:])
