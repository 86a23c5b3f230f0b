"""Studies folder loading, tasks and splits, and 2D slices with box prompts.

Synthetic datastores are written to tmp_path with nibabel (NIfTI) and pynrrd (NRRD). The real-data tests use
../shared/data (a 3-slice CT DICOM series with NRRD and DICOM-SEG labels, and the hippocampus MRI set) and skip when it
is absent.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
from conftest import SHARED_DATA

from medsamix.errors import StudyError
from medsamix.data.slices import extract_slices, jitter_box, jitter_pixels, tight_box
from medsamix.data.studies import Study, find_studies, load_studies, load_study
from medsamix.data.tasks import (LABELS_FILE, Task, contiguous_runs, datastore_label_names, label_names,
                                 read_label_names, split_patients, split_slabs, tasks_from_labels)
from medsamix.errors import MergeRunError

CT3 = SHARED_DATA / "dcmqi_ct3slice"
HIPPO = SHARED_DATA / "hippocampus"

# ITK's SWIG bindings warn on import under Python 3.11+; unrelated to this code
pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS world flip

SHAPE = (8, 9, 10)
AFFINE = np.array([[0.0, -1.5, 0.0, 10.0], [1.5, 0.0, 0.0, -20.0], [0.0, 0.0, 2.0, 30.0], [0.0, 0.0, 0.0, 1.0]])


# --------------------------------------------------------------------------------------------------------------------
# synthetic datastore


def _ct_image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.normal(40.0, 20.0, SHAPE).astype(np.float32)
    img[:, :2] = -1000.0  # air
    img[:2, 5:, 5:] = 700.0  # bone
    return img


def _mr_image() -> np.ndarray:
    return np.random.default_rng(1).uniform(0.0, 800.0, SHAPE).astype(np.float32)


def _label() -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[2:5, 3:6, 4:7] = 1
    lab[5:7, 1:3, 2:4] = 2
    return lab


def _nii(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    nib.save(nib.Nifti1Image(array, affine), path)


def _nrrd(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    """Write an NRRD in LPS space (as Slicer does) that describes the same geometry as the RAS ``affine``."""
    lps = LPS @ affine
    header = {"space": "left-posterior-superior", "space directions": lps[:3, :3].T, "space origin": lps[:3, 3]}
    nrrd.write(str(path), array, header)


GOOD = ["cross", "ct", "float_whole", "mr_nrrd", "voxflip"]
BAD = {  # image name -> expected part of the skip reason
    "affine.nii.gz": "label affine differs from image affine",
    "corrupt.nii.gz": "cannot read image",
    "garbled.nrrd": "cannot read image",
    "empty.nii.gz": "empty label (all zero)",
    "fourd.nii.gz": "expected a 3D image, got shape (8, 9, 10, 2)",
    "nolabel.nii.gz": "no label in labels/final",
    "nonint.nii.gz": "non-integer label",
    "rasflip.nii.gz": "LPS<->RAS flip",
    "shape.nii.gz": "label shape (8, 9, 9) differs from image shape (8, 9, 10)",
    "twod.nii.gz": "expected a 3D image, got shape (8, 9)",
}


@pytest.fixture
def datastore(tmp_path: Path) -> Path:
    """A MONAI Label style folder with good studies in both formats and one study per kind of bad input."""
    labels = tmp_path / "labels" / "final"
    labels.mkdir(parents=True)
    ct, mr, lab = _ct_image(), _mr_image(), _label()

    _nii(tmp_path / "ct.nii.gz", ct)
    _nii(labels / "ct.nii.gz", lab)
    _nrrd(tmp_path / "mr_nrrd.nrrd", mr)
    _nrrd(labels / "mr_nrrd.nrrd", lab)
    _nii(tmp_path / "cross.nii", ct)  # NIfTI image (RAS) with an NRRD label (LPS): same grid
    _nrrd(labels / "cross.nrrd", lab)
    _nii(tmp_path / "float_whole.nii.gz", mr)
    _nii(labels / "float_whole.nii.gz", lab.astype(np.float32))

    for name in ["nolabel", "empty", "shape", "affine", "rasflip", "voxflip", "nonint", "fourd", "twod", "corrupt"]:
        _nii(tmp_path / f"{name}.nii.gz", ct)
        _nii(labels / f"{name}.nii.gz", lab)
    (labels / "nolabel.nii.gz").unlink()
    _nii(labels / "empty.nii.gz", np.zeros(SHAPE, np.uint8))
    _nii(labels / "shape.nii.gz", lab[..., :-1])
    shifted = AFFINE.copy()
    shifted[:3, 3] += 5.0
    _nii(labels / "affine.nii.gz", lab, shifted)
    _nii(labels / "rasflip.nii.gz", lab, LPS @ AFFINE)
    flip = np.diag([-1.0, 1.0, -1.0, 1.0])  # the same grid with I and K stored backwards: flipped back on loading
    flip[[0, 2], 3] = [SHAPE[0] - 1, SHAPE[2] - 1]
    _nii(labels / "voxflip.nii.gz", lab[::-1, :, ::-1].copy(), AFFINE @ flip)
    nonint = lab.astype(np.float32)
    nonint[3, 4, 5] = 0.5
    _nii(labels / "nonint.nii.gz", nonint)
    _nii(tmp_path / "fourd.nii.gz", np.stack([ct, ct], axis=-1))
    _nii(tmp_path / "twod.nii.gz", ct[..., 0])
    (tmp_path / "corrupt.nii.gz").write_bytes(b"not a nifti file" * 8)
    (tmp_path / "garbled.nrrd").write_bytes(b"NRRD0004\ntype: float\n")
    _nrrd(labels / "garbled.nrrd", lab)
    _nii(labels / "corrupt.nii.gz", lab)

    (tmp_path / ".datastore_v2.json").write_text("{}")  # MONAI Label bookkeeping: ignored
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "not_dicom").mkdir()  # a folder without DICOM files is not a study
    (tmp_path / "not_dicom" / "file").write_bytes(b"x" * 200)
    return tmp_path


def test_find_studies_pairs_images_with_labels(datastore: Path) -> None:
    pairs = find_studies(datastore)
    names = {image.name: (label.name if label else None) for image, label in pairs}
    assert set(names) == {"ct.nii.gz", "mr_nrrd.nrrd", "cross.nii", "float_whole.nii.gz", "voxflip.nii.gz"} | set(BAD)
    assert names["cross.nii"] == "cross.nrrd"
    assert names["nolabel.nii.gz"] is None
    ids = [image.name.split(".")[0] for image, _ in pairs]
    assert ids == sorted(ids)


def test_load_studies_loads_good_and_skips_bad(datastore: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="medsamix.data.studies"):
        studies, skipped = load_studies(datastore)
    assert [s.study_id for s in studies] == GOOD
    reasons = {s.path.name: s.reason for s in skipped}
    assert set(reasons) == set(BAD)
    for name, expected in BAD.items():
        assert expected in reasons[name], (name, reasons[name])
        assert name in reasons[name]  # the message names the file
        assert len(reasons[name]) < 300  # one clear line, not a wall of tracebacks
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == len(BAD)
    assert any("voxflip" in r.getMessage() and "(0, 2)" in r.getMessage() for r in caplog.records)


def test_loaded_arrays_affines_and_modality(datastore: Path) -> None:
    studies = {s.study_id: s for s in load_studies(datastore)[0]}
    for study in studies.values():
        assert study.image.dtype == np.float32 and study.image.shape == SHAPE
        assert study.label.dtype == np.int16 and study.label.shape == SHAPE
        np.testing.assert_array_equal(study.label, _label())
        np.testing.assert_allclose(study.affine, AFFINE, atol=1e-5)  # NRRD's LPS header comes back as RAS
    np.testing.assert_array_equal(studies["ct"].image, _ct_image())
    np.testing.assert_array_equal(studies["mr_nrrd"].image, _mr_image())  # NRRD keeps IJK order
    assert studies["ct"].modality == "CT"
    assert studies["mr_nrrd"].modality == "MR"
    assert studies["cross"].label_path.name == "cross.nrrd"


def test_load_study_errors_and_modality_argument(datastore: Path) -> None:
    labels = datastore / "labels" / "final"
    assert load_study(datastore / "ct.nii.gz", labels / "ct.nii.gz", modality="MR").modality == "MR"
    assert load_studies(datastore, modality="other")[0][0].modality == "other"
    with pytest.raises(StudyError, match="nonint.nii.gz: non-integer label"):
        load_study(datastore / "nonint.nii.gz", labels / "nonint.nii.gz")
    with pytest.raises(StudyError, match="no label"):
        load_study(datastore / "nolabel.nii.gz", None)
    with pytest.raises(StudyError, match="modality must be one of"):
        load_study(datastore / "ct.nii.gz", labels / "ct.nii.gz", modality="PET")


def test_missing_folder_and_duplicate_ids(tmp_path: Path) -> None:
    with pytest.raises(StudyError, match="does not exist"):
        load_studies(tmp_path / "nowhere")
    (tmp_path / "labels" / "final").mkdir(parents=True)
    _nii(tmp_path / "a.nii.gz", _ct_image())
    _nrrd(tmp_path / "a.nrrd", _ct_image())
    _nii(tmp_path / "labels" / "final" / "a.nii.gz", _label())
    studies, skipped = load_studies(tmp_path)
    assert studies == [] and len(skipped) == 2
    assert all("shared by a.nii.gz, a.nrrd" in s.reason for s in skipped)


# --------------------------------------------------------------------------------------------------------------------
# real data: a CT DICOM series with an NRRD label, and the hippocampus MRI set


@pytest.fixture(scope="module")
def ct3_study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    if not (CT3 / "ct-3slice").is_dir():
        pytest.skip(f"shared data absent: {CT3}")
    root = tmp_path_factory.mktemp("ct3")
    (root / "labels" / "final").mkdir(parents=True)
    (root / "ct-3slice").symlink_to(CT3 / "ct-3slice")
    shutil.copy(CT3 / "liver_seg.nrrd", root / "labels" / "final" / "ct-3slice.nrrd")
    studies, skipped = load_studies(root)
    assert skipped == [] and len(studies) == 1
    return studies[0]


@pytest.mark.data
def test_dicom_series_with_nrrd_label(ct3_study: Study) -> None:
    study = ct3_study
    assert study.study_id == "ct-3slice" and study.modality == "CT"  # from the DICOM Modality tag
    assert study.image.shape == study.label.shape == (512, 512, 3)
    assert set(np.unique(study.label).tolist()) == {0, 1}
    # the DICOM (ITK) and NRRD (pynrrd) affines agree exactly after MONAI's LPS->RAS conversion: no flip to undo
    assert np.allclose(study.affine[:3, :3], np.diag([-0.810547, -0.810547, 1.0]), atol=1e-5)
    # liver voxels hold soft-tissue HU; a mask flipped along I or J would land on fat/air instead
    for k in range(3):
        assert 0 < study.image[..., k][study.label[..., k] > 0].mean() < 100


@pytest.mark.data
def test_dicom_voxels_match_pydicom_and_seg(ct3_study: Study) -> None:
    """Each IJK slice k is the DICOM file at the world position the affine gives, transposed (I = column), and the
    label matches the DICOM SEG frame at that position: the loader's geometry is right voxel for voxel."""
    import pydicom

    study = ct3_study
    files = {}
    for path in sorted((CT3 / "ct-3slice").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        files[round(float(ds.ImagePositionPatient[2]), 2)] = (path.name, ds)
    seg = pydicom.dcmread(CT3 / "liver.dcm")
    seg_frames = {
        round(float(fg.PlanePositionSequence[0].ImagePositionPatient[2]), 2): seg.pixel_array[f]
        for f, fg in enumerate(seg.PerFrameFunctionalGroupsSequence)
    }
    order = []
    for k in range(3):
        corner_lps = (LPS @ study.affine @ [0, 0, k, 1])[:3]
        name, ds = files[round(float(corner_lps[2]), 2)]
        order.append(name)
        np.testing.assert_allclose(corner_lps, np.array(ds.ImagePositionPatient, float), atol=1e-3)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(study.image[..., k], hu.T)
        np.testing.assert_array_equal(study.label[..., k] > 0, seg_frames[round(float(corner_lps[2]), 2)].T > 0)
    assert order == ["03.dcm", "02.dcm", "01.dcm"]  # ITK sorts by position (ascending z), not by file name


@pytest.mark.data
def test_dicom_modality_tag_wins_over_argument(ct3_study: Study) -> None:
    assert load_study(ct3_study.image_path, ct3_study.label_path, modality="MR").modality == "CT"


@pytest.mark.data
def test_dicom_series_with_j_reversed_nifti_label(tmp_path: Path) -> None:
    """TotalSegmentator's prediction for its JPEG 2000 DICOM example is a NIfTI whose J axis runs opposite to the
    series' (its affine says so): the loader flips it onto the DICOM grid instead of rejecting or misplacing it."""
    totalseg = SHARED_DATA / "totalseg"
    if not (totalseg / "example_ct_dicom").is_dir():
        pytest.skip(f"shared data absent: {totalseg}")
    (tmp_path / "labels" / "final").mkdir(parents=True)
    (tmp_path / "series").symlink_to(totalseg / "example_ct_dicom")  # files named by UID, no .dcm suffix
    (tmp_path / "labels" / "final" / "series.nii.gz").symlink_to(totalseg / "example_seg_dicom.nii.gz")
    studies, skipped = load_studies(tmp_path)
    assert skipped == [] and len(studies) == 1
    study = studies[0]
    stored = np.asarray(nib.load(totalseg / "example_seg_dicom.nii.gz").dataobj)
    assert study.image.shape == study.label.shape == (512, 512, 20) and study.modality == "CT"
    np.testing.assert_array_equal(study.label, stored[:, ::-1, :])
    liver = study.image[study.label == 5]  # 5 = liver in TotalSegmentator's "total" task
    assert liver.size > 1000 and 20 < np.median(liver) < 150  # soft tissue: the mask sits on the liver


@pytest.fixture(scope="module")
def hippo_studies(tmp_path_factory: pytest.TempPathFactory) -> list[Study]:
    if not (HIPPO / "images").is_dir():
        pytest.skip(f"shared data absent: {HIPPO}")
    root = tmp_path_factory.mktemp("hippo")
    (root / "labels" / "final").mkdir(parents=True)
    for image in sorted((HIPPO / "images").glob("*.nii.gz"))[:5]:
        (root / image.name).symlink_to(image)
        (root / "labels" / "final" / image.name).symlink_to(HIPPO / "labels" / image.name)
    studies, skipped = load_studies(root)
    assert skipped == []
    return studies


@pytest.mark.data
def test_hippocampus_studies(hippo_studies: list[Study]) -> None:
    assert [s.study_id for s in hippo_studies] == [f"hippocampus_{i:03d}" for i in (1, 3, 4, 6, 8)]
    values: set[int] = set()
    for study in hippo_studies:
        assert study.image.ndim == 3 and study.image.shape == study.label.shape
        assert all(30 <= n <= 55 for n in study.image.shape)
        assert study.modality == "MR"
        np.testing.assert_allclose(study.affine, nib.load(study.image_path).affine, atol=1e-5)
        values |= set(np.unique(study.label).tolist())
    assert values == {0, 1, 2}
    names = {1: "anterior", 2: "posterior"}
    assert tasks_from_labels(hippo_studies, names) == [Task("anterior", 1), Task("posterior", 2)]
    for sample in extract_slices(hippo_studies[0], Task("anterior", 1), axis=0, jitter=3.0):
        assert sample.mask.any() and (sample.box[:2] <= tight_box(sample.mask)[:2]).all()


# --------------------------------------------------------------------------------------------------------------------
# tasks and splits


def _study(label: np.ndarray, study_id: str = "s", image: np.ndarray | None = None) -> Study:
    image = np.arange(label.size, dtype=np.float32).reshape(label.shape) if image is None else image
    return Study(study_id, image, label.astype(np.int16), np.eye(4), "other", Path(study_id), Path(study_id))


def test_label_names_one_parser_for_the_app_its_train_task_and_the_cli(tmp_path, caplog) -> None:
    # the app's ``labels`` setting: comma-separated (values 1, 2, ...) or JSON, both forms of a mapping
    assert datastore_label_names("liver, spleen", tmp_path) == {1: "liver", 2: "spleen"}
    assert datastore_label_names('{"liver": 1, "kidney": 3}', tmp_path) == {1: "liver", 3: "kidney"}
    assert datastore_label_names('{"2": "spleen"}', tmp_path) == {2: "spleen"}
    with pytest.raises(MergeRunError, match=r"labels: not valid JSON"):
        datastore_label_names('{"liver": 1', tmp_path)  # not split at its comma into two odd names
    with pytest.raises(MergeRunError, match=r"labels: expected \{name: value\}"):
        label_names('"liver"')
    # no setting: the datastore's label-names file, else value 1 is "foreground"
    assert datastore_label_names(None, tmp_path) == {1: "foreground"}
    (tmp_path / LABELS_FILE).write_text('{"anterior": 1, "posterior": 2}')
    assert datastore_label_names("", tmp_path) == {1: "anterior", 2: "posterior"}
    assert datastore_label_names("liver", tmp_path) == {1: "liver"}  # the setting wins
    (tmp_path / LABELS_FILE).write_text("{cut")
    with caplog.at_level(logging.WARNING):
        assert datastore_label_names(None, tmp_path) == {1: "foreground"}
    assert f"{tmp_path / LABELS_FILE}: not valid JSON" in caplog.text
    with pytest.raises(MergeRunError, match="nope.json: cannot read label names"):
        read_label_names(tmp_path / "nope.json")


def test_tasks_from_labels() -> None:
    a = np.zeros((4, 4, 4), np.int16)
    a[0, 0, :3] = 1
    a[1, 1, :2] = 3
    b = np.zeros((4, 4, 4), np.int16)
    b[2, 2, :] = 3
    b[3, 3, :2] = 5
    studies = [_study(a, "a"), _study(b, "b")]
    assert tasks_from_labels(studies) == [Task("label_1", 1), Task("label_3", 3), Task("label_5", 5)]
    assert tasks_from_labels(studies, {3: "liver"}, min_voxels=3) == [Task("label_1", 1), Task("liver", 3)]
    assert tasks_from_labels([]) == []


@pytest.mark.parametrize("n", range(2, 31))
def test_split_patients_properties(n: int) -> None:
    ids = [f"p{i:02d}" for i in range(n)]
    cal, test = split_patients(ids)
    assert len(cal) == max(1, int(np.floor(0.2 * n + 0.5)))
    assert test and not set(cal) & set(test) and sorted(cal + test) == ids
    shuffled = ids[:]
    random.Random(n).shuffle(shuffled)
    assert split_patients(shuffled) == (cal, test)  # independent of the input order
    assert split_patients(ids, seed=0) == (cal, test)


def test_split_patients_seed_fraction_and_edges() -> None:
    ids = [f"p{i}" for i in range(20)]
    assert len(split_patients(ids, 0.5)[0]) == 10
    assert len({tuple(split_patients(ids, seed=s)[0]) for s in range(10)}) > 5
    assert split_patients(["only"]) == (["only"], [])
    assert split_patients([]) == ([], [])
    assert all(len(part) == 1 for part in split_patients(["a", "b"], 0.9))
    with pytest.raises(ValueError, match="duplicate"):
        split_patients(["a", "b", "a"])
    with pytest.raises(ValueError, match="calibration_fraction"):
        split_patients(ids, 1.0)


def test_split_slabs() -> None:
    starts = set()
    for seed in range(30):
        cal, test = split_slabs(50, 0.2, seed)
        assert len(cal) == 10 and cal == list(range(cal[0], cal[0] + 10))  # one contiguous slab
        assert sorted(cal + test) == list(range(50)) and not set(cal) & set(test)
        assert split_slabs(50, 0.2, seed) == (cal, test)
        starts.add(cal[0])
    assert len(starts) > 10 and min(starts) >= 0 and max(starts) <= 40
    assert split_slabs(1) == ([0], [])
    cal, test = split_slabs(2, 0.2, 3)
    assert len(cal) == 1 and len(test) == 1
    with pytest.raises(ValueError):
        split_slabs(0)


def test_split_slabs_several_slabs_with_a_guard_gap() -> None:
    offsets = set()
    for seed in range(20):
        cal, test = split_slabs(112, 0.2, seed, slabs=4, gap=1)
        runs = contiguous_runs(cal)
        assert len(cal) == 22 and [len(r) for r in runs] == [6, 6, 5, 5]
        assert all(r[0] - i * 28 == runs[0][0] for i, r in enumerate(runs))  # one per 28-slice segment, same offset
        offsets.add(runs[0][0])
        assert not set(cal) & set(test)
        for i in cal:  # the slices next to a slab are in neither set; every other slice is a test slice
            assert i - 1 not in test and i + 1 not in test
        dropped = set(range(112)) - set(cal) - set(test)
        assert all(min(abs(d - c) for c in cal) == 1 for d in dropped)
        assert split_slabs(112, 0.2, seed, slabs=4, gap=1) == (cal, test)
    assert len(offsets) > 5
    cal, test = split_slabs(20, 0.2, 0, slabs=1, gap=1)  # one slab: at most two slices dropped
    assert len(cal) == 4 and len(test) in (14, 15)
    with pytest.raises(ValueError, match="slabs"):
        split_slabs(20, 0.2, 0, slabs=5)  # 4 calibration slices cannot make 5 slabs
    with pytest.raises(ValueError, match="gap"):
        split_slabs(20, 0.2, 0, gap=-1)


# --------------------------------------------------------------------------------------------------------------------
# boxes and slices


def test_tight_box_hand_made_masks() -> None:
    mask = np.zeros((7, 11), bool)  # H != W catches x/y swaps
    mask[3, 5] = True
    np.testing.assert_array_equal(tight_box(mask), [5, 3, 5, 3])
    mask[2:5, 1:7] = True  # rows 2..4, columns 1..6
    box = tight_box(mask)
    assert box.dtype == np.float32 and box.shape == (4,)
    np.testing.assert_array_equal(box, [1, 2, 6, 4])
    border = np.zeros((7, 11), bool)
    border[0, 4] = border[6, 10] = True  # top row and bottom-right corner
    np.testing.assert_array_equal(tight_box(border), [4, 0, 10, 6])
    np.testing.assert_array_equal(tight_box(np.ones((7, 11), bool)), [0, 0, 10, 6])
    with pytest.raises(ValueError, match="empty"):
        tight_box(np.zeros((7, 11), bool))
    with pytest.raises(ValueError, match="2D"):
        tight_box(np.ones((2, 2, 2), bool))


def test_jitter_box_bounds_and_determinism() -> None:
    box = np.array([2, 3, 6, 5], np.float32)
    h, w = 9, 12
    shifts = []
    for seed in range(300):
        out = jitter_box(box, (h, w), 4.0, np.random.default_rng(seed))
        assert out.dtype == np.float32
        assert 0 <= out[0] <= box[0] and 0 <= out[1] <= box[1]
        assert box[2] <= out[2] <= w - 1 and box[3] <= out[3] <= h - 1
        np.testing.assert_array_equal(out, jitter_box(box, (h, w), 4.0, np.random.default_rng(seed)))
        shifts.append(int(out[2] - box[2]))
    assert set(shifts) == {0, 1, 2, 3, 4}  # x_max has room up to 11, so every shift in [0, 4] occurs
    np.testing.assert_array_equal(jitter_box(box, (h, w), 0.0, np.random.default_rng(0)), box)
    np.testing.assert_array_equal(jitter_box(box, (h, w), 100.0, np.random.default_rng(0)), [0, 0, w - 1, h - 1])
    with pytest.raises(ValueError):
        jitter_box(box, (h, w), -1.0, np.random.default_rng(0))


def test_jitter_pixels() -> None:
    assert jitter_pixels((1024, 1024)) == 20.0
    assert jitter_pixels((256, 128)) == 5.0
    assert jitter_pixels((35, 51), 10.0) == pytest.approx(10.0 * 51 / 1024)


def _volume_study(study_id: str = "vol") -> Study:
    label = np.zeros((6, 7, 8), np.int16)
    label[1:4, 2:6, 3:7] = 1  # I 1..3, J 2..5, K 3..6
    label[5, 0, 0] = 1  # a single voxel: slice K=0 has 1 pixel, I=5 has 1 pixel, J=0 has 1 pixel
    label[0, 6, 7] = 2
    image = np.random.default_rng(0).normal(size=label.shape).astype(np.float32)
    return _study(label, study_id, image)


@pytest.mark.parametrize(
    "axis, indices, single, hw, box_at_first_big",
    [
        (2, [0, 3, 4, 5, 6], 0, (6, 7), [2, 1, 5, 3]),  # rows = I, columns = J
        (1, [0, 2, 3, 4, 5], 0, (6, 8), [3, 1, 6, 3]),  # rows = I, columns = K
        (0, [1, 2, 3, 5], 5, (7, 8), [3, 2, 6, 5]),  # rows = J, columns = K
    ],
)
def test_extract_slices_axes(
    axis: int, indices: list[int], single: int, hw: tuple[int, int], box_at_first_big: list[int]
) -> None:
    study = _volume_study()
    task = Task("organ", 1)
    samples = extract_slices(study, task, axis=axis)
    assert [s.index for s in samples] == indices
    for s in samples:
        assert (s.study_id, s.task, s.axis) == ("vol", task, axis)
        assert s.image.shape == s.mask.shape == hw and s.image.dtype == np.float32 and s.mask.dtype == bool
        np.testing.assert_array_equal(s.image, study.image.take(s.index, axis))
        np.testing.assert_array_equal(s.mask, study.label.take(s.index, axis) == 1)
        np.testing.assert_array_equal(s.box, tight_box(s.mask))
    big = [s for s in samples if s.mask.sum() > 1][0]
    np.testing.assert_array_equal(big.box, box_at_first_big)
    kept = extract_slices(study, task, axis=axis, min_pixels=2)
    assert [s.index for s in kept] == [i for i in indices if i != single]
    assert extract_slices(study, Task("absent", 9), axis=axis) == []
    assert len(extract_slices(study, Task("dot", 2), axis=axis, min_pixels=0)) == 1  # never an empty mask


def test_extract_slices_jitter_is_seeded_per_slice() -> None:
    study = _volume_study()
    organ, dot = Task("organ", 1), Task("dot", 2)
    first = extract_slices(study, organ, jitter=3.0, seed=7)
    extract_slices(study, dot, jitter=3.0, seed=7)  # other calls in between do not change the result
    again = extract_slices(study, organ, jitter=3.0, seed=7)
    assert [s.box.tolist() for s in first] == [s.box.tolist() for s in again]
    other_seed = extract_slices(study, organ, jitter=3.0, seed=8)
    assert [s.box.tolist() for s in first] != [s.box.tolist() for s in other_seed]
    renamed = extract_slices(_volume_study("other_id"), organ, jitter=3.0, seed=7)
    assert [s.box.tolist() for s in first] != [s.box.tolist() for s in renamed]
    for s in first:
        tight = tight_box(s.mask)
        h, w = s.mask.shape
        assert (s.box[:2] <= tight[:2]).all() and (s.box[2:] >= tight[2:]).all()
        assert (s.box >= 0).all() and s.box[2] <= w - 1 and s.box[3] <= h - 1
        assert (np.abs(s.box - tight) <= 3).all()
