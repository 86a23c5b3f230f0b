"""Sample studies for the demo server: a MONAI Label datastore folder with images and ``labels/final`` labels.

Two sources:

* **hippocampus** (when ``../shared/data/hippocampus`` exists): a handful of real T1 MRI crops from the *test* split
  of :func:`medsamix.demo.shared_data.hippocampus` - patients used to train a pool model (``training_studies`` in
  ``pool.yaml``) are excluded first and calibration patients are never taken - copied unchanged (NIfTI).
  Labels: 1 = anterior, 2 = posterior hippocampus.
* **phantoms** otherwise: synthetic 3D MR-like volumes, each with an ellipsoid (label 1) and a smooth blob (label 2)
  on a textured background, written as NIfTI with 1 x 1 x 2 mm voxels. Every other phantom is stored with an
  LPS-style affine (I and J axes pointing to -x and -y), so the demo exercises both orientations.

Label names are written to ``<out>/.medsamix-labels.json`` (name -> value; hidden, so datastores ignore it).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from scipy import ndimage

from medsamix.data.imageio import study_id_of
from medsamix.data.tasks import LABELS_FILE, split_patients
from medsamix.demo.shared_data import hippocampus_patients

HIPPOCAMPUS_LABELS = {"anterior": 1, "posterior": 2}
PHANTOM_LABELS = {"ellipsoid": 1, "blob": 2}


def hippocampus_test_ids(root: Path, exclude: Iterable[str], seed: int = 0,
                         calibration_fraction: float = 0.2) -> list[str]:
    """The hippocampus test-split study ids of :func:`medsamix.demo.shared_data.hippocampus` (same exclusion and split).

    Args:
        root: The shared data root (holding ``hippocampus/images`` and ``hippocampus/labels``).
        exclude: Pool-training patient ids (never returned).
        seed, calibration_fraction: As for the task set.
    """
    pairs, _ = hippocampus_patients(root, exclude)
    _, test = split_patients([study_id_of(i) for i, _ in pairs], calibration_fraction, seed)
    return test


def copy_hippocampus(out: Path, root: Path, exclude: Iterable[str], count: int = 5) -> list[str]:
    """Copy ``count`` test-split hippocampus studies into the datastore ``out``; returns their ids."""
    ids = hippocampus_test_ids(root, exclude)[:count]
    (out / "labels" / "final").mkdir(parents=True, exist_ok=True)
    for i in ids:
        shutil.copyfile(root / "hippocampus" / "images" / f"{i}.nii.gz", out / f"{i}.nii.gz")
        shutil.copyfile(root / "hippocampus" / "labels" / f"{i}.nii.gz", out / "labels" / "final" / f"{i}.nii.gz")
    (out / LABELS_FILE).write_text(json.dumps(HIPPOCAMPUS_LABELS))
    return ids


def phantom_volume(rng: np.random.Generator, shape: tuple[int, int, int] = (96, 80, 32)
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic volume and its label map.

    Returns:
        ``(image, label)``: ``(I, J, K)`` float32 MR-like intensities (background ~100-300, objects ~500-900, noise)
        and int16 labels (1 = ellipsoid, 2 = blob; the blob is cut out of the ellipsoid where they overlap).
    """
    ii, jj, kk = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in shape), indexing="ij")
    kk_mm = kk * 2.0  # 2 mm slices
    label = np.zeros(shape, dtype=np.int16)
    c = rng.uniform([0.3, 0.3, 0.4], [0.45, 0.7, 0.6]) * np.array(shape)
    r = rng.uniform([10, 8, 14], [18, 14, 22])
    ell = (((ii - c[0]) / r[0]) ** 2 + ((jj - c[1]) / r[1]) ** 2 + ((kk_mm - 2 * c[2]) / r[2]) ** 2) <= 1
    label[ell] = 1
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), (4, 4, 2))
    field /= field.std() + 1e-6
    cb = rng.uniform([0.6, 0.25, 0.4], [0.75, 0.75, 0.6]) * np.array(shape)
    rb = rng.uniform(9, 14)
    dist = np.sqrt((ii - cb[0]) ** 2 + (jj - cb[1]) ** 2 + (kk_mm - 2 * cb[2]) ** 2) / rb
    blob = field * 0.35 + (1.4 - dist) > 0.5
    lab, n = ndimage.label(blob)
    if n:
        sizes = ndimage.sum(blob, lab, range(1, n + 1))
        blob = lab == 1 + int(np.argmax(sizes))
    label[blob] = 2
    background = 200 + 60 * ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 6) * 8
    image = background.astype(np.float32)
    image[label == 1] = rng.uniform(550, 700)
    image[label == 2] = rng.uniform(750, 900)
    image = ndimage.gaussian_filter(image, 0.8) + rng.normal(0, 15, shape).astype(np.float32)
    return np.clip(image, 0, None).astype(np.float32), label


def phantom_affine(shape: tuple[int, int, int], lps: bool) -> np.ndarray:
    """1 x 1 x 2 mm voxels centred on the origin; ``lps`` flips I and J to run along -x and -y (RAS world)."""
    sign = -1.0 if lps else 1.0
    affine = np.diag([sign, sign, 2.0, 1.0])
    affine[:3, 3] = -affine[:3, :3] @ (np.array(shape) / 2.0)
    return affine


def write_phantoms(out: Path, count: int = 3, seed: int = 0) -> list[str]:
    """Write ``count`` phantom studies (``phantom_<n>.nii.gz`` + label) into the datastore ``out``; returns ids."""
    import nibabel as nib

    (out / "labels" / "final").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = []
    for n in range(count):
        image, label = phantom_volume(rng)
        affine = phantom_affine(image.shape, lps=n % 2 == 1)
        sid = f"phantom_{n:03d}"
        nib.save(nib.Nifti1Image(image, affine), str(out / f"{sid}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(out / "labels" / "final" / f"{sid}.nii.gz"))
        ids.append(sid)
    (out / LABELS_FILE).write_text(json.dumps(PHANTOM_LABELS))
    return ids
