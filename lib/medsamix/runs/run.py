"""One merge run end to end: calibration slices -> search -> merged model + no-regression decision.

This is the part of the MONAI Label "merge" train task (and of ``scripts/merge_search.py``) that does not depend on
MONAI Label. The steps live in their own modules: task sets (:mod:`medsamix.data.tasksets`), options
(:mod:`medsamix.runs.options`), the plan and run folder (:mod:`medsamix.runs.plan`), progress
(:mod:`medsamix.runs.progress`), the search state (:mod:`medsamix.runs.state`) and the no-regression guard
(:mod:`medsamix.runs.promotion`). :func:`run_merge` runs (or resumes) the search into an output folder, writes
``recipe.yaml``, ``merged.pth`` and ``history.csv`` there, scores the selected configuration on the test split, and
decides the :class:`~medsamix.runs.promotion.Promotion`; it holds the folder's :class:`~medsamix.runs.lock.RunLock`
throughout, so a second process on the folder is refused.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from medsamix.atomic import atomic_write
from medsamix.data.slices import SliceSample
from medsamix.merging.config import MergeConfig
from medsamix.merging.merger import Merger
from medsamix.merging.recipe import ModelRef, Recipe
from medsamix.models.checkpoint import save_sam_checkpoint
from medsamix.models.pool import ModelPool
from medsamix.runs.lock import RunLock
from medsamix.runs.plan import search_context
from medsamix.runs.promotion import Promotion, decide_promotion, single_model_scores
from medsamix.runs.state import SMAC_DIR, checkpoint_search_state, restore_search_state, write_history
from medsamix.search.evaluate import Evaluator
from medsamix.search.report import uniform_scores, write_report
from medsamix.search.search import SearchResult, SearchSettings, Trial, run_search, score

log = logging.getLogger(__name__)


@dataclasses.dataclass
class MergeOutcome:
    """What a finished run produced (also written to its output folder)."""

    out_dir: Path
    result: SearchResult
    recipe: Recipe
    state_dict: dict[str, Tensor]
    calibration_dice: dict[str, float]
    test_dice: dict[str, float]
    promotion: Promotion


def run_merge(
    pool: ModelPool,
    calibration: Sequence[SliceSample],
    test: Sequence[SliceSample],
    settings: SearchSettings,
    out_dir: str | Path,
    split: str,
    restart: bool = False,
    on_trial: Callable[[Trial, int], None] | None = None,
    client: Any | None = None,
    report: bool = True,
    min_gain: float = 0.0,
    device: str = "cpu",
    on_ready: Callable[["MergeOutcome"], None] | None = None,
    warm: Sequence[MergeConfig] = (),
) -> MergeOutcome:
    """Run (or resume) a search into ``out_dir`` and write its recipe, merged checkpoint and history there.

    Args:
        pool: The model pool.
        calibration: Calibration slices of ``settings.tasks`` (see :func:`select_tasks`).
        test: Test slices (may be empty: no test Dice then).
        settings: The search settings.
        out_dir: Output folder; a search there with the same settings and data is resumed. Locked for the whole
            call (search, selection, ``on_ready``, report): one process per folder.
        split: How calibration and test were split (part of the resume check and of the recipe).
        restart: Discard an incompatible history in ``out_dir`` instead of refusing.
        on_trial: Called after each trial with the trial and the number of trials done (resumed ones included).
        client: Optional ``distributed.Client`` for parallel trials.
        report: Also score the single models and uniform merges on calibration and test slices and write
            ``report.md`` (best-so-far curve, Pareto front, per-group method map, per-task tables).
        min_gain: Calibration Dice the merged model must gain over the best single model to be promoted.
        device: Where merging and scoring run ("cpu", "cuda", "cuda:1" ...); the outcome's state dict is on the CPU.
        on_ready: Called with the outcome once recipe, checkpoint and history are written and before the report
            (which can take long: it scores every reference model on the test slices), e.g. to publish.
        warm: Configurations of an earlier search to start from (:func:`~medsamix.search.search.run_search`),
            e.g. a clean-only search's selection before a robust search.

    Returns:
        The outcome; ``recipe.yaml``, ``merged.pth`` and ``history.csv`` are in ``out_dir`` (each written
        atomically), and ``recipe.scores`` carries the calibration and test Dice and the promotion decision. The
        recipe's ``preprocessing.style`` is the selected configuration's (searched, or fixed by the settings).
        The single models of the no-regression guard are scored with their own styles (``settings.own_styles``).

    Raises:
        RunLockedError: another process (or another call in this one) runs in ``out_dir``.
    """
    out_dir = Path(out_dir)
    with RunLock(out_dir):  # one process per run folder, for the whole run (a second one fails at once)
        return _run_merge(pool, calibration, test, settings, out_dir, split, restart, on_trial, client, report,
                          min_gain, device, on_ready, warm)


def _run_merge(pool: ModelPool, calibration: Sequence[SliceSample], test: Sequence[SliceSample],
               settings: SearchSettings, out_dir: Path, split: str, restart: bool,
               on_trial: Callable[[Trial, int], None] | None, client: Any | None, report: bool, min_gain: float,
               device: str, on_ready: Callable[["MergeOutcome"], None] | None,
               warm: Sequence[MergeConfig] = ()) -> MergeOutcome:
    """:func:`run_merge` with the run folder's lock held."""
    merger = Merger(pool, settings.granularity, settings.separate, device)
    evaluator = Evaluator(list(calibration), device=device, rounds=settings.rounds)
    context = search_context(pool, calibration, split)
    if restore_search_state(out_dir) is None and not (out_dir / SMAC_DIR).exists():
        checkpoint_search_state(out_dir, 0)  # a new run: a kill before the first trial's checkpoint returns here

    def after_trial(trial: Trial, done: int) -> None:
        # the caller's callback first (RunMonitor appends the trial to trials.jsonl), then the checkpoint, which
        # copies that log with SMAC's state: a resumed run gets both as they were after the same trial
        try:
            if on_trial is not None:
                on_trial(trial, done)
        finally:
            checkpoint_search_state(out_dir, done)

    result = run_search(merger, evaluator, settings, out_dir, context, restart, after_trial, client, warm)
    best = result.best.config
    test_ev = Evaluator(list(test), device=device, rounds=settings.rounds) if test else None
    test_dice = score(merger, test_ev, best, settings.tasks) if test_ev else {}
    singles = single_model_scores(merger, evaluator, settings)
    promotion = decide_promotion(result.best.dice, singles, min_gain)
    recipe = Recipe(
        arch=pool.arch, base=ModelRef(pool.base.alias, pool.base.sha256),
        models=[ModelRef(m.alias, m.sha256) for m in pool.models],
        merge=best.with_preprocessing(None).with_ct_window(None),
        preprocessing={"style": best.preprocessing, **({"ct_window": best.ct_window} if best.ct_window else {})},
        scores={"calibration_dice": dict(result.best.dice), "test_dice": test_dice, "trials": len(result.trials),
                "split": split, "single_models_calibration_dice": promotion.singles,
                "promotion": promotion.reason},
    )
    recipe.save(out_dir / "recipe.yaml")
    state = {k: v.detach().to("cpu", copy=True) for k, v in merger.apply(best).state_dict().items()}
    save_sam_checkpoint(state, out_dir / "merged.pth")
    atomic_write(out_dir / "history.csv", lambda p: write_history(p, result.trials, settings.tasks))
    outcome = MergeOutcome(out_dir, result, recipe, state, dict(result.best.dice), test_dice, promotion)
    if on_ready is not None:  # e.g. publish now: the report below scores every reference model on test slices
        on_ready(outcome)
    if report:
        write_comparison_report(out_dir, merger, evaluator, test_ev, settings, result, singles, test_dice,
                                [f"Data: {split}."])
    return outcome


def reference_scores(merger: Merger, evaluator: Evaluator, settings: SearchSettings) -> dict[str, dict[str, float]]:
    """Dice per task of the references a merge must beat on ``evaluator``'s slices: every single pool model (its
    own preprocessing) and every uniform merge (the base model's style, as in the initial design). ``merger``'s
    model is overwritten."""
    return {**single_model_scores(merger, evaluator, settings), **uniform_scores(merger, evaluator, settings)}


def write_comparison_report(out_dir: Path, merger: Merger, calibration: Evaluator, test: Evaluator | None,
                            settings: SearchSettings, result: SearchResult, singles: Mapping[str, Mapping[str, float]],
                            test_dice: Mapping[str, float], header: Sequence[str] = ()) -> Path:
    """Score the single models (own preprocessing) and the uniform merges on calibration and test slices and
    write ``report.md`` with its figures (see :mod:`medsamix.search.report`). ``merger``'s model is overwritten."""
    cal = {"medsamix": dict(result.best.dice), **singles, **uniform_scores(merger, calibration, settings, result.trials)}
    tst: dict[str, dict[str, float]] = {}
    if test is not None:
        tst = {"medsamix": dict(test_dice), **reference_scores(merger, test, settings)}
    return write_report(out_dir, result, settings, cal, tst, header)
