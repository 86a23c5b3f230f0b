"""The no-regression guard: the merged model is promoted only when its mean calibration Dice is not below that of
the best single pool model (plus ``min_gain``), each single model scored on the same calibration slices *with its
own preprocessing* (as it would be served on its own). The preprocessing style is part of the searched
configuration (unless the options fix it) and the search's initial design contains every single model with its
own style, so the guard can only trip on a required gain (``min_gain``) - or, with a fixed style, on a single model
whose own preprocessing suits the data better; then the run says so and nothing is published.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from medsamix.merging.config import MergeConfig
from medsamix.merging.merger import Merger
from medsamix.search.evaluate import Evaluator
from medsamix.search.search import SearchSettings, score

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

    Args:
        merged: Task -> calibration Dice of the merged model.
        singles: Alias -> task -> calibration Dice of each single pool model (at least one).
        min_gain: Required margin over the best single model (0: not worse is enough).
    """
    if not singles:
        raise ValueError("no single pool model to compare with")

    def mean(d: Mapping[str, float]) -> float:
        return float(sum(d.values()) / len(d)) if d else 0.0

    m = mean(merged)
    means = {a: mean(d) for a, d in singles.items()}
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


def single_model_config(merger: Merger, alias: str, style: str) -> MergeConfig:
    """Pool model ``alias`` as it is served alone: every group picked from it, with ``style``."""
    return MergeConfig.uniform(merger.groups, "pick", {"source": alias}, merger.granularity, merger.separate, style)


def single_model_scores(merger: Merger, evaluator: Evaluator, settings: SearchSettings) -> dict[str, dict[str, float]]:
    """Dice per task (``settings.tasks``) of each single pool model on ``evaluator``'s slices, each with its own
    preprocessing style (:meth:`SearchSettings.own_style`), as it is served alone."""
    return {a: score(merger, evaluator, single_model_config(merger, a, settings.own_style(a)), settings.tasks)
            for a in merger.aliases}
