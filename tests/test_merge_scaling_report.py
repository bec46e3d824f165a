"""The report's Scaling section, from a store built by hand: merges of k experts of two methods (their
scores on two tasks, their theory quantities), one series per merge entry; per (series, k) the mean and
spread over subsets, the gain per added expert, the fit and k*; the theory table; the plots, linked."""

from __future__ import annotations

import math

from pefteval_harness.report import scaling
from pefteval_harness.report.leaderboard import collect, render, write_reports
from tests.test_report import StoreBuilder, acc_task, lineage, lm_eval_result

PNG = b"\x89PNG\r\n\x1a\n"


def curve(k: int, ceiling: float) -> float:
    return ceiling - 0.4 * math.exp(-(k - 1) / 1.5)


def scaling_store(root):
    """ta and ties merges of k = 1..5, two subsets each (scores ± 0.02 around a saturating curve)."""
    store = StoreBuilder(root)
    for name, ceiling in (("ta", 0.8), ("ties", 0.9)):
        for k in range(1, 6):
            for subset, offset in ((1, -0.02), (2, 0.02)):
                label = f"{name}[k={k},s={subset}]"
                merge = {"method": name, "experts": [f"e{i}" for i in range(k)], "k": k, "seed": 1}
                lin = {**lineage(label, f"merge:{name}", ["t1"], merge), "sweep_of": name,
                       "sweep": {"k": k, "subset": subset}}  # fmt: skip
                theory = {"gaussian_width_normalised": 0.1 * k, "sign_conflict_rate": 0.05 * k + subset / 100,
                          "coverage_merged": 1.0, "kurtosis_merged": math.nan}  # fmt: skip
                store.job("merge", label, {"method": name}, result={"theory": theory}, lin=lin)
                score = curve(k, ceiling) + offset
                for task in ("t1", "t2"):
                    store.evaluate(label, task, lm_eval_result({task: acc_task(score)}), lin)
    return store.write()


def test_scaling_table_fit_and_k_star_per_merge_entry(tmp_path):
    markdown = render(collect(scaling_store(tmp_path)), "markdown")
    section = markdown.split("## Scaling with the number of merged experts", 1)[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("|")]
    ties_k3 = next(cells for cells in rows if cells[:2] == ["ties", "3"])
    assert ties_k3[2] == "2"  # subsets
    assert float(ties_k3[3]) == round(curve(3, 0.9), 3)  # the mean of the two subsets
    assert float(ties_k3[4]) == round(math.sqrt(2 * 0.02**2), 3)  # sample std
    gain = curve(3, 0.9) - curve(2, 0.9)
    assert float(ties_k3[7]) == round(gain, 3)
    fit = scaling.fit_saturating(list(range(1, 6)), [curve(k, 0.9) for k in range(1, 6)])
    assert f"| ties    | {fit.a:.3f} − {fit.b:.3f}·exp(−(k−1)/{fit.c:.2f})" in section
    assert f"{scaling.threshold_k(fit).k}" in section
    assert "Gaussian width / mean ‖τ‖" in section and "kurtosis merged" not in section  # nan everywhere: no column


def test_theory_quantities_are_means_over_subsets_and_plots_are_linked(tmp_path):
    root = scaling_store(tmp_path)
    markdown = write_reports(root)
    section = markdown.split("Theory quantities", 1)[1]
    line = next(row for row in section.splitlines() if row.startswith("| ta ") and "| 2 " in row)
    assert "0.115" in line  # sign conflicts at k=2: mean of 0.11 and 0.12
    for png in ("scaling.png", "scaling_gaussian_width_normalised.png", "scaling_sign_conflict_rate.png"):
        assert (root / "plots" / png).read_bytes().startswith(PNG)
        assert f"(plots/{png})" in markdown
    assert not (root / "plots" / "scaling_kurtosis_merged.png").exists()


def test_no_scaling_sweep_no_section(tmp_path):
    store = StoreBuilder(tmp_path)
    store.evaluate("m", "t1", lm_eval_result({"t1": acc_task(0.5)}))
    markdown = write_reports(store.write())
    assert "Scaling" not in markdown and not (tmp_path / "plots" / "scaling.png").exists()
