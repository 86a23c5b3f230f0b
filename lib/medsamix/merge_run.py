"""One merge run end to end: labelled studies -> task set -> search -> merged model + no-regression decision.

This is the part of the MONAI Label "merge" train task (and of ``scripts/merge_search.py``) that does not depend on
MONAI Label:

* :func:`task_set_from_pairs` / :func:`datastore_task_set` build the calibration / test slices from (image, label)
  pairs or a datastore folder (calibration = 20% of the patients, test = the rest);
* :func:`select_tasks` picks the requested tasks' slices and checks that there are enough of them;
* :func:`run_merge` runs (or resumes) the search into an output folder, writes ``recipe.yaml``, ``merged.pth`` and
  ``history.csv`` there, scores the selected configuration on the test split, and decides :class:`Promotion`;
* :func:`run_name` gives every combination of settings and data a stable output folder name, so a stopped run
  resumes when it is asked for again with the same settings;
* :class:`ProgressFile` is a small JSON file replaced atomically, for a process that watches the run from outside
  (the MONAI Label server process reads it while the search runs in a subprocess).

The no-regression guard: the merged model is promoted only when its mean calibration Dice is not below that of the
best single pool model, each single model scored on the same calibration slices *with its own preprocessing* (as it
would be served on its own). The search's initial design contains every single model (with the merged model's
preprocessing), so on calibration the merged model can only lose to a single model whose own preprocessing suits the
data better; then the run says so and nothing is published.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from .checkpoint import save_sam_checkpoint
from .config import MergeConfig
from .errors import MedSAMixError
from .evaluate import Evaluator
from .merger import Merger
from .pool import ModelPool, PoolManifest
from .preprocess import Preprocessor
from .recipe import ModelRef, Recipe
from .search import SearchResult, SearchSettings, Trial, _settings_key, run_search, score
from .shared_data import TaskSet, normalized
from .slices import SliceSample, extract_slices
from .studies import Skipped, Study, find_studies, load_study_pairs
from .tasks import split_patients, tasks_from_labels

log = logging.getLogger(__name__)

MIN_CALIBRATION_SLICES = 3
CALIBRATION_FRACTION = 0.2


class MergeRunError(MedSAMixError):
    """A merge run cannot start: no or too few labelled studies, unknown task, too few slices, bad option."""


# --------------------------------------------------------------------------------------------------- task sets


def task_set_from_studies(name: str, studies: Sequence[Study], names: Mapping[int, str] | None = None,
                          seed: int = 0) -> TaskSet:
    """Calibration and test slices of labelled studies, split by patient (study).

    Args:
        name: Name of the data source (shown in messages).
        studies: The labelled studies (at least 2: one for calibration, one for test).
        names: Label value -> task name; values without a name become ``label_<value>``.
        seed: Seed of the patient split.

    Raises:
        MergeRunError: fewer than 2 studies, or no label value > 0 in any of them.
    """
    if len(studies) < 2:
        raise MergeRunError(f"{name}: at least 2 labelled studies are needed (calibration and test), "
                            f"found {len(studies)}")
    tasks = tasks_from_labels(studies, names)
    if not tasks:
        raise MergeRunError(f"{name}: the labels of the {len(studies)} labelled studies are all empty")
    cal_ids, _ = split_patients([s.study_id for s in studies], CALIBRATION_FRACTION, seed)
    cal: list[SliceSample] = []
    test: list[SliceSample] = []
    for study in map(normalized, studies):
        for t in tasks:
            (cal if study.study_id in cal_ids else test).extend(extract_slices(study, t))
    return TaskSet(name, tasks, cal, test, f"patients: {len(cal_ids)} calibration / "
                   f"{len(studies) - len(cal_ids)} test")


def task_set_from_pairs(name: str, pairs: Iterable[tuple[str | Path, str | Path | None]],
                        names: Mapping[int, str] | None = None, seed: int = 0) -> tuple[TaskSet, list[Skipped]]:
    """:func:`task_set_from_studies` of (image, label) path pairs; unreadable or unlabelled ones are skipped.

    Returns:
        ``(task_set, skipped)``: skipped studies with the reason (also logged).
    """
    studies, skipped = load_study_pairs([(Path(i), Path(lab) if lab else None) for i, lab in pairs])
    for s in skipped:
        log.warning("skipped %s: %s", s.path, s.reason)
    if len(studies) < 2:
        why = "".join(f"; {s.path.name}: {s.reason}" for s in skipped[:5])
        raise MergeRunError(f"{name}: at least 2 labelled studies are needed (calibration and test), "
                            f"found {len(studies)}{why}")
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
    """Task names from an option: a comma/space separated string or a list; empty -> ``()`` (= every task)."""
    if value is None:
        return ()
    items = re.split(r"[,\s]+", value) if isinstance(value, str) else [str(v) for v in value]
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
    """
    tasks = "+".join(re.sub(r"[^A-Za-z0-9_.-]", "_", t) for t in settings.tasks)[:60]
    parts = [tasks, f"t{settings.trials}", f"g{settings.granularity}{'s' if settings.separate else ''}",
             f"seed{settings.seed}"]
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
                     tolerance: float = 1e-9) -> Promotion:
    """Promote when the merged model's mean calibration Dice is >= the best single model's (minus ``tolerance``).

    Args:
        merged: Task -> calibration Dice of the merged model.
        singles: Alias -> task -> calibration Dice of each single pool model (at least one).
    """
    if not singles:
        raise ValueError("no single pool model to compare with")

    def mean(d: Mapping[str, float]) -> float:
        return float(sum(d.values()) / len(d)) if d else 0.0

    m = mean(merged)
    means = {a: mean(d) for a, d in singles.items()}
    best = max(means, key=lambda a: means[a])
    ok = m >= means[best] - tolerance
    if ok:
        reason = (f"promoted: merged calibration Dice {m:.4f} >= best single pool model {best!r} "
                  f"{means[best]:.4f}")
    else:
        reason = (f"not promoted: merged calibration Dice {m:.4f} is below the best single pool model {best!r} "
                  f"({means[best]:.4f}, own preprocessing) on the same calibration slices; the served model is "
                  "unchanged")
    return Promotion(ok, m, best, means[best], {a: dict(d) for a, d in singles.items()}, reason)


def single_model_scores(merger: Merger, evaluator: Evaluator, manifest: PoolManifest | None,
                        tasks: Sequence[str], default_style: str) -> dict[str, dict[str, float]]:
    """Calibration Dice of each single pool model, each with its own preprocessing from the manifest
    (``default_style`` for a model the manifest does not describe)."""
    out = {}
    for alias in merger.aliases:
        style = (manifest.preprocessing.get(alias, {}).get("style") if manifest else None) or default_style
        prep = Preprocessor(style, merger.pool.arch.img_size)
        config = MergeConfig.uniform(merger.groups, "pick", {"source": alias}, merger.granularity, merger.separate)
        out[alias] = score(merger, evaluator, prep, config, tasks)
    return out


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
    manifest: PoolManifest | None = None,
    restart: bool = False,
    on_trial: Callable[[Trial, int], None] | None = None,
    client: Any | None = None,
) -> MergeOutcome:
    """Run (or resume) a search into ``out_dir`` and write its recipe, merged checkpoint and history there.

    Args:
        pool: The model pool.
        calibration: Calibration slices of ``settings.tasks`` (see :func:`select_tasks`).
        test: Test slices (may be empty: no test Dice then).
        settings: The search settings.
        out_dir: Output folder; a search there with the same settings and data is resumed.
        split: How calibration and test were split (part of the resume check and of the recipe).
        manifest: The pool manifest, for the single models' own preprocessing in the no-regression guard.
        restart: Discard an incompatible history in ``out_dir`` instead of refusing.
        on_trial: Called after each trial with the trial and the number of trials done (resumed ones included).
        client: Optional ``distributed.Client`` for parallel trials.

    Returns:
        The outcome; ``recipe.yaml``, ``merged.pth`` and ``history.csv`` are in ``out_dir`` (each written
        atomically), and ``recipe.scores`` carries the calibration and test Dice and the promotion decision.
    """
    out_dir = Path(out_dir)
    merger = Merger(pool, settings.granularity, settings.separate)
    evaluator = Evaluator(list(calibration))
    context = search_context(pool, calibration, split)
    result = run_search(merger, evaluator, settings, out_dir, context, restart, on_trial, client)
    prep = Preprocessor(settings.preprocessing, pool.arch.img_size)
    test_dice = score(merger, Evaluator(list(test)), prep, result.best.config, settings.tasks) if test else {}
    singles = single_model_scores(merger, evaluator, manifest, settings.tasks, settings.preprocessing)
    promotion = decide_promotion(result.best.dice, singles)
    recipe = Recipe(
        arch=pool.arch, base=ModelRef(pool.base.alias, pool.base.sha256),
        models=[ModelRef(m.alias, m.sha256) for m in pool.models], merge=result.best.config,
        preprocessing={"style": settings.preprocessing},
        scores={"calibration_dice": dict(result.best.dice), "test_dice": test_dice, "trials": len(result.trials),
                "split": split, "single_models_calibration_dice": promotion.singles,
                "promotion": promotion.reason},
    )
    _atomic(out_dir / "recipe.yaml", recipe.save)
    state = {k: v.detach().clone() for k, v in merger.apply(result.best.config).state_dict().items()}
    save_sam_checkpoint(state, out_dir / "merged.pth")
    _atomic(out_dir / "history.csv", lambda p: write_history(p, result.trials, settings.tasks))
    return MergeOutcome(out_dir, result, recipe, state, dict(result.best.dice), test_dice, promotion)


def write_history(path: str | Path, trials: Sequence[Trial], tasks: Sequence[str]) -> None:
    """One CSV row per trial: number, status, mean Dice, per-task Dice, budget (calibration slices; '' = all)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "status", "mean_dice", *tasks, "budget"])
        for t in trials:
            w.writerow([t.number, t.status, f"{t.mean_dice:.4f}", *(f"{t.dice.get(k, 0):.4f}" for k in tasks),
                        "" if t.budget is None else t.budget])


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
