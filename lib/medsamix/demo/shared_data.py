"""Task sets built from the shared real-image collection (``../shared/data``) for benchmarks and searches.

Each :class:`TaskSet` holds the calibration and test slices of one data source, intensity-normalised to 0-255
(CT window 40/400, other modalities 0.5-99.5 percentiles per volume) and sliced along the last IJK axis:

* ``hippocampus`` - 200 T1 MRIs with manual labels (anterior, posterior); patient-level split, calibration 20%.
  Patients used to train a pool model are excluded first.
* ``totalseg_ct`` / ``totalseg_mr`` - one CT (a 30-slice crop) and one MR volume (20 slices) with
  TotalSegmentator (silver) labels; a single patient each, so the split is by contiguous slabs of slices
  (calibration = one slab of 20% of the slices; the slices next to it are left out of the test set).
  The largest structures are used as tasks.
* ``totalseg_ct_full`` - the whole TotalSegmentator example CT (112 slices; the crop above is slices 82-111 of it) with
  the labels of TotalSegmentator's fast model: calibration = 20% of the slices in slabs of about 5 slices spread
  over the volume (one per equal segment), each with a one-slice guard gap to the test slices.
* ``dcmqi_ct`` - a 3-slice CT DICOM series with liver, spine and heart labels (NRRD); slab split (1 slice for
  calibration).
* ``sammed2d`` - 5 CT/MR PNG slices with organ masks; split by image.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from medsamix.data.slices import SliceSample, tight_box
from medsamix.data.imageio import study_id_of
from medsamix.data.studies import Study, find_studies, load_study
from medsamix.data.tasks import Task, split_patients, without_studies
from medsamix.data.tasksets import TaskSet, normalized, slab_task_set, slices_of

log = logging.getLogger(__name__)


def hippocampus_patients(root: Path, exclude: Iterable[str] = ()) -> tuple[list[tuple[Path, Path | None]], int]:
    """The MSD hippocampus (image, label) pairs (``root/hippocampus``) less the ``exclude`` patients (pool training),
    sorted by id, and how many were excluded."""
    return without_studies(find_studies(root / "hippocampus" / "images", labels_subdir="../labels"), exclude)


def hippocampus(root: Path, exclude: Iterable[str] = (), seed: int = 0, max_patients: int | None = None,
                calibration_fraction: float = 0.2) -> TaskSet:
    """Patient-split task set of the MSD hippocampus volumes (``root/hippocampus``)."""
    tasks = [Task("hippocampus_anterior", 1), Task("hippocampus_posterior", 2)]
    pairs, n_excluded = hippocampus_patients(root, exclude)
    if max_patients:
        pairs = pairs[:max_patients]
    ids = [study_id_of(i) for i, _ in pairs]
    cal_ids, _ = split_patients(ids, calibration_fraction, seed)
    cal, test = [], []
    for image, label in pairs:
        study = normalized(load_study(image, label, modality="MR"))
        (cal if study.study_id in cal_ids else test).extend(slices_of(study, tasks))
    return TaskSet("hippocampus", tasks, cal, test,
                   f"patients: {len(cal_ids)} calibration / {len(ids) - len(cal_ids)} test "
                   f"({n_excluded} pool-training patients excluded)")


def _largest_tasks(study: Study, names: dict[str, str], count: int, min_slices: int) -> list[Task]:
    values, voxels = np.unique(study.label[study.label > 0], return_counts=True)
    slices = {int(v): int((study.label == v).any(axis=(0, 1)).sum()) for v in values}
    ranked = sorted((int(n), int(v)) for v, n in zip(values, voxels) if slices[int(v)] >= min_slices)[::-1]
    return [Task(names.get(str(v), f"label_{v}"), v) for _, v in ranked[:count]]


def totalseg(root: Path, modality: str, seed: int = 0, organs: int = 8,
             calibration_fraction: float = 0.2, full: bool = False) -> TaskSet:
    """Slab-split task set of the TotalSegmentator example CT (``modality="CT"``; ``full``: the whole 112-slice
    volume with the fast model's labels, split into several slabs) or MR volume."""
    base = root / "totalseg"
    names = json.loads((base / "label_names.json").read_text())
    if modality == "CT" and full:
        study = load_study(base / "example_ct.nii.gz", base / "example_seg_fast_force_split.nii.gz", modality="CT")
        label_names = names["total"]
    elif modality == "CT":
        study = load_study(base / "example_ct_sm.nii.gz", base / "example_seg.nii.gz", modality="CT")
        label_names = names["total"]
    elif full:
        raise ValueError("only the CT has a full volume")
    else:
        study = load_study(base / "example_mr_sm.nii.gz", base / "example_seg_mr.nii.gz", modality="MR")
        label_names = names["total_mr"]
    study = normalized(study)
    tasks = _largest_tasks(study, label_names, organs, min_slices=max(4, study.image.shape[2] // 3))
    name = f"totalseg_{modality.lower()}{'_full' if full else ''}"
    return slab_task_set(name, study, tasks, seed, calibration_fraction, slab_size=5 if full else None, gap=1)


def dcmqi_ct(root: Path, seed: int = 0) -> TaskSet:
    """The 3-slice dcmqi CT series with its liver (1), spine (2) and heart (3) labels; slab split."""
    base = root / "dcmqi_ct3slice"
    tasks = [Task("liver", 1), Task("spine", 2), Task("heart", 3)]
    label = None
    study = None
    for t in tasks:
        s = load_study(base / "ct-3slice", base / f"{t.name}_seg.nrrd", modality="CT")
        study = study or s
        part = np.where(s.label > 0, t.value, 0).astype(np.int16)
        label = part if label is None else np.where(part > 0, part, label)
    assert study is not None and label is not None
    study = normalized(dataclasses.replace(study, label=label, study_id="dcmqi_ct3slice"))
    return slab_task_set("dcmqi_ct", study, tasks, seed, 0.2)


def sammed2d(root: Path, seed: int = 0) -> TaskSet:
    """The SAM-Med2D demo slices (PNG, already 0-255) with one task per organ name; split by image."""
    from PIL import Image

    base = root / "sammed2d_demo"
    mapping: dict[str, list[str]] = json.loads((base / "image2label_train.json").read_text())
    for mask_key, image_key in json.loads((base / "label2image_test.json").read_text()).items():
        mapping.setdefault(image_key, []).append(mask_key)
    organs: dict[str, list[tuple[str, Path]]] = {}
    images: dict[str, np.ndarray] = {}
    for image_key, mask_keys in sorted(mapping.items()):
        stem = Path(image_key).stem
        images[stem] = np.asarray(Image.open(base / "images" / Path(image_key).name).convert("L"), dtype=np.float32)
        for mk in mask_keys:
            organ = Path(mk).stem[len(stem) + 1:].rsplit("_", 1)[0]
            organs.setdefault(organ, []).append((stem, base / "masks" / Path(mk).name))
    tasks = [Task(o, i + 1) for i, o in enumerate(sorted(organs))]
    cal_ids, _ = split_patients(sorted(images), 0.2, seed)
    cal, test = [], []
    for task in tasks:
        for stem, path in organs[task.name]:
            mask = np.asarray(Image.open(path).convert("L")) > 127
            if not mask.any():
                continue
            sample = SliceSample(stem, task, 2, 0, images[stem], mask, tight_box(mask))
            (cal if stem in cal_ids else test).append(sample)
    return TaskSet("sammed2d", tasks, cal, test, f"images: {len(cal_ids)} calibration / {len(images) - len(cal_ids)} test")


def shared_task_sets(root: Path, exclude: Iterable[str] = (), seed: int = 0,
                     names: Sequence[str] = ("hippocampus", "totalseg_ct", "totalseg_mr", "dcmqi_ct", "sammed2d"),
                     max_patients: int | None = None) -> list[TaskSet]:
    """The task sets named in ``names`` (all by default) from the shared data root."""
    makers = {
        "hippocampus": lambda: hippocampus(root, exclude, seed, max_patients),
        "totalseg_ct": lambda: totalseg(root, "CT", seed),
        "totalseg_mr": lambda: totalseg(root, "MR", seed),
        "totalseg_ct_full": lambda: totalseg(root, "CT", seed, full=True),
        "dcmqi_ct": lambda: dcmqi_ct(root, seed),
        "sammed2d": lambda: sammed2d(root, seed),
    }
    unknown = sorted(set(names) - set(makers))
    if unknown:
        raise ValueError(f"unknown task sets {unknown}; known: {sorted(makers)}")
    return [makers[n]() for n in names]

