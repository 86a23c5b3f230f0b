"""Task sets from the shared real-image collection: splits, exclusions, boxes."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SHARED_DATA
from medsamix.shared_data import dcmqi_ct, hippocampus, sammed2d, totalseg
from medsamix.slices import tight_box

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} (shared real-image data) is absent")


def check_samples(samples):
    for s in samples:
        assert s.image.shape == s.mask.shape and s.mask.any()
        assert s.image.dtype == np.float32 and 0 <= s.image.min() and s.image.max() <= 255 + 1e-3
        np.testing.assert_array_equal(s.box, tight_box(s.mask))


def test_hippocampus_patient_split_excludes_training_patients():
    excluded = ["hippocampus_001", "hippocampus_003"]
    ts = hippocampus(SHARED_DATA, exclude=excluded, seed=0, max_patients=20)
    cal = {s.study_id for s in ts.calibration}
    test = {s.study_id for s in ts.test}
    assert not cal & test
    assert len(cal) == 4 and len(test) == 16  # 20% of 20 patients
    assert not (cal | test) & set(excluded)
    assert {s.task.name for s in ts.test} == {"hippocampus_anterior", "hippocampus_posterior"}
    check_samples(ts.calibration + ts.test)
    again = hippocampus(SHARED_DATA, exclude=excluded, seed=0, max_patients=20)
    assert {s.study_id for s in again.calibration} == cal
    other = hippocampus(SHARED_DATA, exclude=excluded, seed=1, max_patients=20)
    assert {s.study_id for s in other.calibration} != cal


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_totalseg_slab_split(modality):
    ts = totalseg(SHARED_DATA, modality, seed=0)
    cal = sorted({s.index for s in ts.calibration})
    test = sorted({s.index for s in ts.test})
    assert not set(cal) & set(test)
    assert cal == list(range(cal[0], cal[-1] + 1))  # one contiguous slab
    assert "liver" in {t.name for t in ts.tasks} and len(ts.tasks) == 8
    assert "slab" in ts.split
    check_samples(ts.calibration + ts.test)


def test_dcmqi_labels_sit_on_the_right_tissue():
    ts = dcmqi_ct(SHARED_DATA)
    samples = ts.calibration + ts.test
    assert {s.task.name for s in samples} == {"liver", "spine", "heart"}
    check_samples(samples)
    # after the CT window 40/400, bone (spine) is brighter than liver
    spine = np.mean([s.image[s.mask].mean() for s in samples if s.task.name == "spine"])
    liver = np.mean([s.image[s.mask].mean() for s in samples if s.task.name == "liver"])
    assert spine > liver > 60


def test_sammed2d_split_by_image():
    ts = sammed2d(SHARED_DATA)
    assert not {s.study_id for s in ts.calibration} & {s.study_id for s in ts.test}
    assert len({s.study_id for s in ts.calibration + ts.test}) == 4  # amos_0507_31 has no masks
    assert "liver" in {t.name for t in ts.tasks}
    check_samples(ts.calibration + ts.test)
