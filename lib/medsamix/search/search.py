"""MedSAMix search: SMAC over layer-wise merge configurations, scored by calibration Dice.

One code path serves both variants; they differ only in the objectives handed to SMAC:

* MedSAMix-S (one task): ``HyperparameterOptimizationFacade`` (random-forest surrogate, expected improvement)
  minimising ``1 - Dice`` of the task.
* MedSAMix-M (several tasks): the same facade with ``ParEGO`` passed explicitly as the multi-objective algorithm
  (random scalarisations of the per-task costs), giving a Pareto front; the selected configuration is the front
  member with the best mean calibration Dice.

A search has two stages (:attr:`SearchSettings.coarse_share`): a coarse stage over a tied space with one setting
per model component (:func:`~medsamix.search.space.component_tie`), which holds the initial design, then the
per-group stage, seeded with the coarse stage's best configurations. Each stage is its own SMAC run (state under
``out_dir/smac/coarse`` and ``out_dir/smac/medsamix``); trials are numbered across both.

Trials run through SMAC's ask/tell interface, so every finished trial is written to the output directory at once
(SMAC saves its run history on every ``tell``): an interrupted search resumes where it stopped. A trial whose merge
is non-finite or that raises is told to SMAC as crashed (cost 1 per task) and the search goes on. The initial design
contains the uniform merges and each single pool model, so the search never ends worse on calibration than the best
of them.

The preprocessing style is part of every configuration (:attr:`MergeConfig.preprocessing`): searched (the
hyper-parameter ``prep:style``) unless the settings fix it. Then each single model enters the initial design with its
own style (:attr:`SearchSettings.own_styles`), exactly as it is served alone, so the search never ends below any
single model as served alone either.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ConfigSpace import Configuration

from medsamix.merging.config import MergeConfig, uniform_merges
from medsamix.errors import MedSAMixError
from medsamix.search.evaluate import Evaluator
from medsamix.merging.merger import MergeError, Merger
from medsamix.models.preprocess import CT_WINDOWS, DEFAULT_CT_WINDOW, STYLES, Preprocessor
from medsamix.search.space import Tie, build_space, component_tie, from_merge_config, to_merge_config

log = logging.getLogger(__name__)


class SearchError(MedSAMixError):
    """A search cannot start (bad settings, incompatible output directory)."""


COARSE_TOP = 3
"""How many of the coarse stage's best configurations (full budget, distinct) seed the per-group stage."""


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """What defines a search; an output directory only continues a search with equal settings.

    Attributes:
        tasks: Task names; one for MedSAMix-S, several for MedSAMix-M.
        trials: Number of configurations to evaluate in total (initial design included).
        granularity: ViT blocks per encoder group.
        separate: Split encoder groups into attn / mlp / norm.
        methods: Merge methods searched over.
        seed: SMAC's seed.
        preprocessing: Preprocessing style of the merged model ("sam" / "medsam"); ``None``: searched (the
            hyper-parameter ``prep:style`` over :data:`~medsamix.models.preprocess.STYLES`).
        own_styles: ``(alias, style)`` of each pool model: its own preprocessing, as it is served alone. With a
            searched style each single model enters the initial design with it; the no-regression guard scores
            each single model with it (:func:`medsamix.runs.promotion.single_model_scores`). A model not listed: the
            fixed style, else "sam".
        naive: Reproduce the reference loop for comparison: every trial reloads the checkpoints from disk, builds
            a new merger and re-encodes every calibration slice (no embedding reuse).
        min_budget: Multi-fidelity (single task only): the fewest calibration slices a trial is scored on;
            SMAC's Hyperband raises promising configurations up to all slices. ``None`` = every trial on all
            slices.
        eta: Hyperband's factor between budgets (and the share of configurations promoted, 1/eta). With
            ``min_budget`` <= slices / eta**3 Hyperband has four rungs.
        coarse_share: Share of the trials spent first in a coarse stage (0 = none; see :func:`coarse_trials` for
            the exact number): SMAC over a tied space with one method and hyper-parameters per model component
            (image encoder, prompt encoder, mask decoder), where one move changes a whole component (a task vector
            extrapolated everywhere, the encoder of one model with the decoder of another), which the per-group
            space reaches only through many coordinated moves. The initial design runs there; the per-group stage
            that follows starts from the coarse stage's best configurations (:data:`COARSE_TOP`), so SMAC's local
            search refines them group by group.
        ct_windows: CT windows searched (the hyper-parameter ``prep:window``; :func:`ct_windows_for` gives every
            window of :data:`~medsamix.models.preprocess.CT_WINDOWS` for CT calibration data); ``()``: not searched,
            the default window.
        rounds: The objective: 0 = Dice of box prompts; k > 0 = the interactive protocol, the box then k
            correction clicks (:mod:`medsamix.search.interactive`), a slice's Dice averaged over the k + 1 rounds.
    """

    tasks: tuple[str, ...]
    trials: int = 120
    granularity: int = 2
    separate: bool = False
    methods: tuple[str, ...] = ("dare", "linear", "pick", "slerp", "task_arithmetic", "ties")
    seed: int = 0
    preprocessing: str | None = None
    own_styles: tuple[tuple[str, str], ...] = ()
    naive: bool = False
    min_budget: int | None = None
    eta: int = 3
    coarse_share: float = 1 / 3
    rounds: int = 0
    ct_windows: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise SearchError(f"rounds must be >= 0, got {self.rounds}")
        if any(w not in CT_WINDOWS for w in self.ct_windows):
            raise SearchError(f"CT windows must be among {list(CT_WINDOWS)}, got {list(self.ct_windows)}")
        bad = [s for s in (self.preprocessing, *(st for _, st in self.own_styles)) if s is not None and s not in STYLES]
        if bad:
            raise SearchError(f"preprocessing styles must be among {STYLES}, got {bad}")

    @property
    def multi(self) -> bool:
        return len(self.tasks) > 1

    @property
    def searched_styles(self) -> tuple[str, ...]:
        """The styles the search chooses among: every style when ``preprocessing`` is ``None``, else none."""
        return STYLES if self.preprocessing is None else ()

    def own_style(self, alias: str) -> str:
        """The style ``alias`` is served with on its own: ``own_styles``, else the fixed style, else "sam"."""
        return dict(self.own_styles).get(alias) or self.preprocessing or STYLES[0]

    def design_style(self, alias: str) -> str:
        """The style of single model ``alias`` in the initial design (the base model's: of the uniform merges too):
        the fixed style, else its own."""
        return self.preprocessing or self.own_style(alias)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not self.rounds:  # box objective: the settings (and run keys) of searches before the interactive one
            del d["rounds"]
        if not self.ct_windows:  # likewise searches without a CT window
            del d["ct_windows"]
        return d


def initial_configs(merger: Merger, settings: SearchSettings) -> list[MergeConfig]:
    """The uniform merges (with the base model's style) and every single pool model with its style
    (:meth:`SearchSettings.design_style`: its own unless the settings fix one), as merge configurations.

    A single model is a one-hot linear merge (weight 1 on it, 0 on the others; bit-identical to the model). As a
    point of the continuous weight space it has continuous neighbours, so SMAC's local search around a strong single
    model proposes small moves away from it rather than only jumps to other methods (as ``pick`` would). Each
    fine-tuned model also enters as one-hot task arithmetic (scale 1, weight 1 on it, 0 on the others; also
    bit-identical): its neighbours include moves past the model along its task vector (scale above 1), which
    linear weights cannot express, and the addition of a little of another model's task vector."""
    g, sep, groups, aliases = settings.granularity, settings.separate, merger.groups, merger.aliases
    base_style = settings.design_style(aliases[0])
    configs = list(uniform_merges(groups, aliases, g, sep, base_style).values())
    configs.append(MergeConfig.uniform(groups, "dare", {"drop": 0.5, "scale": 0.5, "seed": 0}, g, sep, base_style))
    configs += [MergeConfig.uniform(groups, "linear", {"weights": {b: float(a == b) for b in aliases}}, g, sep,
                                    settings.design_style(a))
                for a in aliases]
    configs += [MergeConfig.uniform(groups, "task_arithmetic",
                                    {"scale": 1.0, "weights": {b: float(a == b) for b in aliases[1:]}}, g, sep,
                                    settings.design_style(a))
                for a in aliases[1:]]
    window = DEFAULT_CT_WINDOW if settings.ct_windows else None  # as SMAC returns them when the window is searched
    return [c.with_ct_window(window) for c in configs if next(iter(c.groups.values())).method in settings.methods]


def ct_windows_for(samples: Sequence[Any]) -> tuple[str, ...]:
    """The CT windows a search over ``samples`` (slice samples) chooses among: every window of
    :data:`~medsamix.models.preprocess.CT_WINDOWS` when some slice carries HU values (CT), else none."""
    return tuple(CT_WINDOWS) if any(getattr(s, "hu", None) is not None for s in samples) else ()


def coarse_trials(trials: int, share: float, n_initial: int) -> int:
    """Trials of the coarse stage: ``round(share * trials)``, at least the initial design (``n_initial``, which
    runs there) and leaving at least :data:`COARSE_TOP` to the per-group stage; 0 (no coarse stage) when ``share``
    is 0 or the trials are too few for both."""
    if share <= 0:
        return 0
    n = min(max(n_initial, round(share * trials)), trials - COARSE_TOP)
    return n if n >= n_initial else 0


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
    encoder_passes: int
    aggregation: str | None = None  # SMAC's multi-objective algorithm (ParEGO for MedSAMix-M)
    seconds: float = 0.0  # wall time of this call (set-up, trials, selection); a resumed search counts its part only


def preprocessor(config: MergeConfig, img_size: int) -> Preprocessor:
    """The input convention of ``config``'s merged model (its :attr:`~MergeConfig.preprocessing` style and CT window).

    Raises:
        ValueError: the configuration has no style.
    """
    if config.preprocessing is None:
        raise ValueError("the merge configuration has no preprocessing style")
    return Preprocessor(config.preprocessing, img_size, config.ct_window or DEFAULT_CT_WINDOW)


def score(merger: Merger, evaluator: Evaluator, config: MergeConfig, tasks: Sequence[str],
          indices: Sequence[int] | None = None, cache: bool = True) -> dict[str, float]:
    """Dice per task of the merged model of ``config`` with the configuration's preprocessing style, on
    ``evaluator``'s slices (``indices``: a subset); with ``cache``, image embeddings are reused for configurations
    with the same image-encoder settings and style (keyed by the encoder fingerprint, which includes the style).

    Raises:
        ValueError: the configuration has no preprocessing style.
    """
    prep = preprocessor(config, merger.pool.arch.img_size)
    merger.apply(config, check_finite=True)
    key = merger.encoder_fingerprint(config) if cache else None
    result = evaluator.evaluate(merger.model, prep, key=key, indices=indices)
    return {t: result.dice2d.get(t, 0.0) for t in tasks}


def _run_trial(merger: Merger, evaluator: Evaluator, settings: SearchSettings, config: MergeConfig,
               budget: int | None) -> tuple[dict[str, float], str]:
    """Score one configuration; a failure (NaN weights, out of memory, ...) becomes a "crashed: ..." status."""
    indices = evaluator.subset(budget, settings.seed) if budget is not None else None
    try:
        if settings.naive:
            return score(_reloaded(merger), evaluator, config, settings.tasks, indices, cache=False), "ok"
        return score(merger, evaluator, config, settings.tasks, indices), "ok"
    except (MergeError, RuntimeError, ValueError) as e:
        return {}, f"crashed: {e}"


@dataclasses.dataclass(frozen=True)
class WorkerSetup:
    """What a Dask worker needs to build its own merger once: pool files (base first), grouping, a cache key."""

    members: tuple[tuple[str, str], ...]
    arch: Any
    granularity: int
    separate: bool
    key: str


_WORKER_STATE: dict[str, tuple[Merger, Evaluator]] = {}


def _dask_trial(setup: WorkerSetup, samples: list[Any], settings: SearchSettings, config: MergeConfig,
                budget: int | None) -> tuple[dict[str, float], str, int]:
    """Run one trial on a Dask worker; the pool is loaded once per worker process and search."""
    from medsamix.models.pool import ModelPool

    if setup.key not in _WORKER_STATE:
        (base, *models) = setup.members
        pool = ModelPool.load(base, list(models), arch=setup.arch)
        _WORKER_STATE.clear()
        _WORKER_STATE[setup.key] = (Merger(pool, setup.granularity, setup.separate), Evaluator(samples, rounds=settings.rounds))
    merger, evaluator = _WORKER_STATE[setup.key]
    before = evaluator.encoder_passes
    dice, status = _run_trial(merger, evaluator, settings, config, budget)
    return dice, status, evaluator.encoder_passes - before


def _reloaded(merger: Merger) -> Merger:
    """A new merger over the same checkpoint files, read again from disk (the naive reference loop)."""
    from medsamix.models.pool import ModelPool

    pool = merger.pool
    fresh = ModelPool.load((pool.base.alias, pool.base.path), [(m.alias, m.path) for m in pool.models],
                           arch=pool.arch, checksums=pool.checksums)
    return Merger(fresh, merger.granularity, merger.separate, merger.device)


def _settings_key(settings: SearchSettings, context: dict[str, Any]) -> str:
    payload = json.dumps({"settings": settings.to_dict(), "context": context}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def run_search(
    merger: Merger,
    evaluator: Evaluator,
    settings: SearchSettings,
    out_dir: str | Path,
    context: dict[str, Any] | None = None,
    restart: bool = False,
    on_trial: Callable[[Trial, int], None] | None = None,
    client: Any | None = None,
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

    Raises:
        SearchError: unknown task, a task without calibration slices, or an output directory holding a search
            with other settings (and not ``restart``).
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
        if settings.multi:
            raise SearchError("multi-fidelity is supported for single-task searches only")
        if not 1 <= settings.min_budget < full:
            raise SearchError(f"min_budget must lie in [1, {full}) calibration slices, got {settings.min_budget}")
        if settings.eta < 2:
            raise SearchError(f"eta must be at least 2, got {settings.eta}")
    design = initial_configs(merger, settings)
    n_initial = len(design)
    if settings.trials < n_initial:
        raise SearchError(f"trials must be at least {n_initial}: the initial design alone (the uniform merges and "
                          f"each single pool model) has {n_initial} configurations; got {settings.trials}")
    if not 0 <= settings.coarse_share < 1:
        raise SearchError(f"coarse_share must lie in [0, 1), got {settings.coarse_share}")
    n_coarse = coarse_trials(settings.trials, settings.coarse_share, n_initial)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = _settings_key(settings, context or {})
    stamp = out_dir / "search_settings.json"
    overwrite = False
    if stamp.exists():
        old = json.loads(stamp.read_text())
        if old.get("key") != key:
            if not restart:
                raise SearchError(f"{out_dir} holds a search with other settings or data ({old.get('settings')}); "
                                  "use another output directory or restart to discard it")
            overwrite = True
    stamp.write_text(json.dumps({"key": key, "settings": settings.to_dict(), "context": context or {}},
                                indent=2, default=str))

    runner = _Runner(merger, evaluator, settings, out_dir / "smac", overwrite, key, on_trial, client)
    seeds = design
    if n_coarse:
        runner.stage("coarse", component_tie(merger.groups), n_coarse, design)
        seeds = _best_distinct([t for t in runner.trials if t.stage == "coarse"], COARSE_TOP) or design
    runner.stage("groups", None, settings.trials - n_coarse, seeds)
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
            dice, status = _run_trial(merger, evaluator, settings, config, None)
            if status == "ok":
                trials.append(Trial(len(trials), config, dice, "ok", stage="rescored"))
                ok.append(trials[-1])
    if not ok:
        raise SearchError("every trial crashed")
    pareto = _pareto(ok) if settings.multi else [max(ok, key=lambda t: t.mean_dice)]
    best = max(pareto, key=lambda t: t.mean_dice)
    return SearchResult(trials, pareto, best, evaluator.encoder_passes + runner.remote_passes, runner.aggregation,
                        time.perf_counter() - started)


class _Runner:
    """Runs the SMAC stages of one search and collects their trials (numbered across stages)."""

    def __init__(self, merger: Merger, evaluator: Evaluator, settings: SearchSettings, smac_dir: Path,
                 overwrite: bool, key: str, on_trial: Callable[[Trial, int], None] | None, client: Any | None) -> None:
        self.merger, self.evaluator, self.settings = merger, evaluator, settings
        self.smac_dir, self.overwrite, self.key = smac_dir, overwrite, key
        self.on_trial, self.client = on_trial, client
        self.trials: list[Trial] = []
        self.remote_passes = 0
        self.aggregation: str | None = None
        self._dask: tuple[WorkerSetup, Any, int] | None = None

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

        def done() -> int:
            return len(self.trials) - first

        if self.client is None:
            while done() < n_trials:
                info, config, budget = next_job()
                record(info, config, budget, *_run_trial(merger, evaluator, settings, config, budget))
            return
        from distributed import wait

        setup, samples, slots = self._dask_context()
        running: dict[Any, tuple[Any, MergeConfig, int | None]] = {}
        asked = done()
        while done() < n_trials:
            while len(running) < slots and asked < n_trials:
                info, config, budget = next_job()
                running[self.client.submit(_dask_trial, setup, samples, settings, config, budget, pure=False)] = (
                    info, config, budget)
                asked += 1
            finished, _ = wait(list(running), return_when="FIRST_COMPLETED")
            for fut in finished:
                info, config, budget = running.pop(fut)
                try:
                    dice, status, passes = fut.result()
                except Exception as e:  # noqa: BLE001 - a worker died or raised: the trial failed, the search goes on
                    dice, status, passes = {}, f"crashed: worker error: {e}", 0
                self.remote_passes += passes
                record(info, config, budget, dice, status)

    def _dask_context(self) -> tuple[WorkerSetup, Any, int]:
        """What every Dask trial needs (the pool files, the calibration slices scattered once), and the number of
        workers."""
        if self._dask is None:
            pool, settings = self.merger.pool, self.settings
            setup = WorkerSetup(tuple((m.alias, str(m.path)) for m in pool.members), pool.arch,
                                settings.granularity, settings.separate, self.key)
            samples = self.client.scatter(self.evaluator.samples, broadcast=True)
            self._dask = (setup, samples, max(1, len(self.client.scheduler_info()["workers"])))
        return self._dask


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
