"""The whole flow at ViT-B size: a pool of three random-weight ViT-B checkpoints in the real file layouts -> the app's
``merge`` train task -> publish -> 2D and 3D box prompts served by the merged model.

* Pool: ``segment_anything.sam_model_registry["vit_b"]()`` with random weights as the base, saved as SAM's plain state
  dict; two "fine-tunes" (the base plus seeded noise) saved in MedSAM's training layout (``{"model": ...,
  "optimizer": ..., "epoch": ...}``) and in MedicoSAM's torch_em layout (``{"model_state": {"sam.<key>": ...}}``).
* Training: the app's train task (``apps/medsamix/lib/trainers/merge.py``, ``MergeTrain``) in-process on a MONAI Label
  ``LocalDatastore``, as ``test_app_train_task.py`` runs it, with the fewest trials (10, the initial design of a pool of
  three) and ``merge_report`` off. The two labelled phantom studies carry the label on 3 slices each (3 is the fewest
  calibration slices a run accepts), so the search has 3 calibration and 3 test slices: the ViT-B encoder takes
  ~16 s per slice on a 2-core CPU.
* Serving: the published version through the library path the app's infer task uses (``PoolLoader`` ->
  ``MergedModelSource`` -> ``InteractiveService``), pre-encoding off.

About 10-20 minutes on 2 cores (most of it encoder passes). Slow set: ``bash scripts/test.sh -m slow
tests/test_vit_b_e2e.py``.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medsamix.models.checkpoint import load_sam_checkpoint
from medsamix.runs.publish import current
from test_app_train_task import APP, merge

pytestmark = pytest.mark.slow

SHAPE = (40, 48, 12)
LABEL_SLICES = (4, 5, 6)


def _pool(folder: Path) -> str:
    """Three random ViT-B checkpoints in the SAM / MedSAM / MedicoSAM layouts; returns the app's ``models`` spec."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    base = sam_model_registry["vit_b"]().state_dict()
    g = torch.Generator().manual_seed(1)
    tuned = [{k: v + 0.02 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
              for k, v in base.items()} for _ in range(2)]
    files = {"sam": folder / "sam_vit_b_01ec64.pth", "medsam": folder / "medsam_vit_b.pth",
             "medicosam": folder / "medicosam_vit_b.pt"}
    torch.save(base, files["sam"])
    torch.save({"model": tuned[0], "optimizer": {"state": {}, "param_groups": []}, "epoch": 100}, files["medsam"])
    torch.save({"model_state": {"sam." + k: v for k, v in tuned[1].items()}, "optimizer_state": {}},
               files["medicosam"])
    for alias, layout, prefix in (("sam", "plain", ""), ("medsam", "model", ""), ("medicosam", "model_state", "sam.")):
        _, report = load_sam_checkpoint(files[alias], None)
        assert (report.layout, report.prefix, report.arch.name) == (layout, prefix, "vit_b"), alias
    return ",".join(f"{a}={p}" for a, p in files.items())


def _datastore(root: Path) -> None:
    """Three phantom studies (a bright ellipsoid in noise); the first two labelled on ``LABEL_SLICES`` only (3: the fewest calibration slices a run accepts)."""
    (root / "labels" / "final").mkdir(parents=True)
    rng = np.random.default_rng(0)
    ii, jj, _ = np.mgrid[0:SHAPE[0], 0:SHAPE[1], 0:SHAPE[2]]
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    for n in range(3):
        ell = ((ii - 18 - n) / 9) ** 2 + ((jj - 22) / 11) ** 2 < 1
        img = rng.normal(300, 40, SHAPE).astype(np.float32) + 400 * ell
        nib.save(nib.Nifti1Image(img, affine), root / f"case{n}.nii.gz")
        if n < 2:
            lab = np.zeros(SHAPE, np.uint8)
            lab[:, :, list(LABEL_SLICES)] = ell[:, :, list(LABEL_SLICES)]
            nib.save(nib.Nifti1Image(lab, affine), root / "labels" / "final" / f"case{n}.nii.gz")


def test_vit_b_pool_train_publish_and_serve_2d_and_3d(tmp_path):
    from monailabel.datastore.local import LocalDatastore

    from medsamix.data.volumes import VolumeCache
    from medsamix.serving.segmenter import EmbeddingCache
    from medsamix.serving.service import InteractiveService, MergedModelSource, PoolLoader

    spec = _pool(tmp_path)
    studies, model_dir = tmp_path / "studies", tmp_path / "model"
    _datastore(studies)
    ds = LocalDatastore(str(studies), extensions=("*.nii.gz",), auto_reload=False)
    task = merge.MergeTrain(str(APP), str(studies), "", str(model_dir / "merged"),
                            {"models": spec, "model_dir": str(model_dir), "labels": "ellipsoid",
                             "merge_report": "false", "device": "cpu"})
    res = task({"model": "merge", "task": "ellipsoid", "trials": 10, "preprocessing": "sam"}, ds)
    st = task.stats()
    assert st["status"] == "done" and st["epoch"] == 10
    assert st["calibration_slices"] == len(LABEL_SLICES) and st["test_slices"] == len(LABEL_SLICES)
    assert res["trials"] == 10 and res["promoted"] is True  # not worse than the best single model on calibration
    pub = current(model_dir / "merged")
    assert pub is not None and pub.version == res["published_version"]
    sd, report = load_sam_checkpoint(pub.checkpoint, None)
    assert report.arch.name == "vit_b" and len(sd) > 0

    service = InteractiveService("medsamix", MergedModelSource(PoolLoader(models=spec), model_dir / "merged").get,
                                 VolumeCache(), EmbeddingCache(), preencoder=None)
    image = studies / "case2.nii.gz"
    roi = [8, 30, 10, 34, 6, 6]
    two_d = service.run(image, {"roi": roi, "mode": "2d", "label": "ellipsoid"})
    three_d = service.run(image, {"roi": roi[:4] + [5, 7], "mode": "3d", "slice": 6, "label": "ellipsoid"})
    for result, slices in ((two_d, {6}), (three_d, {5, 6, 7})):
        p = result.params
        assert p["model_version"] == pub.version and p["label_names"] == {"ellipsoid": 1}
        assert result.mask.shape == SHAPE and result.mask.dtype == np.uint8
        assert set(np.unique(result.mask)) <= {0, 1}
        assert np.array_equal(result.affine, nib.load(image).affine)
        ii, jj, kk = np.nonzero(result.mask)  # never outside the box or the slices the prompt covers
        assert set(kk.tolist()) <= slices and set(p["slices"]) <= slices and 6 in p["slices"]
        if len(ii):
            assert ii.min() >= 8 and ii.max() <= 30 and jj.min() >= 10 and jj.max() <= 34
        assert p["voxels"] == int(result.mask.sum())
    assert three_d.params["mode"] == "3d" and two_d.params["mode"] == "2d"
    assert three_d.params["latencies"]["cache_hits"] >= 1  # the 2D prompt's slice is reused, not re-encoded
