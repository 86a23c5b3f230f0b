"""The embedded tiny pool: integrity, size, and the paper's premise on real held-out data."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA
from medsamix import TINY256, MergeConfig, Merger, PoolManifest
from medsamix.errors import PoolError
from medsamix.search.evaluate import Evaluator
from medsamix.models.preprocess import Preprocessor
from medsamix.demo.shared_data import dcmqi_ct, hippocampus, sammed2d, totalseg

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


def _per_task(task_sets, manifest, merger) -> dict[str, dict[str, float]]:
    """alias -> {set/task: test Dice} with each model's own preprocessing."""
    out: dict[str, dict[str, float]] = {}
    for ts in task_sets:
        ev = Evaluator(ts.test)
        for alias in merger.aliases:
            merger.apply(MergeConfig.uniform(merger.groups, "pick", {"source": alias}))
            res = ev.evaluate(merger.model, Preprocessor(manifest.preprocessing[alias]["style"], 256))
            out.setdefault(alias, {}).update({f"{ts.name}/{t}": d for t, d in res.dice2d.items()})
    return out


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} (shared real-image data) is absent")
def test_specialists_win_and_lose_on_real_held_out_data():
    """The paper's premise (its Figure 1): each specialist beats the base on some tasks and loses on others."""
    manifest = PoolManifest.load(POOL)
    merger = Merger(manifest.load_pool())
    excluded = manifest.training_studies["hippocampus"]
    sets = [hippocampus(SHARED_DATA, exclude=excluded, max_patients=12), totalseg(SHARED_DATA, "CT"),
            dcmqi_ct(SHARED_DATA), sammed2d(SHARED_DATA)]
    scores = _per_task(sets, manifest, merger)
    base = scores["sam_tiny"]
    for alias in ("medsam_tiny", "medicosam_tiny"):
        wins = [t for t in base if scores[alias][t] > base[t] + 0.05]
        losses = [t for t in base if scores[alias][t] < base[t] - 0.05]
        assert wins and losses, (alias, wins, losses)
    hippo = [t for t in base if t.startswith("hippocampus/")]
    assert all(scores["medicosam_tiny"][t] > base[t] + 0.1 for t in hippo)  # the MR specialist wins on MR
