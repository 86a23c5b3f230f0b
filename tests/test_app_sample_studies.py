"""scripts/make_sample_studies.py: the demo datastore (phantoms, or hippocampus test-split studies only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA
from medsamix.models.pool import PoolManifest
from medsamix.data.studies import load_studies
from medsamix.data.tasks import split_patients

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_sample_studies.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_phantoms_are_a_loadable_datastore_in_both_orientations(tmp_path):
    out = tmp_path / "studies"
    r = _run("--out", str(out), "--phantoms", "--count", "2")
    assert r.returncode == 0, r.stderr
    studies, skipped = load_studies(out)
    assert not skipped and [s.study_id for s in studies] == ["phantom_000", "phantom_001"]
    for s in studies:
        assert set(np.unique(s.label)) == {0, 1, 2} and s.image.ndim == 3
        assert (s.label == 1).sum() > 500 and (s.label == 2).sum() > 500
    assert np.sign(np.diag(studies[0].affine)[:2]).tolist() == [1, 1]
    assert np.sign(np.diag(studies[1].affine)[:2]).tolist() == [-1, -1]  # LPS-style
    assert json.loads((out / ".medsamix-labels.json").read_text()) == {"ellipsoid": 1, "blob": 2}
    again = _run("--out", str(out), "--phantoms")
    assert again.returncode == 2 and "not empty" in again.stderr


@pytest.mark.skipif(not (SHARED_DATA / "hippocampus").is_dir(), reason="needs ../shared/data/hippocampus")
def test_hippocampus_samples_come_from_the_test_split_only(tmp_path):
    out = tmp_path / "studies"
    r = _run("--out", str(out), "--count", "5")
    assert r.returncode == 0, r.stderr
    studies, skipped = load_studies(out)
    ids = [s.study_id for s in studies]
    assert not skipped and len(ids) == 5
    training = {i for v in PoolManifest.load(REPO / "sample-data" / "pool").training_studies.values() for i in v}
    assert not set(ids) & training
    everything = sorted(p.name.removesuffix(".nii.gz") for p in (SHARED_DATA / "hippocampus" / "images").iterdir())
    calibration, test = split_patients([i for i in everything if i not in training], 0.2, 0)
    assert set(ids) <= set(test) and not set(ids) & set(calibration)
    assert json.loads((out / ".medsamix-labels.json").read_text()) == {"anterior": 1, "posterior": 2}


@pytest.mark.data
@pytest.mark.skipif(not (SHARED_DATA / "hippocampus").is_dir(), reason="needs ../shared/data/hippocampus")
def test_demo_server_segments_a_real_hippocampus_in_3d(tmp_path):
    """The main job's set-up (sample studies + default pool) on real data: a 3D box around the anterior hippocampus
    of a held-out patient, segmented by the MR specialist with propagation, matches the manual label."""
    import nibabel as nib
    from monailabel.client import MONAILabelClient

    from app_server import running_server

    out = tmp_path / "studies"
    assert _run("--out", str(out), "--count", "1").returncode == 0
    (image,) = [p for p in out.iterdir() if p.name.endswith(".nii.gz")]
    sid = image.name.removesuffix(".nii.gz")
    gt = np.asarray(nib.load(str(out / "labels" / "final" / image.name)).dataobj) == 1
    ii, jj, kk = np.nonzero(gt)
    roi = [int(ii.min()) - 1, int(ii.max()) + 1, int(jj.min()) - 1, int(jj.max()) + 1, int(kk.min()), int(kk.max())]
    with running_server(out) as url:
        client = MONAILabelClient(url, tmpdir=str(tmp_path))
        assert client.info()["labels"] == ["anterior", "posterior"]
        dice = {}
        for model in ("medicosam_tiny", "medsamix"):
            path, params = client.infer(model, sid, {"roi": roi, "label": "anterior"})
            pred = np.asarray(nib.load(path).dataobj) > 0
            Path(path).unlink()
            assert params["mode"] == "3d" and len(params["slices"]) > 1
            dice[model] = 2 * (pred & gt).sum() / (pred.sum() + gt.sum())
    assert dice["medicosam_tiny"] > 0.6, dice
    assert dice["medsamix"] > 0.3, dice
