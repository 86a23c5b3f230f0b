"""The embedded tiny pool: integrity, size, and the paper's premise on real held-out data."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA
from medsamix import TINY256, MergeConfig, Merger, PoolManifest
from medsamix.errors import PoolError
from medsamix.evaluate import Evaluator
from medsamix.preprocess import Preprocessor
from medsamix.shared_data import hippocampus, totalseg

POOL = Path(__file__).resolve().parents[1] / "sample-data" / "pool"


def test_manifest_checksums_size_and_format():
    manifest = PoolManifest.load(POOL)
    assert list(manifest.files) == ["sam_tiny", "medsam_tiny", "medicosam_tiny"]
    assert manifest.arch == TINY256
    assert manifest.preprocessing["medsam_tiny"]["style"] == "medsam"
    total = sum(p.stat().st_size for p in manifest.files.values())
    assert total <= 40 * 2**20
    for path in manifest.files.values():
        sd = torch.load(path, weights_only=True)
        assert all(v.dtype == torch.float16 for v in sd.values())
    pool = manifest.load_pool()
    assert pool.checksums == manifest.checksums
    assert len(manifest.training_studies["hippocampus"]) == 40


def test_tampered_checkpoint_is_refused(tmp_path):
    shutil.copytree(POOL, tmp_path / "pool")
    path = tmp_path / "pool" / "medsam_tiny.pth"
    sd = torch.load(path, weights_only=True)
    sd["mask_decoder.iou_token.weight"] += 1
    torch.save(sd, path)
    with pytest.raises(PoolError, match="checksum mismatch"):
        PoolManifest.load(tmp_path / "pool").load_pool()


def test_missing_manifest(tmp_path):
    with pytest.raises(PoolError, match="no pool manifest"):
        PoolManifest.load(tmp_path)


def _scores(task_set, manifest, merger):
    ev = Evaluator(task_set.test)
    out = {}
    for alias in merger.aliases:
        merger.apply(MergeConfig.uniform(merger.groups, "pick", {"source": alias}))
        out[alias] = ev.evaluate(merger.model, Preprocessor(manifest.preprocessing[alias]["style"], 256)).mean2d
    return out


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} (shared real-image data) is absent")
def test_specialists_win_and_lose_on_real_held_out_data():
    """The paper's premise (its Figure 1): each specialist beats the base somewhere and loses somewhere."""
    manifest = PoolManifest.load(POOL)
    merger = Merger(manifest.load_pool())
    excluded = manifest.training_studies["hippocampus"]
    mr = _scores(hippocampus(SHARED_DATA, exclude=excluded, max_patients=12), manifest, merger)
    ct = _scores(totalseg(SHARED_DATA, "CT"), manifest, merger)
    assert ct["medsam_tiny"] > ct["sam_tiny"] + 0.02  # the CT specialist wins on CT
    assert mr["medicosam_tiny"] > mr["sam_tiny"] + 0.02  # the MR specialist wins on MR
    assert mr["medsam_tiny"] < mr["medicosam_tiny"]
    assert ct["medicosam_tiny"] < ct["medsam_tiny"]
    assert np.isfinite(list(mr.values()) + list(ct.values())).all()
