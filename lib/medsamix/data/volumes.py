"""Images served for interactive segmentation: reading them (MONAI readers), their 0-255 form, header checks.

Volumes are read exactly as :mod:`medsamix.data.studies` reads a datastore image (:mod:`medsamix.data.imageio`, MONAI's ``NibabelReader``,
``NrrdReader`` or ``ITKReader``): a ``(I, J, K)`` array in the file's voxel order, never re-oriented, and a
``(4, 4)`` affine from voxel IJK to world RAS millimetres. A label written by
:func:`medsamix.data.labelfile.encode_label` uses that affine and that voxel order, so it overlays the image voxel for
voxel in any viewer, whatever the image's orientation.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from medsamix.errors import StudyError
from medsamix.data.intensity import normalize
from medsamix.data.imageio import FILE_SUFFIXES, dicom_modality, guess_modality, read_image
from medsamix.models.preprocess import Preprocessor


@dataclasses.dataclass(frozen=True)
class Volume:
    """An image prepared for the model.

    Attributes:
        key: Identifies the file and its content (path, size and modification time).
        path: The image file or DICOM series folder.
        image255: ``(I, J, K)`` float32 intensities mapped to 0-255 (CT window 40/400 HU, else percentiles).
        affine: ``(4, 4)`` float64 voxel IJK -> world RAS (mm).
        modality: "CT", "MR" or "other".
        hu: ``(I, J, K)`` float32 HU values of a CT (``None`` otherwise), for a model served with another CT window
            (:meth:`pixels`).

    The 0-255 volume under the last non-default CT window asked for is kept (one array, counted in :attr:`nbytes`),
    so the prompts and pre-encoding of a model served with that window do not re-window the whole volume each time.
    """

    key: str
    path: Path
    image255: np.ndarray
    affine: np.ndarray
    modality: str
    hu: np.ndarray | None = None
    _windowed: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def pixels(self, prep: Preprocessor) -> tuple[str, np.ndarray]:
        """The 0-255 volume a model with preprocessing ``prep`` sees (its CT window applied to a CT's HU values)
        and the key of that content (:attr:`key`, suffixed with a window other than the default)."""
        image = self._windowed.get(prep.ct_window)
        if image is None:
            image = prep.window(self.image255, self.hu)
            if image is self.image255:
                return self.key, image
            self._windowed.clear()  # one window at a time: the served model's
            self._windowed[prep.ct_window] = image
        return f"{self.key}|{prep.ct_window}", image

    @property
    def nbytes(self) -> int:
        """Bytes held: the 0-255 volume, a CT's HU values and the last windowed copy (:meth:`pixels`)."""
        return (self.image255.nbytes + (0 if self.hu is None else self.hu.nbytes)
                + sum(a.nbytes for a in list(self._windowed.values())))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (int(self.image255.shape[0]), int(self.image255.shape[1]), int(self.image255.shape[2]))


def volume_key(path: str | os.PathLike[str]) -> str:
    """``path|size|mtime_ns`` of a file (for a DICOM folder: of the folder entry)."""
    p = Path(path)
    st = p.stat()
    return f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def load_volume(path: str | os.PathLike[str], modality: str | None = None) -> Volume:
    """Read an image and map it to 0-255.

    Args:
        path: NIfTI / NRRD file or DICOM series folder.
        modality: "CT", "MR" or "other"; None: the DICOM Modality tag, else guessed from the intensities.

    Raises:
        StudyError: Missing or unreadable file, another format (PNG, JPEG ...), not a 3D image, non-finite values.
    """
    p = Path(path)
    if not p.exists():
        raise StudyError(f"{p}: no such image")
    if p.is_file() and not p.name.lower().endswith(FILE_SUFFIXES):
        raise StudyError(f"{p.name}: {NOT_3D_FORMAT}")
    key = volume_key(p)
    image, affine = read_image(p, "image")
    image = image.astype(np.float32, copy=False)
    if not np.all(np.isfinite(image)):
        raise StudyError(f"{p}: image contains NaN or infinite values")
    found = dicom_modality(p) if p.is_dir() else None
    mod = found or modality or guess_modality(image)
    return Volume(key, p, normalize(image, mod), affine, mod, image if mod == "CT" else None)


NOT_3D_FORMAT = ("not a 3D image format: interactive segmentation reads NIfTI (.nii, .nii.gz), NRRD (.nrrd) or a "
                 "DICOM series folder; 2D images (PNG, JPEG, TIFF) are not supported")


def without_folders(message: str, path: str | os.PathLike[str]) -> str:
    """``message`` with the folder that holds ``path`` left out wherever it appears (as given and resolved), so an
    error a server answers names the file (``image.nii.gz``, ``series/0001.dcm``), never where the server keeps it.
    """
    p = Path(path)
    out = message
    for folder in sorted({str(p.parent), str(p.absolute().parent), os.path.realpath(p.parent)}, key=len,
                         reverse=True):
        if folder not in ("", ".", os.sep):
            out = out.replace(folder.rstrip(os.sep) + os.sep, "")
    return out


def header_shape(path: str | os.PathLike[str]) -> tuple[int, ...]:
    """The array shape of an image from its header alone (nothing decompressed, no voxel read): NIfTI and NRRD
    headers; for a DICOM series folder, (Rows, Columns, number of files).

    Raises:
        StudyError: Missing, unreadable or unsupported file.
    """
    p = Path(path)
    name = p.name.lower()
    try:
        if p.is_dir():
            import pydicom

            files = [f for f in p.rglob("*") if f.is_file()]
            if not files:
                raise StudyError(f"{p.name}: empty folder")
            ds = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
            frames = max(1, int(getattr(ds, "NumberOfFrames", 1) or 1))  # a multi-frame file holds many slices
            return (int(ds.Rows), int(ds.Columns), len(files) * frames)
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            return tuple(int(d) for d in nib.load(str(p)).header.get_data_shape())
        if name.endswith(".nrrd"):
            return _nrrd_shape(p)
    except StudyError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader error means the file cannot be served
        raise StudyError(f"{p.name}: unreadable image header ({type(e).__name__}: {without_folders(str(e), p)})"
                         ) from None
    raise StudyError(f"{p.name}: {NOT_3D_FORMAT}")


NRRD_MAX_BYTES_PER_VOXEL = 16  # complex128, the widest NRRD type


def _nrrd_shape(p: Path) -> tuple[int, ...]:
    """Sizes of an NRRD file, refusing what a header-only check cannot bound: a header that points to a separate
    data file (``data file:``, which a reader would open wherever it points) and compressed data that inflates to
    more bytes than the header's sizes allow (a decompression bomb: readers inflate all of it before checking)."""
    import nrrd

    with open(p, "rb") as fh:
        header = nrrd.read_header(fh)
        if any(str(k).replace(" ", "").lower() == "datafile" for k in header):
            raise StudyError(f"{p.name}: NRRD headers that point to a separate data file are not accepted; save "
                             "the volume as one .nrrd (or .nii.gz) file")
        shape = tuple(int(d) for d in header["sizes"])
        encoding = str(header.get("encoding", "raw")).lower()
        if encoding in ("gzip", "gz", "bzip2", "bz2"):
            limit = int(np.prod(shape, dtype=np.int64)) * NRRD_MAX_BYTES_PER_VOXEL + 4096
            if _inflated_size(fh, encoding.startswith("bz"), limit) > limit:
                raise StudyError(f"{p.name}: the compressed NRRD data inflates to more than the {limit} bytes its "
                                 f"sizes {list(shape)} allow")
    return shape


def _inflated_size(fh: Any, bzip2: bool, limit: int) -> int:
    """Bytes the gzip/zlib (or bzip2) stream from ``fh`` inflates to, counted in bounded steps and given up as soon
    as they pass ``limit`` (nothing is kept)."""
    import bz2
    import zlib

    step = 1 << 22
    total = 0
    if bzip2:
        bd = bz2.BZ2Decompressor()
        while not bd.eof and total <= limit:
            data = fh.read(1 << 20)
            total += len(bd.decompress(data, step))
            while not bd.eof and not bd.needs_input and total <= limit:
                total += len(bd.decompress(b"", step))
            if not data:
                break
        return total
    zd = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header
    while not zd.eof and total <= limit:
        data = fh.read(1 << 20)
        if not data:
            break
        while data and total <= limit:
            total += len(zd.decompress(data, step))
            data = zd.unconsumed_tail
    return total


def check_voxels(path: str | os.PathLike[str], max_voxels: int | None) -> tuple[int, ...]:
    """The header shape of ``path`` if it has at most ``max_voxels`` voxels (None: no limit).

    Raises:
        StudyError: Too many voxels (the message gives both numbers) or an unreadable header.
    """
    shape = header_shape(path)
    n = int(np.prod(shape, dtype=np.int64)) if shape else 0
    if max_voxels is not None and n > max_voxels:
        raise StudyError(f"{Path(path).name}: {n} voxels (shape {list(shape)}) is over the limit of {max_voxels}")
    return shape


DEFAULT_VOLUME_CACHE_BYTES = 1 << 30


class VolumeCache:
    """The most recently used volumes (at most ``max_bytes`` of 0-255 arrays, and always the last one), keyed by path
    and file state, so a changed file is read again. A volume of more than ``max_voxels`` voxels (by its header)
    is refused before it is read."""

    def __init__(self, max_bytes: int = DEFAULT_VOLUME_CACHE_BYTES, max_voxels: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.max_voxels = max_voxels
        self._items: collections.OrderedDict[str, Volume] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str | os.PathLike[str], modality: str | None = None) -> Volume:
        """The volume of ``path`` (read unless cached).

        Raises:
            StudyError: As :func:`load_volume`; the message names the file without its folder (it is answered to
                clients of the server)."""
        try:
            return self._get(Path(path), modality)
        except StudyError as e:
            raise StudyError(without_folders(str(e), path)) from None

    def _get(self, p: Path, modality: str | None) -> Volume:
        if not p.exists():
            raise StudyError(f"{p}: no such image")
        key = volume_key(p)
        with self._lock:
            v = self._items.get(key)
            if v is not None:
                self._items.move_to_end(key)
                return v
        if self.max_voxels is not None:
            check_voxels(p, self.max_voxels)
        v = load_volume(p, modality)
        with self._lock:
            self._items[v.key] = v
            while len(self._items) > 1 and sum(x.nbytes for x in self._items.values()) > self.max_bytes:
                self._items.popitem(last=False)
        return v
