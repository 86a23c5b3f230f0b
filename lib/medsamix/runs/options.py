"""The options of a merge run as a user gives them (a MONAI Label train request, the command line), parsed and
checked in one place: :class:`MergeOptions` (every option, strings accepted) and :func:`parse_tasks` (task names).
Label names (value -> task name) are read by :func:`medsamix.data.tasks.label_names`, re-exported here."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from medsamix.data.tasks import label_names, parse_names
from medsamix.errors import MergeRunError, check_choice, check_flag, echo
from medsamix.merging.groups import check_granularity
from medsamix.models.preprocess import check_style
from medsamix.search.search import SearchSettings

__all__ = ["MergeOptions", "label_names", "parse_min_gain", "parse_tasks"]

parse_tasks = parse_names
"""Task names from an option (:func:`medsamix.data.tasks.parse_names`)."""


MAX_OPTION_INT = 2**31 - 1  # integer options (trials, seed, ...) beyond this are refused
OBJECTIVES = ("box", "interactive")
MAX_ROUNDS = 20  # correction rounds of the interactive objective (each one a decoder pass per slice and trial)


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise MergeRunError(f"{name}: expected an integer, got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError, OverflowError):
        raise MergeRunError(f"{name}: expected an integer, got {echo(value)}") from None
    if not f.is_integer():
        raise MergeRunError(f"{name}: expected an integer, got {echo(value)}")
    if abs(f) > MAX_OPTION_INT:
        raise MergeRunError(f"{name}: {str(value)[:40]} is out of range (at most {MAX_OPTION_INT})")
    return int(f)


def _as_bool(name: str, value: Any) -> bool:
    return check_flag(value, name, MergeRunError)


def parse_min_gain(value: Any, name: str = "min_gain") -> float:
    """The promotion margin (:func:`medsamix.runs.promotion.decide_promotion`): a Dice difference in [-1, 1];
    ``None`` / empty -> 0.

    Raises:
        MergeRunError: not a number or out of range, naming the option ``name``.
    """
    try:
        min_gain = float(value or 0.0)
    except (TypeError, ValueError):
        raise MergeRunError(f"{name}: expected a number, got {value!r}") from None
    if not -1.0 <= min_gain <= 1.0:
        raise MergeRunError(f"{name}: must lie in [-1, 1] (a Dice difference), got {min_gain}")
    return min_gain


@dataclasses.dataclass(frozen=True)
class MergeOptions:
    """The options of a merge run as a user gives them (a MONAI Label train request, a form).

    Attributes:
        tasks: Task names; one -> MedSAMix-S, several -> MedSAMix-M, none -> every task of the data.
        trials: Configurations to evaluate (the initial design included).
        granularity: ViT blocks per encoder group (1-4).
        separate: Split encoder groups into attn / mlp / norm.
        min_budget: Multi-fidelity (one task only): fewest calibration slices per trial; ``None`` = off.
        seed: Seed of the patient split and of SMAC.
        restart: Discard the stored trials of these settings and start over.
        preprocessing: Preprocessing style of the merged model ("sam" / "medsam"), fixed; ``None`` = searched
            (each single pool model enters the initial design with its own style).
        min_gain: Promote only when the merged model's mean calibration Dice exceeds the best single pool
            model's by at least this much (0 = not worse is enough). Not part of the search settings.
        robust: Add the corrupted twin ``<task>@corrupted`` of every task as an objective (calibration and test
            slices under :mod:`medsamix.search.corruptions`' seeded suite), so ParEGO trades clean against
            corrupted Dice.
        objective: What a trial is scored on: "box" (Dice of box prompts) or "interactive" (the box, then
            ``rounds`` correction clicks, a slice's Dice averaged over the rounds; :mod:`medsamix.search.interactive`).
        rounds: Correction rounds of the interactive objective (1-:data:`MAX_ROUNDS`); ignored for "box".
    """

    tasks: tuple[str, ...] = ()
    trials: int = 30
    granularity: int = 2
    separate: bool = False
    min_budget: int | None = None
    seed: int = 0
    restart: bool = False
    preprocessing: str | None = None
    min_gain: float = 0.0
    robust: bool = False
    objective: str = "box"
    rounds: int = 3

    @property
    def search_rounds(self) -> int:
        """The search settings' ``rounds``: 0 for the box objective, else :attr:`rounds`."""
        return self.rounds if self.objective == "interactive" else 0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> "MergeOptions":
        """Parse and check options; strings are accepted for every field ("10", "true"), ``task``/``tasks``/
        ``labels`` name the tasks, and a ``min_budget`` of 0 or empty turns multi-fidelity off. Unrelated keys
        are ignored.

        Raises:
            MergeRunError: a value of the wrong type or out of range, naming the option.
        """
        merged = {**(defaults or {}), **{k: v for k, v in values.items() if v is not None}}
        tasks: tuple[str, ...] = ()
        for key in ("task", "tasks", "labels"):
            if merged.get(key) not in (None, "", [], ()):
                tasks = parse_tasks(merged[key])
                break
        trials = _as_int("trials", merged.get("trials", cls.trials))
        if trials < 1:
            raise MergeRunError(f"trials: must be >= 1, got {trials}")
        granularity = _as_int("granularity", merged.get("granularity", cls.granularity))
        check_granularity(granularity, error=MergeRunError)
        mb_raw = merged.get("min_budget")
        min_budget = None if mb_raw in (None, "", "none", "None") else _as_int("min_budget", mb_raw)
        if min_budget is not None and min_budget < 0:
            raise MergeRunError(f"min_budget: must be >= 0 (0 = all calibration slices), got {min_budget}")
        seed = _as_int("seed", merged.get("seed", cls.seed))
        if seed < 0:
            raise MergeRunError(f"seed: must be >= 0, got {seed}")
        style = merged.get("preprocessing") or None
        if style is not None:
            check_style(style, "preprocessing", MergeRunError)  # empty: searched
        min_gain = parse_min_gain(merged.get("min_gain"))
        raw = merged.get("objective") or "box"
        objective = check_choice(raw.strip().lower() if isinstance(raw, str) else raw, OBJECTIVES, "objective",
                                 MergeRunError)
        rounds = _as_int("rounds", merged.get("rounds", cls.rounds))
        if not 1 <= rounds <= MAX_ROUNDS:
            raise MergeRunError(f"rounds: must lie in [1, {MAX_ROUNDS}] correction rounds, got {rounds}")
        return cls(tasks, trials, granularity, _as_bool("separate", merged.get("separate", False)),
                   min_budget or None, seed, _as_bool("restart", merged.get("restart", False)), style, min_gain,
                   _as_bool("robust", merged.get("robust", False)), objective, rounds)

    def settings(self, tasks: Sequence[str], styles: Mapping[str, str]) -> SearchSettings:
        """The search settings for ``tasks``; ``styles``: alias -> own preprocessing style of each pool model
        (:attr:`~medsamix.models.pool.ModelPool.styles`). The merged model's style is searched unless the options fix one."""
        return SearchSettings(tasks=tuple(tasks), trials=self.trials, granularity=self.granularity,
                              separate=self.separate, seed=self.seed, preprocessing=self.preprocessing,
                              own_styles=tuple((a, str(s)) for a, s in styles.items()), min_budget=self.min_budget,
                              rounds=self.search_rounds)
