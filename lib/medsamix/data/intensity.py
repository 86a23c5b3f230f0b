"""Intensity normalisation: a medical volume mapped to the 0-255 range the SAM-family models expect.

As in MedSAM's data preparation: CT by a window (level/width in HU, default abdomen 40/400), other modalities by
clipping to the 0.5-99.5 percentiles of the volume's non-zero voxels (voxels above its minimum), then scaling
linearly to float32 0-255. The range is taken over the whole volume, so every slice of it is mapped alike. Every
path into a model goes through here: served volumes (:mod:`medsamix.data.volumes`), task sets
(:mod:`medsamix.data.tasksets`), the shared-data sets and the pool's training slices. A model's own input
convention (SAM or MedSAM) is applied afterwards (:mod:`medsamix.models.preprocess`).
"""

from __future__ import annotations

import numpy as np

from medsamix.errors import MedSAMixError, check_choice

CT_WINDOWS: dict[str, tuple[float, float]] = {  # name -> (level, width) in HU
    "abdomen": (40.0, 400.0),  # MedSAM's data preparation; the usual soft-tissue window of abdominal CT
    "soft_tissue": (50.0, 350.0),  # mediastinal / narrow soft-tissue window
    "bone": (400.0, 1800.0),
    "lung": (-600.0, 1500.0),
}
DEFAULT_CT_WINDOW = "abdomen"
CT_WINDOW = CT_WINDOWS[DEFAULT_CT_WINDOW]  # level, width (HU) every CT slice is normalised with at load
PERCENTILES = (0.5, 99.5)


def check_window(window: object, what: str = "CT window", error: type[MedSAMixError] = MedSAMixError) -> str:
    """``window`` if it names one of :data:`CT_WINDOWS`; otherwise ``error`` naming ``what`` and the windows."""
    return str(check_choice(window, CT_WINDOWS, what, error))


def intensity_range(volume: np.ndarray, modality: str, window: str = DEFAULT_CT_WINDOW,
                    percentiles: tuple[float, float] = PERCENTILES) -> tuple[float, float]:
    """Intensity interval mapped to 0-255 for a whole volume: the named CT ``window`` (:func:`ct_range`), else the
    non-zero ``percentiles``."""
    if modality == "CT":
        return ct_range(window)
    values = volume[volume > volume.min()] if np.any(volume > volume.min()) else volume
    lo, hi = np.percentile(values, percentiles)
    return float(lo), float(max(hi, lo + 1e-6))


def ct_range(window: str) -> tuple[float, float]:
    """The HU interval ``(level - width / 2, level + width / 2)`` of a named window of :data:`CT_WINDOWS`.

    Raises:
        MedSAMixError: an unknown window name.
    """
    level, width = CT_WINDOWS[check_window(window)]
    return level - width / 2, level + width / 2


def to_255(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Clip ``image`` to [lo, hi] and scale to float32 0-255 (any shape)."""
    return ((np.clip(image, lo, hi) - lo) * (255.0 / (hi - lo))).astype(np.float32)


def normalize(volume: np.ndarray, modality: str) -> np.ndarray:
    """``volume`` (any shape, e.g. ``(I, J, K)``) mapped to float32 0-255 by its :func:`intensity_range`."""
    return to_255(volume, *intensity_range(volume, modality))
