"""Task sets: the calibration and test slices of labelled studies, split by patient or by slabs of slices.

* :class:`TaskSet` holds the calibration and test slices of one data source (images normalised to 0-255 by
  :func:`normalized`, sliced along the last IJK axis);
* :func:`task_set_from_pairs` / :func:`datastore_task_set` build it from (image, label) pairs or a MONAI Label
  datastore folder (calibration = 20% of the patients, test = the rest; with one labelled study, slabs of its
  slices: :func:`one_study_task_set`, built on :func:`slab_task_set`);
* :func:`select_tasks` picks the requested tasks' slices and checks that there are enough of them.

The benchmark task sets of the shared data (:mod:`medsamix.demo.shared_data`) are built with the same helpers.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from medsamix.errors import MergeRunError
from medsamix.data.intensity import normalize
from medsamix.data.slices import SliceSample, extract_slices
from medsamix.data.studies import Skipped, Study, find_studies, load_study_pairs
from medsamix.data.tasks import Task, contiguous_runs, split_patients, split_slabs, tasks_from_labels

log = logging.getLogger(__name__)

MIN_CALIBRATION_SLICES = 3
CALIBRATION_FRACTION = 0.2
SLAB_SIZE = 5  # one labelled study: calibration slabs of about this many slices, spread over its labelled slices
SLAB_GAP = 1  # ... each with this many guard slices left out of the test set on either side
SLAB_TRIES = 64  # ... at the first of this many seeded slab positions that gives every task enough calibration slices
ONE_STUDY_SPLIT = "slab split of the one labelled study"


@dataclasses.dataclass
class TaskSet:
    """Calibration and test slices of one data source.

    Attributes:
        name: Data source name.
        tasks: Its tasks.
        calibration: Calibration slices (0-255 images).
        test: Test slices.
        split: How calibration and test were separated (patients or contiguous slabs).
    """

    name: str
    tasks: list[Task]
    calibration: list[SliceSample]
    test: list[SliceSample]
    split: str


def normalized(study: Study) -> Study:
    """The study with its image mapped to 0-255 (the default CT window or percentiles); a CT keeps its HU values
    in ``hu`` (its slices carry them, so a searched CT window can be applied)."""
    return dataclasses.replace(study, image=normalize(study.image, study.modality),
                               hu=study.image if study.modality == "CT" else None)


def slices_of(study: Study, tasks: Iterable[Task], indices: Iterable[int] | None = None, jitter: float = 0.0,
              seed: int = 0) -> list[SliceSample]:
    """The slices of ``study`` along its last axis for each of ``tasks`` (only ``indices`` when given; see
    :func:`~medsamix.data.slices.extract_slices` for ``jitter`` and ``seed``)."""
    keep = None if indices is None else set(indices)
    out = []
    for t in tasks:
        out += [s for s in extract_slices(study, t, axis=2, jitter=jitter, seed=seed)
                if keep is None or s.index in keep]
    return out


def slab_indices(num_slices: int, calibration_fraction: float, seed: int, slab_size: int | None = None,
                 gap: int = 0) -> tuple[list[int], list[int]]:
    """The calibration and test slice indices of :func:`slab_task_set` (0 .. ``num_slices`` - 1): one slab, or with
    ``slab_size`` about ``calibration_fraction * num_slices / slab_size`` slabs
    (:func:`~medsamix.data.tasks.split_slabs`)."""
    slabs = 1
    if slab_size:
        k = max(1, round(calibration_fraction * num_slices))
        slabs = max(1, k // slab_size)
    return split_slabs(num_slices, calibration_fraction, seed, slabs=slabs, gap=gap)


def slab_task_set(name: str, study: Study, tasks: Sequence[Task], seed: int, calibration_fraction: float,
                  slab_size: int | None = None, gap: int = 0, extent: tuple[int, int] | None = None) -> TaskSet:
    """Slab split of one volume along its last axis: one slab, or (with ``slab_size``) slabs of about that many
    slices spread over it, ``gap`` guard slices left out of the test set next to each
    (:func:`~medsamix.data.tasks.split_slabs`).

    Args:
        name: Data source name.
        study: The (normalised) volume ``(I, J, K)`` and its label map.
        tasks: Its tasks.
        seed: Seed of the slab positions.
        calibration_fraction: Share of the split slices for calibration, in (0, 1).
        slab_size: About this many slices per calibration slab (several slabs); ``None``: one slab.
        gap: Guard slices on each side of a slab.
        extent: ``(first, last)`` slice indices (inclusive) to split; ``None``: the whole volume. Slices outside
            belong to neither side.
    """
    total = study.image.shape[2]
    first, last = extent if extent is not None else (0, total - 1)
    n = last - first + 1
    cal_idx, test_idx = slab_indices(n, calibration_fraction, seed, slab_size, gap)
    cal_idx, test_idx = [i + first for i in cal_idx], [i + first for i in test_idx]
    cal = slices_of(study, tasks, cal_idx)
    test = slices_of(study, tasks, test_idx)
    runs = contiguous_runs(cal_idx)
    where = ", ".join(f"{r[0]}-{r[-1]}" for r in runs)
    guard = f", less {n - len(cal_idx) - len(test_idx)} guard slices next to them" if gap else ""
    within = f" (slices {first}-{last} split, those holding labels)" if (first, last) != (0, total - 1) else ""
    return TaskSet(name, list(tasks), cal, test,
                   f"one volume ({total} slices{within}): contiguous slab{'s' if len(runs) > 1 else ''} of slices "
                   f"{where} for calibration, the other {len(test_idx)} slices for test{guard}")


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
    (:func:`slab_task_set`): calibration = :data:`CALIBRATION_FRACTION` of them, at least
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
