"""Task sets from the shared real-image collection: splits, exclusions, boxes."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SHARED_DATA
from medsamix.demo.shared_data import dcmqi_ct, hippocampus, sammed2d, totalseg
from medsamix.data.slices import tight_box

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


def test_totalseg_full_ct_split_into_spread_slabs_with_guard_gaps():
    ts = totalseg(SHARED_DATA, "CT", seed=0, full=True)
    assert ts.name == "totalseg_ct_full"
    cal = sorted({s.index for s in ts.calibration})
    test = sorted({s.index for s in ts.test})
    assert not set(cal) & set(test)
    assert all(abs(i - j) >= 2 for i in cal for j in test)  # a guard slice between calibration and test
    runs = [[cal[0]]]
    for i in cal[1:]:
        runs[-1].append(i) if i == runs[-1][-1] + 1 else runs.append([i])
    assert len(runs) == 4 and all(5 <= len(r) <= 6 for r in runs)  # 22 slices (20% of 112) in 4 slabs
    assert max(r[0] for r in runs) - min(r[0] for r in runs) >= 112 // 2  # spread over the volume
    names = {t.name for t in ts.tasks}
    assert {"liver", "colon", "autochthon_left"} <= names and len(ts.tasks) == 8
    for t in ts.tasks:  # every task reaches calibration and test
        assert sum(s.task.name == t.name for s in ts.calibration) >= 3
        assert sum(s.task.name == t.name for s in ts.test) >= 10
    assert "slabs of slices" in ts.split and "guard" in ts.split
    check_samples(ts.calibration + ts.test)
    with pytest.raises(ValueError, match="only the CT"):
        totalseg(SHARED_DATA, "MR", full=True)


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
