"""``server/medsamix_server/ohif.py``: the infer answer's file in the format the client asked for.

The contract with OHIF's MONAI Label plugin (monailabel 0.8.5 bundle; ``docs/ohif-notes.md``): it asks for
``.nrrd`` / ``uint8`` / uncompressed, finds the end of the header at the first blank line, checks the ``NRRD000x``
magic and copies the bytes after the header as one byte per voxel, column fastest, then row, then slice. 3D Slicer
asks for the same and reads the geometry; MONAI Label's Python client asks for nothing and gets NIfTI.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from medsamix.data.labelfile import (  # noqa: E402
    EncodedLabel,
    ResultFormat,
    ResultFormatError,
    encode_label,
    nrrd_bytes,
    viewer_order,
)

OHIF_PARAMS = {"foreground": [[258, 249, 1]], "background": [], "result_extension": ".nrrd", "result_dtype": "uint8",
               "result_compress": False, "restore_label_idx": False}


def _mask() -> np.ndarray:
    m = np.zeros((7, 5, 3), np.uint8)
    m[1:4, 2:5, 1] = 1
    m[6, 0, 2] = 2  # one voxel, far corner: any axis mix-up moves it
    return m


def _affine() -> np.ndarray:
    """An oblique IJK -> RAS affine with unequal spacings and a non-trivial origin."""
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    a = np.eye(4)
    a[:3, :3] = rot @ np.diag([0.8, 0.9, 2.5])
    a[:3, 3] = [10.5, -20.25, 33.0]
    return a


def _split(body: bytes) -> tuple[list[str], bytes]:
    """Header lines and data as nrrd-js splits them: the header ends at the first blank line."""
    end = body.index(b"\n\n")
    return body[:end].decode("ascii").split("\n"), body[end + 2:]


def test_ohif_request_gets_a_raw_uint8_nrrd_whose_data_is_the_viewer_voxel_order():
    m = _mask()
    enc = encode_label(m, _affine(), OHIF_PARAMS)
    assert isinstance(enc, EncodedLabel)
    assert enc.format == ResultFormat(".nrrd", "uint8", False)
    assert enc.filename.endswith(".nrrd") and enc.media_type == "application/octet-stream"
    lines, data = _split(enc.body)
    assert lines[0] in ("NRRD0004", "NRRD0005")  # nrrd-js reads both (/^NRRD\d{4}$/)
    fields = dict(ln.split(": ", 1) for ln in lines[1:] if not ln.startswith("#"))
    assert fields["type"] == "uint8" and fields["encoding"] == "raw" and fields["sizes"] == "7 5 3"
    assert "endian" not in fields  # not needed for one byte; nrrd-js requires it only for wider types
    assert len(data) == m.size
    flat = np.frombuffer(data, np.uint8)
    np.testing.assert_array_equal(flat, viewer_order(m))
    # column (I) fastest, then row (J), then slice (K): index = i + I * (j + J * k)
    assert flat[6 + 7 * (0 + 5 * 2)] == 2 and flat.sum() == m.sum()


def test_nrrd_geometry_is_the_image_geometry_for_itk_and_pynrrd(tmp_path):
    import nrrd
    import SimpleITK as sitk

    m, a = _mask(), _affine()
    path = tmp_path / "label.nrrd"
    path.write_bytes(encode_label(m, a, OHIF_PARAMS).body)
    data, header = nrrd.read(str(path))
    np.testing.assert_array_equal(data, m)
    assert header["space"] == "left-posterior-superior"
    lps = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(np.asarray(header["space directions"]).T, lps @ a[:3, :3], atol=1e-12)
    np.testing.assert_allclose(header["space origin"], lps @ a[:3, 3], atol=1e-12)
    # ITK reads the NRRD exactly as it reads a NIfTI with the same affine (what MONAI Label / Slicer compare)
    nii = tmp_path / "label.nii.gz"
    nii.write_bytes(encode_label(m, a, {}).body)
    from_nrrd, from_nii = sitk.ReadImage(str(path)), sitk.ReadImage(str(nii))
    assert from_nrrd.GetSize() == from_nii.GetSize() == (7, 5, 3)
    np.testing.assert_allclose(from_nrrd.GetOrigin(), from_nii.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(from_nrrd.GetSpacing(), from_nii.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(from_nrrd.GetDirection(), from_nii.GetDirection(), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(from_nrrd), sitk.GetArrayFromImage(from_nii))


def test_compressed_and_wider_nrrd(tmp_path):
    import nrrd

    m = _mask().astype(np.int32) * 300
    enc = encode_label(m, _affine(), {"result_extension": "nrrd", "result_dtype": "uint16", "result_compress": "true"})
    lines, data = _split(enc.body)
    assert "encoding: gzip" in lines and "endian: little" in lines and "type: uint16" in lines
    np.testing.assert_array_equal(np.frombuffer(gzip.decompress(data), "<u2"), viewer_order(m))
    path = tmp_path / "l.nrrd"
    path.write_bytes(enc.body)
    np.testing.assert_array_equal(nrrd.read(str(path))[0], m)


def test_without_format_parameters_the_answer_is_nifti_gz_as_before(tmp_path):
    m, a = _mask(), _affine()
    enc = encode_label(m, a, {"foreground": [[1, 2, 1]]})
    assert enc.format == ResultFormat(".nii.gz", "uint8", False) and enc.filename == "label.nii.gz"
    assert enc.body[:2] == b"\x1f\x8b"
    path = tmp_path / enc.filename
    path.write_bytes(enc.body)
    img = nib.load(str(path))
    np.testing.assert_array_equal(np.asarray(img.dataobj), m)
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, a, atol=1e-5)
    plain = encode_label(m, a, {"result_extension": ".nii"})
    assert plain.body[344:348] == b"n+1\x00"  # single-file NIfTI-1, not gzipped


def test_booleans_and_float_masks_are_cast():
    m = _mask() > 0
    flat = np.frombuffer(_split(encode_label(m, _affine(), OHIF_PARAMS).body)[1], np.uint8)
    np.testing.assert_array_equal(flat, viewer_order(m.astype(np.uint8)))
    f = _mask().astype(np.float32)
    assert encode_label(f, _affine(), OHIF_PARAMS).body == encode_label(_mask(), _affine(), OHIF_PARAMS).body


@pytest.mark.parametrize("params, match", [
    ({"result_extension": ".png"}, "not supported"),
    ({"result_extension": 3}, "must be a string"),
    ({"result_dtype": "complex64"}, "not supported"),
    ({"result_compress": "maybe"}, "true or false"),
    ({"result_dtype": "uint8", "values": 300}, "do not fit"),
    ({"result_dtype": "uint8", "values": 0.5}, "not integers"),
])
def test_bad_requests_say_why(params, match):
    m = _mask().astype(np.float64)
    if "values" in params:
        m[0, 0, 0] = params.pop("values")
    with pytest.raises(ResultFormatError, match=match):
        encode_label(m, _affine(), params)


def test_bad_shapes_say_why():
    with pytest.raises(ResultFormatError, match="label map"):
        encode_label(np.zeros((4, 4), np.uint8), _affine(), OHIF_PARAMS)
    with pytest.raises(ResultFormatError, match="affine"):
        encode_label(_mask(), np.eye(3), OHIF_PARAMS)
    with pytest.raises(ResultFormatError, match="affine"):
        encode_label(_mask(), np.full((4, 4), np.nan), OHIF_PARAMS)
    with pytest.raises(ResultFormatError, match="label map"):
        nrrd_bytes(np.zeros((2, 2, 2, 2), np.uint8), _affine())
