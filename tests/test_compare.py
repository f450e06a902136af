"""`dpfl-bench compare`: exact summaries of crafted results, every output format, the plot, --select,
paired gains with their intervals, columns without a guarantee, and files it must skip with a warning
instead of crashing."""

import itertools
import json
import math

import pandas as pd
import pytest
from support import assert_user_error, invoke, write_run

from dpfl_bench.compare import load_results, mixed_options, paired_gains, pivots, summarize

T_975 = {2: 4.302652729749464, 3: 3.182446305284263}  # Student's t table: the 0.975 quantile by degrees of freedom


@pytest.fixture
def folder(tmp_path):
    """dp-lora and la-lora at ε = 1 and ∞, three seeds each, with chosen final accuracies."""
    finals = {
        ("dp-lora", 1.0): [0.5, 0.6, 0.7],  # mean 0.6, sample std 0.1
        ("la-lora", 1.0): [0.65, 0.7, 0.75],  # mean 0.7, std 0.05
        ("dp-lora", math.inf): [0.8, 0.8, 0.9],  # mean 0.8333.., std 0.057735..
        ("la-lora", math.inf): [0.78, 0.8, 0.82],  # mean 0.8, std 0.02
    }
    for (method, eps), accuracies in finals.items():
        for seed, accuracy in enumerate(accuracies):
            # round 1 is worse than the final round: only the last round may count
            write_run(tmp_path / method, method=method, eps=eps, seed=seed, accuracies=[0.1, accuracy])
    return tmp_path


def tables_of(folder, metric="test_accuracy", by=["method"]):
    finals = load_results(folder).finals
    summary = summarize(finals, metric, by)
    return pivots(summary, metric, by, paired_gains(finals, summary, metric, by))


def test_mean_std_and_count_over_seeds_are_exact(folder):
    loaded = load_results(folder)
    assert loaded.warnings == []
    summary = summarize(loaded.finals).set_index(["method", "eps_target"])
    expected = {
        ("dp-lora", 1.0): (0.6, 0.1),
        ("la-lora", 1.0): (0.7, 0.05),
        ("dp-lora", math.inf): (2.5 / 3, pd.Series([0.8, 0.8, 0.9]).std()),
        ("la-lora", math.inf): (0.8, 0.02),
    }
    for key, (mean, std) in expected.items():
        assert summary.loc[key, "mean"] == pytest.approx(mean, abs=1e-12)
        assert summary.loc[key, "std"] == pytest.approx(std, abs=1e-12)
        assert summary.loc[key, "n"] == 3
        assert summary.loc[key, "seconds_per_round"] == pytest.approx(2.0)  # train_seconds 2 per round


def test_best_cell_per_column_and_la_lora_gain_over_the_best_other_method(folder):
    (table,) = tables_of(folder)
    assert table.columns == ["ε=1", "ε=∞ (no DP)"], "∞ comes last, and says it is not private"
    assert table.best == {"ε=1": {"la-lora"}, "ε=∞ (no DP)": {"dp-lora"}}
    assert table.gains["la-lora gain"]["ε=1"][0] == "dp-lora"
    assert table.gains["la-lora gain"]["ε=1"][1].mean == pytest.approx(0.1)
    assert table.gains["la-lora gain"]["ε=∞ (no DP)"][1].mean == pytest.approx(0.8 - 2.5 / 3)


def test_lower_is_better_metrics_pick_the_smallest_mean(folder):
    (table,) = tables_of(folder, "test_loss")
    assert table.best == {"ε=1": {"la-lora"}, "ε=∞ (no DP)": {"dp-lora"}}  # loss = 1 - accuracy here
    gain = table.gains["la-lora gain"]["ε=1"][1]
    assert gain.mean == pytest.approx(0.1), "a gain is an improvement, whichever direction is better"
    assert 0 < gain.high and gain.low == pytest.approx(0.1 - T_975[2] * 0.05 / math.sqrt(3))


def test_table_output_shows_cells_columns_and_gain(folder):
    result = invoke("compare", folder)
    assert result.exit_code == 0, result.output
    texts = ("synthetic · tiny", "ε=1", "ε=∞ (no DP)", "0.6000 ± 0.1000 (3)", "0.7000 ± 0.0500 (3)", "la-lora gain", "+0.1000", "-0.0333")
    for text in texts:
        assert text in result.output
    assert result.output.index("ε=1") < result.output.index("ε=∞")


def test_markdown_bolds_the_best_cell(folder):
    result = invoke("compare", folder, "--format", "markdown")
    assert result.exit_code == 0, result.output
    assert "| la-lora | **0.7000 ± 0.0500 (3)** | 0.8000 ± 0.0200 (3) |" in result.output
    assert "| dp-lora | 0.6000 ± 0.1000 (3) | **0.8333 ± 0.0577 (3)** |" in result.output


def test_csv_and_json_give_one_record_per_cell(folder):
    csv = invoke("compare", folder, "--format", "csv")
    assert csv.exit_code == 0, csv.output
    frame = pd.read_csv(pd.io.common.StringIO(csv.output))
    assert len(frame) == 4 and set(frame["method"]) == {"dp-lora", "la-lora"}
    assert set(frame["eps_target"].astype(str)) == {"1.0", "inf"}
    records = json.loads(invoke("compare", folder, "--format", "json").output)
    cell = next(r for r in records if r["method"] == "la-lora" and r["eps_target"] == "inf")
    assert cell["mean"] == pytest.approx(0.8) and cell["n"] == 3


def test_metric_and_by_accept_any_numeric_column_or_run_option(folder):
    result = invoke("compare", folder, "--metric", "eps_spent", "--by", "method,lr", "--format", "csv")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(pd.io.common.StringIO(result.output))
    assert "lr" in frame.columns and (frame["lr"] == 1e-3).all()  # crafted runs have the global default lr
    assert frame.loc[frame["eps_target"].astype(float) == 1.0, "mean"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--metric", "accuracy"], "no column 'accuracy'"),
        (["--metric", "method"], "is not numeric"),
        (["--by", "colour"], "no column 'colour'"),
        (["--format", "xml"], "--format must be"),
        (["--by", ","], "--by needs at least one column"),
        (["--plot", "figure.xyz"], "--plot figure.xyz: give a file name ending in .png, .pdf, .svg"),
    ],
)
def test_bad_options_are_one_line_errors(folder, args, message):
    assert_user_error(invoke("compare", folder, *args), message)


def test_cells_that_mix_configurations_are_warned_about(tmp_path):
    write_run(tmp_path, method="dp-lora", eps=1.0, seed=0, accuracies=[0.5])
    write_run(tmp_path, method="dp-lora", eps=1.0, seed=1, accuracies=[0.6], lr=0.5)
    assert mixed_options(load_results(tmp_path).finals, ["method"]) == ["lr"]
    result = invoke("compare", tmp_path)
    assert result.exit_code == 0
    assert "differ in lr" in result.output and "--by method,lr" in result.output
    assert mixed_options(load_results(tmp_path).finals, ["method", "lr"]) == []


def test_non_private_runs_of_both_levels_are_told_apart_by_their_configured_level(tmp_path):
    """A non-private run records dp_level none whatever --dp-level it had (its audit's canaries follow the
    configured level): --by dp_level alone must warn, --by config.dp_level separates them."""
    write_run(tmp_path, method="dp-lora", eps=math.inf, seed=0, accuracies=[0.5])
    write_run(tmp_path, method="dp-lora", eps=math.inf, seed=0, accuracies=[0.7], **{"dp-level": "client"})
    finals = load_results(tmp_path).finals
    assert mixed_options(finals, ["method", "dp_level"]) == ["config.dp_level"]
    assert mixed_options(finals, ["method", "config.dp_level"]) == []
    result = invoke("compare", tmp_path, "--by", "method,config.dp_level", "--format", "csv")
    assert result.exit_code == 0 and "warning" not in result.output
    assert sorted(result.output.splitlines()[1:])[0].startswith("synthetic,tiny,dp-lora,client,ε=∞ (no DP),False,inf,0.7")
    warned = invoke("compare", tmp_path, "--by", "method,dp_level")
    assert "differ in config.dp_level" in warned.output and "--by method,dp_level,config.dp_level" in warned.output


def test_corrupt_foreign_unfinished_and_duplicate_files_are_skipped_with_a_warning(folder):
    (folder / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    pd.DataFrame({"a": [1]}).to_parquet(folder / "foreign.parquet")
    unfinished = write_run(folder / "partial", method="rolora", eps=1.0, seed=0, accuracies=[0.3], rounds_total=2)
    duplicate = folder / "copy" / "again.parquet"
    duplicate.parent.mkdir()
    duplicate.write_bytes(next((folder / "dp-lora").glob("*.parquet")).read_bytes())

    result = invoke("compare", folder)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning")]
    assert len(warnings) == 4
    assert any("corrupt.parquet" in w and "not a readable Parquet file" in w for w in warnings)
    assert any("foreign.parquet" in w and "not a dpfl-bench results file" in w for w in warnings)
    assert any(str(unfinished) in w and "unfinished (round 1 of 2)" in w for w in warnings)
    assert any("again.parquet" in w and "the same run as" in w for w in warnings)
    assert "rolora" not in result.output.split("warning")[-1].split("\n", 1)[1]
    assert "0.6000 ± 0.1000 (3)" in result.output, "the duplicate is counted once"


def test_an_empty_or_missing_folder_says_so(tmp_path):
    assert_user_error(invoke("compare", tmp_path), f"no finished runs under {tmp_path}")
    assert_user_error(invoke("compare", tmp_path / "nowhere"), "does not exist")


def saved_figure(monkeypatch) -> dict:
    """Filled with the visible axes of the next figure saved (the plot is drawn, then read back here)."""
    import matplotlib.figure

    saved = {}
    original = matplotlib.figure.Figure.savefig

    def spy(figure, path, **kwargs):
        saved["axes"] = [ax for ax in figure.axes if ax.get_visible()]
        renderer = figure.canvas.get_renderer()
        saved["extents"] = [(ax.get_window_extent(renderer), legend and legend.get_window_extent(renderer))
                            for ax in saved["axes"] for legend in [ax.get_legend()]]
        return original(figure, path, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    return saved


def test_plot_writes_a_png_with_a_panel_per_eps_and_one_against_eps(folder, tmp_path, monkeypatch):
    saved = saved_figure(monkeypatch)
    path = tmp_path / "plots" / "comparison.png"
    result = invoke("compare", folder, "--plot", path)
    assert result.exit_code == 0, result.output
    assert path.read_bytes().startswith(b"\x89PNG")
    titles = [ax.get_title() for ax in saved["axes"]]
    assert titles == ["synthetic · ε=1", "synthetic · ε=∞ (no DP)", "synthetic · final test accuracy"]
    per_round = saved["axes"][0]
    assert sorted(line.get_label() for line in per_round.get_lines()) == ["dp-lora (3 seeds)", "la-lora (3 seeds)"]
    la_lora = next(line for line in per_round.get_lines() if line.get_label().startswith("la-lora"))
    assert list(la_lora.get_xdata()) == [1, 2] and la_lora.get_ydata()[-1] == pytest.approx(0.7)
    assert all(float(tick).is_integer() for tick in per_round.get_xticks()), "rounds are whole numbers"
    final = saved["axes"][-1]
    assert [t.get_text() for t in final.get_xticklabels()] == ["1", "∞\n(no DP)"]
    assert all(line.get_linestyle() == "None" for line in final.get_lines()), "regimes are categories: no line joins them"


def test_a_file_from_another_version_is_named_as_such(folder):
    path = next((folder / "la-lora").glob("*_eps1_seed0_*.parquet"))  # final accuracy 0.65
    pd.read_parquet(path).drop(columns=["client_data_json"]).to_parquet(path)
    result = invoke("compare", folder)
    assert result.exit_code == 0
    assert f"skipped {path}: from another version of dpfl-bench (missing client_data_json)" in result.output
    assert "0.7250 ± 0.0354 (2)" in result.output, "the other two la-lora runs at ε = 1 remain"


def test_grouping_by_an_option_that_does_not_separate_methods_is_warned_about(folder):
    """--by rank puts dp-lora and la-lora runs (same rank) in one cell: compare must say so."""
    mixed = mixed_options(load_results(folder).finals, ["rank"])
    assert "method" in mixed and "method_options.smooth_sigma" in mixed, "la-lora's own options differ too"
    assert mixed_options(load_results(folder).finals, ["method"]) == []
    result = invoke("compare", folder, "--by", "rank")
    assert result.exit_code == 0 and "differ in method" in result.output


def test_a_diverged_run_is_counted_apart_and_an_all_nan_column_does_not_crash(tmp_path):
    write_run(tmp_path, method="dp-lora", eps=1.0, seed=0, accuracies=[0.5])
    write_run(tmp_path, method="dp-lora", eps=1.0, seed=1, accuracies=[math.nan])
    write_run(tmp_path, method="la-lora", eps=1.0, seed=0, accuracies=[0.4])
    write_run(tmp_path, method="la-lora", eps=math.inf, seed=0, accuracies=[math.nan])
    (table,) = tables_of(tmp_path)
    assert table.best == {"ε=1": {"dp-lora"}}, "no best cell in a column of NaN"
    assert list(table.gains["la-lora gain"]) == ["ε=1"] and table.gains["la-lora gain"]["ε=1"][1].mean == pytest.approx(-0.1)
    result = invoke("compare", tmp_path)
    assert result.exit_code == 0, result.output
    assert "0.5000 (1, 1 NaN)" in result.output and "— (0, 1 NaN)" in result.output


def test_a_file_holding_several_runs_is_skipped(folder, tmp_path):
    merged = pd.concat([pd.read_parquet(p) for p in sorted((folder / "dp-lora").glob("*.parquet"))])
    merged.to_parquet(folder / "merged.parquet")
    result = invoke("compare", folder)
    assert result.exit_code == 0
    assert f"skipped {folder / 'merged.parquet'}: holds 6 runs (a reference or merged file), not one" in result.output
    assert "0.6000 ± 0.1000 (3)" in result.output


def test_json_keeps_infinity_apart_from_missing_values(folder):
    records = json.loads(invoke("compare", folder, "--metric", "eps_spent", "--format", "json").output)
    at_infinity = next(r for r in records if r["method"] == "dp-lora" and r["eps_target"] == "inf")
    assert at_infinity["mean"] == "inf" and at_infinity["std"] is None


def test_tied_best_cells_are_all_highlighted(tmp_path):
    write_run(tmp_path, method="ffa-lora", eps=1.0, seed=0, accuracies=[0.7])
    write_run(tmp_path, method="la-lora", eps=1.0, seed=0, accuracies=[0.7])
    write_run(tmp_path, method="rolora", eps=1.0, seed=0, accuracies=[0.6])
    (table,) = tables_of(tmp_path)
    assert table.best == {"ε=1": {"ffa-lora", "la-lora"}}
    assert invoke("compare", tmp_path, "--format", "markdown").output.count("**0.7000 (1)**") == 2


@pytest.fixture
def tuned(tmp_path):
    """dp-lora at ε = 1 over three learning rates, two seeds each. Validation and test disagree: lr 0.001
    has the best test accuracy, lr 0.003 the best validation accuracy; lr 0.01 is worse on both."""
    runs = {  # lr -> (validation, test) final accuracies by seed
        0.001: ([0.60, 0.62], [0.90, 0.92]),
        0.003: ([0.70, 0.72], [0.75, 0.79]),  # the one to choose: test mean 0.77, sample std 0.028284
        0.01: ([0.65, 0.65], [0.50, 0.50]),
    }
    for lr, (val, test) in runs.items():
        for seed in (0, 1):
            write_run(tmp_path, method="dp-lora", eps=1.0, seed=seed, accuracies=[0.1, test[seed]], val_accuracies=[0.1, val[seed]], lr=lr)
    return tmp_path


def test_select_reports_the_test_metric_of_the_configuration_best_on_validation(tuned):
    result = invoke("compare", tuned, "--select", "lr", "--format", "markdown")
    assert result.exit_code == 0, result.output
    assert "| dp-lora | **0.7700 ± 0.0283 (2) lr=0.003** |" in result.output
    assert "lr: chosen per cell by the best mean final val_accuracy over seeds" in result.output
    assert "warning" not in result.output, "the selected option differs between runs by design"
    assert "differ in lr" in invoke("compare", tuned).output, "without --select, mixing learning rates is warned about"
    records = json.loads(invoke("compare", tuned, "--select", "lr", "--format", "json").output)
    assert len(records) == 1 and records[0]["lr"] == 0.003 and records[0]["mean"] == pytest.approx(0.77)
    table = invoke("compare", tuned, "--select", "lr")
    assert "0.7700 ± 0.0283 (2) lr=0.003" in table.output


def test_select_breaks_ties_toward_the_smaller_value_and_compares_several_options_as_tuples(tmp_path):
    """la-lora over lr × smooth_sigma: (0.001, 1.0) and (0.003, 0.5) tie on validation accuracy, 0.8; the
    smaller tuple, (0.001, 1.0), wins. Alone, smooth_sigma 0.5 and 1.0 tie too: 0.5 wins."""
    validation = {(0.001, 0.5): 0.6, (0.001, 1.0): 0.8, (0.003, 0.5): 0.8, (0.003, 1.0): 0.6}
    for (lr, sigma), val in validation.items():
        test = 0.5 + lr * 10 + sigma / 10  # a distinct test accuracy per configuration
        options = {"lr": lr, "method_options": {"smooth_sigma": sigma}}
        write_run(tmp_path, method="la-lora", eps=1.0, seed=0, accuracies=[test], val_accuracies=[val], **options)
    both = pd.read_csv(pd.io.common.StringIO(invoke("compare", tmp_path, "--select", "lr,smooth_sigma", "--format", "csv").output))
    assert both[["lr", "method_options.smooth_sigma"]].values.tolist() == [[0.001, 1.0]]
    assert both["mean"].tolist() == [pytest.approx(0.5 + 0.01 + 0.1)]
    assert "lr=0.001 smooth_sigma=1" in invoke("compare", tmp_path, "--select", "lr,method_options.smooth_sigma").output
    one_option = tmp_path / "smooth_sigma"
    for sigma in (1.0, 0.5):  # the larger value first: order on disk must not decide
        options = {"method_options": {"smooth_sigma": sigma}}
        write_run(one_option, method="la-lora", eps=1.0, seed=0, accuracies=[sigma], val_accuracies=[0.7], **options)
    result = invoke("compare", one_option, "--select", "smooth-sigma", "--format", "csv")
    assert pd.read_csv(pd.io.common.StringIO(result.output))["method_options.smooth_sigma"].tolist() == [0.5]


def test_select_of_an_option_the_runs_do_not_vary_is_a_one_line_error(tuned):
    assert_user_error(invoke("compare", tuned, "--select", "rank"), "--select rank", "options that do: lr")
    assert_user_error(invoke("compare", tuned, "--select", "lr,colour"), "--select colour", "options that do: lr")
    assert_user_error(invoke("compare", tuned, "--by", "method,lr", "--select", "lr"), "--select lr", "nothing but their seed")


def test_select_when_only_seeds_differ_says_so(folder):
    assert_user_error(invoke("compare", folder, "--select", "lr"), "--select lr", "they differ in nothing but their seed")


@pytest.fixture
def paired(tmp_path):
    """la-lora and dp-lora at ε = 1 over seeds 0-3 (la-lora also seed 4, which has no pair), and ffa-lora."""
    la_lora, dp_lora = [0.70, 0.74, 0.71, 0.77, 0.99], [0.65, 0.66, 0.69, 0.70]
    for seed, accuracy in enumerate(la_lora):
        write_run(tmp_path, method="la-lora", eps=1.0, seed=seed, accuracies=[accuracy])
    for seed, accuracy in enumerate(dp_lora):
        write_run(tmp_path, method="dp-lora", eps=1.0, seed=seed, accuracies=[accuracy])
    write_run(tmp_path, method="ffa-lora", eps=1.0, seed=0, accuracies=[0.5])
    return tmp_path


def test_the_gain_is_the_mean_paired_difference_with_a_student_t_interval(paired):
    differences = [0.05, 0.08, 0.02, 0.07]  # seeds 0-3; seed 4 has no dp-lora run
    mean = sum(differences) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / 3)
    half = T_975[3] * sd / math.sqrt(4)
    (table,) = tables_of(paired)
    over, gain = table.gains["la-lora gain"]["ε=1"]
    assert over == "dp-lora" and gain.pairs == 4
    assert (gain.mean, gain.low, gain.high) == pytest.approx((mean, mean - half, mean + half), abs=1e-12)
    assert gain.significant and mean - half > 0
    text = f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}] (4 pairs)"
    assert f"| la-lora gain | **{text} vs dp-lora** * |" in invoke("compare", paired, "--format", "markdown").output
    assert f"{text} vs dp-lora *" in invoke("compare", paired).output
    records = json.loads(invoke("compare", paired, "--format", "json").output)
    ours = next(r for r in records if r["method"] == "la-lora")
    assert ours["gain_over"] == "dp-lora" and ours["gain_pairs"] == 4 and ours["significant"] is True
    assert type(ours["gain_pairs"]) is int, "a count of pairs is written as a whole number"
    assert (ours["gain"], ours["gain_low"], ours["gain_high"]) == pytest.approx((mean, mean - half, mean + half))
    assert all(r["gain"] is None for r in records if r["method"] != "la-lora")


def test_an_interval_that_contains_zero_is_not_significant(folder):
    (table,) = tables_of(folder)
    gain = table.gains["la-lora gain"]["ε=1"][1]  # differences 0.15, 0.1, 0.05: sd 0.05
    assert (gain.low, gain.high) == pytest.approx((0.1 - T_975[2] * 0.05 / math.sqrt(3), 0.1 + T_975[2] * 0.05 / math.sqrt(3)))
    assert not gain.significant
    assert "+0.1000 [-0.0242, +0.2242] (3 pairs) vs dp-lora |" in invoke("compare", folder, "--format", "markdown").output


def test_paired_differences_all_equal_have_no_interval_and_are_not_significant(tmp_path):
    """Two seeds with the same difference: a zero-width t interval would call +0.005 significant."""
    for seed, (ours, theirs) in enumerate([(0.1550, 0.1500), (0.1720, 0.1670)]):  # 0.005 both, not equal in floating point
        write_run(tmp_path, method="la-lora", eps=1.0, seed=seed, accuracies=[ours])
        write_run(tmp_path, method="dp-lora", eps=1.0, seed=seed, accuracies=[theirs])
    (table,) = tables_of(tmp_path)
    gain = table.gains["la-lora gain"]["ε=1"][1]
    assert gain.pairs == 2 and gain.mean == pytest.approx(0.005) and math.isnan(gain.low) and not gain.significant
    markdown = invoke("compare", tmp_path, "--format", "markdown").output
    assert "| la-lora gain | +0.0050 (2 pairs, all equal: no interval) vs dp-lora |" in markdown


def test_baseline_measures_la_lora_against_the_method_named(paired):
    result = invoke("compare", paired, "--baseline", "ffa-lora", "--format", "markdown")
    assert result.exit_code == 0, result.output
    assert "| la-lora − ffa-lora | +0.2000 (1 pair: no interval) |" in result.output, "only seed 0 has both"
    frame = pd.read_csv(pd.io.common.StringIO(invoke("compare", paired, "--baseline", "ffa-lora", "--format", "csv").output))
    ours = frame[frame["method"] == "la-lora"].iloc[0]
    assert ours["gain_over"] == "ffa-lora" and ours["gain_pairs"] == 1 and math.isnan(ours["gain_low"]) and not ours["significant"]


def test_cells_without_a_common_seed_say_so(tmp_path):
    write_run(tmp_path, method="la-lora", eps=1.0, seed=1, accuracies=[0.7])
    write_run(tmp_path, method="dp-lora", eps=1.0, seed=0, accuracies=[0.6])
    assert "— (no seed in common) vs dp-lora" in invoke("compare", tmp_path).output


def test_the_best_other_method_is_chosen_on_the_seeds_every_method_ran(tmp_path):
    """rolora's two seeds average above dp-lora's three, but on the seeds both ran dp-lora is ahead: a
    method still missing its low seed must not become the comparator."""
    for seed, (la_lora, dp_lora) in enumerate([(0.60, 0.62), (0.70, 0.75), (0.40, 0.45)]):
        write_run(tmp_path, method="la-lora", eps=1.0, seed=seed, accuracies=[la_lora])
        write_run(tmp_path, method="dp-lora", eps=1.0, seed=seed, accuracies=[dp_lora])
    for seed, rolora in enumerate([0.61, 0.74]):  # mean 0.675 > dp-lora's 0.6067, but 0.675 < 0.685 on seeds 0-1
        write_run(tmp_path, method="rolora", eps=1.0, seed=seed, accuracies=[rolora])
    (table,) = tables_of(tmp_path)
    assert table.best == {"ε=1": {"rolora"}}, "the cells still show each row's own mean"
    over, gain = table.gains["la-lora gain"]["ε=1"]
    assert over == "dp-lora" and gain.pairs == 3 and gain.mean == pytest.approx(-0.04)
    assert "-0.0400 [" in (text := invoke("compare", tmp_path, "--format", "markdown").output) and "vs dp-lora" in text
    write_run(tmp_path, method="rolora", eps=1.0, seed=2, accuracies=[0.50])  # its third seed: now ahead on all three
    (table,) = tables_of(tmp_path)
    assert table.gains["la-lora gain"]["ε=1"][0] == "rolora"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--baseline", "la-lora"], "--baseline la-lora: give a method to measure the la-lora variants against; "
                                    "these runs have dp-lora, ffa-lora"),
        (["--baseline", "rolora"], "--baseline rolora: give a method"),
        (["--baseline", "dp-lora", "--by", "method,rank"], "use it with --by method"),
    ],
)
def test_bad_baselines_are_one_line_errors(paired, args, message):
    assert_user_error(invoke("compare", paired, *args), message)


@pytest.fixture
def regimes(tmp_path):
    """la-lora under an accounted ε = 1, the authors' regime at σ = 0.5 and 0.2, and non-private."""
    write_run(tmp_path, method="la-lora", eps=1.0, seed=0, accuracies=[0.5])
    write_run(tmp_path, method="la-lora", seed=0, accuracies=[0.9], dp_level="authors", dp_sigma=0.5)
    write_run(tmp_path, method="la-lora", seed=0, accuracies=[0.8], dp_level="authors", dp_sigma=0.2)
    write_run(tmp_path, method="la-lora", eps=math.inf, seed=0, accuracies=[0.95])
    return tmp_path


def test_runs_without_a_guarantee_are_never_averaged_with_accounted_ones(regimes):
    authors = ["authors σ=0.2 (no guarantee)", "authors σ=0.5 (no guarantee)"]
    (table,) = tables_of(regimes)
    assert table.columns == ["ε=1", "ε=∞ (no DP)", *authors]
    means = {column: table.cells[("la-lora", column)]["mean"] for column in table.columns}
    assert means == {"ε=1": 0.5, "ε=∞ (no DP)": 0.95, authors[0]: 0.8, authors[1]: 0.9}
    markdown = invoke("compare", regimes, "--format", "markdown")
    assert markdown.exit_code == 0 and "warning" not in markdown.output
    assert "|  | ε=1 | ε=∞ (no DP) | authors σ=0.2 (no guarantee) | authors σ=0.5 (no guarantee) |" in markdown.output
    assert "| la-lora | **0.5000 (1)** | **0.9500 (1)** | **0.8000 (1)** | **0.9000 (1)** |" in markdown.output
    records = json.loads(invoke("compare", regimes, "--format", "json").output)
    expected = [("ε=1", True), ("ε=∞ (no DP)", False), (authors[0], False), (authors[1], False)]
    assert [(r["regime"], r["guarantee"]) for r in records] == expected
    assert records[2]["eps_target"] is None, "no ε, not a number that could be read as one"
    assert "(no guarantee)" in invoke("compare", regimes).output


def test_the_plot_labels_regimes_without_a_guarantee(regimes, tmp_path, monkeypatch):
    saved = saved_figure(monkeypatch)
    assert invoke("compare", regimes, "--plot", tmp_path / "regimes.png").exit_code == 0
    # One evaluated round each: no learning curve to draw, so the final panel alone.
    assert [ax.get_title() for ax in saved["axes"]] == ["synthetic · final test accuracy"]
    ticks = [t.get_text() for t in saved["axes"][-1].get_xticklabels()]
    assert ticks == ["1", "∞\n(no DP)", "authors σ=0.2\n(no guarantee)", "authors σ=0.5\n(no guarantee)"]


def test_runs_lists_finished_and_unfinished_runs_and_filters_them(tmp_path):
    write_run(tmp_path, method="dp-lora", seed=0, accuracies=[0.5, 0.6], eps=1.0)
    write_run(tmp_path, method="la-lora", seed=1, accuracies=[0.4], eps=1.0, rounds_total=3)
    write_run(tmp_path, method="la-lora", seed=2, accuracies=[0.7], dp_level="authors", dp_sigma=0.2)
    (tmp_path / "foreign.parquet").write_bytes(b"not parquet")
    result = invoke("runs", tmp_path, "--format", "csv")
    assert result.exit_code == 0, result.output
    listed = pd.read_csv(__import__("io").StringIO(result.stdout))
    assert sorted(zip(listed["method"], listed["rounds"], listed["finished"])) == [
        ("dp-lora", "2/2", True), ("la-lora", "1/1", True), ("la-lora", "1/3", False)]
    assert set(listed["regime"]) == {"ε=1", "authors σ=0.2 (no guarantee)"}
    assert "skipped" in result.stderr and "foreign.parquet" in result.stderr
    unfinished = invoke("runs", tmp_path, "--where", "finished=false", "--format", "csv")
    assert unfinished.stdout.count("\n") == 2 and "1/3" in unfinished.stdout
    assert_user_error(invoke("runs", tmp_path, "--where", "colour=red"), "--where colour: not a column")


def test_late_gain_is_the_last_fifth_of_the_rounds_against_the_fifth_before(tmp_path):
    from dpfl_bench.stats import late_gain

    rising = pd.Series([r / 10 for r in range(1, 11)], index=range(1, 11))
    assert late_gain(rising) == pytest.approx(0.95 - 0.75)  # rounds 9-10 against 7-8
    every_third = pd.Series([0.5, 0.6, 0.9, 0.7, 0.8], index=[3, 6, 9, 12, 15])  # windows by round, not by row
    assert late_gain(every_third) == pytest.approx(0.8 - 0.7)
    assert math.isnan(late_gain(pd.Series([0.5], index=[1])))  # no fifth before the last
    write_run(tmp_path, method="dp-lora", seed=0, accuracies=[0.5] * 10, val_accuracies=list(rising), eps=1.0)
    listed = pd.read_csv(__import__("io").StringIO(invoke("runs", tmp_path, "--format", "csv").stdout))
    assert listed["late_gain"].tolist() == pytest.approx([0.2])


@pytest.mark.parametrize("width", [80, 160])
def test_runs_on_a_narrow_terminal_leaves_out_options_never_figures(tmp_path, monkeypatch, width):
    from dpfl_bench import cli

    write_run(tmp_path, method="la-lora", seed=0, accuracies=[0.4321], eps=1.0, dp_level="authors", dp_sigma=0.2)
    monkeypatch.setattr(cli.console, "width", width)
    result = invoke("runs", tmp_path)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= width
    assert "0.4321" in result.stdout and "1/1" in result.stdout  # the figures, whole
    assert ("in --format csv" in " ".join(line.strip() for line in lines)) == (width == 80)  # says what it left out


def test_the_plot_names_the_values_select_chose_and_the_seeds(tmp_path, monkeypatch):
    for seed in (0, 1):
        write_run(tmp_path, method="dp-lora", seed=seed, accuracies=[0.5, 0.6], val_accuracies=[0.5, 0.6], eps=1.0, lr=0.01)
        write_run(tmp_path, method="dp-lora", seed=seed, accuracies=[0.4, 0.5], val_accuracies=[0.4, 0.5], eps=1.0, lr=0.001)
    saved = saved_figure(monkeypatch)
    assert invoke("compare", tmp_path, "--select", "lr", "--plot", tmp_path / "chosen.svg").exit_code == 0
    assert (tmp_path / "chosen.svg").read_text().startswith("<?xml")
    assert [line.get_label() for line in saved["axes"][0].get_lines()] == ["dp-lora · lr=0.01 (2 seeds)"]


def test_the_plot_by_several_options_draws_a_curve_per_configuration(tmp_path, monkeypatch):
    """An option column that only some files' rows carry (files of other versions) reads back as floats
    (3.0 beside NaN), which once broke the legend's lookup with a traceback."""
    write_run(tmp_path, method="dp-lora", seed=0, accuracies=[0.5, 0.6], eps=math.inf, rounds=2, lr=0.001)
    longer = write_run(tmp_path, method="dp-lora", seed=0, accuracies=[0.5, 0.6, 0.7], eps=math.inf, rounds=3, lr=0.001)
    pd.read_parquet(longer).assign(rounds=3).to_parquet(longer)
    write_run(tmp_path, method="dp-lora", seed=0, accuracies=[0.4, 0.5], eps=math.inf, rounds=2, lr=0.0001)
    saved = saved_figure(monkeypatch)
    result = invoke("compare", tmp_path, "--by", "lr,rounds", "--plot", tmp_path / "curves.png")
    assert result.exit_code == 0, result.output
    assert sorted(line.get_label() for line in saved["axes"][0].get_lines()) == [
        "0.0001 · 2 (1 seed)", "0.001 · 2 (1 seed)", "0.001 · 3 (1 seed)"]


def test_plot_legends_cover_no_panel_even_with_many_methods_and_two_rows_of_panels(tmp_path, monkeypatch):
    """Eight methods' curves in four regimes (two rows of panels): a legend inside a panel would hide
    curves, one below a panel of the first row would run into the second."""
    methods = ["dp-lora", "ffa-lora", "rolora", "la-lora", "fedsvd", "fed-sb"]
    variants = [{"method_options": {"smooth_sigma": 0.0}}, {"method_options": {"first_factor": "A"}}]
    configurations = [{"method": m} for m in methods] + [{"method": "la-lora", **v} for v in variants]
    regimes = [{"eps": 1.0}, {"eps": 3.0}, {"eps": math.inf}, {"dp_level": "authors", "dp_sigma": 0.2}]
    for configuration, regime in itertools.product(configurations, regimes):
        write_run(tmp_path, seed=0, accuracies=[0.3, 0.5, 0.6], **configuration, **regime)
    saved = saved_figure(monkeypatch)
    assert invoke("compare", tmp_path, "--plot", tmp_path / "many.png").exit_code == 0
    axes = saved["axes"]
    assert len(axes) == 5 and all(len(ax.get_legend().get_texts()) == 8 for ax in axes)
    for ax, (_, legend) in zip(axes, saved["extents"]):
        for other, (panel, _) in zip(axes, saved["extents"]):
            assert not legend.overlaps(panel), f"{ax.get_title()}'s legend covers {other.get_title()}"


def test_the_plot_axis_follows_the_means_not_a_two_seed_band(tmp_path, monkeypatch):
    """Two seeds far apart give a 95% interval of ±12.7 half-differences: the axis may not stretch to it (it
    would flatten every curve), yet every mean stays in view."""
    write_run(tmp_path, method="dp-lora", seed=0, accuracies=[0.2, 0.3, 0.4], eps=1.0, rounds=3)
    write_run(tmp_path, method="dp-lora", seed=1, accuracies=[0.3, 0.4, 0.5], eps=1.0, rounds=3)
    for seed in (0, 1):
        write_run(tmp_path, method="la-lora", seed=seed, accuracies=[0.35, 0.35, 0.35 + 0.001 * seed], eps=1.0, rounds=3)
    saved = saved_figure(monkeypatch)
    assert invoke("compare", tmp_path, "--plot", tmp_path / "curves.png").exit_code == 0
    bottom, top = saved["axes"][0].get_ylim()
    means = [0.25, 0.35, 0.45]  # dp-lora's; its band reaches 0.45 ± 0.64
    span = max(means) - min(means)
    assert min(means) - span < bottom < min(means) and max(means) < top < max(means) + span, (bottom, top)


def test_the_plot_of_a_metric_no_run_recorded_is_drawn_empty_not_a_traceback(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path, method="dp-lora", seed=seed, accuracies=[0.2, 0.3, 0.4], val_accuracies=[math.nan] * 3, eps=1.0, rounds=3)
    result = invoke("compare", tmp_path, "--metric", "val_accuracy", "--plot", tmp_path / "empty.png")
    assert result.exit_code == 0, repr(result.exception)
    assert (tmp_path / "empty.png").read_bytes().startswith(b"\x89PNG")
