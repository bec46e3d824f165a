"""Plots: what each one shows (checked on its data, computed by hand), that each PNG is written and linked
from leaderboard.md, and that a plot without data is neither written nor linked. Stores are built by hand."""

from __future__ import annotations

import math
from pathlib import Path

from pefteval_harness.report.leaderboard import collect, render, write_reports
from pefteval_harness.report.plots import PLOT_NAMES, draw, plots
from tests.test_report import MEAN, TRAIN, StoreBuilder, acc_task, analysis, lineage, lm_eval_result, module

PNG = b"\x89PNG\r\n\x1a\n"


def point(label: str, method: str, sweep_of: str | None = None, **sweep) -> dict:
    fields = {key.replace("__", "."): value for key, value in sweep.items()}  # config__r -> config.r
    return {**lineage(label, method, ["t1", "t2"]), "sweep_of": sweep_of, "sweep": fields}


# model -> (lineage, trainable params, t1 acc, t2 acc, adversarial acc)
MODELS = {
    "fft": (point("fft", "full"), 100_000, 0.9, 0.7, 0.5),
    "lora[r=2]": (point("lora[r=2]", "lora", "lora", config__r=2), 100, 0.6, 0.4, 0.5),
    "lora[r=8]": (point("lora[r=8]", "lora", "lora", config__r=8), 400, 0.8, 0.6, 0.6),
    "frac[0.25]": (point("frac[0.25]", "lora", "frac", train__data_fraction=0.25), 200, 0.5, 0.3, 0.4),
    "frac[1]": (point("frac[1]", "lora", "frac", train__data_fraction=1.0), 200, 0.7, 0.5, 0.6),
    "prompt": (point("prompt", "prompt_tuning"), 50, 0.4, 0.2, 0.4),
}


def full_store(root: Path) -> Path:
    """Every plot's data: costs and scores of sweep points and plain fine-tunes (group "main" over t1 and
    t2), an adversarial twin of t1, and weight-update analyses."""
    store = StoreBuilder(root, groups={"main": {"tasks": ["t1", "t2"], "aggregate": MEAN}})
    adversarial = {"metadata": {"clean_partner": "t1"}}
    for label, (lin, params, t1, t2, adv) in MODELS.items():
        store.job("train", label, TRAIN, result={"steps": 5, "trainable_params": params}, lin=lin)
        for task, acc, extra in (("t1", t1, {}), ("t2", t2, {}), ("t1_adv", adv, adversarial)):
            store.evaluate(label, task, lm_eval_result({task: acc_task(acc, **extra)}), lin)
    layers = [module("model.layers.0.mlp.up_proj", 0, 0.25), module("model.layers.0.mlp.down_proj", 0, 0.75),
              module("model.layers.1.mlp.up_proj", 1, 0.5)]  # fmt: skip
    store.job("analyze", "lora[r=8]", TRAIN, result=analysis(layers, 0.5), lin=MODELS["lora[r=8]"][0])
    store.job("analyze", "frac[1]", TRAIN, result=analysis(layers[2:], 0.5), lin=MODELS["frac[1]"][0])
    return store.write()


def close(found: dict[str, list[tuple[float, float]]], expected: dict[str, list[tuple[float, float]]]) -> bool:
    return found.keys() == expected.keys() and all(
        len(found[k]) == len(expected[k])
        and all(math.isclose(a, c) and math.isclose(b, d) for (a, b), (c, d) in zip(found[k], expected[k], strict=True))
        for k in expected
    )


def test_each_plot_shows_its_records(tmp_path):
    shown = {p.name: p for p in plots(collect(full_store(tmp_path)).records)}
    assert list(shown) == list(PLOT_NAMES)

    params = shown["score_vs_trainable_params"]  # y: the "main" group's aggregate, the plain mean of t1 and t2
    assert params.logx and params.ylabel == "main (acc)"
    assert close(params.series, {
        "frac": [(200, 0.6)],  # the sweep point on all the data; frac[0.25] is in the next plot
        "full": [(100_000, 0.8)],
        "lora": [(100, 0.5), (400, 0.7)],
        "prompt_tuning": [(50, 0.3)],
    })  # fmt: skip
    assert close(shown["score_vs_data_fraction"].series, {"frac": [(0.25, 0.4), (1.0, 0.6)]})
    bars = dict(shown["robustness_gap"].bars)  # t1 minus t1_adv
    assert bars.keys() == MODELS.keys() and all(math.isclose(bars[m], MODELS[m][2] - MODELS[m][4]) for m in MODELS)
    assert close(shown["subspace_overlap_per_layer"].series, {"frac[1]": [(1, 0.5)], "lora[r=8]": [(0, 0.5), (1, 0.5)]})


def test_write_reports_writes_every_png_and_links_it(tmp_path):
    markdown = write_reports(full_store(tmp_path))

    for name in PLOT_NAMES:
        png = (tmp_path / "plots" / f"{name}.png").read_bytes()
        assert png.startswith(PNG) and len(png) > 5_000
        assert f"](plots/{name}.png)\n" in markdown
    assert markdown.index("\n## Plots\n") > markdown.index("\n## Robustness\n")
    first = (tmp_path / "plots" / "robustness_gap.png").read_bytes()
    assert draw(plots(collect(tmp_path).records)[2]) == first  # the same records, the same bytes


def test_plots_without_data_are_not_written_and_stale_ones_are_removed(tmp_path):
    store = StoreBuilder(tmp_path)  # scores only: no costs, no adversarial task, no analysis
    store.evaluate("a", "t1", lm_eval_result({"t1": acc_task(0.5)}))
    (tmp_path / "plots").mkdir(parents=True)
    (tmp_path / "plots" / "robustness_gap.png").write_bytes(PNG)  # from an earlier report with that data
    (tmp_path / "plots" / "mine.png").write_bytes(PNG)  # not ours: left alone
    markdown = write_reports(store.write())

    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["mine.png"]
    assert "## Plots" not in markdown and "plots/" not in markdown


def test_only_the_plots_with_data(tmp_path):
    store = StoreBuilder(tmp_path)  # a fine-tune's cost and score: the parameters plot alone
    lin = lineage("lora", "lora")
    store.job("train", "lora", TRAIN, result={"steps": 5, "trainable_params": 1000}, lin=lin)
    store.evaluate("lora", "t1", lm_eval_result({"t1": acc_task(0.5)}), lin)
    markdown = write_reports(store.write())

    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["score_vs_trainable_params.png"]
    assert markdown.count("](plots/") == 1 and render(collect(tmp_path), "markdown") == markdown
    (only,) = plots(collect(tmp_path).records)
    assert only.ylabel == "average (acc)" and only.series == {"lora": [(1000.0, 0.5)]}  # no group: the average
