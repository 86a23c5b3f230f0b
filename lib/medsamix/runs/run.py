"""One merge run end to end: labelled studies -> task set -> search -> merged model + no-regression decision.

This is the part of the MONAI Label "merge" train task (and of ``scripts/merge_search.py``) that does not depend on
MONAI Label:

* :func:`task_set_from_pairs` / :func:`datastore_task_set` build the calibration / test slices from (image, label)
  pairs or a datastore folder (calibration = 20% of the patients, test = the rest; with one labelled study, slabs of
  its slices: :func:`task_set_from_studies`);
* :func:`select_tasks` picks the requested tasks' slices and checks that there are enough of them;
* :func:`run_merge` runs (or resumes) the search into an output folder, writes ``recipe.yaml``, ``merged.pth`` and
  ``history.csv`` there, scores the selected configuration on the test split, and decides :class:`Promotion`; it
  holds the folder's :class:`~medsamix.runs.lock.RunLock` throughout, so a second process on the folder is refused;
* :func:`run_name` gives every combination of settings and data a stable output folder name, so a stopped run
  resumes when it is asked for again with the same settings;
* :class:`MergeOptions` parses a user's options (a MONAI Label train request) and :func:`plan_run` turns them into
  search settings, slices and the run folder, checking everything that can be checked before the search starts;
* :class:`ProgressFile` is a small JSON file replaced atomically, for a process that watches the run from outside
  (the MONAI Label server process reads it while the search runs in a subprocess); :class:`RunMonitor` fills it
  after every trial and :func:`effective_status` reports a run whose process is gone as stopped;
* :func:`checkpoint_search_state` / :func:`restore_search_state` keep a complete copy of SMAC's state and of the
  trials log after every trial, so a run killed anywhere (while SMAC rewrites its files, between two records)
  resumes from the last finished trial with every finished trial kept and logged exactly once.

The no-regression guard: the merged model is promoted only when its mean calibration Dice is not below that of the
best single pool model (plus ``min_gain``), each single model scored on the same calibration slices *with its own
preprocessing* (as it would be served on its own). The preprocessing style is part of the searched configuration
(unless the options fix it) and the search's initial design contains every single model with its own style, so the
guard can only trip on a required gain (``min_gain``) - or, with a fixed style, on a single model whose own
preprocessing suits the data better; then the run says so and nothing is published.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from medsamix.models.checkpoint import save_sam_checkpoint
from medsamix.merging.config import MergeConfig
from medsamix.errors import MedSAMixError
from medsamix.search.evaluate import Evaluator
from medsamix.merging.merger import Merger
from medsamix.models.pool import ModelPool, PoolManifest
from medsamix.merging.recipe import PREPROCESSING_STYLES, ModelRef, Recipe
from medsamix.search.corruptions import robust_tasks, with_corrupted
from medsamix.search.report import uniform_scores, write_report
from medsamix.runs.lock import RunLock, pid_alive, process_started  # noqa: F401 - process_started: part of this API
from medsamix.search.search import SearchResult, SearchSettings, Trial, _settings_key, run_search, score
from medsamix.demo.shared_data import TaskSet, normalized, slab_indices, slab_task_set
from medsamix.data.slices import SliceSample, extract_slices
from medsamix.data.studies import Skipped, Study, find_studies, load_study_pairs
from medsamix.data.tasks import Task, split_patients, tasks_from_labels

log = logging.getLogger(__name__)

MIN_CALIBRATION_SLICES = 3
CALIBRATION_FRACTION = 0.2
SLAB_SIZE = 5  # one labelled study: calibration slabs of about this many slices, spread over its labelled slices
SLAB_GAP = 1  # ... each with this many guard slices left out of the test set on either side
SLAB_TRIES = 64  # ... at the first of this many seeded slab positions that gives every task enough calibration slices
ONE_STUDY_SPLIT = "slab split of the one labelled study"


class MergeRunError(MedSAMixError):
    """A merge run cannot start: no or too few labelled studies, unknown task, too few slices, bad option."""


# --------------------------------------------------------------------------------------------------- task sets


def task_set_from_studies(name: str, studies: Sequence[Study], names: Mapping[int, str] | None = None,
                          seed: int = 0) -> TaskSet:
    """Calibration and test slices of labelled studies, split by patient (study); a single study is split by slabs
    of its slices (:func:`one_study_task_set`).

    Args:
        name: Name of the data source (shown in messages).
        studies: The labelled studies (at least 1).
        names: Label value -> task name; values without a name become ``label_<value>``.
        seed: Seed of the patient (or slab) split.

    Raises:
        MergeRunError: no study, or no label value > 0 in any of them.
    """
    if not studies:
        raise MergeRunError(f"{name}: no labelled study (at least 1 is needed)")
    tasks = tasks_from_labels(studies, names)
    if not tasks:
        raise MergeRunError(f"{name}: the labels of the {len(studies)} labelled studies are all empty")
    if len(studies) == 1:
        return one_study_task_set(name, studies[0], tasks, seed)
    cal_ids, _ = split_patients([s.study_id for s in studies], CALIBRATION_FRACTION, seed)
    cal: list[SliceSample] = []
    test: list[SliceSample] = []
    for study in map(normalized, studies):
        for t in tasks:
            (cal if study.study_id in cal_ids else test).extend(extract_slices(study, t))
    return TaskSet(name, tasks, cal, test, f"patients: {len(cal_ids)} calibration / "
                   f"{len(studies) - len(cal_ids)} test")


def one_study_task_set(name: str, study: Study, tasks: Sequence[Task], seed: int = 0) -> TaskSet:
    """Calibration and test slices of a single labelled study: slabs of the slices that hold labels (from the first
    to the last such slice along the last axis), as for the single volumes of the shared data
    (:func:`medsamix.demo.shared_data.slab_task_set`): calibration = :data:`CALIBRATION_FRACTION` of them, at least
    :data:`MIN_CALIBRATION_SLICES` where the volume allows, in slabs of about :data:`SLAB_SIZE` slices spread over
    them, each with :data:`SLAB_GAP` guard slices left out of the test set. One split serves every task (no slice is
    calibration for one task and test for another); among :data:`SLAB_TRIES` seeded slab positions (``seed`` first)
    the first that gives every task :data:`MIN_CALIBRATION_SLICES` calibration slices and a test slice is taken
    (else the one coming closest), so that a small structure is not left out of calibration. The split string
    starts with :data:`ONE_STUDY_SPLIT`.
    """
    study = normalized(study)
    present = [np.flatnonzero((study.label == t.value).any(axis=(0, 1))) for t in tasks]
    labelled = np.flatnonzero((study.label > 0).any(axis=(0, 1)))
    first, last = int(labelled[0]), int(labelled[-1])
    n = last - first + 1
    fraction = min(max(CALIBRATION_FRACTION, MIN_CALIBRATION_SLICES / n), 0.5)

    def coverage(s: int) -> tuple[int, int]:  # (fewest calibration slices of a task (capped), tasks with test slices)
        cal, test = slab_indices(n, fraction, s, SLAB_SIZE, SLAB_GAP)
        cal_set, test_set = {i + first for i in cal}, {i + first for i in test}
        return (min(min(sum(int(i) in cal_set for i in p), MIN_CALIBRATION_SLICES) for p in present),
                sum(any(int(i) in test_set for i in p) for p in present))

    goal = (MIN_CALIBRATION_SLICES, len(tasks))
    tried: list[tuple[tuple[int, int], int, int]] = []
    for j in range(SLAB_TRIES):
        c = coverage(seed + 7919 * j)
        if c >= goal:
            chosen = seed + 7919 * j
            break
        tried.append((c, -j, seed + 7919 * j))
    else:
        chosen = max(tried)[2]  # the closest to the goal, the earliest of those
    ts = slab_task_set(name, study, tasks, chosen, fraction, slab_size=SLAB_SIZE, gap=SLAB_GAP, extent=(first, last))
    return dataclasses.replace(ts, split=f"{ONE_STUDY_SPLIT} ({study.study_id}): {ts.split}")


def task_set_from_pairs(name: str, pairs: Iterable[tuple[str | Path, str | Path | None]],
                        names: Mapping[int, str] | None = None, seed: int = 0,
                        sub_blocks: bool = False) -> tuple[TaskSet, list[Skipped]]:
    """:func:`task_set_from_studies` of (image, label) path pairs; unreadable or unlabelled ones are skipped.
    ``sub_blocks``: accept labels covering only a block of the image grid (DICOM SEG; ``studies.load_study``).

    Returns:
        ``(task_set, skipped)``: skipped studies with the reason (also logged).
    """
    studies, skipped = load_study_pairs([(Path(i), Path(lab) if lab else None) for i, lab in pairs],
                                        sub_blocks=sub_blocks)
    for s in skipped:
        log.warning("skipped %s: %s", s.path, s.reason)
    if not studies:
        why = "".join(f"; {s.path.name}: {s.reason}" for s in skipped[:5])
        raise MergeRunError(f"{name}: at least 1 labelled study is needed, found 0{why}")
    return task_set_from_studies(name, studies, names, seed), skipped


def datastore_task_set(folder: str | Path, names: Mapping[int, str] | None = None, seed: int = 0) -> TaskSet:
    """Task set of a MONAI Label datastore folder (images at the top, labels in ``labels/final``)."""
    folder = Path(folder)
    return task_set_from_pairs(folder.name, find_studies(folder), names, seed)[0]


def select_tasks(ts: TaskSet, tasks: Sequence[str]) -> tuple[list[SliceSample], list[SliceSample]]:
    """The calibration and test slices of ``tasks``.

    Raises:
        MergeRunError: an unknown task name, no task, or a task with fewer than 3 calibration slices.
    """
    if not tasks:
        raise MergeRunError("no task given")
    known = [t.name for t in ts.tasks]
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise MergeRunError(f"unknown task(s) {unknown}; this data has {sorted(known)}")
    cal = [s for s in ts.calibration if s.task.name in tasks]
    test = [s for s in ts.test if s.task.name in tasks]
    for t in tasks:
        n = sum(s.task.name == t for s in cal)
        if n < MIN_CALIBRATION_SLICES:
            raise MergeRunError(f"task {t!r} has only {n} calibration slices (at least {MIN_CALIBRATION_SLICES} "
                                f"are needed; {ts.split})")
    return cal, test


def parse_tasks(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """Task names from an option: a comma-separated string (names may contain spaces: "left kidney, liver") or a
    list; surrounding spaces and repeats are dropped; empty -> ``()`` (= every task)."""
    if value is None:
        return ()
    items = re.split(r"[,\n]", value) if isinstance(value, str) else [str(v) for v in value]
    out: list[str] = []
    for item in (i.strip() for i in items):
        if item and item not in out:
            out.append(item)
    return tuple(out)


def label_names(value: str | Mapping[str, Any] | Sequence[str] | None) -> dict[int, str]:
    """Label value -> task name from a MONAI Label style ``labels`` setting.

    Accepts ``{"liver": 1, ...}`` (MONAI Label's convention), ``{"1": "liver"}``, a list of names (values 1, 2, ...)
    or the JSON text of any of these; ``None`` / empty gives ``{}``.

    Raises:
        MergeRunError: anything else.
    """
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = [v for v in parse_tasks(value)]
    try:
        if isinstance(value, Mapping):
            out = {}
            for k, v in value.items():
                if isinstance(v, (int, float)) or (isinstance(v, str) and v.strip().isdigit()):
                    out[int(v)] = str(k)  # {"liver": 1}
                else:
                    out[int(k)] = str(v)  # {"1": "liver"}
            return {k: v for k, v in out.items() if k > 0}
        if isinstance(value, Sequence):
            return {i + 1: str(v) for i, v in enumerate(value)}
    except (TypeError, ValueError):
        pass
    raise MergeRunError(f"labels: expected {{name: value}}, {{value: name}} or a list of names, got {value!r}")


# --------------------------------------------------------------------------------------------------- progress


class ProgressFile:
    """A small JSON status file replaced atomically (readers see the old or the new content, never a mix)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def write(self, data: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex}")
        tmp.write_text(json.dumps(dict(data), indent=2, default=str))
        os.replace(tmp, self.path)

    def update(self, **fields: Any) -> dict[str, Any]:
        """Read, update with ``fields`` and write back; returns the new content."""
        data = self.read()
        data.update(fields)
        self.write(data)
        return data

    def read(self) -> dict[str, Any]:
        """The content, or ``{}`` when the file does not exist or is unreadable."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------------------------------- runs


def search_context(pool: ModelPool, calibration: Sequence[SliceSample], split: str) -> dict[str, Any]:
    """Facts besides the settings that must match for a search to resume: the pool, the calibration studies."""
    return {"pool": pool.checksums, "calibration": sorted({s.study_id for s in calibration}), "set": split}


def run_name(settings: SearchSettings, context: Mapping[str, Any]) -> str:
    """A stable folder name for a search: readable settings and a hash of everything that defines the search.

    Equal settings on equal data (pool checksums, calibration studies) give the same name, so asking again
    resumes; other settings or new labelled studies give another folder instead of an incompatible-history error.
    A fixed preprocessing style shows as ``prep_<style>`` (a searched one adds nothing); the hash covers it and
    the pool models' own styles (the initial design), so a changed search space is another run.
    """
    tasks = "+".join(re.sub(r"[^A-Za-z0-9_.-]", "_", t) for t in settings.tasks)[:60]
    parts = [tasks, f"t{settings.trials}", f"g{settings.granularity}{'s' if settings.separate else ''}",
             f"seed{settings.seed}"]
    if settings.preprocessing is not None:
        parts.append(f"prep_{settings.preprocessing}")
    if settings.min_budget is not None:
        parts.append(f"mb{settings.min_budget}")
    return "-".join(parts) + "-" + _settings_key(settings, dict(context))[:10]


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


def manifest_styles(manifest: PoolManifest) -> dict[str, str]:
    """Alias -> preprocessing style of each model of a pool manifest."""
    return {a: str(p.get("style", "sam")) for a, p in manifest.preprocessing.items()}


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
                          min_gain, device, on_ready)


def _run_merge(pool: ModelPool, calibration: Sequence[SliceSample], test: Sequence[SliceSample],
               settings: SearchSettings, out_dir: Path, split: str, restart: bool,
               on_trial: Callable[[Trial, int], None] | None, client: Any | None, report: bool, min_gain: float,
               device: str, on_ready: Callable[["MergeOutcome"], None] | None) -> MergeOutcome:
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

    result = run_search(merger, evaluator, settings, out_dir, context, restart, after_trial, client)
    best = result.best.config
    test_ev = Evaluator(list(test), device=device, rounds=settings.rounds) if test else None
    test_dice = score(merger, test_ev, best, settings.tasks) if test_ev else {}
    singles = single_model_scores(merger, evaluator, settings)
    promotion = decide_promotion(result.best.dice, singles, min_gain)
    recipe = Recipe(
        arch=pool.arch, base=ModelRef(pool.base.alias, pool.base.sha256),
        models=[ModelRef(m.alias, m.sha256) for m in pool.models], merge=best.with_preprocessing(None),
        preprocessing={"style": best.preprocessing},
        scores={"calibration_dice": dict(result.best.dice), "test_dice": test_dice, "trials": len(result.trials),
                "split": split, "single_models_calibration_dice": promotion.singles,
                "promotion": promotion.reason},
    )
    recipe.save(out_dir / "recipe.yaml")
    state = {k: v.detach().to("cpu", copy=True) for k, v in merger.apply(best).state_dict().items()}
    save_sam_checkpoint(state, out_dir / "merged.pth")
    _atomic(out_dir / "history.csv", lambda p: write_history(p, result.trials, settings.tasks))
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


SMAC_DIR = "smac"
TRIALS_LOG = "trials.jsonl"
CHECKPOINT_PREFIX = "smac.checkpoint-"


def _checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for p in out_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        tail = p.name[len(CHECKPOINT_PREFIX):]
        if p.is_dir() and tail.isdigit():
            found.append((int(tail), p))
    return sorted(found)


def checkpoint_search_state(out_dir: str | Path, done: int) -> Path:
    """Copy SMAC's state (``out_dir/smac``) and the trials log (``out_dir/trials.jsonl``, see :class:`RunMonitor`)
    to ``out_dir/smac.checkpoint-<done>`` atomically and drop older copies.

    SMAC rewrites its JSON files in place after every trial; a process killed in the middle of that (a stop
    request) could leave them cut off. Called after each trial, this keeps a complete copy of the state as it was
    after the last finished trial, which :func:`restore_search_state` puts back before a resumed run. The trials log
    is part of that state: restored with it, every trial SMAC keeps is logged once and a trial SMAC lost (and runs
    again) is not logged twice. Without a ``smac`` folder (``done`` = 0, a new run) the copy is an empty state.
    """
    out_dir = Path(out_dir)
    src = out_dir / SMAC_DIR
    tmp = out_dir / f".{CHECKPOINT_PREFIX}tmp-{uuid.uuid4().hex}"
    try:
        if src.is_dir():
            shutil.copytree(src, tmp)
        else:
            tmp.mkdir()
        trials_log = out_dir / TRIALS_LOG
        if trials_log.is_file():
            shutil.copyfile(trials_log, tmp / TRIALS_LOG)
        else:
            (tmp / TRIALS_LOG).touch()  # empty: no log at this point
        dst = out_dir / f"{CHECKPOINT_PREFIX}{done}"
        if dst.exists():
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for n, p in _checkpoints(out_dir):
        if n != done:  # older ones, or those of a search this one replaced (restart)
            shutil.rmtree(p, ignore_errors=True)
    for pattern in (f".{CHECKPOINT_PREFIX}tmp-*", f".{SMAC_DIR}.restore-*"):  # left by a killed run
        for p in out_dir.glob(pattern):
            shutil.rmtree(p, ignore_errors=True)
    return dst


def restore_search_state(out_dir: str | Path) -> int | None:
    """Put the newest checkpoint of SMAC's state and of the trials log back in place (see
    :func:`checkpoint_search_state`; a checkpoint written before the log was part of it leaves the log alone).

    Returns:
        The number of trials of the restored state, or ``None`` when there is no checkpoint (a new run).
    """
    out_dir = Path(out_dir)
    found = _checkpoints(out_dir)
    if not found:
        return None
    done, ckpt = found[-1]
    live = out_dir / SMAC_DIR
    tmp = out_dir / f".{SMAC_DIR}.restore-{uuid.uuid4().hex}"
    shutil.copytree(ckpt, tmp)
    saved_log = tmp / TRIALS_LOG
    if saved_log.is_file():
        if saved_log.stat().st_size:
            os.replace(saved_log, out_dir / TRIALS_LOG)
        else:
            saved_log.unlink()
            (out_dir / TRIALS_LOG).unlink(missing_ok=True)
    if live.exists():
        shutil.rmtree(live)
    os.rename(tmp, live)
    log.info("%s: search state restored from the checkpoint after %d trials", out_dir, done)
    return done


def write_history(path: str | Path, trials: Sequence[Trial], tasks: Sequence[str]) -> None:
    """One CSV row per trial: number, status, mean Dice, per-task Dice, budget (calibration slices; '' = all),
    stage (``coarse``: one setting per model component; ``groups``: per layer group; ``rescored``: an initial-design
    configuration dropped early by Hyperband, scored on all calibration slices after the search), preprocessing
    style."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "status", "mean_dice", *tasks, "budget", "stage", "preprocessing"])
        for t in trials:
            w.writerow([t.number, t.status, f"{t.mean_dice:.4f}", *(f"{t.dice.get(k, 0):.4f}" for k in tasks),
                        "" if t.budget is None else t.budget, t.stage, t.config.preprocessing or ""])


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------------------------------- options


MAX_OPTION_INT = 2**31 - 1  # integer options (trials, seed, ...) beyond this are refused


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise MergeRunError(f"{name}: expected an integer, got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError, OverflowError):
        raise MergeRunError(f"{name}: expected an integer, got {str(value)[:40]!r}") from None
    if not f.is_integer():
        raise MergeRunError(f"{name}: expected an integer, got {str(value)[:40]!r}")
    if abs(f) > MAX_OPTION_INT:
        raise MergeRunError(f"{name}: {str(value)[:40]} is out of range (at most {MAX_OPTION_INT})")
    return int(f)


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "on", "false", "no", "0", "off", ""):
        return value.strip().lower() in ("true", "yes", "1", "on")
    raise MergeRunError(f"{name}: expected true or false, got {value!r}")


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
        if granularity not in (1, 2, 3, 4):
            raise MergeRunError(f"granularity: must be 1, 2, 3 or 4 ViT blocks per group, got {granularity}")
        mb_raw = merged.get("min_budget")
        min_budget = None if mb_raw in (None, "", "none", "None") else _as_int("min_budget", mb_raw)
        if min_budget is not None and min_budget < 0:
            raise MergeRunError(f"min_budget: must be >= 0 (0 = all calibration slices), got {min_budget}")
        seed = _as_int("seed", merged.get("seed", cls.seed))
        if seed < 0:
            raise MergeRunError(f"seed: must be >= 0, got {seed}")
        style = merged.get("preprocessing") or None
        if style is not None and style not in PREPROCESSING_STYLES:
            raise MergeRunError(f"preprocessing: must be one of {list(PREPROCESSING_STYLES)} (or empty to search "
                                f"it), got {style!r}")
        try:
            min_gain = float(merged.get("min_gain") or 0.0)
        except (TypeError, ValueError):
            raise MergeRunError(f"min_gain: expected a number, got {merged.get('min_gain')!r}") from None
        if not -1.0 <= min_gain <= 1.0:
            raise MergeRunError(f"min_gain: must lie in [-1, 1] (a Dice difference), got {min_gain}")
        return cls(tasks, trials, granularity, _as_bool("separate", merged.get("separate", False)),
                   min_budget or None, seed, _as_bool("restart", merged.get("restart", False)), style, min_gain,
                   _as_bool("robust", merged.get("robust", False)))

    def settings(self, tasks: Sequence[str], styles: Mapping[str, str]) -> SearchSettings:
        """The search settings for ``tasks``; ``styles``: alias -> own preprocessing style of each pool model
        (:func:`manifest_styles`). The merged model's style is searched unless the options fix one."""
        return SearchSettings(tasks=tuple(tasks), trials=self.trials, granularity=self.granularity,
                              separate=self.separate, seed=self.seed, preprocessing=self.preprocessing,
                              own_styles=tuple((a, str(s)) for a, s in styles.items()), min_budget=self.min_budget)


# --------------------------------------------------------------------------------------------------- planning


@dataclasses.dataclass
class RunPlan:
    """A merge run ready to start: its settings, slices and stable output folder."""

    name: str
    out_dir: Path
    settings: SearchSettings
    calibration: list[SliceSample]
    test: list[SliceSample]
    split: str
    available_tasks: list[str]

    @property
    def variant(self) -> str:
        return "MedSAMix-M" if self.settings.multi else "MedSAMix-S"

    @property
    def one_study(self) -> bool:
        """Whether calibration and test are slabs of a single labelled study (:func:`one_study_task_set`)."""
        return self.split.startswith(ONE_STUDY_SPLIT)


def plan_run(task_set: TaskSet, options: MergeOptions, pool: ModelPool, runs_dir: str | Path,
             styles: Mapping[str, str]) -> RunPlan:
    """Choose tasks, slices, settings and the run folder ``runs_dir/<run_name>``; ``styles``: alias -> own
    preprocessing style of each pool model (see :meth:`MergeOptions.settings`).

    Raises:
        MergeRunError: unknown task, too few calibration slices, multi-fidelity with several tasks or a
            ``min_budget`` not below the number of calibration slices.
    """
    available = [t.name for t in task_set.tasks]
    tasks = options.tasks or tuple(available)
    cal, test = select_tasks(task_set, tasks)
    if options.min_budget is not None:
        if len(tasks) > 1:
            raise MergeRunError(f"min_budget (multi-fidelity) works with one task only; {len(tasks)} tasks were "
                                f"asked for ({', '.join(tasks)})")
        if options.robust:
            raise MergeRunError("min_budget (multi-fidelity) works with one objective only; robust adds the "
                                "corrupted Dice as a second one")
        if not 1 <= options.min_budget < len(cal):
            raise MergeRunError(f"min_budget must lie in [1, {len(cal)}): task {tasks[0]!r} has {len(cal)} "
                                "calibration slices")
    if options.robust:
        cal, test, tasks = with_corrupted(cal, options.seed), with_corrupted(test, options.seed), robust_tasks(tasks)
    settings = options.settings(tasks, {a: styles[a] for a in pool.aliases if a in styles})
    name = run_name(settings, search_context(pool, cal, task_set.split))
    return RunPlan(name, Path(runs_dir) / name, settings, cal, test, task_set.split, available)


# --------------------------------------------------------------------------------------------------- monitoring


ACTIVE = ("preparing", "running", "finishing")


class RunMonitor:
    """Reports a run's progress in a :class:`ProgressFile` in the keys MONAI Label clients read (``epoch`` = trials
    done, ``total_epochs`` = trials, ``best_metric`` = best calibration Dice so far) and appends every trial to
    ``<out_dir>/trials.jsonl`` (so that a resumed run reports the trials it already has at once). Under
    :func:`run_merge` the log is part of the run's checkpoints: a resumed run puts it back as it was after the last
    checkpointed trial (a trial logged after that is run and logged again, once).

    ``best_metric`` counts trials scored on all calibration slices only (multi-fidelity trials on a subset are not
    comparable), unless no trial reached the full budget yet.
    """

    def __init__(self, progress: ProgressFile, out_dir: str | Path, total: int) -> None:
        self.progress = progress
        self.log_path = Path(out_dir) / TRIALS_LOG
        self.total = total
        self.done = 0
        self.best_full: float | None = None
        self.best_any: float | None = None
        for rec in self._records():
            self._count(float(rec.get("mean_dice", 0.0)), rec.get("status") == "ok", rec.get("budget"))
            self.done = max(self.done, int(rec.get("trial", -1)) + 1)

    def _records(self) -> list[dict[str, Any]]:
        try:
            lines = self.log_path.read_text().splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut by a kill: the trial itself is safe in SMAC's history
                continue
        return out

    def _count(self, dice: float, ok: bool, budget: int | None) -> None:
        if not ok:
            return
        self.best_any = dice if self.best_any is None else max(self.best_any, dice)
        if budget is None:
            self.best_full = dice if self.best_full is None else max(self.best_full, dice)

    @property
    def best(self) -> float | None:
        return self.best_full if self.best_full is not None else self.best_any

    def fields(self) -> dict[str, Any]:
        """``epoch``, ``total_epochs`` and ``best_metric`` (0.0 before the first successful trial)."""
        return {"epoch": self.done, "total_epochs": self.total, "best_metric": self.best or 0.0}

    def on_trial(self, trial: Trial, done: int) -> None:
        """``run_search``'s callback: log the trial and update the progress file."""
        self.done = done
        ok = trial.status == "ok"
        self._count(trial.mean_dice, ok, trial.budget)
        rec = {"trial": trial.number, "status": trial.status, "mean_dice": round(trial.mean_dice, 6),
               "dice": trial.dice, "budget": trial.budget}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        last = f"Dice {trial.mean_dice:.4f}" if ok else trial.status
        if trial.budget is not None:
            last += f" on {trial.budget} calibration slices"
        message = f"trial {done}/{self.total}: {last}; best {self.best or 0.0:.4f}"
        log.info(message)
        self.progress.update(**self.fields(), last_trial=rec, message=message)


def effective_status(data: Mapping[str, Any]) -> dict[str, Any]:
    """The progress file's content as it really stands: a run still marked active whose process is gone (killed
    by a stop request, or crashed hard) is reported as ``stopped``, with what it had done. The file's ``pid`` and
    optional ``pid_started`` (:func:`process_started`) identify the run's process."""
    out = dict(data)
    if out.get("status") in ACTIVE and not pid_alive(out.get("pid"), out.get("pid_started")):
        out["status"] = "stopped"
        out["message"] = (f"stopped after {out.get('epoch', 0)}/{out.get('total_epochs', '?')} trials (the run's "
                          "process ended); ask again with the same settings to resume")
    return out
