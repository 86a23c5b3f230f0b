"""Segmentation tasks (one label value each) and the calibration/test split.

Task names come from a ``labels`` setting or a datastore's label-names file (:data:`LABELS_FILE`), both read by
:func:`label_names` / :func:`datastore_label_names` (comma-separated names or JSON), for the app, its train task and
the command line alike.

The search tunes a merge on a calibration set and reports it on a disjoint test set. With several patients the split is
by patient (``split_patients``), so that no patient's slices appear on both sides; with a single volume it is by slab
(``split_slabs``): one or several contiguous runs of slices for calibration, the rest (less an optional guard gap
around each run) for test.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsamix.data.imageio import study_id_of
from medsamix.errors import MergeRunError

if TYPE_CHECKING:
    from medsamix.data.studies import Study

log = logging.getLogger(__name__)

LABELS_FILE = ".medsamix-labels.json"
"""A datastore's label names, ``{"name": value}`` JSON (hidden, so datastores ignore it); written with the sample
studies (:mod:`medsamix.demo.sample_studies`)."""
DEFAULT_LABELS = {1: "foreground"}
"""Label names when neither a ``labels`` setting nor :data:`LABELS_FILE` gives any."""


@dataclass(frozen=True)
class Task:
    """One structure to segment.

    Attributes:
        name: Human-readable name, e.g. "liver".
        value: Its value in the label maps (> 0).
    """

    name: str
    value: int


def tasks_from_labels(
    studies: Sequence[Study], names: Mapping[int, str] | None = None, min_voxels: int = 1
) -> list[Task]:
    """The tasks present in a set of studies.

    Args:
        studies: Studies whose ``label`` maps are scanned.
        names: Optional label value -> name; values without a name are called ``f"label_{value}"``.
        min_voxels: A value counts as present when at least one study has this many voxels of it.

    Returns:
        One task per label value > 0 present in any study, sorted by value.
    """
    largest: dict[int, int] = {}
    for study in studies:
        values, counts = np.unique(study.label, return_counts=True)
        for v, c in zip(values.tolist(), counts.tolist()):
            if v > 0:
                largest[v] = max(largest.get(v, 0), c)
    names = names or {}
    return [Task(names.get(v, f"label_{v}"), v) for v in sorted(largest) if largest[v] >= min_voxels]


def parse_names(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """Names from a setting: a comma- (or newline-) separated string (names may contain spaces: "left kidney,
    liver") or a list; surrounding spaces and repeats are dropped; empty -> ``()``."""
    if value is None:
        return ()
    items = re.split(r"[,\n]", value) if isinstance(value, str) else [str(v) for v in value]
    out: list[str] = []
    for item in (i.strip() for i in items):
        if item and item not in out:
            out.append(item)
    return tuple(out)


def label_names(value: str | Mapping[str, Any] | Sequence[str] | None, source: str = "labels") -> dict[int, str]:
    """Label value -> task name from a MONAI Label style ``labels`` setting.

    Accepts ``{"liver": 1, ...}`` (MONAI Label's convention), ``{"1": "liver"}``, a list of names (values 1, 2, ...),
    the JSON text of any of these, or comma-separated names (``"liver,spleen"``: values 1, 2); ``None`` / empty
    gives ``{}``.

    Args:
        value: The setting.
        source: What to call it in an error (the option, or the file it was read from).

    Raises:
        MergeRunError: text that starts like JSON (``{`` or ``[``) but is not valid JSON, or anything else,
            naming ``source``.
    """
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            if value.lstrip().startswith(("{", "[")):
                raise MergeRunError(f"{source}: not valid JSON ({e})") from None
            value = list(parse_names(value))
    try:
        if isinstance(value, Mapping):
            out = {}
            for k, v in value.items():
                if isinstance(v, (int, float)) or (isinstance(v, str) and v.strip().isdigit()):
                    out[int(v)] = str(k)  # {"liver": 1}
                else:
                    out[int(k)] = str(v)  # {"1": "liver"}
            return {k: v for k, v in out.items() if k > 0}
        if isinstance(value, Sequence) and not isinstance(value, str):
            return {i + 1: str(v) for i, v in enumerate(value)}
    except (TypeError, ValueError):
        pass
    raise MergeRunError(f"{source}: expected {{name: value}}, {{value: name}} or a list of names, got {value!r}")


def datastore_label_names(setting: str | None, studies: str | os.PathLike[str]) -> dict[int, str]:
    """The label names of a datastore, as the app, its train task and the command line name its labels.

    ``setting`` (the app's ``labels``: comma-separated names or JSON, :func:`label_names`) when given; else
    ``<studies>/`` :data:`LABELS_FILE` when it exists and is readable (an unreadable one is logged and skipped);
    else :data:`DEFAULT_LABELS`.

    Raises:
        MergeRunError: a bad ``setting``, naming it.
    """
    if setting:
        return label_names(setting)
    f = Path(str(studies)) / LABELS_FILE
    if f.is_file():
        try:
            names = read_label_names(f)
        except MergeRunError as e:
            log.warning("%s; using %s", e, DEFAULT_LABELS)
            names = {}
        if names:
            return names
    return dict(DEFAULT_LABELS)


def read_label_names(path: str | os.PathLike[str]) -> dict[int, str]:
    """Label names from a file: JSON or comma-separated names, as :func:`label_names` reads them.

    Raises:
        MergeRunError: the file cannot be read or holds no label names :func:`label_names` accepts, naming it.
    """
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise MergeRunError(f"{path}: cannot read label names ({e})") from None
    return label_names(text, str(path))


def training_study_ids(training_studies: Mapping[str, Sequence[str]]) -> list[str]:
    """Every study id a pool model was trained on, from a pool manifest's ``training_studies`` (data source ->
    ids): these patients never enter a calibration or test split (:func:`without_studies`)."""
    return [i for ids in training_studies.values() for i in ids]


def without_studies(pairs: Sequence[tuple[Path, Path | None]],
                    exclude: Iterable[str]) -> tuple[list[tuple[Path, Path | None]], int]:
    """The (image, label) pairs whose study id (:func:`~medsamix.data.imageio.study_id_of`) is not in ``exclude``
    (e.g. :func:`training_study_ids`), in their order, and how many were left out."""
    excluded = set(exclude)
    kept = [(i, lab) for i, lab in pairs if study_id_of(i) not in excluded]
    return kept, len(pairs) - len(kept)


def _calibration_size(n: int, calibration_fraction: float) -> int:
    """round-half-up(fraction * n), at least 1, and at most n - 1 when n >= 2 (so that the test side is not empty)."""
    if not 0.0 < calibration_fraction < 1.0:
        raise ValueError(f"calibration_fraction must lie in (0, 1), got {calibration_fraction}")
    k = max(1, math.floor(calibration_fraction * n + 0.5))
    return min(k, n - 1) if n >= 2 else k


def split_patients(
    ids: Sequence[str], calibration_fraction: float = 0.2, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split patient ids into a calibration and a test set.

    The ids are sorted before a seeded shuffle, so the split depends only on the set of ids and the seed, not on
    their order. The calibration set gets round-half-up(``calibration_fraction`` * n) ids, at least 1; the test set
    at least 1 when n >= 2. A single id goes to calibration (use ``split_slabs`` to split one volume).

    Args:
        ids: Distinct patient (study) ids.
        calibration_fraction: Fraction of ids for calibration, in (0, 1).
        seed: Seed of the shuffle.

    Returns:
        ``(calibration, test)``, each sorted; disjoint, and together exactly ``ids``.

    Raises:
        ValueError: Duplicate ids or a fraction outside (0, 1).
    """
    ordered = sorted(ids)
    if len(set(ordered)) != len(ordered):
        dupes = sorted(i for i, c in Counter(ordered).items() if c > 1)
        raise ValueError(f"duplicate patient ids: {dupes}")
    if not ordered:
        return [], []
    k = _calibration_size(len(ordered), calibration_fraction)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    calibration = sorted(ordered[i] for i in perm[:k])
    test = sorted(ordered[i] for i in perm[k:])
    return calibration, test


def split_slabs(num_slices: int, calibration_fraction: float = 0.2, seed: int = 0, slabs: int = 1,
                gap: int = 0) -> tuple[list[int], list[int]]:
    """Split the slice indices of one volume into calibration slabs and test slices.

    The calibration slices form ``slabs`` contiguous slabs of near-equal size (round-half-up(``calibration_fraction``
    * ``num_slices``) slices in all, sized as in ``split_patients``). The volume is cut into ``slabs`` equal
    segments and each segment holds one slab at the same seeded offset, so several slabs spread over the whole
    volume (every structure along the axis can reach calibration). Slices within ``gap`` of a calibration slice are
    left out of the test set: neighbouring slices are strongly correlated, so they would leak calibration data.

    Args:
        num_slices: Number of slices (indices 0 .. num_slices - 1 along the sliced axis).
        calibration_fraction: Fraction of slices for calibration, in (0, 1).
        seed: Chooses the slabs' offset inside their segments (one slab: its start, uniformly among all positions).
        slabs: Number of calibration slabs, >= 1 (at most the number of calibration slices).
        gap: Slices dropped from the test set on each side of every slab, >= 0.

    Returns:
        ``(calibration, test)``: sorted, disjoint lists of slice indices.

    Raises:
        ValueError: ``num_slices`` < 1, a fraction outside (0, 1), ``slabs`` < 1 or more slabs than fit, ``gap`` < 0.
    """
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    k = _calibration_size(num_slices, calibration_fraction)
    if not 1 <= slabs <= k:
        raise ValueError(f"slabs must lie in [1, {k}] (the calibration size) for {num_slices} slices, got {slabs}")
    sizes = [k // slabs + (1 if i < k % slabs else 0) for i in range(slabs)]
    segment = num_slices // slabs
    if max(sizes) > segment:
        raise ValueError(f"{slabs} slabs of up to {max(sizes)} slices do not fit in {num_slices} slices")
    rng = np.random.default_rng(seed)
    if slabs == 1:
        starts = [int(rng.integers(0, num_slices - k + 1))]
    else:
        offset = int(rng.integers(0, segment - max(sizes) + 1))
        starts = [i * segment + offset for i in range(slabs)]
    calibration = sorted(i for start, size in zip(starts, sizes) for i in range(start, start + size))
    cal = set(calibration)
    near = {j for i in calibration for j in range(i - gap, i + gap + 1)}
    test = [i for i in range(num_slices) if i not in cal and i not in near]
    return calibration, test


def contiguous_runs(indices: Sequence[int]) -> list[list[int]]:
    """Sorted indices -> runs of consecutive indices, e.g. ``[1, 2, 5]`` -> ``[[1, 2], [5]]``."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs

