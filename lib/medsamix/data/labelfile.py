"""A label map in the file format a client asked for: the bytes and media type of an infer answer.

Pure functions (numpy, pynrrd for NRRD, nibabel for NIfTI); no web framework. The app's infer task calls
:func:`encode_label` with the mask it computed and the request's parameters, and the server sends the result as the
body of ``POST /infer/<model>?output=image`` (or as the ``image`` part of ``output=all``).

What the clients ask for (``params`` form field of the request, JSON):

* OHIF's MONAI Label plugin (the viewer bundled with monailabel 0.8.5, OHIF v3) always sends
  ``result_extension=".nrrd"``, ``result_dtype="uint8"``, ``result_compress=false``. It parses the answer with
  ``nrrd-js`` and copies the raw voxel buffer *unchanged* into its labelmap volume (``new Uint8Array(buffer)``):
  the NRRD header's geometry is ignored, so the data must be one byte per voxel, in the order of the viewer's
  volume: column index fastest, then row, then slice, slices ascending along the normal of the image plane
  (cross product of the row and column directions), which is the voxel order of the ITK/NIfTI volume MONAI Label
  makes from a DICOM series (``I`` = column, ``J`` = row, ``K`` = slice). A NIfTI answer ends in the plugin's
  ``Error: File is not an NRRD file!`` and nothing is shown (issue 11, ``docs/ohif-notes.md``).
* 3D Slicer's MONAI Label module sends ``result_extension=".nrrd"``, ``result_dtype="uint8"`` and reads the file
  with its geometry (LPS ``space directions`` / ``space origin``).
* MONAI Label's Python client sends nothing: the answer is then a NIfTI (``.nii.gz``), as before.

The mask is the ``(I, J, K)`` label map on the image's voxel grid and ``affine`` its ``(4, 4)`` IJK -> RAS matrix
(as :class:`medsamix.serving.service.InteractiveResult` holds them).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import numpy as np

from medsamix.errors import MedSAMixError

DEFAULT_EXTENSION = ".nii.gz"
EXTENSIONS = (".nrrd", ".nii.gz", ".nii")
MEDIA_TYPE = "application/octet-stream"  # what MONAI Label answers for label files, NRRD and NIfTI alike
# result_dtype -> NRRD type name (numpy names; NRRD spells the floats "float" / "double")
NRRD_TYPES = {"uint8": "uint8", "int8": "int8", "uint16": "uint16", "int16": "int16", "uint32": "uint32",
              "int32": "int32", "float32": "float", "float64": "double"}
DTYPE_ALIASES = {"float": "float32", "double": "float64", "uchar": "uint8", "unsigned char": "uint8",
                 "short": "int16", "ushort": "uint16", "int": "int32", "uint": "uint32"}
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


class ResultFormatError(MedSAMixError):
    """The request asks for a format, type or mask that cannot be answered (the server answers HTTP 400)."""


@dataclasses.dataclass(frozen=True)
class ResultFormat:
    """What the client asked for.

    Attributes:
        extension: ``.nrrd``, ``.nii.gz`` or ``.nii``.
        dtype: Voxel type of the file (numpy name; default ``uint8``).
        compress: gzip-encode the NRRD data (NIfTI: ``.nii.gz`` is always compressed, ``.nii`` never).
    """

    extension: str = DEFAULT_EXTENSION
    dtype: str = "uint8"
    compress: bool = False

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "ResultFormat":
        """Read ``result_extension``, ``result_dtype``, ``result_compress`` (MONAI Label's names) from a request's
        parameters; missing or empty ones take the defaults.

        Raises:
            ResultFormatError: An unknown extension or type, or a ``result_compress`` that is not a boolean.
        """
        ext = params.get("result_extension") or DEFAULT_EXTENSION
        if not isinstance(ext, str):
            raise ResultFormatError(f"result_extension must be a string, got {ext!r}")
        ext = ext.strip().lower()
        if ext and not ext.startswith("."):
            ext = "." + ext
        if ext not in EXTENSIONS:
            raise ResultFormatError(f"result_extension {ext!r} is not supported; use one of {', '.join(EXTENSIONS)}")
        dtype = params.get("result_dtype") or "uint8"
        if not isinstance(dtype, str):
            raise ResultFormatError(f"result_dtype must be a string, got {dtype!r}")
        dtype = DTYPE_ALIASES.get(dtype.strip().lower(), dtype.strip().lower())
        if dtype not in NRRD_TYPES:
            raise ResultFormatError(f"result_dtype {dtype!r} is not supported; use one of {', '.join(NRRD_TYPES)}")
        return cls(ext, dtype, _boolean(params.get("result_compress", False), "result_compress"))


@dataclasses.dataclass(frozen=True)
class EncodedLabel:
    """An infer answer's file.

    Attributes:
        body: The file's bytes.
        media_type: HTTP ``Content-Type``.
        filename: A file name with the right extension (``Content-Disposition``; clients keep the extension).
        format: What was written.
    """

    body: bytes
    media_type: str
    filename: str
    format: ResultFormat


def encode_label(mask: np.ndarray, affine: np.ndarray, params: Mapping[str, Any] | ResultFormat,
                 name: str = "label") -> EncodedLabel:
    """The label map as the file the request asks for.

    Args:
        mask: ``(I, J, K)`` label map (integer values) on the image's voxel grid.
        affine: ``(4, 4)`` IJK -> RAS matrix of the image.
        params: The request's parameters (see :meth:`ResultFormat.from_params`) or a :class:`ResultFormat`.
        name: File name stem.

    Raises:
        ResultFormatError: Bad format parameters, a mask that is not 3D, an affine that is not a finite ``(4, 4)``
            matrix, or label values the asked type cannot hold.
    """
    fmt = params if isinstance(params, ResultFormat) else ResultFormat.from_params(params)
    data = _cast(mask, fmt.dtype)
    affine = _affine(affine)
    if fmt.extension == ".nrrd":
        body = nrrd_bytes(data, affine, compress=fmt.compress)
    else:
        body = nifti_bytes(data, affine, compress=fmt.extension == ".nii.gz")
    return EncodedLabel(body, MEDIA_TYPE, name + fmt.extension, fmt)


def nrrd_bytes(data: np.ndarray, affine: np.ndarray, compress: bool = False) -> bytes:
    """An NRRD file (inline data, written by pynrrd) of a ``(I, J, K)`` array: data in Fortran order (I fastest),
    little-endian, raw or gzip; geometry in LPS (``space directions`` are the affine's columns, ``space origin`` its
    translation). This is the order OHIF copies into its labelmap without looking at the header, and what
    ITK / 3D Slicer read with the image's geometry."""
    import io

    import nrrd

    if data.ndim != 3:
        raise ResultFormatError(f"expected a (I, J, K) label map, got shape {data.shape}")
    dtype = np.dtype(data.dtype)
    if dtype.name not in NRRD_TYPES:
        raise ResultFormatError(f"NRRD cannot hold {dtype.name} here; use one of {', '.join(NRRD_TYPES)}")
    lps = _affine(affine)
    lps[:3, :] = LPS_FROM_RAS @ lps[:3, :]
    header = {"space": "left-posterior-superior", "space directions": lps[:3, :3].T,
              "space origin": lps[:3, 3], "kinds": ["domain"] * 3, "encoding": "gzip" if compress else "raw",
              "endian": "little"}
    out = io.BytesIO()
    nrrd.write(out, np.asarray(data, dtype=dtype.newbyteorder("<")), header, index_order="F", compression_level=6)
    return out.getvalue()


def nifti_bytes(data: np.ndarray, affine: np.ndarray, compress: bool = True) -> bytes:
    """A NIfTI-1 file of a ``(I, J, K)`` array with ``affine`` as qform and sform (code 1, scanner); gzip when
    ``compress`` (``.nii.gz``)."""
    import nibabel as nib

    if data.ndim != 3:
        raise ResultFormatError(f"expected a (I, J, K) label map, got shape {data.shape}")
    affine = _affine(affine)
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=6, mtime=0) if compress else raw


def viewer_order(mask: np.ndarray) -> np.ndarray:
    """The flat voxel order of OHIF's (cornerstone3D's) volume for a ``(I, J, K)`` array on the ITK grid of the
    same series: ``index = i + I * (j + J * k)``. For tests and for clients that send labels back the same way."""
    return np.asarray(mask).ravel(order="F")


def _cast(mask: np.ndarray, dtype: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 3:
        raise ResultFormatError(f"expected a (I, J, K) label map, got shape {m.shape}")
    target = np.dtype(dtype)
    if m.dtype == bool:
        return m.astype(target)
    if not np.issubdtype(m.dtype, np.integer) and not np.issubdtype(target, np.floating):
        if not np.all(np.isfinite(m)) or not np.all(m == np.round(m)):
            raise ResultFormatError(f"label values are not integers; cannot write them as {dtype}")
    if np.issubdtype(target, np.integer) and m.size:
        lo, hi = np.iinfo(target).min, np.iinfo(target).max
        if m.min() < lo or m.max() > hi:
            raise ResultFormatError(f"label values {m.min()}..{m.max()} do not fit {dtype} ({lo}..{hi})")
    return m.astype(target, copy=False)


def _affine(affine: np.ndarray) -> np.ndarray:
    a = np.array(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ResultFormatError(f"expected a finite (4, 4) affine, got shape {a.shape}")
    return a


def _vector(v: np.ndarray) -> str:
    return "(" + ",".join(repr(float(x)) for x in v) + ")"


def _boolean(v: Any, name: str) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "1", "yes", "false", "0", "no", ""):
        return v.strip().lower() in ("true", "1", "yes")
    if v is None:
        return False
    raise ResultFormatError(f"{name} must be true or false, got {v!r}")


def label_from_viewer_bytes(raw: bytes, image: str | os.PathLike[str]) -> bytes:
    """A NIfTI (``.nii.gz``) label on ``image``'s grid from a viewer's raw label buffer: one uint8 per voxel in the
    viewer's order (:func:`viewer_order`: I fastest, then J, then K), as OHIF's labelmap holds it.

    Args:
        raw: ``I * J * K`` bytes.
        image: The image file (NIfTI or NRRD) the label belongs to.

    Raises:
        ResultFormatError: The byte count is not the image's voxel count.
    """
    from medsamix.data.volumes import load_volume

    path = Path(image)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        import nibabel as nib

        img = nib.load(str(path))
        shape, affine = tuple(int(s) for s in img.shape[:3]), img.affine
    else:
        vol = load_volume(path)
        shape, affine = vol.shape, vol.affine
    n = int(np.prod(shape))
    if len(raw) != n:
        raise ResultFormatError(f"the label has {len(raw)} voxels (bytes); the image has {n} ({list(shape)})")
    mask = np.frombuffer(raw, dtype=np.uint8).reshape(shape, order="F")
    return nifti_bytes(mask, affine, compress=True)
