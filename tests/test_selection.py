"""A search's selection (medsamix.search.selection): the single-model guard of a single-task search, the robust
choice of a robust search, and the promotion of a robust search's model."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from medsamix.runs.promotion import decide_promotion, single_model_scores
from medsamix.search.corruptions import robust_tasks, with_corrupted
from medsamix.search.evaluate import Evaluator
from medsamix.search.search import SearchError, SearchSettings, run_search, score
from medsamix.search.selection import (
    clean_and_corrupted,
    guard,
    is_robust,
    paired_gain,
    robust_choice,
    robust_selection,
    task_mean_gain,
)
from medsamix.search.settings import initial_configs, single_configs
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


# ------------------------------------------------------------------------------------------------ robust selection

class _T:
    def __init__(self, dice: dict[str, float]) -> None:
        self.dice = dice


def _robust(clean: float, bad: float) -> _T:
    return _T({"a": clean, "b": clean, "a@corrupted": bad, "b@corrupted": bad})


def test_robust_choice_keeps_clean_dice_within_the_tolerance_and_maximises_corrupted_dice():
    trials = [_robust(0.80, 0.60), _robust(0.795, 0.70), _robust(0.78, 0.75), _robust(0.80, 0.60)]
    chosen, why = robust_choice(trials, 0.01)
    assert chosen is trials[1]  # 0.78 is 0.02 below the best clean Dice: not eligible however robust
    assert "0.7000" in why and "0.8000" in why and "within 0.01" in why
    assert robust_choice(trials, 0.05)[0] is trials[2]
    assert robust_choice(trials, 0.0)[0] is trials[0]  # ties: the earlier trial
    with pytest.raises(ValueError):
        robust_choice([], 0.01)


def test_robust_choice_is_on_the_pareto_front_and_no_eligible_trial_is_more_robust():
    rng = np.random.default_rng(3)
    for _ in range(20):
        trials = [_T({k: float(v) for k, v in zip(("a", "b", "a@corrupted", "b@corrupted"), rng.uniform(0, 1, 4))})
                  for _ in range(30)]
        chosen, _ = robust_choice(trials, 0.05)
        c, bad = clean_and_corrupted(chosen.dice)
        best_clean = max(clean_and_corrupted(t.dice)[0] for t in trials)
        assert c >= best_clean - 0.05
        assert all(clean_and_corrupted(t.dice)[1] <= bad for t in trials
                   if clean_and_corrupted(t.dice)[0] >= best_clean - 0.05)
        assert not any(all(t.dice[k] >= chosen.dice[k] for k in t.dice) and
                       any(t.dice[k] > chosen.dice[k] for k in t.dice) for t in trials)


def test_robust_choice_only_for_corrupted_objectives_and_the_tolerance_is_checked():
    assert is_robust(("a", "a@corrupted")) and not is_robust(("a", "b"))
    assert SearchSettings(tasks=("a",)).robust_tolerance == 0.01
    assert "robust_tolerance" not in SearchSettings(tasks=("a",)).to_dict()  # selection only: older searches resume
    assert SearchSettings(tasks=("a",), robust_tolerance=0.02).to_dict()["robust_tolerance"] == 0.02
    with pytest.raises(SearchError, match="robust_tolerance"):
        SearchSettings(tasks=("a",), robust_tolerance=-0.1)
    assert SearchSettings(tasks=("a",)).robust_se == 1.0 and "robust_se" not in SearchSettings(tasks=("a",)).to_dict()
    assert SearchSettings(tasks=("a",), robust_se=0).to_dict()["robust_se"] == 0
    with pytest.raises(SearchError, match="robust_se"):
        SearchSettings(tasks=("a",), robust_se=float("nan"))


@pytest.mark.parametrize("z", [0.0, 1e9])
def test_robust_search_selects_by_robust_choice_guarded_by_z(merger, evaluator, tmp_path, z):  # noqa: F811
    corrupted = Evaluator(with_corrupted(evaluator.samples, 0))
    settings = SearchSettings(tasks=robust_tasks(("a", "b")), trials=14, granularity=2, seed=0, robust_se=z)
    result = run_search(merger, corrupted, settings, tmp_path / "r")
    ok = [t for t in result.trials if t.status == "ok" and t.budget is None]
    proposal = robust_choice(ok, 0.01)[0]
    cleanest = max(ok, key=lambda t: clean_and_corrupted(t.dice)[0])
    # z = 0: the plain rule; no gain is 1e9 standard errors: the cleanest configuration is kept
    assert result.best is (proposal if z == 0 else cleanest) and result.selection.startswith("robust:")
    if z and proposal is not cleanest:
        assert "the best mean clean calibration Dice kept" in result.selection
    assert result.best in result.pareto
    promotion = decide_promotion(result.best.dice, single_model_scores(merger, corrupted, settings))
    assert promotion.promote, promotion.reason  # every single model is in the design: the guard does not trip


def test_a_warm_started_robust_search_keeps_the_clean_selection_unless_beaten_beyond_noise(merger, evaluator,
                                                                                          tmp_path):  # noqa: F811
    """As a site runs it: a clean-only MedSAMix-M search, then a robust one warm-started from its selection. With
    no gain ever enough (robust_se 1e9) the robust search returns that selection (or, if its own best clean Dice is
    more than the tolerance above it, its cleanest configuration)."""
    clean = run_search(merger, evaluator, SearchSettings(tasks=("a", "b"), trials=14, granularity=2, seed=0),
                       tmp_path / "m")
    corrupted = Evaluator(with_corrupted(evaluator.samples, 0))
    settings = SearchSettings(tasks=robust_tasks(("a", "b")), trials=16, granularity=2, seed=0, robust_se=1e9)
    robust = run_search(merger, corrupted, settings, tmp_path / "r", warm=[clean.best.config])
    ok = [t for t in robust.trials if t.status == "ok"]
    mine = score(merger, corrupted, clean.best.config, settings.tasks)
    assert clean_and_corrupted(mine)[0] >= max(clean_and_corrupted(t.dice)[0] for t in ok) - 0.01  # eligible here
    assert robust.best.dice == pytest.approx(mine)  # the clean-only selection itself
    proposal = robust_choice(ok, 0.01)[0]
    assert (robust.selection.startswith("robust: the warm-start configuration kept") if proposal.dice != mine
            else robust.selection == robust_choice(ok, 0.01)[1])


def test_task_mean_gain_is_the_difference_of_task_means_with_a_stratified_standard_error():
    rng = np.random.default_rng(5)
    tasks = ["a"] * 4 + ["b"] * 7
    x, y = rng.uniform(0, 1, 11), rng.uniform(0, 1, 11)
    gain, se = task_mean_gain(x, y, tasks)
    mean = lambda v, t: np.mean([v[i] for i in range(11) if tasks[i] == t])  # noqa: E731
    assert gain == pytest.approx(((mean(x, "a") + mean(x, "b")) - (mean(y, "a") + mean(y, "b"))) / 2)
    d = x - y
    var = sum(np.var(d[np.array(tasks) == t], ddof=1) / tasks.count(t) for t in "ab")
    assert se == pytest.approx(math.sqrt(var) / 2)
    assert task_mean_gain(x[:5], y[:5], ["a"] * 4 + ["b"])[1] == math.inf  # a task with one slice: no evidence


def test_robust_selection_leaves_the_cleanest_only_for_a_gain_beyond_noise(merger, evaluator):  # noqa: F811
    """Two real configurations of the initial design: X recorded as the cleanest, Y as the more robust within the
    tolerance. Y is kept exactly when its corrupted gain over X, scored again per slice, is positive and at least
    robust_se standard errors."""
    corrupted = Evaluator(with_corrupted(evaluator.samples, 0))
    settings = SearchSettings(tasks=robust_tasks(("a", "b")), granularity=2)
    real = {c.fingerprint(): (c, score(merger, corrupted, c, settings.tasks))
            for c in initial_configs(merger, settings)}
    ranked = sorted(real.values(), key=lambda cd: clean_and_corrupted(cd[1])[1])
    (x, x_dice), (y, y_dice) = ranked[0], ranked[-1]  # the least and the most robust
    assert clean_and_corrupted(y_dice)[1] > clean_and_corrupted(x_dice)[1]
    recorded = [_Trial(x, {**x_dice, **{t: 0.9 for t in ("a", "b")}}),
                _Trial(y, {**y_dice, **{t: 0.895 for t in ("a", "b")}})]  # X the cleanest, Y within 0.01
    idx = [i for i, s in enumerate(corrupted.samples) if s.task.name.endswith("@corrupted")]
    names = [corrupted.samples[i].task.name for i in idx]
    gain, se = task_mean_gain(*(score_per_slice(merger, corrupted, c, idx) for c in (y, x)), names)
    assert gain == pytest.approx(clean_and_corrupted(y_dice)[1] - clean_and_corrupted(x_dice)[1]) and 0 < se < 1
    for z in (0.0, 0.5 * gain / se, 0.99 * gain / se, 1.01 * gain / se, 1e9):
        chosen, why = robust_selection(merger, corrupted, dataclasses.replace(settings, robust_se=z), recorded)
        assert chosen is recorded[1 if z < gain / se else 0], (z, gain, se, why)
        if z:
            assert f"{gain:+.4f}" in why and f"{se:.4f}" in why
    assert robust_selection(merger, corrupted, settings, recorded[:1])[0] is recorded[0]
    # a warm-start reference within the tolerance takes the cleanest one's place; outside it, it does not
    ref = _Trial(x, {**x_dice, **{t: 0.892 for t in ("a", "b")}})
    z = 0.99 * gain / se
    chosen, why = robust_selection(merger, corrupted, dataclasses.replace(settings, robust_se=z), [*recorded, ref], ref)
    assert chosen is recorded[1] and "over the warm-start configuration" in why
    chosen, why = robust_selection(merger, corrupted, dataclasses.replace(settings, robust_se=1.01 * gain / se),
                                   [*recorded, ref], ref)
    assert chosen is ref and why.startswith("robust: the warm-start configuration kept")
    far = _Trial(x, {**x_dice, **{t: 0.88 for t in ("a", "b")}})  # 0.02 below the best clean Dice
    chosen, why = robust_selection(merger, corrupted, dataclasses.replace(settings, robust_se=1e9),
                                   [*recorded, far], far)
    assert chosen is recorded[0] and why.startswith("robust: the cleanest configuration kept")


class _Trial:
    def __init__(self, config, dice: dict[str, float]) -> None:  # noqa: ANN001
        self.config, self.dice = config, dice


def score_per_slice(merger, evaluator, config, idx):  # noqa: ANN001, ANN201, F811
    from medsamix.search.execution import evaluate_config

    return evaluate_config(merger, evaluator, config, idx).per_sample[idx]


def test_robust_promotion_needs_each_single_model_beaten_on_clean_or_corrupted_dice():
    singles = {"sam": {"a": 0.7, "a@corrupted": 0.5}, "medsam": {"a": 0.6, "a@corrupted": 0.65}}
    yes = decide_promotion({"a": 0.69, "a@corrupted": 0.66}, singles)  # less clean than sam, more robust than both
    assert yes.promote and "beaten on clean or corrupted" in yes.reason and yes.best_single == "sam"
    no = decide_promotion({"a": 0.65, "a@corrupted": 0.45}, singles)  # sam is cleaner and more robust
    assert not no.promote and "'sam'" in no.reason and "served model is unchanged" in no.reason
    assert decide_promotion({"a": 0.69, "a@corrupted": 0.66}, singles, min_gain=0.05).promote  # by 0.09 and 0.16
    gain = decide_promotion({"a": 0.69, "a@corrupted": 0.66}, singles, min_gain=0.2)
    assert not gain.promote and "required gain 0.2" in gain.reason
