"""How trials run: the scoring of one configuration, and the strategies that run a stage's trials.

* :func:`score` / :func:`run_trial`: one configuration's calibration Dice on a merger kept in memory (image embeddings
  reused across configurations with equal image-encoder settings); with ``settings.naive`` the reference loop
  instead (:func:`reloaded`: checkpoints read again, a new merger, every slice re-encoded).
* :class:`LocalExecution`: trials one after another in this process.
* :class:`DaskExecution`: trials in parallel on a ``distributed.Client``'s workers (one per worker at a time), each
  worker loading the pool and building its merger and evaluator once (:func:`dask_trial`).

A strategy's :meth:`~LocalExecution.run` takes ``ask`` (the next job: SMAC's trial info, the configuration, the
budget) and ``tell`` (a finished job with its Dice and status); the SMAC driver (:mod:`medsamix.search.search`)
supplies both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from medsamix.merging.config import MergeConfig
from medsamix.merging.merger import MergeError, Merger
from medsamix.models.preprocess import DEFAULT_CT_WINDOW, Preprocessor
from medsamix.search.evaluate import DiceResult, Evaluator
from medsamix.search.settings import SearchSettings

Job = tuple[Any, MergeConfig, "int | None"]
"""SMAC's trial info, the configuration and its budget (calibration slices; ``None`` = all)."""
Ask = Callable[[], Job]
Tell = Callable[[Any, MergeConfig, "int | None", dict[str, float], str], None]


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
    result = evaluate_config(merger, evaluator, config, indices, cache)
    return {t: result.dice2d.get(t, 0.0) for t in tasks}


def evaluate_config(merger: Merger, evaluator: Evaluator, config: MergeConfig, indices: Sequence[int] | None = None,
                    cache: bool = True) -> DiceResult:
    """:meth:`Evaluator.evaluate` of the merged model of ``config`` (its style and CT window) on ``evaluator``'s
    slices (``indices``: a subset): per-task and per-sample Dice. ``cache`` as in :func:`score`.

    Raises:
        ValueError: the configuration has no preprocessing style.
    """
    prep = preprocessor(config, merger.pool.arch.img_size)
    merger.apply(config, check_finite=True)
    key = merger.encoder_fingerprint(config) if cache else None
    return evaluator.evaluate(merger.model, prep, key=key, indices=indices)


def run_trial(merger: Merger, evaluator: Evaluator, settings: SearchSettings, config: MergeConfig,
               budget: int | None) -> tuple[dict[str, float], str]:
    """Score one configuration; a failure (NaN weights, out of memory, ...) becomes a "crashed: ..." status."""
    indices = evaluator.subset(budget, settings.seed) if budget is not None else None
    try:
        if settings.naive:
            return score(reloaded(merger), evaluator, config, settings.tasks, indices, cache=False), "ok"
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


def dask_trial(setup: WorkerSetup, samples: list[Any], settings: SearchSettings, config: MergeConfig,
                budget: int | None) -> tuple[dict[str, float], str, int]:
    """Run one trial on a Dask worker; the pool is loaded once per worker process and search."""
    from medsamix.models.pool import ModelPool

    if setup.key not in _WORKER_STATE:
        (base, *models) = setup.members
        pool = ModelPool.load(base, list(models), arch=setup.arch)
        _WORKER_STATE.clear()
        _WORKER_STATE[setup.key] = (Merger(pool, setup.granularity, setup.separate),
                                    Evaluator(samples, rounds=settings.rounds))
    merger, evaluator = _WORKER_STATE[setup.key]
    before = evaluator.encoder_passes
    dice, status = run_trial(merger, evaluator, settings, config, budget)
    return dice, status, evaluator.encoder_passes - before


def reloaded(merger: Merger) -> Merger:
    """A new merger over the same checkpoint files, read again from disk (the naive reference loop)."""
    from medsamix.models.pool import ModelPool

    pool = merger.pool
    fresh = ModelPool.load((pool.base.alias, pool.base.path), [(m.alias, m.path) for m in pool.models],
                           arch=pool.arch, checksums=pool.checksums, styles=pool.styles)
    return Merger(fresh, merger.granularity, merger.separate, merger.device, merger.memo.max_bytes)


class LocalExecution:
    """Runs trials here, one after another."""

    def __init__(self, merger: Merger, evaluator: Evaluator, settings: SearchSettings) -> None:
        self.merger, self.evaluator, self.settings = merger, evaluator, settings
        self.remote_passes = 0  # encoder passes made elsewhere (none here)

    def run(self, ask: Ask, tell: Tell, n: int) -> None:
        """Ask, score and tell ``n`` trials."""
        for _ in range(n):
            info, config, budget = ask()
            tell(info, config, budget, *run_trial(self.merger, self.evaluator, self.settings, config, budget))


class DaskExecution(LocalExecution):
    """Runs trials on a ``distributed.Client``'s workers, as many at a time as there are workers; a worker that
    dies or raises makes its trial a crashed one and the search goes on."""

    def __init__(self, merger: Merger, evaluator: Evaluator, settings: SearchSettings, client: Any, key: str) -> None:
        super().__init__(merger, evaluator, settings)
        self.client, self.key = client, key
        self._context: tuple[WorkerSetup, Any, int] | None = None

    def _dask_context(self) -> tuple[WorkerSetup, Any, int]:
        """What every Dask trial needs (the pool files, the calibration slices scattered once), and the number of
        workers."""
        if self._context is None:
            pool, settings = self.merger.pool, self.settings
            setup = WorkerSetup(tuple((m.alias, str(m.path)) for m in pool.members), pool.arch,
                                settings.granularity, settings.separate, self.key)
            samples = self.client.scatter(self.evaluator.samples, broadcast=True)
            self._context = (setup, samples, max(1, len(self.client.scheduler_info()["workers"])))
        return self._context

    def run(self, ask: Ask, tell: Tell, n: int) -> None:
        from distributed import wait

        setup, samples, slots = self._dask_context()
        running: dict[Any, Job] = {}
        asked = told = 0
        while told < n:
            while len(running) < slots and asked < n:
                info, config, budget = ask()
                running[self.client.submit(dask_trial, setup, samples, self.settings, config, budget, pure=False)] = (
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
                tell(info, config, budget, dice, status)
                told += 1


def execution(merger: Merger, evaluator: Evaluator, settings: SearchSettings, client: Any | None = None,
              key: str = "") -> LocalExecution:
    """The strategy for a search: on ``client``'s Dask workers when given, else here (``key`` identifies the
    search to the workers' pool caches)."""
    if client is None:
        return LocalExecution(merger, evaluator, settings)
    return DaskExecution(merger, evaluator, settings, client, key)
