"""Labels that cover only a block of the image grid (a DICOM SEG read back with only its stored frames).

``load_study(..., sub_blocks=True)`` zero-pads such a label onto the image grid, exactly (no resampling); without the
flag, or when the label's voxels are not image voxels, the old errors stay.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsamix.errors import StudyError
from medsamix.data.studies import load_study, sub_block

SHAPE = (8, 9, 10)
AFFINE = np.array([[0.0, -1.5, 0.0, 10.0], [1.5, 0.0, 0.0, -20.0], [0.0, 0.0, 2.0, 30.0], [0.0, 0.0, 0.0, 1.0]])


def _shifted(affine: np.ndarray, start: tuple[int, int, int]) -> np.ndarray:
    """Affine of the block whose first voxel is image voxel ``start``."""
    out = affine.copy()
    out[:3, 3] = affine[:3, :3] @ np.array(start, float) + affine[:3, 3]
    return out


def _write(tmp_path: Path, label: np.ndarray, label_affine: np.ndarray, stem: str = "img") -> tuple[Path, Path]:
    image = np.random.default_rng(0).uniform(0, 500, SHAPE).astype(np.float32)
    nib.save(nib.Nifti1Image(image, AFFINE), str(tmp_path / f"{stem}.nii.gz"))
    nib.save(nib.Nifti1Image(label, label_affine), str(tmp_path / f"{stem}_label.nii.gz"))
    return tmp_path / f"{stem}.nii.gz", tmp_path / f"{stem}_label.nii.gz"


def test_block_in_the_middle_is_padded_onto_the_image_grid(tmp_path):
    full = np.zeros(SHAPE, np.uint8)
    full[2:5, 3:7, 4] = 1
    full[3, 4, 6] = 2
    block = full[1:6, 2:8, 4:7]  # what a SEG holding slices 4..6 (and a cropped in-plane extent) gives back
    img, lab = _write(tmp_path, block, _shifted(AFFINE, (1, 2, 4)))
    assert sub_block(AFFINE, SHAPE, _shifted(AFFINE, (1, 2, 4)), block.shape) == ((1, 2, 4), ())
    study = load_study(img, lab, "MR", sub_blocks=True)
    np.testing.assert_array_equal(study.label, full)
    with pytest.raises(StudyError, match="label shape"):
        load_study(img, lab, "MR")  # not asked for: the old error


def test_single_slice_block_whatever_its_slice_axis_says(tmp_path):
    """A one-frame SEG: its slice axis has no spacing of its own (here: 1 mm instead of 2, reversed)."""
    full = np.zeros(SHAPE, np.uint8)
    full[2:6, 1:4, 7] = 1
    aff = _shifted(AFFINE, (0, 0, 7))
    aff[:3, 2] = -0.5 * AFFINE[:3, 2]
    img, lab = _write(tmp_path, full[:, :, 7:8], aff)
    np.testing.assert_array_equal(load_study(img, lab, "MR", sub_blocks=True).label, full)


def test_reversed_axis_block(tmp_path):
    full = np.zeros(SHAPE, np.uint8)
    full[1:3, 2:5, 3:6] = 1
    full[1, 2, 3] = 2
    block = full[:, :, 3:6][:, :, ::-1]  # stored with K running backwards, first voxel at image K = 5
    aff = _shifted(AFFINE, (0, 0, 5))
    aff[:3, 2] = -AFFINE[:3, 2]
    img, lab = _write(tmp_path, block, aff)
    assert sub_block(AFFINE, SHAPE, aff, block.shape) == ((0, 0, 3), (2,))
    np.testing.assert_array_equal(load_study(img, lab, "MR", sub_blocks=True).label, full)


@pytest.mark.parametrize("case", ["half voxel", "other spacing", "sticks out", "rotated"])
def test_labels_off_the_image_grid_are_still_refused(tmp_path, case):
    block = np.zeros((4, 4, 3), np.uint8)
    block[1, 1, 1] = 1
    aff = _shifted(AFFINE, (1, 1, 2))
    if case == "half voxel":
        aff[:3, 3] += 0.5 * AFFINE[:3, 0]
    elif case == "other spacing":
        aff[:3, 0] *= 1.5
    elif case == "sticks out":
        aff = _shifted(AFFINE, (6, 1, 2))
    else:
        aff[:3, [0, 1]] = aff[:3, [1, 0]]
    assert sub_block(AFFINE, SHAPE, aff, block.shape) is None
    img, lab = _write(tmp_path, block, aff)
    with pytest.raises(StudyError, match="label shape"):
        load_study(img, lab, "MR", sub_blocks=True)


def test_task_set_from_pairs_passes_sub_blocks_through(tmp_path):
    """The merge train task's loader: SEG-style block labels are used with ``sub_blocks=True`` and skipped (with the
    shape reason) without it."""
    from medsamix.data.tasksets import task_set_from_pairs
    from medsamix.errors import MergeRunError

    pairs = []
    for n in range(2):
        block = np.zeros((6, 7, 4), np.uint8)
        block[1:5, 2:6, :] = 1
        pairs.append(_write(tmp_path, block, _shifted(AFFINE, (1, 1, 3)), f"study{n}"))
    ts, skipped = task_set_from_pairs("seg", pairs, {1: "organ"}, sub_blocks=True)
    assert not skipped and [t.name for t in ts.tasks] == ["organ"]
    assert len(ts.calibration) + len(ts.test) == 2 * 4  # every labelled slice of both studies, on the image grid
    with pytest.raises(MergeRunError, match="label shape"):
        task_set_from_pairs("seg", pairs, {1: "organ"})
