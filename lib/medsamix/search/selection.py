"""Selection of a search's configuration: a single-task search's guarded against the winner's curse
(:func:`guard`), a robust search's by corrupted Dice within a bound on clean Dice (:func:`robust_choice`), guarded
the same way (:func:`robust_selection`).

A search keeps the configuration with the best mean calibration Dice. On a small calibration set (one volume split
into slabs: a handful of slices) that maximum over tens of configurations is biased upward: a merge that beats the
best single pool model by a few thousandths on calibration is often below it on new slices. The guard therefore
keeps the best configuration over the best single pool model (as served alone: the initial design's one-hot point,
with the model's own style) only when its mean per-slice gain over that model, on the same calibration slices, is at
least ``guard_se`` standard errors of that paired gain (:attr:`SearchSettings.guard_se`; 1.0: the
one-standard-error rule). Otherwise the single model itself is selected, so the site serves that model.

Only the calibration slices take part: the rule is fixed beforehand and is not tuned on any test split.

The guard is off by default (``guard_se`` 0): on the shared sets it changed 2 of 15 selections, once by +0.001 and
once by -0.157 test Dice (it fell back to a single model that led the others on calibration by 0.002 and was the
worst of them on test; ``results/search_quality.md``). A search keeps it as an option.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Protocol, TypeVar

import numpy as np

from medsamix.merging.config import MergeConfig
from medsamix.merging.merger import Merger
from medsamix.search.corruptions import CORRUPTED
from medsamix.search.evaluate import Evaluator
from medsamix.search.execution import evaluate_config
from medsamix.search.settings import SearchSettings, single_configs


@dataclasses.dataclass(frozen=True)
class Guard:
    """The guard's comparison of the best configuration with the best single pool model on calibration slices.

    Attributes:
        alias: The best single pool model (mean calibration Dice, own style).
        config: Its initial-design configuration (bit-identical to the model).
        single_dice: Its mean calibration Dice on the task.
        gain: Mean per-slice Dice of the best configuration minus the single model's (paired, same slices).
        se: Standard error of that mean (sample standard deviation / sqrt(n); ``inf`` for one slice).
        slices: Number of calibration slices compared.
        kept: Whether the best configuration stays selected.
    """

    alias: str
    config: MergeConfig
    single_dice: float
    gain: float
    se: float
    slices: int
    kept: bool

    def reason(self, z: float) -> str:
        """One sentence saying what was selected and why."""
        what = (f"paired calibration gain {self.gain:+.4f} over the best single model {self.alias!r} "
                f"({self.single_dice:.4f}), standard error {self.se:.4f} on {self.slices} slices")
        if self.kept:
            return f"best calibration Dice kept: {what} (required: >= {z:g} SE)"
        return f"single model {self.alias!r} selected: {what}, less than {z:g} SE (or not positive)"


def paired_gain(chosen: np.ndarray, single: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of ``chosen - single`` (per-slice Dice ``(n,)`` on the same slices of one task)."""
    return task_mean_gain(chosen, single, [""] * len(chosen))


def guard(merger: Merger, evaluator: Evaluator, settings: SearchSettings, config: MergeConfig) -> Guard:
    """Compare ``config`` (the best calibration Dice of a single-task search) with the best single pool model on the
    task's calibration slices of ``evaluator`` and decide by ``settings.guard_se`` (see the module docstring).

    Identical predictions on every slice (``config`` is that model) keep ``config``.

    Raises:
        ValueError: ``settings`` has more than one task, or no pool model has a single-model point.
    """
    if settings.multi:
        raise ValueError("the single-model guard is for single-task searches")
    task = settings.tasks[0]
    idx = [i for i, s in enumerate(evaluator.samples) if s.task.name == task]
    singles = {a: cs[0] for a, cs in single_configs(merger, settings).items() if cs}
    if not singles:
        raise ValueError("no pool model has a single-model point in the initial design")
    per = {a: evaluate_config(merger, evaluator, c, idx).per_sample[idx] for a, c in singles.items()}
    alias = max(per, key=lambda a: float(per[a].mean()))  # the first (base first) among equals
    chosen = evaluate_config(merger, evaluator, config, idx).per_sample[idx]
    gain, se = paired_gain(chosen, per[alias])
    kept = bool(np.array_equal(chosen, per[alias])) or (gain > 0 and gain >= settings.guard_se * se)
    return Guard(alias, singles[alias], float(per[alias].mean()), gain, se, len(idx), kept)


class Scored(Protocol):
    """Anything with per-objective calibration Dice (a search's trial)."""

    @property
    def dice(self) -> dict[str, float]: ...


T = TypeVar("T", bound=Scored)


class ScoredConfig(Scored, Protocol):
    """A scored merge configuration (a search's trial)."""

    @property
    def config(self) -> MergeConfig: ...


TC = TypeVar("TC", bound=ScoredConfig)


def is_robust(objectives: Sequence[str]) -> bool:
    """Whether a multi-task search's objectives hold corrupted twins (``<task>@corrupted``): a robust search."""
    return any(o.endswith(CORRUPTED) for o in objectives)


def clean_and_corrupted(dice: dict[str, float]) -> tuple[float, float]:
    """Mean Dice of the clean objectives and of the corrupted twins (``nan`` where there are none)."""
    clean = [v for k, v in dice.items() if not k.endswith(CORRUPTED)]
    bad = [v for k, v in dice.items() if k.endswith(CORRUPTED)]
    return (float(np.mean(clean)) if clean else math.nan, float(np.mean(bad)) if bad else math.nan)


def robust_choice(trials: Sequence[T], tolerance: float) -> tuple[T, str]:
    """The selection of a robust search (every task and its corrupted twin as objectives) and why.

    Among ``trials`` (successful, scored on all calibration slices) whose mean clean calibration Dice is within
    ``tolerance`` of the best mean clean calibration Dice of them all, the one with the best mean corrupted
    calibration Dice (ties: the better clean Dice, then the earlier trial). It is a member of the Pareto front of
    ``trials``: a trial dominating it would be as clean, so eligible, and at least as robust.

    Raises:
        ValueError: no trials.
    """
    if not trials:
        raise ValueError("no trials to select from")
    means = [clean_and_corrupted(t.dice) for t in trials]
    best_clean = max(c for c, _ in means)
    eligible = [i for i, (c, _) in enumerate(means) if c >= best_clean - tolerance]
    i = max(eligible, key=lambda j: (means[j][1], means[j][0], -j))
    why = (f"robust: the best mean corrupted calibration Dice ({means[i][1]:.4f}) among the configurations within "
           f"{tolerance:g} of the best mean clean calibration Dice ({best_clean:.4f}; this one {means[i][0]:.4f})")
    return trials[i], why


def task_mean_gain(chosen: np.ndarray, other: np.ndarray, tasks: Sequence[str]) -> tuple[float, float]:
    """Mean over tasks of the per-task mean of ``chosen - other`` (per-slice Dice ``(n,)`` on the same slices,
    ``tasks[i]`` the task of slice ``i``) and its standard error (stratified by task: the square root of the sum of
    each task's squared standard error, divided by the number of tasks; ``inf`` when a task has one slice).

    The mean equals the difference of the two models' mean task Dice, the quantity a robust search selects on."""
    d = np.asarray(chosen, dtype=np.float64) - np.asarray(other, dtype=np.float64)
    names = sorted(set(tasks))
    if not names:
        return 0.0, math.inf
    where = np.asarray(tasks)
    means, variances = [], []
    for t in names:
        x = d[where == t]
        means.append(float(x.mean()))
        variances.append(float(x.var(ddof=1)) / x.size if x.size > 1 else math.inf)
    return float(np.mean(means)), math.sqrt(sum(variances)) / len(names)


def robust_selection(merger: Merger, evaluator: Evaluator, settings: SearchSettings, trials: Sequence[TC],
                     reference: TC | None = None) -> tuple[TC, str]:
    """The selection of a robust search among ``trials`` (successful, on all calibration slices of ``evaluator``,
    which holds every task and its corrupted twin) and why.

    :func:`robust_choice` with ``settings.robust_tolerance`` proposes a configuration. The reference is
    ``reference`` (the trial of a warm-start configuration, e.g. the clean-only search's selection) when it is
    within the tolerance of the best mean clean calibration Dice, else the configuration with the best mean clean
    calibration Dice (the first among equals). The reference is kept instead of the proposal unless the proposal's
    mean corrupted calibration Dice gain over it, paired per slice and stratified by task (:func:`task_mean_gain`,
    both scored again here), is positive and at least ``settings.robust_se`` standard errors. With a handful of
    calibration slices per task the largest corrupted Dice of tens of configurations is biased upward, as the
    largest clean Dice is, and two configurations a thousandth apart in clean calibration Dice are equally clean:
    the search leaves its reference only for robustness beyond that noise. ``robust_se`` 0: the proposal.

    Raises:
        ValueError: no trials.
    """
    proposal, why = robust_choice(trials, settings.robust_tolerance)
    best_clean = max(clean_and_corrupted(t.dice)[0] for t in trials)
    if reference is not None and clean_and_corrupted(reference.dice)[0] >= best_clean - settings.robust_tolerance:
        anchor, name = reference, "the warm-start configuration"
    else:
        anchor = max(trials, key=lambda t: clean_and_corrupted(t.dice)[0])  # max keeps the first among equals
        name = "the cleanest configuration"
    if settings.robust_se <= 0 or proposal is anchor:
        return proposal, why
    idx = [i for i, s in enumerate(evaluator.samples) if s.task.name.endswith(CORRUPTED)]
    names = [evaluator.samples[i].task.name for i in idx]
    per = [evaluate_config(merger, evaluator, t.config, idx).per_sample[idx] for t in (proposal, anchor)]
    gain, se = task_mean_gain(per[0], per[1], names)
    what = (f"corrupted calibration gain {gain:+.4f} over {name} (mean clean "
            f"{clean_and_corrupted(anchor.dice)[0]:.4f}), standard error {se:.4f} on {len(idx)} slices")
    if gain > 0 and gain >= settings.robust_se * se:
        return proposal, f"{why}; kept: {what} (required: >= {settings.robust_se:g} SE)"
    return anchor, (f"robust: {name} kept; the proposal ({why}) had a {what}, less than {settings.robust_se:g} SE "
                    "(or not positive)")
