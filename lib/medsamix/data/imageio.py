"""Reading one image volume: NIfTI, NRRD or a DICOM series folder, with MONAI's readers, and its modality.

Every array is in MONAI's IJK voxel order and every affine maps voxel IJK to world RAS millimetres (MONAI converts
the LPS of NRRD and DICOM to RAS); nothing is re-oriented. For a DICOM series, ITK sorts the slices by their position
along the slice normal, so index K grows with that position whatever the file names or instance numbers say. Used by
:mod:`medsamix.data.studies` (datastore studies with labels) and :mod:`medsamix.data.volumes` (served images).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsamix.errors import StudyError

FILE_SUFFIXES = (".nii.gz", ".nii", ".nrrd")
DICOM_SUFFIX = ".dcm"
MODALITIES = ("CT", "MR", "other")


def study_id_of(path: Path) -> str:
    """The study id of an image or label path: the name without a known extension (a folder keeps its name)."""
    name = path.name
    for suffix in FILE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_image_file(path: Path) -> bool:
    """A NIfTI or NRRD file (by its suffix)."""
    return path.is_file() and path.name.lower().endswith(FILE_SUFFIXES)


def is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` file, or one with the DICOM Part 10 preamble ("DICM" at byte 128): series often have no suffix."""
    if not path.is_file() or path.name.startswith("."):
        return False
    if path.name.lower().endswith(DICOM_SUFFIX):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def first_dicom_file(folder: Path) -> Path | None:
    """The first DICOM file of a series folder by name, or None."""
    return next((p for p in sorted(folder.iterdir()) if is_dicom_file(p)), None)


def read_image(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Read an image file or DICOM folder with a MONAI reader: (array in IJK order, (4, 4) RAS affine).

    The reader is called directly rather than through ``LoadImage``, which on failure retries every other reader and
    reports all their tracebacks; this way the error names the file and the one relevant cause.
    """
    from monai.data import ITKReader, NibabelReader, NrrdReader

    if path.is_dir():
        reader = ITKReader()
    elif path.name.lower().endswith(".nrrd"):
        reader = NrrdReader()
    else:
        reader = NibabelReader()
    try:
        array, meta = reader.get_data(reader.read(str(path)))
        array = np.asarray(array)
        affine = np.asarray(meta["affine"], dtype=np.float64)
    except KeyError as e:  # e.g. an NRRD header without "space directions": no voxel geometry
        raise StudyError(f"{path}: cannot read {what}: the header lacks the field {e}") from e
    except Exception as e:  # noqa: BLE001 - third-party readers raise anything on a broken file
        raise StudyError(f"{path}: cannot read {what}: {type(e).__name__}: {e}") from e
    if array.ndim == 4 and array.shape[-1] == 1:  # a trailing singleton channel/time dimension
        array = array[..., 0]
    if array.ndim != 3:
        raise StudyError(f"{path}: expected a 3D {what}, got shape {tuple(array.shape)}")
    if affine.shape != (4, 4):
        raise StudyError(f"{path}: expected a (4, 4) affine for the {what}, got shape {affine.shape}")
    return array, affine


def dicom_modality(folder: Path) -> str | None:
    """The Modality tag of the first DICOM file of a series folder ("CT", "MR" or "other"), or None if it has none."""
    import pydicom

    first = first_dicom_file(folder)
    if first is None:
        raise StudyError(f"{folder}: the folder holds no DICOM file")
    try:
        ds = pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["Modality"])
    except Exception as e:  # noqa: BLE001
        raise StudyError(f"{folder}: cannot read the DICOM Modality tag: {type(e).__name__}: {e}") from e
    value = str(ds.get("Modality", "")).strip().upper()
    return None if not value else value if value in ("CT", "MR") else "other"


def guess_modality(image: np.ndarray) -> str:
    """Guess "CT", "MR" or "other" from intensities: CT if the 1st percentile <= -500 and max >= 300 (HU), else MR if
    every value is >= 0, else "other"."""
    if np.percentile(image, 1) <= -500 and image.max() >= 300:
        return "CT"
    return "MR" if image.min() >= 0 else "other"
