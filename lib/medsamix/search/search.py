"""MedSAMix search: SMAC over layer-wise merge configurations, scored by calibration Dice.

One code path serves both variants; they differ only in the objectives handed to SMAC:

* MedSAMix-S (one task): ``HyperparameterOptimizationFacade`` (random-forest surrogate, expected improvement)
  minimising ``1 - Dice`` of the task.
* MedSAMix-M (several tasks): the same facade with ``ParEGO`` passed explicitly as the multi-objective algorithm
  (random scalarisations of the per-task costs), giving a Pareto front; the selected configuration is the front
  member with the best mean calibration Dice. A robust search (every task and its corrupted twin as objectives)
  selects the front member with the best mean corrupted Dice among those within
  :attr:`SearchSettings.robust_tolerance` of the best mean clean Dice, over the cleanest configuration only for a
  corrupted gain beyond noise (:func:`~medsamix.search.selection.robust_selection`).

A search has two stages (:attr:`SearchSettings.coarse_share`): a coarse stage over a tied space with one setting
per model component (:func:`~medsamix.search.space.component_tie`), which holds the initial design, then the
per-group stage, seeded with the coarse stage's best configurations (and any warm-start configurations of an
earlier search). Each stage is its own SMAC run (state under
``out_dir/smac/coarse`` and ``out_dir/smac/medsamix``); trials are numbered across both.

Trials run through SMAC's ask/tell interface, so every finished trial is written to the output directory at once
(SMAC saves its run history on every ``tell``): an interrupted search resumes where it stopped. A trial whose merge
is non-finite or that raises is told to SMAC as crashed (cost 1 per task) and the search goes on. The initial design
contains the uniform merges and each single pool model, so the search never ends worse on calibration than the best
of them. A single-task search selects its best calibration Dice; with :attr:`SearchSettings.guard_se` > 0 (off by
default) it keeps that configuration over the best single pool model only when the calibration gain is beyond noise
(:mod:`medsamix.search.selection`), otherwise it selects that single model.

The preprocessing style is part of every configuration (:attr:`MergeConfig.preprocessing`): searched (the
hyper-parameter ``prep:style``) unless the settings fix it. Then each single model enters the initial design with its
own style (:attr:`SearchSettings.own_styles`), exactly as it is served alone, so the search never ends below any
single model as served alone either.

This module is the SMAC driver; the settings and the initial design are in :mod:`medsamix.search.settings`, how
trials run (here, on Dask workers, or the naive reference loop) in :mod:`medsamix.search.execution`. Both are
re-exported here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ConfigSpace import Configuration

from medsamix.atomic import atomic_write_text
from medsamix.errors import MedSAMixError
from medsamix.merging.config import MergeConfig
from medsamix.merging.merger import Merger
from medsamix.search.evaluate import Evaluator
from medsamix.search.execution import LocalExecution, execution, preprocessor, run_trial, score
from medsamix.search.selection import clean_and_corrupted, guard, is_robust, robust_selection
from medsamix.search.settings import (
    COARSE_TOP,
    SearchError,
    SearchSettings,
    budget_problem,
    coarse_trials,
    ct_windows_for,
    initial_configs,
    settings_key,
)
from medsamix.search.space import Tie, build_space, component_tie, from_merge_config, to_merge_config

log = logging.getLogger(__name__)

_settings_key = settings_key  # the former private name (runs/plan.py)

__all__ = ["COARSE_TOP", "SearchError", "SearchResult", "SearchSettings", "Trial", "budget_problem", "coarse_trials",
           "ct_windows_for", "initial_configs", "preprocessor", "run_search", "score", "settings_key"]


@dataclasses.dataclass
class Trial:
    """One evaluated configuration."""

    number: int
    config: MergeConfig
    dice: dict[str, float]
    status: str  # "ok" or "crashed: <reason>"
    budget: int | None = None  # calibration slices scored (None = all)
    # "coarse" (one setting per component), "groups" (per layer group) or "rescored" (after a multi-fidelity search,
    # an initial-design configuration Hyperband dropped early, scored on all calibration slices; not a SMAC trial)
    stage: str = "groups"

    @property
    def mean_dice(self) -> float:
        return float(sum(self.dice.values()) / len(self.dice)) if self.dice else 0.0


@dataclasses.dataclass
class SearchResult:
    """Outcome of a search: every trial, the Pareto front (multi-task) and the selected configuration."""

    trials: list[Trial]
    pareto: list[Trial]
    best: Trial
    encoder_passes: int  # image-encoder passes of the trials (the single-model guard's few are not counted)
    aggregation: str | None = None  # SMAC's multi-objective algorithm (ParEGO for MedSAMix-M)
    seconds: float = 0.0  # wall time of this call (set-up, trials, selection); a resumed search counts its part only
    argmax: Trial | None = None  # the best calibration Dice (``best`` unless the single-model guard replaced it)
    selection: str = ""  # how ``best`` was chosen (:mod:`medsamix.search.selection`)


def run_search(
    merger: Merger,
    evaluator: Evaluator,
    settings: SearchSettings,
    out_dir: str | Path,
    context: dict[str, Any] | None = None,
    restart: bool = False,
    on_trial: Callable[[Trial, int], None] | None = None,
    client: Any | None = None,
    warm: Sequence[MergeConfig] = (),
) -> SearchResult:
    """Run (or resume) a search and return its result.

    Args:
        merger: Merger over the pool, built with ``settings.granularity`` / ``separate``.
        evaluator: Calibration slices of the tasks.
        settings: The search definition.
        out_dir: Output directory; SMAC's files go to ``out_dir/smac``.
        context: Further facts that must match to resume (pool checksums, calibration study ids ...).
        restart: Discard an existing, incompatible history instead of refusing.
        on_trial: Called after every trial with the trial and the number of trials done.
        client: A ``distributed.Client``: trials then run in parallel on its workers (one per worker at a time);
            each worker loads the pool and builds its merger and evaluator once. ``None`` runs them here.
        warm: Configurations of an earlier search over the same pool and grouping (a warm start, e.g. the
            selection of a clean-only MedSAMix-M search before a robust one): they join the per-group stage's
            initial design, after the coarse stage's best, so this search scores them and can select them. Part of
            the resume check.

    Raises:
        SearchError: unknown task, a task without calibration slices, a warm-start configuration that is not in
            this search's space, or an output directory holding a search with other settings (and not
            ``restart``).
    """
    started = time.perf_counter()
    if (merger.granularity, merger.separate) != (settings.granularity, settings.separate):
        raise SearchError("the merger's grouping differs from the search settings")
    available = {s.task.name for s in evaluator.samples}
    for t in settings.tasks:
        if t not in available:
            raise SearchError(f"task {t!r} has no calibration slices; available: {sorted(available)}")
    full = len(evaluator.samples)
    if settings.min_budget is not None:
        problem = budget_problem(settings.min_budget, len(settings.tasks), full)
        if problem:
            raise SearchError(problem)
        if settings.eta < 2:
            raise SearchError(f"eta must be at least 2, got {settings.eta}")
    design = initial_configs(merger, settings)
    n_initial = len(design)
    if settings.trials < n_initial:
        raise SearchError(f"trials must be at least {n_initial}: the initial design alone (the uniform merges, "
                          f"each single pool model and each fine-tuned model extrapolated) has {n_initial} "
                          f"configurations; got {settings.trials}")
    if not 0 <= settings.coarse_share < 1:
        raise SearchError(f"coarse_share must lie in [0, 1), got {settings.coarse_share}")
    n_coarse = coarse_trials(settings.trials, settings.coarse_share, n_initial)
    warm = _distinct(warm)
    ahead = COARSE_TOP if n_coarse else n_initial  # the per-group stage's design before them (at most)
    if warm and settings.trials - n_coarse < ahead + len(warm):
        raise SearchError(f"too few trials for the {len(warm)} warm-start configuration(s): the per-group stage "
                          f"gets {settings.trials - n_coarse} of the {settings.trials} trials and needs "
                          f"{ahead + len(warm)} (the {'coarse stage best' if n_coarse else 'initial design'}, "
                          f"{ahead}, then them); raise trials or lower coarse_share")
    if warm:
        space = build_space(merger.groups, merger.aliases, settings.methods, seed=settings.seed,
                            styles=settings.searched_styles, windows=settings.ct_windows)
        for i, c in enumerate(warm, 1):
            if (c.granularity, c.separate) != (settings.granularity, settings.separate):
                raise SearchError(f"warm-start configuration {i} has granularity {c.granularity} / separate "
                                  f"{c.separate}; this search {settings.granularity} / {settings.separate}")
            try:
                c.validate(merger.groups, merger.aliases)
                from_merge_config(space, c, merger.aliases)
            except (MedSAMixError, ValueError, KeyError) as e:
                raise SearchError(f"warm-start configuration {i} is not in this search's space: {e}") from None
    context = dict(context or {})
    if warm:
        context["warm_start"] = [c.fingerprint() for c in warm]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = settings_key(settings, context)
    stamp = out_dir / "search_settings.json"
    overwrite = False
    if stamp.exists():
        old = json.loads(stamp.read_text())
        if old.get("key") != key:
            if not restart:
                raise SearchError(f"{out_dir} holds a search with other settings or data ({old.get('settings')}); "
                                  "use another output directory or restart to discard it")
            overwrite = True
    stamp.write_text(json.dumps({"key": key, "settings": settings.to_dict(), "context": context},
                                indent=2, default=str))

    runner = _Runner(merger, evaluator, settings, out_dir / "smac", overwrite, on_trial,
                     execution(merger, evaluator, settings, client, key))
    seeds = design
    if n_coarse:
        runner.stage("coarse", component_tie(merger.groups), n_coarse, design)
        seeds = _best_distinct([t for t in runner.trials if t.stage == "coarse"], COARSE_TOP) or design
    runner.stage("groups", None, settings.trials - n_coarse, _distinct([*seeds, *warm]))
    trials = runner.trials
    ok = [t for t in trials if t.status == "ok" and t.budget is None]
    if settings.min_budget is not None:
        # Hyperband may drop a configuration of the initial design at a small budget; the selection still sees
        # every single model and uniform merge on all calibration slices (so the search never ends below them),
        # and the best partial-budget configuration if none reached the full budget. Not told to SMAC.
        full = {t.config.fingerprint() for t in ok}
        extra = [c for c in design if c.fingerprint() not in full]
        if not ok and any(t.status == "ok" for t in trials):
            extra.append(max((t for t in trials if t.status == "ok"), key=lambda t: t.mean_dice).config)
        for config in extra:
            dice, status = run_trial(merger, evaluator, settings, config, None)
            if status == "ok":
                trials.append(Trial(len(trials), config, dice, "ok", stage="rescored"))
                ok.append(trials[-1])
    if not ok:
        raise SearchError("every trial crashed")
    pareto = _pareto(ok) if settings.multi else [max(ok, key=lambda t: t.mean_dice)]
    best = argmax = max(pareto, key=lambda t: t.mean_dice)
    passes = evaluator.encoder_passes + runner.executor.remote_passes  # the trials' (the guard's rescoring not counted)
    selection = "the Pareto member with the best mean calibration Dice" if settings.multi else "best calibration Dice"
    if settings.multi and is_robust(settings.tasks):
        reference = _warm_trial(space, merger.aliases, ok, warm) if warm else None
        best, selection = robust_selection(merger, evaluator, settings, ok, reference)
    if not settings.multi and settings.guard_se > 0:
        g = guard(merger, evaluator, settings, best.config)
        selection = g.reason(settings.guard_se)
        if not g.kept:
            fp = g.config.fingerprint()
            best = next((t for t in ok if t.config.fingerprint() == fp), None) or Trial(
                len(trials), g.config, {settings.tasks[0]: g.single_dice}, "ok", stage="guard")
    return SearchResult(trials, pareto, best, passes, runner.aggregation, time.perf_counter() - started, argmax,
                        selection)


class _Runner:
    """Runs the SMAC stages of one search and collects their trials (numbered across stages)."""

    def __init__(self, merger: Merger, evaluator: Evaluator, settings: SearchSettings, smac_dir: Path,
                 overwrite: bool, on_trial: Callable[[Trial, int], None] | None, executor: LocalExecution) -> None:
        self.merger, self.evaluator, self.settings = merger, evaluator, settings
        self.smac_dir, self.overwrite = smac_dir, overwrite
        self.on_trial, self.executor = on_trial, executor
        self.trials: list[Trial] = []
        self.aggregation: str | None = None

    def stage(self, name: str, tie: Tie | None, n_trials: int, initial: Sequence[MergeConfig]) -> None:
        """Run (or resume) one SMAC search of ``n_trials`` over the space of ``tie`` (``None``: per group), its
        initial design ``initial``. SMAC keeps its state in ``smac_dir/<scenario name>``."""
        from smac import HyperparameterOptimizationFacade as HPO
        from smac import MultiFidelityFacade as MF
        from smac import Scenario
        from smac.multi_objective.parego import ParEGO
        from smac.runhistory.dataclasses import TrialValue
        from smac.runhistory.enumerations import StatusType

        merger, evaluator, settings = self.merger, self.evaluator, self.settings
        full = len(evaluator.samples)
        space = build_space(merger.groups, merger.aliases, settings.methods, seed=settings.seed, tie=tie,
                            styles=settings.searched_styles, windows=settings.ct_windows)
        scenario = Scenario(
            space,
            name="medsamix" if name == "groups" else name,
            output_directory=self.smac_dir,
            deterministic=True,
            objectives=[f"cost_{t}" for t in settings.tasks] if settings.multi else "cost",
            n_trials=n_trials,
            seed=settings.seed,
            min_budget=settings.min_budget,
            max_budget=full if settings.min_budget is not None else None,
        )
        facade = MF if settings.min_budget is not None else HPO
        seeds = [from_merge_config(space, c, merger.aliases, tie) for c in initial]
        design = facade.get_initial_design(scenario, n_configs=0, additional_configs=seeds)
        extra: dict[str, Any] = {}
        if settings.multi:
            extra["multi_objective_algorithm"] = ParEGO(scenario, seed=settings.seed)
        intensifier = (MF.get_intensifier(scenario, eta=settings.eta) if settings.min_budget is not None
                       else HPO.get_intensifier(scenario, max_config_calls=1))
        target = _unused_target_mf if settings.min_budget is not None else _unused_target
        if not self.overwrite:
            _check_saved_scenario(scenario)
        smac = facade(scenario, target, initial_design=design, overwrite=self.overwrite, logging_level=False,
                      intensifier=intensifier, **extra)
        mo = smac.meta.get("multi_objective_algorithm")
        self.aggregation = mo.get("name") if mo else None
        first = len(self.trials)
        for t in _history(smac, merger, settings, tie):
            self.trials.append(dataclasses.replace(t, number=len(self.trials), stage=name))

        def record(info: Any, config: MergeConfig, budget: int | None, dice: dict[str, float], status: str) -> None:
            if status == "ok":
                value = TrialValue(cost=_costs(dice, settings), additional_info={"dice": dice})
            else:
                log.warning("trial %d %s", len(self.trials), status)
                value = TrialValue(cost=_costs({t: 0.0 for t in settings.tasks}, settings),
                                   status=StatusType.CRASHED, additional_info={"error": status})
            smac.tell(info, value)
            self.trials.append(Trial(len(self.trials), config, dice, status, budget, name))
            if self.on_trial:
                self.on_trial(self.trials[-1], len(self.trials))

        def next_job() -> tuple[Any, MergeConfig, int | None]:
            with warnings.catch_warnings():
                # SMAC's multi-fidelity bookkeeping averages the costs of budgets that have no trial yet (numpy warns)
                warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
                warnings.filterwarnings("ignore", "invalid value encountered in scalar divide", RuntimeWarning)
                info = smac.ask()
            config = to_merge_config(info.config, merger.groups, merger.aliases, settings.granularity,
                                     settings.separate, tie, settings.preprocessing)
            return info, config, _budget(info.budget, full)

        self.executor.run(next_job, record, n_trials - (len(self.trials) - first))


def _check_saved_scenario(scenario: Any) -> None:
    """Make SMAC resume the state saved where ``scenario`` (a ``smac.Scenario``) keeps it, or refuse clearly.

    SMAC compares the saved ``scenario.json`` with the new scenario, its absolute output directory included, and on
    any difference asks on standard input whether to overwrite (a train task on a server would wait for an answer
    nobody gives, or fail with ``EOFError``). A run folder that was moved or restored elsewhere is the same search
    (:func:`run_search` has checked the settings key): its saved scenario is pointed at the new place (the only
    file of SMAC's state that holds the path). Any other difference is refused here.

    Raises:
        SearchError: the saved scenario differs in more than its place.
    """
    from smac import Scenario

    saved = Path(scenario.output_directory) / "scenario.json"
    if not saved.is_file():
        return
    try:
        old = json.loads(saved.read_text())
    except (OSError, ValueError) as e:
        raise SearchError(f"{saved}: SMAC's saved scenario is unreadable ({e}); restart the search") from None
    new = Scenario.make_serializable(scenario)
    here = str(scenario.output_directory)
    differ = sorted(k for k in set(old) | set(new)
                    if k not in ("_meta", "output_directory") and old.get(k) != new.get(k))
    if differ:
        raise SearchError(f"{saved}: SMAC's saved state is of another search (differs in {', '.join(differ)}); "
                          "restart the search")
    if old.get("output_directory") != here:
        log.info("SMAC state moved from %s to %s: resuming it there", old.get("output_directory"), here)
        old["output_directory"] = here
        atomic_write_text(saved, json.dumps(old, indent=4))


def _warm_trial(space: Any, aliases: Sequence[str], trials: Sequence[Trial],
                warm: Sequence[MergeConfig]) -> Trial | None:
    """The trial (of ``trials``) of a warm-start configuration, the cleanest if several: the same point of the
    per-group ``space`` (SMAC's copy of a configuration may spell weights differently), else ``None``."""
    points = [dict(from_merge_config(space, c, aliases)) for c in warm]
    found = [t for t in trials if any(_same_point(dict(from_merge_config(space, t.config, aliases)), p)
                                      for p in points)]
    return max(found, key=lambda t: clean_and_corrupted(t.dice)[0]) if found else None


def _same_point(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two points of a ConfigSpace space are equal (floats to 1e-9)."""
    return a.keys() == b.keys() and all(
        math.isclose(v, b[k], rel_tol=1e-9, abs_tol=1e-12) if isinstance(v, float) else v == b[k]
        for k, v in a.items())


def _distinct(configs: Sequence[MergeConfig]) -> list[MergeConfig]:
    """``configs`` without repeats (same fingerprint), in order of first appearance."""
    out: dict[str, MergeConfig] = {}
    for c in configs:
        out.setdefault(c.fingerprint(), c)
    return list(out.values())


def _best_distinct(trials: Sequence[Trial], k: int) -> list[MergeConfig]:
    """The configurations of the ``k`` best successful full-budget trials (mean Dice), without repeats."""
    out: dict[str, MergeConfig] = {}
    for t in sorted((t for t in trials if t.status == "ok" and t.budget is None), key=lambda t: -t.mean_dice):
        out.setdefault(t.config.fingerprint(), t.config)
        if len(out) == k:
            break
    return list(out.values())


def _unused_target(config: Configuration, seed: int = 0) -> float:
    # ask/tell only: SMAC checks the signature (budget only for multi-fidelity) but never calls it
    raise RuntimeError("the search drives SMAC through ask/tell")


def _unused_target_mf(config: Configuration, seed: int = 0, budget: float | None = None) -> float:
    raise RuntimeError("the search drives SMAC through ask/tell")


def _budget(budget: float | None, full: int) -> int | None:
    """SMAC's budget -> number of calibration slices (``None`` = all of them)."""
    if budget is None or int(round(budget)) >= full:
        return None
    return max(1, int(round(budget)))


def _costs(dice: dict[str, float], settings: SearchSettings) -> float | list[float]:
    costs = [1.0 - dice[t] for t in settings.tasks]
    return costs if settings.multi else costs[0]


def _history(smac: Any, merger: Merger, settings: SearchSettings, tie: Tie | None = None) -> list[Trial]:
    """Trials already in SMAC's run history (a resumed search), in order."""
    out = []
    rh = smac.runhistory
    for k, v in rh.items():
        cfg = rh.get_config(k.config_id)
        mc = to_merge_config(cfg, merger.groups, merger.aliases, settings.granularity, settings.separate, tie,
                             settings.preprocessing)
        info = v.additional_info or {}
        dice = dict(info.get("dice", {}))
        error = str(info.get("error", "")) or "crashed: (no reason recorded)"
        status = "ok" if dice else (error if error.startswith("crashed") else f"crashed: {error}")
        full = smac.scenario.max_budget
        out.append(Trial(len(out), mc, dice, status, _budget(k.budget, int(full)) if full else None))
    return out


def _pareto(trials: Sequence[Trial]) -> list[Trial]:
    """Trials not dominated in per-task Dice (higher is better)."""
    front = []
    for t in trials:
        dominated = any(
            all(o.dice[k] >= t.dice[k] for k in t.dice) and any(o.dice[k] > t.dice[k] for k in t.dice)
            for o in trials if o is not t
        )
        if not dominated and not any(math.isclose(f.mean_dice, t.mean_dice) and f.dice == t.dice for f in front):
            front.append(t)
    return front
