"""The search report (medsamix.search.report)."""

from __future__ import annotations

import math

from medsamix.models.architecture import reference_param_names
from medsamix.merging.config import MergeConfig
from medsamix.merging.groups import group_parameters
from medsamix.search.report import best_so_far, comparison_table, method_map, write_report
from medsamix.search.search import SearchResult, SearchSettings, Trial, _pareto

from conftest import TINY


def _config(method: str = "linear") -> MergeConfig:
    groups = group_parameters(reference_param_names(TINY), 2, False)
    params = {"weights": {"base": 1.0, "ft": 0.5}} if method == "linear" else {"source": "ft"}
    return MergeConfig.uniform(groups, method, params, 2, False)


def test_best_so_far_ignores_partial_budgets_and_crashes():
    c = _config()
    trials = [Trial(0, c, {"a": 0.2}, "ok", 5), Trial(1, c, {"a": 0.5}, "ok"), Trial(2, c, {}, "crashed: x"),
              Trial(3, c, {"a": 0.9}, "ok", 5), Trial(4, c, {"a": 0.6}, "ok")]
    curve = best_so_far(trials)
    assert math.isnan(curve[0]) and curve[1:] == [0.5, 0.5, 0.5, 0.6]


def test_method_map_lists_every_group_once():
    c = _config("pick")
    table = method_map(c).splitlines()
    assert len(table) == 2 + len(c.groups)
    assert all("pick" in row and "source=ft" in row for row in table[2:])


def test_comparison_table_bolds_the_best_of_each_row_and_adds_the_mean():
    table = comparison_table({"medsamix": {"x": 0.7, "y": 0.4}, "sam": {"x": 0.6, "y": 0.5}}, ["x", "y"])
    rows = table.splitlines()
    assert rows[2] == "| x | **0.700** | 0.600 |"
    assert rows[3] == "| y | 0.400 | **0.500** |"
    assert rows[4] == "| **mean** | **0.550** | **0.550** |"


def test_write_report_multi_task(tmp_path):
    c = _config()
    trials = [Trial(i, c, {"x": x, "y": y}, "ok") for i, (x, y) in enumerate([(0.2, 0.9), (0.6, 0.6), (0.5, 0.5),
                                                                            (0.9, 0.1)])]
    pareto = _pareto(trials)
    assert [t.number for t in pareto] == [0, 1, 3]
    result = SearchResult(trials, pareto, trials[1], 123, "parego")
    settings = SearchSettings(tasks=("x", "y"), trials=4)
    cal = {"medsamix": {"x": 0.6, "y": 0.6}, "sam": {"x": 0.5, "y": 0.2}}
    path = write_report(tmp_path, result, settings, cal, {"medsamix": {"x": 0.55, "y": 0.5}, "sam": cal["sam"]},
                        ["Data: test."])
    text = path.read_text()
    assert (tmp_path / "progress.png").stat().st_size > 0 and (tmp_path / "pareto.png").stat().st_size > 0
    assert "MedSAMix-M (ParEGO)" in text and "parego" in text and "| 1 (selected) | 0.600 | 0.600 | 0.600 |" in text
    assert "Test split" in text and "| x | **0.550** | 0.500 |" in text
    assert text.count("| linear |") == len(c.groups)
    assert "Stages:" not in text  # no coarse stage in this search


def test_report_says_how_many_trials_each_stage_had(tmp_path):
    c = _config()
    trials = [Trial(i, c, {"x": 0.1 * i}, "ok", stage="coarse" if i < 3 else "groups") for i in range(5)]
    result = SearchResult(trials, [trials[2]], trials[2], 10)
    text = write_report(tmp_path, result, SearchSettings(tasks=("x",), trials=5), {}, None).read_text()
    assert ("Stages: 3 trials of a coarse search (one method and its parameters per model component), then 2 per "
            "layer group, starting from the coarse stage's best; the selected configuration comes from the coarse "
            "stage.") in text
    trials.append(Trial(5, c, {"x": 0.2}, "ok", stage="rescored"))
    result = SearchResult(trials, [trials[4]], trials[4], 10)
    text = write_report(tmp_path, result, SearchSettings(tasks=("x",), trials=5), {}, None).read_text()
    assert ("then 2 per layer group, starting from the coarse stage's best, and 1 initial-design configurations "
            "dropped early by Hyperband were scored on all calibration slices; the selected configuration comes "
            "from the per-group stage.") in text
