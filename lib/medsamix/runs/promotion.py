"""The no-regression guard: the merged model is promoted only when its mean calibration Dice is not below that of
the best single pool model (plus ``min_gain``), each single model scored on the same calibration slices *with its
own preprocessing* (as it would be served on its own). The preprocessing style is part of the searched
configuration (unless the options fix it) and the search's initial design contains every single model with its
own style, so the guard can only trip on a required gain (``min_gain``) - or, with a fixed style, on a single model
whose own preprocessing suits the data better; then the run says so and nothing is published. A robust search's
model (every task and its corrupted twin as objectives) is compared on mean clean and mean corrupted Dice, as it was
selected: each single model must be beaten on one of the two.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from medsamix.merging.config import MergeConfig
from medsamix.merging.merger import Merger
from medsamix.search.evaluate import Evaluator
from medsamix.search.search import SearchSettings, score
from medsamix.search.selection import clean_and_corrupted, is_robust

@dataclasses.dataclass(frozen=True)
class Promotion:
    """The no-regression decision.

    Attributes:
        promote: Whether the merged model may replace the served one.
        merged_dice: Mean calibration Dice of the merged model over the tasks.
        best_single: Alias of the best single pool model.
        best_single_dice: Its mean calibration Dice (own preprocessing, same slices).
        singles: Alias -> task -> calibration Dice of every single pool model.
        reason: One sentence saying why.
    """

    promote: bool
    merged_dice: float
    best_single: str
    best_single_dice: float
    singles: dict[str, dict[str, float]]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def decide_promotion(merged: Mapping[str, float], singles: Mapping[str, Mapping[str, float]],
                     min_gain: float = 0.0, tolerance: float = 1e-9) -> Promotion:
    """Promote when the merged model's mean calibration Dice is >= the best single model's + ``min_gain``
    (up to ``tolerance`` for rounding).

    A robust search's model (objectives every task and its corrupted twin) is compared as it was selected
    (:func:`~medsamix.search.selection.robust_choice`): on its mean clean and mean corrupted Dice, see
    :func:`_robust_promotion`.

    Args:
        merged: Task -> calibration Dice of the merged model.
        singles: Alias -> task -> calibration Dice of each single pool model (at least one).
        min_gain: Required margin over the best single model (0: not worse is enough).
    """
    if not singles:
        raise ValueError("no single pool model to compare with")
    if is_robust(list(merged)):
        return _robust_promotion(merged, singles, min_gain, tolerance)

    m = _mean(merged)
    means = {a: _mean(d) for a, d in singles.items()}
    best = max(means, key=lambda a: means[a])
    ok = m >= means[best] + min_gain - tolerance
    gain = f" + required gain {min_gain:g}" if min_gain else ""
    if ok:
        reason = (f"promoted: merged calibration Dice {m:.4f} >= best single pool model {best!r} "
                  f"{means[best]:.4f}{gain}")
    else:
        reason = (f"not promoted: merged calibration Dice {m:.4f} is below the best single pool model {best!r} "
                  f"({means[best]:.4f}, own preprocessing, on the same calibration slices){gain}; the served "
                  "model is unchanged")
    return Promotion(ok, m, best, means[best], {a: dict(d) for a, d in singles.items()}, reason)


def _mean(d: Mapping[str, float]) -> float:
    """Mean Dice over the objectives of ``d`` (0 for none)."""
    return float(sum(d.values()) / len(d)) if d else 0.0


def _robust_promotion(merged: Mapping[str, float], singles: Mapping[str, Mapping[str, float]], min_gain: float,
                      tolerance: float) -> Promotion:
    """Promote a robust search's model unless a single pool model is as good on both mean clean and mean corrupted
    calibration Dice: each single model must be beaten by ``min_gain`` on at least one of the two means.

    The robust selection keeps the best corrupted Dice among configurations within a tolerance of the best clean
    Dice, and every single model (own style) is in its initial design, so a single model that is at least as clean
    was eligible and is not more robust: with ``min_gain`` 0 the guard does not trip. ``merged_dice`` and
    ``best_single_dice`` are means over every objective (clean and corrupted); ``best_single`` is the single model
    with the best mean clean Dice."""
    r_clean, r_bad = clean_and_corrupted(dict(merged))
    pairs = {a: clean_and_corrupted(dict(d)) for a, d in singles.items()}
    blocking = [a for a, (c, b) in pairs.items()
                if r_clean < c + min_gain - tolerance and r_bad < b + min_gain - tolerance]
    best = max(pairs, key=lambda a: pairs[a])
    m, best_dice = _mean(merged), _mean(singles[best])
    gain = f" by the required gain {min_gain:g}" if min_gain else ""
    what = f"merged calibration Dice clean {r_clean:.4f}, corrupted {r_bad:.4f}"
    if not blocking:
        reason = f"promoted: {what}; every single pool model is beaten on clean or corrupted Dice{gain}"
    else:
        a = blocking[0]
        reason = (f"not promoted: {what}; the single pool model {a!r} (clean {pairs[a][0]:.4f}, corrupted "
                  f"{pairs[a][1]:.4f}, own preprocessing, on the same calibration slices) is not beaten on either"
                  f"{gain}; the served model is unchanged")
    return Promotion(not blocking, m, best, best_dice, {a: dict(d) for a, d in singles.items()}, reason)


def single_model_config(merger: Merger, alias: str, style: str) -> MergeConfig:
    """Pool model ``alias`` as it is served alone: every group picked from it, with ``style``."""
    return MergeConfig.uniform(merger.groups, "pick", {"source": alias}, merger.granularity, merger.separate, style)


def single_model_scores(merger: Merger, evaluator: Evaluator, settings: SearchSettings) -> dict[str, dict[str, float]]:
    """Dice per task (``settings.tasks``) of each single pool model on ``evaluator``'s slices, each with its own
    preprocessing style (:meth:`SearchSettings.own_style`), as it is served alone."""
    return {a: score(merger, evaluator, single_model_config(merger, a, settings.own_style(a)), settings.tasks)
            for a in merger.aliases}
