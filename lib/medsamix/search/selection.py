"""Selection of a single-task search's configuration, guarded against the winner's curse.

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

import numpy as np

from medsamix.merging.config import MergeConfig
from medsamix.merging.merger import Merger
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
    """Mean and standard error of ``chosen - single`` (per-slice Dice ``(n,)`` on the same slices)."""
    d = np.asarray(chosen, dtype=np.float64) - np.asarray(single, dtype=np.float64)
    if d.size < 2:
        return float(d.mean()) if d.size else 0.0, math.inf
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))


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
