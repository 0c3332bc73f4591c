"""The benchmark report (mtlens.bench.report / tables): arithmetic on exact stores, files of a real one."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from rich.console import Console
from scipy import stats
from store_builder import write_fake_store

from mtlens.bench.report import leaderboard_renderables, main, write_report
from mtlens.bench.tables import (
    compare,
    leaderboard,
    level_comparison,
    load_store,
    num,
    ranking_table,
    rep_mtl_tables,
)
from mtlens.diagnose.ranking import ranking_similarity
from mtlens.errors import ConfigurationError
from mtlens.tasks.delta import mean_rank


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# exact arithmetic on stores with given numbers
def _fake(tmp_path, extra=()):
    runs = [
        {
            "method": "ew",
            "seed": 0,
            "acc": {"left": 90.0, "right": 80.0},
            "delta": 1.0,
            "step_s": 0.010,
            "peak": 100 * 2**20,
            "diag": {"diag/fd": 0.5, "diag/param/gds_mean": 0.1},
        },
        {
            "method": "ew",
            "seed": 1,
            "acc": {"left": 92.0, "right": 82.0},
            "delta": 3.0,
            "step_s": 0.012,
            "peak": 120 * 2**20,
            "diag": {"diag/fd": 0.52, "diag/param/gds_mean": 0.12},
        },
        {
            "method": "mgda",
            "level": "param",
            "seed": 0,
            "acc": {"left": 95.0, "right": 70.0},
            "delta": -2.0,
            "step_s": 0.030,
            "peak": 220 * 2**20,
            "diag": {"diag/fd": 0.6, "diag/param/gds_mean": 0.05},
        },
        {
            "method": "mgda",
            "level": "param",
            "seed": 1,
            "acc": {"left": 93.0, "right": 72.0},
            "delta": -1.0,
            "step_s": 0.033,
            "peak": 220 * 2**20,
            "diag": {"diag/fd": 0.62, "diag/param/gds_mean": 0.06},
        },
        {
            "method": "mgda",
            "level": "feature",
            "seed": 0,
            "acc": {"left": 96.0, "right": 85.0},
            "delta": 6.0,
            "step_s": 0.015,
            "peak": 110 * 2**20,
            "diag": {"diag/fd": 0.4, "diag/feature/gds_mean": 0.3},
        },
        {
            "method": "mgda",
            "level": "feature",
            "seed": 1,
            "acc": {"left": 97.0, "right": 86.0},
            "delta": 6.2,
            "step_s": 0.016,
            "peak": 110 * 2**20,
            "diag": {"diag/fd": 0.41, "diag/feature/gds_mean": 0.31},
        },
        {"method": "pcgrad", "level": "param", "seed": 0, "status": "failed", "error": "SolverError: boom"},
        {"method": "pcgrad", "level": "param", "seed": 1, "status": "running"},
        *extra,
    ]
    return write_fake_store(tmp_path / "store", runs)


def test_leaderboard_means_stds_mr_and_ratios_to_ew(tmp_path):
    store = load_store(_fake(tmp_path))
    table, groups = leaderboard(store, "multimnist")
    rows = {r[4]: dict(zip(table.csv_columns, r)) for r in table.csv_rows}
    ew, mp, mf, pc = rows["ew"], rows["mgda (param)"], rows["mgda (feature)"], rows["pcgrad (param)"]
    assert ew["left/acc_mean"] == pytest.approx(91.0) and ew["left/acc_std"] == pytest.approx(np.std([90, 92], ddof=1))
    assert ew["delta_p_task_mean"] == pytest.approx(2.0) and ew["delta_m_mean"] == pytest.approx(-2.0)
    # MR over the two metrics among the three finished configurations
    want = mean_rank(
        {
            "ew": {"left/acc": 91, "right/acc": 81},
            "mp": {"left/acc": 94, "right/acc": 71},
            "mf": {"left/acc": 96.5, "right/acc": 85.5},
        },
        {"left": {"acc": True}, "right": {"acc": True}},
    )
    assert (ew["mean_rank"], mp["mean_rank"], mf["mean_rank"]) == (want["ew"], want["mp"], want["mf"])
    assert mf["mean_rank"] == 1.0 and table.csv_rows[0][4] == "mgda (feature)"  # sorted by MR
    assert mp["step_time_rel_ew"] == pytest.approx(31.5 / 11.0)
    assert mp["peak_mem_rel_ew"] == pytest.approx(220 / 110)
    assert ew["step_time_rel_ew"] == pytest.approx(1.0)
    # the failed + running configuration is in the table, with no numbers and its status
    assert pc["done"] == 0 and pc["status"] == "0/2 done; failed 1; running 1" and pc["mean_rank"] is None
    assert table.csv_rows[-1][4] == "pcgrad (param)"
    # every Δ column is named by its convention, with its direction
    assert {"delta_p_task ↑", "delta_p_metric ↑", "delta_m ↓"} <= set(table.columns)


def test_level_comparison_pairs_the_seeds_and_names_the_verdict(tmp_path):
    store = load_store(_fake(tmp_path))
    _, groups = leaderboard(store, "multimnist")
    t = level_comparison(groups, "multimnist")
    (row,) = [dict(zip(t.csv_columns, r)) for r in t.csv_rows]
    p = stats.ttest_rel([6.0, 6.2], [-2.0, -1.0]).pvalue  # both levels ran seeds 0 and 1: seed-matched
    assert row["method"] == "mgda" and row["diff"] == pytest.approx(6.1 - (-1.5))
    assert row["p"] == pytest.approx(p) and row["test"] == "paired"
    assert t.rows[0][6] == f"{num(p)} (paired)"
    assert row["verdict"] == ("gains" if p < 0.05 else "within noise")
    assert row["time_ratio"] == pytest.approx(15.5 / 31.5)
    assert t.notes == [f"the fast surrogate (feature level) — {row['verdict']}: mgda"]


@pytest.mark.parametrize(
    ("a", "b", "verdict"),
    [
        ([1.0, 1.1, 0.9], [5.0, 5.1, 4.9], "better"),
        ([5.0, 5.1, 4.9], [1.0, 1.1, 0.9], "worse"),
        ([1.0, 3.0, 2.0], [1.5, 2.5, 2.2], "within noise"),
        ([1.0], [5.0, 5.1], "not testable (< 2 seeds)"),
        ([1.0, 1.0], [2.0, 2.0], "no seed spread"),
    ],
)
def test_noise_rule(a, b, verdict):
    got = compare(a, b)
    assert got["verdict"] == verdict
    assert got["diff"] == pytest.approx(np.mean(b) - np.mean(a))
    if verdict in ("better", "worse"):
        assert got["p"] < 0.05
    assert compare(a, b, higher_is_better=False)["verdict"] == {"better": "worse", "worse": "better"}.get(
        verdict, verdict
    )


def test_noise_rule_pairs_common_seeds_and_falls_back_to_welch():
    base = {"0": -1.0, "1": 1.5}  # a seed's shared shift (its STL baselines): 2.5 points between the seeds
    ablation = {"0": -8.4, "1": -6.1}  # lost 7.4 and 7.6 points: the same loss on both seeds
    paired = compare(base, ablation)
    assert paired["test"] == "paired" and paired["verdict"] == "worse"
    assert paired["p"] == pytest.approx(stats.ttest_rel([-8.4, -6.1], [-1.0, 1.5]).pvalue) and paired["p"] < 0.01
    welch = compare(list(base.values()), list(ablation.values()))  # sequences: no seeds to match
    assert welch["test"] == "Welch"
    assert welch["p"] == pytest.approx(stats.ttest_ind([-8.4, -6.1], [-1.0, 1.5], equal_var=False).pvalue)
    assert welch["p"] > paired["p"]
    other = compare(base, {"1": -8.4, "2": -6.1})  # different seeds: nothing to pair
    assert other["test"] == "Welch" and other["p"] == pytest.approx(welch["p"])
    same = compare(base, {"0": 0.0, "1": 2.5})  # every seed moved by exactly +1: no spread to test against
    assert same["test"] == "paired" and same["p"] is None and same["verdict"] == "no seed spread"
    assert compare(base, dict(base))["verdict"] == "within noise"
    rounded = compare({"0": 3.4, "1": 3.6}, {"0": 3.9, "1": 4.1})  # +0.5 on both, up to float rounding
    assert rounded["verdict"] == "no seed spread" and rounded["p"] is None
    assert compare({"0": 1.0}, {"0": 2.0})["verdict"] == "not testable (< 2 seeds)"


def test_ranking_similarity_rows_equal_the_diagnose_function(tmp_path):
    store = load_store(_fake(tmp_path))
    _, groups = leaderboard(store, "multimnist")
    t = ranking_table(groups, "multimnist", n_bootstrap=300)
    rows = {r[0]: dict(zip(t.csv_columns, r)) for r in t.csv_rows}
    want = ranking_similarity(
        {"ew": [0.5, 0.52], "mgda (param)": [0.6, 0.62], "mgda (feature)": [0.4, 0.41]},
        {"ew": [1.0, 3.0], "mgda (param)": [-2.0, -1.0], "mgda (feature)": [6.0, 6.2]},
        identifier="fd",
        n_bootstrap=300,
        seed=0,
        paired=True,  # every configuration ran seeds 0 and 1: one draw of seeds for all
    )
    fd = rows["FD"]
    assert fd["kendall_tau"] == pytest.approx(want.kendall_tau) == pytest.approx(1.0)
    assert (fd["kendall_low"], fd["kendall_high"]) == pytest.approx(want.kendall_interval)
    assert fd["performance_ranking"] == "mgda (feature) > ew > mgda (param)"
    # GDS at parameter level: only the configurations measured there (never mixed with feature level)
    assert rows["GDS (param level)"]["n_configurations"] == 2
    assert rows["GDS (feature level)"]["n_configurations"] == 1
    assert rows["GDS (feature level)"]["note"] == "too few"
    # 2 seeds drawn jointly: 3 distinct draws (either seed, or both); the interval is their spread, and says so
    assert t.notes == ["2 seeds: a joint draw of 2 seeds with replacement has only 3 distinct outcomes (either seed "
                       "alone, or both), so the 95% interval is the spread of 3 scores, not a confidence interval; "
                       "run more seeds (--seeds 5) before reading it as one"]


def test_rep_mtl_ablation_order_and_difference_to_base(tmp_path):
    extra = []
    for v, d in (("rep_mtl_tsr", 2.5), ("rep_mtl_csa", 1.5), ("rep_mtl", 4.0)):
        for s, eps in ((0, -0.1), (1, 0.1)):
            extra.append(
                {
                    "method": "ew",
                    "variant": v,
                    "seed": s,
                    "delta": d + eps,
                    "step_s": 0.02,
                    "diag": {"diag/fd": 0.3, "diag/tsr_entropy": 0.5},
                }
            )
    store = load_store(_fake(tmp_path, extra))
    _, groups = leaderboard(store, "multimnist")
    alphas = {
        r.key: {"encoder": 3.0 + 0.1 * r.seed, "heads/left": 5.0} for g in groups for r in g.done if g.method == "ew"
    }
    (t,) = rep_mtl_tables(groups, "multimnist", alphas)
    rows = [dict(zip(t.csv_columns, r)) for r in t.csv_rows]
    assert [r["variant"] for r in rows] == ["none", "rep_mtl_tsr", "rep_mtl_csa", "rep_mtl"]
    assert [r[0] for r in t.rows] == ["base (ew)", "+TSR", "+CSA", "+TSR +CSA (Rep-MTL)"]
    assert rows[3]["diff_vs_base"] == pytest.approx(4.0 - 2.0)
    assert rows[3]["p"] == pytest.approx(stats.ttest_rel([3.9, 4.1], [1.0, 3.0]).pvalue)
    assert rows[3]["test"] == "paired" and rows[0]["test"] is None  # the reference row is not tested
    assert rows[0]["alpha_encoder"] == pytest.approx(3.05) and rows[1]["time_rel_base"] == pytest.approx(2 / 1.1)
    assert t.columns[-2:] == ["α encoder", "α heads/left"]


def test_rep_mtl_ablation_compares_against_the_base_with_the_same_loss_transform(tmp_path):
    """Rep-MTL on log losses against plain EW mixes two effects: with an EW-on-log-losses row in the
    store, that row is the reference; without it, the caption warns."""
    extra = []
    for v, d, tr in (("rep_mtl", 4.0, "log"), ("rep_mtl_tsr", 3.0, "log"), ("log_losses", 3.5, "log")):
        for s, eps in ((0, -0.1), (1, 0.1)):
            extra.append({"method": "ew", "variant": v, "seed": s, "delta": d + eps, "step_s": 0.02,
                          "loss_transform": tr, "diag": {"diag/fd": 0.3, "diag/tsr_entropy": 0.5}})
    _, groups = leaderboard(load_store(_fake(tmp_path / "a", extra)), "multimnist")
    (t,) = rep_mtl_tables(groups, "multimnist")
    rows = {r[2]: dict(zip(t.csv_columns, r)) for r in t.csv_rows}
    assert rows["log_losses"]["verdict"] == "reference" and rows["none"]["verdict"] == "not compared"
    assert rows["rep_mtl"]["diff_vs_base"] == pytest.approx(4.0 - 3.5)
    assert 'Reference: "base, log losses"' in t.caption
    # without the matching row: plain EW is the reference and the caption says what is mixed
    no_log = [e for e in extra if e["variant"] != "log_losses"]
    _, groups = leaderboard(load_store(_fake(tmp_path / "b", no_log)), "multimnist")
    (t,) = rep_mtl_tables(groups, "multimnist")
    rows = {r[2]: dict(zip(t.csv_columns, r)) for r in t.csv_rows}
    assert rows["none"]["verdict"] == "reference" and rows["rep_mtl"]["diff_vs_base"] == pytest.approx(4.0 - 2.0)
    assert "Caution: the reference row uses loss transform 'none' and the Rep-MTL rows 'log'" in t.caption


def test_unreadable_and_unlisted_runs_are_reported_not_dropped(tmp_path):
    root = _fake(tmp_path, [{"method": "uw", "seed": 0, "corrupt": True}])
    stray = root / "runs" / "zzz"
    stray.mkdir()
    (stray / "run.json").write_text(
        json.dumps(
            {
                "key": "zzz",
                "benchmark": "multimnist",
                "method": "rlw",
                "level": "loss",
                "variant": "none",
                "seed": 0,
                "kind": "mtl",
                "status": "pending",
                "label": "rlw",
            }
        )
    )
    out = write_report(root, alpha_method="none", n_bootstrap=50)
    bad = _csv(out / "unfinished-runs.csv")
    assert sorted((r["run"], r["status"]) for r in bad) == [
        ("pcgrad (param)", "failed"),
        ("pcgrad (param)", "running"),
        ("rlw", "pending"),
        ("uw", "unreadable"),
    ]
    assert any("is not valid JSON" in r["error"] for r in bad)
    assert any(r["error"] == "SolverError: boom" for r in bad)
    md = (out / "report.md").read_text()
    assert "is not listed in index.json" in md and "uw" in md


def test_runs_of_an_earlier_configuration_are_not_mixed_into_the_tables(tmp_path):
    """The same --out rerun with other settings (`--set train.epochs=3` after 2) leaves the old run directories
    beside the new ones, outside the index: the report used to count them as extra seeds of the current
    configuration ("2/2 done" and a ± over two settings for a one-seed suite)."""
    import shutil

    root = write_fake_store(tmp_path / "s", [{"method": "ew", "seed": 0, "acc": {"left": 90.0, "right": 80.0}},
                                             {"method": "uw", "seed": 0}])
    old = root / "runs" / "old000"
    shutil.copytree(root / "runs" / "k000", old)
    entry = json.loads((old / "run.json").read_text())
    (old / "run.json").write_text(json.dumps({**entry, "key": "old000", "results": "runs/old000/results.json"}))
    res = json.loads((old / "results.json").read_text())
    res["metrics"]["test"]["left"]["acc"] = 10.0
    (old / "results.json").write_text(json.dumps(res))
    store = load_store(root)
    assert [r.key for r in store.runs if r.entry["method"] == "ew"] == ["k000"]
    table, _ = leaderboard(store, "multimnist")
    (ew,) = [row for r in table.csv_rows if (row := dict(zip(table.csv_columns, r)))["method"] == "ew"]
    assert (ew["runs"], ew["done"], ew["status"]) == (1, 1, "1/1 done") and ew["left/acc_mean"] == 90.0, ew
    out = write_report(root, alpha_method="none", n_bootstrap=50)
    md = (out / "report.md").read_text()
    assert "old000" in md and "left out of every table" in md and "2 runs in the store" in md


def test_a_diverged_seed_is_shown_never_averaged_away(tmp_path):
    """A finished seed whose test metric and Δ are NaN used to vanish from the mean: the row said "2/2 done" and
    showed the other seed's numbers alone, without ± and without a word."""
    nan = float("nan")
    root = write_fake_store(tmp_path / "s", [
        {"method": "ew", "seed": 0, "delta": nan, "acc": {"left": nan, "right": 80.0}},
        {"method": "ew", "seed": 1, "delta": 3.0, "acc": {"left": 90.0, "right": 88.0}},
        {"method": "uw", "seed": 0}, {"method": "uw", "seed": 1},
    ])
    table, _ = leaderboard(load_store(root), "multimnist")
    (ew,) = [r for r in table.rows if r[0] == "ew"]
    cells = dict(zip(table.columns, ew))
    assert cells["left/acc ↑"] == "90.00 (1 of 2 seeds non-finite)"
    assert cells["right/acc ↑"] == "84.00 ± 5.66"
    assert cells["delta_p_task ↑"] == "+3.00 (1 of 2 seeds non-finite)"
    assert not any("nan" in str(c).lower() for r in table.rows for c in r)
    crow = dict(zip(table.csv_columns, next(r for r in table.csv_rows if r[1] == "ew")))
    assert crow["nonfinite_seeds"].startswith("left/acc: 1; delta_p_task: 1")
    assert any(n.startswith("ew: some finished seeds have non-finite") for n in table.notes)
    (uw,) = [dict(zip(table.csv_columns, r)) for r in table.csv_rows if r[1] == "uw"]
    assert uw["nonfinite_seeds"] is None


def test_sealed_results_are_verified(tmp_path):
    root = write_fake_store(tmp_path / "s", [{"method": "ew", "sealed": True}, {"method": "uw", "sealed": True}])
    assert all(r.done for r in load_store(root).runs)
    f = root / "runs" / "k001" / "results.json"
    f.write_text(f.read_text().replace('"acc": 90.0', '"acc": 99.0'))  # an edit after sealing
    (bad,) = [r for r in load_store(root).runs if not r.done]
    assert bad.status == "unreadable" and "is corrupt" in bad.problem


def test_memory_ratio_falls_back_to_the_worker_peak_and_never_mixes_sources(tmp_path):
    runs = [
        {"method": "ew", "seed": 0, "peak": None, "entry": {"peak_memory_bytes": 400 * 2**20}},
        {"method": "uw", "seed": 0, "peak": 50 * 2**20, "entry": {"peak_memory_bytes": 600 * 2**20}},
        {"method": "rlw", "seed": 0, "peak": 50 * 2**20},
    ]
    table, _ = leaderboard(load_store(write_fake_store(tmp_path / "s", runs)), "multimnist")
    rows = {r[4]: dict(zip(table.csv_columns, r)) for r in table.csv_rows}
    assert rows["uw"]["peak_mem_source"] == "worker" and rows["uw"]["peak_mem_rel_ew"] == pytest.approx(1.5)
    assert rows["rlw"]["peak_mem_rel_ew"] is None  # only a training-level peak: not comparable with EW's
    assert any("worker process's peak" in n for n in table.notes)


def test_not_a_store_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigurationError, match="not a benchmark results store"):
        write_report(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ConfigurationError, match="mtlens-bench-index"):
        load_store(tmp_path)
    with pytest.raises(ConfigurationError, match="alpha_method"):
        write_report(tmp_path, alpha_method="ww")


def test_runs_without_baselines_show_no_delta_and_say_why(tmp_path):
    root = write_fake_store(tmp_path / "s", [{"method": "ew", "delta": None}, {"method": "uw", "delta": None}])
    table, _ = leaderboard(load_store(root), "multimnist")
    assert any("without STL baselines" in n for n in table.notes)
    assert all(r[table.columns.index("delta_p_task ↑")] == "—" for r in table.rows)


# ---------------------------------------------------------------------------------------------
# a real store: 22 short MultiMNIST trainings (session fixture, tests/bench/conftest.py)
@pytest.mark.slow
def test_report_files_of_a_real_store(real_store, real_report):
    out = real_report
    assert out == real_store / "report"
    for name in ("report.md", "report.html"):
        assert (out / name).stat().st_size > 1000
    csvs = {p.stem: _csv(p) for p in out.glob("*.csv")}
    assert set(csvs) >= {
        "multimnist-leaderboard",
        "multimnist-levels",
        "multimnist-ranking-similarity",
        "multimnist-rep-mtl",
        "unfinished-runs",
    }
    assert all(rows for rows in csvs.values())
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {
        "multimnist-time-vs-delta.png",
        "multimnist-levels.png",
        "multimnist-dynamics-fd.png",
        "multimnist-dynamics-gds-param.png",
        "multimnist-dynamics-gms-param.png",
        "multimnist-rep-mtl-alpha.png",
    } <= set(pngs)
    for p in pngs:
        assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    for p in pngs:
        assert f"]({p})" in md
    html = (out / "report.html").read_text()
    assert html.count('class="report-figure"') == len(pngs) and html.count("data:image/png;base64,") == len(pngs)
    assert html.count('class="report-table"') == len(csvs)
    assert "http://" not in html and "https://" not in html  # self-contained

    # the leaderboard agrees with the runs' own results.json
    lb = {r["label"]: r for r in csvs["multimnist-leaderboard"]}
    assert set(lb) == {
        "ew",
        "uw",
        "mgda (param)",
        "mgda (feature)",
        "pcgrad (param)",
        "pcgrad (feature)",
        "ew + rep_mtl",
        "ew + rep_mtl_tsr",
        "ew + rep_mtl_csa",
        "cagrad (param)",
        "STL baselines",
    }
    index = json.loads((real_store / "index.json").read_text())["runs"]
    for label in ("ew", "mgda (feature)"):
        res = [json.loads((real_store / e["results"]).read_text()) for e in index if e["label"] == label]
        assert len(res) == 2
        left = [r["metrics"]["test"]["left"]["acc"] for r in res]
        assert float(lb[label]["left/acc_mean"]) == pytest.approx(np.mean(left))
        assert float(lb[label]["left/acc_std"]) == pytest.approx(np.std(left, ddof=1))
        d = [r["delta"]["test"]["delta_m"] for r in res]
        assert float(lb[label]["delta_m_mean"]) == pytest.approx(np.mean(d))
    assert lb["cagrad (param)"]["status"] == "0/2 done; failed 1; pending 1"
    assert float(lb["ew"]["step_time_rel_ew"]) == pytest.approx(1.0)
    assert math.isfinite(float(lb["mgda (param)"]["peak_mem_rel_ew"]))
    unf = csvs["unfinished-runs"]
    assert sorted(r["status"] for r in unf) == ["failed", "pending"]

    # Rep-MTL: four variants with α of the encoder and both heads
    rep = csvs["multimnist-rep-mtl"]
    assert [r["variant"] for r in rep] == ["none", "rep_mtl_tsr", "rep_mtl_csa", "rep_mtl"]
    for r in rep:
        for c in ("alpha_encoder", "alpha_heads/left", "alpha_heads/right"):
            assert math.isfinite(float(r[c])) and float(r[c]) > 1.0
    rs = {r["identifier"]: r for r in csvs["multimnist-ranking-similarity"]}
    assert int(rs["FD"]["n_configurations"]) == 9 and -1 <= float(rs["FD"]["kendall_tau"]) <= 1
    assert float(rs["FD"]["kendall_low"]) <= float(rs["FD"]["kendall_high"])


@pytest.mark.slow
def test_terminal_leaderboard_and_module_entry_point(real_store, real_report, capsys):
    console = Console(record=True, width=200)
    console.print(*leaderboard_renderables(real_store))
    text = console.export_text()
    for label in (
        "ew + rep_mtl_tsr",
        "mgda (feature)",
        "STL baselines",
        "Runs without results",
        "failed",
        "pending",
        "delta_p_task",
        "delta_m",
        "MR",
    ):
        assert label in text
    from mtlens.bench.report import print_leaderboard

    console2 = Console(record=True, width=200)
    print_leaderboard(real_store, console2)
    assert console2.export_text() == text
    assert main([str(real_store), str(real_store / "report2")]) == 0
    assert "report2/report.html" in capsys.readouterr().out
    assert main([]) == 2


def test_the_level_and_rep_mtl_tables_say_which_seeds_diverged(tmp_path):
    """Their means and tests are over the finite seeds only (Group.by_seed); a note names the seeds left out."""
    nan = float("nan")
    runs = [{"method": "ew", "seed": s, "delta": 1.0 + s} for s in (0, 1)]
    runs += [{"method": "ew", "variant": "rep_mtl", "seed": 0, "delta": nan},
             {"method": "ew", "variant": "rep_mtl", "seed": 1, "delta": 2.0}]
    runs += [{"method": "mgda", "level": "param", "seed": s, "delta": 0.5 + s} for s in (0, 1)]
    runs += [{"method": "mgda", "level": "feature", "seed": 0, "delta": 0.7},
             {"method": "mgda", "level": "feature", "seed": 1, "delta": nan}]
    _, groups = leaderboard(load_store(write_fake_store(tmp_path / "s", runs)), "multimnist")
    levels = level_comparison(groups, "multimnist")
    assert levels.notes[-1] == ("seeds with a non-finite delta_p_task (the run diverged), left out of the means, the "
                                "stds and the tests: mgda (feature) (1 of 2)")
    (row,) = [dict(zip(levels.csv_columns, r)) for r in levels.csv_rows]
    assert row["seeds_feature"] == 1 and row["verdict"] == "not testable (< 2 seeds)"
    (rep,) = rep_mtl_tables(groups, "multimnist")
    assert rep.notes == ["seeds with a non-finite delta_p_task (the run diverged), left out of the means, the stds "
                         "and the tests: ew + rep_mtl (1 of 2)"]
