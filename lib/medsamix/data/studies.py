"""Reading a folder of studies laid out as MONAI Label's local datastore.

Layout::

    <folder>/
        case_a.nii.gz           image (NIfTI .nii / .nii.gz or NRRD .nrrd)
        case_b.nrrd
        series_c/               image: a DICOM series, a sub-folder of DICOM files (.dcm, or any name with the
            0001.dcm ...            DICOM Part 10 "DICM" preamble)
        labels/final/
            case_a.nii.gz       label with the image's study id as stem (any of .nii, .nii.gz, .nrrd)
            case_b.nrrd
            series_c.nii.gz     label of the DICOM series, named after the folder

Hidden entries (``.lock``, ``.datastore.json`` ...) and files of other types are ignored.

Images are read with MONAI (``NibabelReader`` for NIfTI, ``NrrdReader`` for NRRD, ``ITKReader`` for DICOM series;
:mod:`medsamix.data.imageio`), so every array is in MONAI's IJK voxel order and every affine maps voxel IJK to world
RAS millimetres (MONAI converts the LPS of NRRD and DICOM to RAS). For a DICOM series, ITK sorts the slices by their
position along the slice normal, so index K grows with that position whatever the file names or instance numbers say.

Labels must lie on the image's voxel grid: the loader checks shape and affine (``np.allclose``, atol 1e-3) and never
resamples. One exception is exact: a label whose affine equals the image's with some IJK axes reversed (a NIfTI
converted from the DICOM series by a tool that stores J the other way round, for example) is the same grid in another
index order, and is flipped onto the image's. With ``sub_blocks=True`` (labels read back from DICOM SEG, which keeps
only the frames it needs, typically the non-empty slices) a label that covers only a block of the image's voxels is
zero-padded onto the image grid (``sub_block``). Any other difference, an LPS/RAS mix-up included, is an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsamix.data.imageio import (MODALITIES, dicom_modality, first_dicom_file, guess_modality, is_image_file,
                                   read_image, study_id_of)
from medsamix.errors import StudyError

log = logging.getLogger(__name__)

AFFINE_ATOL = 1e-3
_INT16_MAX = int(np.iinfo(np.int16).max)


@dataclass
class Study:
    """One 3D image with its label map, both on the same voxel grid.

    Attributes:
        study_id: The image file name without its extension (``.nii.gz`` counts as one), or the DICOM folder's name.
        image: (I, J, K) float32 voxel array in IJK order as loaded by MONAI (channel dimension squeezed); CT in HU.
        label: (I, J, K) int16 label map, 0 = background.
        affine: (4, 4) float64 map from voxel IJK to world RAS millimetres, as MONAI gives it.
        modality: "CT", "MR" or "other" (see ``load_study``).
        image_path: The image file or DICOM series folder.
        label_path: The label file.
        hu: A CT's HU values when ``image`` was mapped to 0-255 (``medsamix.data.tasksets.normalized``); ``None``
            otherwise.
    """

    study_id: str
    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    modality: str
    image_path: Path
    label_path: Path
    hu: np.ndarray | None = None


@dataclass
class Skipped:
    """A study that ``load_studies`` left out, with the reason why."""

    path: Path
    reason: str


def find_studies(folder: str | Path, labels_subdir: str = "labels/final") -> list[tuple[Path, Path | None]]:
    """List the images of a datastore folder with their labels.

    Args:
        folder: The datastore folder.
        labels_subdir: Where the labels live, relative to ``folder``.

    Returns:
        ``(image, label)`` pairs sorted by study id (then image name); ``label`` is None when ``labels_subdir`` holds
        no label with the image's study id. When several labels share the id, the one with the image's exact file
        name wins, else the first by name.

    Raises:
        StudyError: ``folder`` does not exist or is not a folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise StudyError(f"{folder}: studies folder does not exist or is not a folder")
    skip_dir = Path(labels_subdir).parts[0] if labels_subdir else None
    images = []
    for entry in folder.iterdir():
        if entry.name.startswith(".") or entry.name == skip_dir:
            continue
        if is_image_file(entry) or (entry.is_dir() and first_dicom_file(entry)):
            images.append(entry)

    labels: dict[str, list[Path]] = {}
    label_dir = folder / labels_subdir
    if label_dir.is_dir():
        for entry in sorted(label_dir.iterdir()):
            if not entry.name.startswith(".") and is_image_file(entry):
                labels.setdefault(study_id_of(entry), []).append(entry)

    pairs: list[tuple[Path, Path | None]] = []
    for image in sorted(images, key=lambda p: (study_id_of(p), p.name)):
        candidates = labels.get(study_id_of(image), [])
        exact = [c for c in candidates if c.name == image.name]
        pairs.append((image, (exact or candidates or [None])[0]))
    return pairs


def _voxel_flip(shape: tuple[int, ...], axes: tuple[int, ...]) -> np.ndarray:
    """(4, 4) voxel map that reverses the given IJK axes: index i -> shape[axis] - 1 - i."""
    flip = np.eye(4)
    for axis in axes:
        flip[axis, axis] = -1.0
        flip[axis, 3] = shape[axis] - 1
    return flip


def _flipped_axes(
    image_affine: np.ndarray, label_affine: np.ndarray, shape: tuple[int, ...]
) -> tuple[int, ...] | None:
    """The IJK axes that run backwards in the label, if reversing them makes its affine the image's; else None.

    Such a label lies on exactly the image's voxel grid, only stored in another index order (for example a NIfTI
    converted from DICOM with its J axis reversed), so ``np.flip(label, axes)`` puts it on the image's grid without
    resampling.
    """
    for axes in [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]:
        if np.allclose(label_affine @ _voxel_flip(shape, axes), image_affine, atol=AFFINE_ATOL):
            return axes
    return None


def sub_block(image_affine: np.ndarray, image_shape: tuple[int, ...], label_affine: np.ndarray,
              label_shape: tuple[int, ...]) -> tuple[tuple[int, int, int], tuple[int, ...]] | None:
    """Where a label that holds only a block of the image's voxel grid lies in it, or None if it does not.

    A DICOM SEG stores only the frames it needs (typically the non-empty slices), so the label volume read from it
    starts at its first frame and can be shorter than the image along any axis. Such a label still lies exactly on
    the image's voxels: every label axis is the image's axis (or the image's axis reversed; an axis of length 1 can
    point anywhere) and its first voxel is an image voxel. No resampling is involved.

    Returns:
        ``(start, reversed_axes)``: ``label`` flipped along ``reversed_axes`` fills the image voxels
        ``start[a] .. start[a] + label_shape[a] - 1`` on every axis ``a``; None when the grids differ otherwise or the
        block does not fit inside the image.
    """
    if len(label_shape) != 3 or len(image_shape) != 3:
        return None
    corner = np.linalg.solve(image_affine, label_affine[:, 3])[:3]  # image voxel of the label's first voxel
    index = np.round(corner)
    if not np.allclose(image_affine[:3, :3] @ index + image_affine[:3, 3], label_affine[:3, 3], atol=AFFINE_ATOL):
        return None
    start, flipped = [], []
    for a in range(3):
        if label_shape[a] > 1 and np.allclose(label_affine[:3, a], image_affine[:3, a], atol=AFFINE_ATOL):
            start.append(int(index[a]))
        elif label_shape[a] > 1 and np.allclose(label_affine[:3, a], -image_affine[:3, a], atol=AFFINE_ATOL):
            start.append(int(index[a]) - (label_shape[a] - 1))
            flipped.append(a)
        elif label_shape[a] == 1:
            start.append(int(index[a]))
        else:
            return None
        if start[a] < 0 or start[a] + label_shape[a] > image_shape[a]:
            return None
    return (start[0], start[1], start[2]), tuple(flipped)


def _affine_mismatch(image_affine: np.ndarray, label_affine: np.ndarray) -> str:
    """Explain how two affines differ, naming a world LPS<->RAS flip when that is the cause."""
    text = f"label affine differs from image affine (max difference {np.abs(image_affine - label_affine).max():.4g})"
    if np.allclose(np.diag([-1.0, -1.0, 1.0, 1.0]) @ label_affine, image_affine, atol=AFFINE_ATOL):
        text += "; they differ by an LPS<->RAS flip of the world x and y axes (one of the files has a wrong header)"
    return text


def _to_label_map(label: np.ndarray, path: Path) -> np.ndarray:
    """Check that a label array holds whole numbers in [0, 32767] and convert it to int16."""
    whole = np.isfinite(label) & (label == np.round(label))
    if not whole.all():
        example = float(label[~whole].flat[0])
        raise StudyError(f"{path}: non-integer label: values such as {example:g} are not whole numbers")
    lo, hi = label.min(), label.max()
    if lo < 0 or hi > _INT16_MAX:
        raise StudyError(f"{path}: label values must lie in 0..{_INT16_MAX}, got {float(lo):g}..{float(hi):g}")
    return label.astype(np.int16)


def load_study(image_path: str | Path, label_path: str | Path | None, modality: str | None = None,
               sub_blocks: bool = False) -> Study:
    """Load one study and check that image and label fit together.

    Args:
        image_path: NIfTI/NRRD file or DICOM series folder.
        label_path: NIfTI/NRRD label file on the same voxel grid (None gives a "no label" error).
        modality: "CT", "MR" or "other" for non-DICOM images; None guesses it from the intensities
            (``guess_modality``). For a DICOM series the Modality tag wins when present (anything but CT or MR
            becomes "other").
        sub_blocks: Accept a label that covers only a block of the image's voxel grid (a DICOM SEG read back with
            only its stored frames) and zero-pad it onto the image grid; off: its shape differs, an error.

    Returns:
        The study, with a float32 image and an int16 label.

    Raises:
        StudyError: With a message naming the file and the problem: no label, unreadable file, not 3D, label shape
            or affine different from the image's (other than reversed voxel axes, which are flipped back),
            non-integer or out-of-range label values, all-zero label, non-finite image values, unknown ``modality``.
    """
    image_path = Path(image_path)
    if modality is not None and modality not in MODALITIES:
        raise StudyError(f"{image_path}: modality must be one of {MODALITIES}, got {modality!r}")
    if label_path is None:
        raise StudyError(f"{image_path}: no label in the labels folder for study {study_id_of(image_path)!r}")
    label_path = Path(label_path)

    image, affine = read_image(image_path, "image")
    label, label_affine = read_image(label_path, "label")
    same_shape = label.shape == image.shape
    if not (same_shape and np.allclose(label_affine, affine, atol=AFFINE_ATOL)):
        axes = _flipped_axes(affine, label_affine, image.shape) if same_shape else None
        if axes is not None:
            log.info("%s: label voxel axes %s run opposite to the image's; flipped onto the image grid", label_path,
                     axes)
            label = np.flip(label, axes)
        else:
            block = sub_block(affine, image.shape, label_affine, label.shape) if sub_blocks else None
            if block is None:
                if not same_shape:
                    raise StudyError(f"{label_path}: label shape {label.shape} differs from image shape {image.shape}")
                raise StudyError(f"{label_path}: {_affine_mismatch(affine, label_affine)}")
            start, flipped = block
            log.info("%s: label covers image voxels %s + %s only (axes %s reversed); placed on the image grid",
                     label_path, start, label.shape, flipped)
            full = np.zeros(image.shape, label.dtype)
            full[tuple(slice(s, s + n) for s, n in zip(start, label.shape))] = np.flip(label, flipped)
            label = full
    label = _to_label_map(label, label_path)
    if not label.any():
        raise StudyError(f"{label_path}: empty label (all zero)")
    image = image.astype(np.float32, copy=False)
    if not np.all(np.isfinite(image)):
        raise StudyError(f"{image_path}: image contains NaN or infinite values")

    found = dicom_modality(image_path) if image_path.is_dir() else None
    return Study(
        study_id=study_id_of(image_path),
        image=image,
        label=label,
        affine=affine,
        modality=found or modality or guess_modality(image),
        image_path=image_path,
        label_path=label_path,
    )


def load_studies(
    folder: str | Path, labels_subdir: str = "labels/final", modality: str | None = None
) -> tuple[list[Study], list[Skipped]]:
    """Load every study of a datastore folder, skipping bad ones with a logged reason instead of raising.

    Images whose study id is shared by another image (``a.nii.gz`` and ``a.nrrd``) are all skipped: their label
    would be ambiguous.

    Args:
        folder: The datastore folder (see the module docstring for the layout).
        labels_subdir: Where the labels live, relative to ``folder``.
        modality: Passed to ``load_study``.

    Returns:
        ``(studies, skipped)``: the loaded studies sorted by id, and the left-out images with the reason.

    Raises:
        StudyError: ``folder`` does not exist.
    """
    return load_study_pairs(find_studies(folder, labels_subdir), labels_subdir, modality)


def load_study_pairs(
    pairs: list[tuple[Path, Path | None]], labels_subdir: str = "labels/final", modality: str | None = None,
    sub_blocks: bool = False,
) -> tuple[list[Study], list[Skipped]]:
    """Load (image, label) path pairs (from ``find_studies`` or a MONAI Label datastore), skipping bad ones with
    a logged reason instead of raising: see ``load_studies``. ``labels_subdir`` only words the "no label" reason;
    ``sub_blocks`` goes to ``load_study``.

    Returns:
        ``(studies, skipped)``: the loaded studies sorted by id, and the left-out images with the reason.
    """
    ids = [study_id_of(image) for image, _ in pairs]
    studies: list[Study] = []
    skipped: list[Skipped] = []
    for (image, label), study_id in zip(pairs, ids):
        try:
            if ids.count(study_id) > 1:
                names = ", ".join(p.name for (p, _), i in zip(pairs, ids) if i == study_id)
                raise StudyError(f"{image}: study id {study_id!r} is shared by {names}")
            if label is None:
                raise StudyError(f"{image}: no label in {labels_subdir}")
            studies.append(load_study(image, label, modality, sub_blocks))
        except StudyError as e:
            log.warning("skipping study: %s", e)
            skipped.append(Skipped(image, str(e)))
    studies.sort(key=lambda s: s.study_id)
    return studies, skipped
