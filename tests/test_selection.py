"""The single-model guard of a single-task search's selection (medsamix.search.selection)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medsamix.search.search import SearchSettings, run_search, score
from medsamix.search.selection import guard, paired_gain
from medsamix.search.settings import single_configs
from test_search import evaluator, merger  # noqa: F401 - pytest fixtures


def test_paired_gain_is_mean_and_standard_error_of_the_differences():
    gain, se = paired_gain(np.array([0.5, 0.7, 0.9]), np.array([0.4, 0.5, 0.9]))
    assert gain == pytest.approx(0.1) and se == pytest.approx(0.1 / math.sqrt(3))
    assert paired_gain(np.array([0.6]), np.array([0.5]))[1] == math.inf  # one slice: no evidence
    assert paired_gain(np.array([0.6, 0.6]), np.array([0.5, 0.5])) == pytest.approx((0.1, 0.0))


def test_a_single_model_is_kept_and_the_best_single_is_named(merger, evaluator):  # noqa: F811
    settings = SearchSettings(tasks=("a",), granularity=2)
    singles = single_configs(merger, settings)
    assert list(singles) == merger.aliases and all(singles.values())
    dice = {a: score(merger, evaluator, cs[0], ["a"])["a"] for a, cs in singles.items()}
    best = max(dice, key=lambda a: dice[a])
    g = guard(merger, evaluator, settings, singles[best][0])
    assert g.alias == best and g.single_dice == pytest.approx(dice[best])
    assert g.kept and g.gain == 0 and g.slices == 6  # 3 studies x 2 slices
    with pytest.raises(ValueError, match="single-task"):
        guard(merger, evaluator, SearchSettings(tasks=("a", "b")), singles[best][0])


@pytest.mark.parametrize("z", [0.0, 1e9])
def test_search_selects_by_the_guard(merger, evaluator, tmp_path, z):  # noqa: F811
    settings = SearchSettings(tasks=("a",), trials=14, granularity=2, seed=0, guard_se=z)
    result = run_search(merger, evaluator, settings, tmp_path / "s")
    ok = [t for t in result.trials if t.status == "ok" and t.budget is None]
    assert result.argmax is not None and result.argmax.mean_dice == max(t.mean_dice for t in ok)
    if z == 0:  # plain best calibration Dice
        assert result.best is result.argmax and result.selection == "best calibration Dice"
        return
    # no gain is ever 1e9 standard errors: the best single model is selected unless the best trial *is* it
    singles = {a: score(merger, evaluator, cs[0], ["a"])["a"] for a, cs in single_configs(merger, settings).items()}
    assert result.best.dice["a"] == pytest.approx(max(singles.values()))
    assert "selected" in result.selection or "kept" in result.selection
    if result.best is not result.argmax:
        assert result.selection.startswith("single model")


def test_guard_is_off_by_default_and_keyed_only_when_on():
    """The default selection is the plain best calibration Dice; a guarded search has its own settings key, an
    unguarded one the key of searches from before the guard (they resume)."""
    plain = SearchSettings(tasks=("a",))
    assert plain.guard_se == 0 and "guard_se" not in plain.to_dict()
    assert SearchSettings(tasks=("a",), guard_se=1.0).to_dict()["guard_se"] == 1.0
