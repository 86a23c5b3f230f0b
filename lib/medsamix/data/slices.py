"""2D slices of a study with a ground-truth box prompt per task.

Conventions:

* A slice through IJK axis ``axis`` at ``index`` is ``volume.take(index, axis)``: its rows run along the first remaining
  IJK axis and its columns along the second (axis 2 gives rows = I, columns = J). This is the storage order, not a
  radiological display orientation; it is the same for image and mask, which is all box prompts need.
* Boxes are float32 ``[x_min, y_min, x_max, y_max]`` (XYXY) in slice pixel coordinates with x = column and
  y = row, and the max corners are the last foreground index (inclusive), as MedSAM computes its boxes from masks.
* Jitter follows MedSAM's training augmentation: each corner moves outward by its own uniform integer in
  [0, max_shift] pixels and the box is clipped to the slice. MedSAM uses 0-20 px at 1024 px; ``jitter_pixels`` scales
  that to a slice's size.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from medsamix.data.studies import Study
from medsamix.data.tasks import Task


@dataclass
class SliceSample:
    """One 2D slice of a study, with the mask and box prompt of one task.

    Attributes:
        study_id: The study it was cut from.
        task: The task whose mask this is.
        axis: The IJK axis sliced through (0, 1 or 2).
        index: The slice index along ``axis``.
        image: (H, W) float32 slice, ``study.image.take(index, axis)``.
        mask: (H, W) bool, ``study.label.take(index, axis) == task.value``; never empty.
        box: (4,) float32 XYXY box in pixel coordinates (x = column, y = row, max inclusive), tight or jittered.
        hu: (H, W) float32 HU values of a CT slice before windowing (``study.hu``), so a model with another CT
            window sees the slice under its window (:meth:`~medsamix.models.preprocess.Preprocessor.window`);
            ``None`` for other modalities and corrupted copies.
    """

    study_id: str
    task: Task
    axis: int
    index: int
    image: np.ndarray
    mask: np.ndarray
    box: np.ndarray
    hu: np.ndarray | None = None


def tight_box(mask: np.ndarray) -> np.ndarray:
    """The tightest box around the foreground of a 2D mask.

    Args:
        mask: (H, W) array; non-zero is foreground.

    Returns:
        (4,) float32 ``[x_min, y_min, x_max, y_max]``: x = column, y = row, max = last foreground index (inclusive).

    Raises:
        ValueError: The mask is not 2D or has no foreground.
    """
    if mask.ndim != 2:
        raise ValueError(f"expected a 2D mask, got shape {mask.shape}")
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("cannot compute a box from an empty mask")
    return np.array([cols.min(), rows.min(), cols.max(), rows.max()], dtype=np.float32)


def jitter_box(box: np.ndarray, shape_hw: tuple[int, int], max_shift: float, rng: np.random.Generator) -> np.ndarray:
    """Enlarge a box by MedSAM-style random shifts.

    Args:
        box: (4,) XYXY box (x = column, y = row, max inclusive).
        shape_hw: (H, W) of the slice.
        max_shift: Largest shift in pixels (>= 0); shifts are integers in [0, floor(max_shift)].
        rng: Source of the four independent shifts.

    Returns:
        (4,) float32 ``[x_min - r0, y_min - r1, x_max + r2, y_max + r3]`` clipped to [0, W - 1] for x and
        [0, H - 1] for y; it always contains the input box.

    Raises:
        ValueError: ``max_shift`` < 0.
    """
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    h, w = shape_hw
    r = rng.integers(0, math.floor(max_shift) + 1, size=4)
    x0, y0, x1, y1 = (float(v) for v in box)
    out = [max(0.0, x0 - r[0]), max(0.0, y0 - r[1]), min(w - 1.0, x1 + r[2]), min(h - 1.0, y1 + r[3])]
    return np.array(out, dtype=np.float32)


def jitter_pixels(shape_hw: tuple[int, int], max_shift_at_1024: float = 20.0) -> float:
    """MedSAM's box jitter (``max_shift_at_1024`` px on a 1024 px image) in pixels of an (H, W) slice."""
    return max_shift_at_1024 * max(shape_hw) / 1024.0


def _rng(seed: int, study_id: str, value: int, index: int) -> np.random.Generator:
    """A generator determined by (seed, study_id, value, index) only, so results do not depend on call order."""
    study_key = int.from_bytes(hashlib.sha256(study_id.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, study_key, value, index])


def extract_slices(
    study: Study, task: Task, axis: int = 2, min_pixels: int = 1, jitter: float = 0.0, seed: int = 0
) -> list[SliceSample]:
    """All slices of a study along ``axis`` where the task's mask has at least ``min_pixels`` pixels.

    Args:
        study: The study; ``image`` and ``label`` are (I, J, K).
        task: Which label value to cut masks for.
        axis: IJK axis to slice through (0, 1 or 2).
        min_pixels: Smallest mask area kept (values below 1 count as 1: an empty mask never yields a sample).
        jitter: Largest box jitter in slice pixels (``jitter_box``); 0 gives the tight box. See ``jitter_pixels``.
        seed: Seed of the jitter; each slice's generator is seeded by (seed, study_id, task.value, index).

    Returns:
        The samples in increasing slice index.

    Raises:
        ValueError: ``axis`` not in 0..2 or a negative ``seed``.
    """
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    fg = study.label == task.value
    counts = np.count_nonzero(fg, axis=tuple(a for a in range(3) if a != axis))
    samples = []
    for index in np.flatnonzero(counts >= max(1, min_pixels)).tolist():
        mask = np.ascontiguousarray(fg.take(index, axis))
        box = tight_box(mask)
        if jitter > 0:
            box = jitter_box(box, mask.shape, jitter, _rng(seed, study.study_id, task.value, index))
        image = np.ascontiguousarray(study.image.take(index, axis), dtype=np.float32)
        hu = None if study.hu is None else np.ascontiguousarray(study.hu.take(index, axis), dtype=np.float32)
        samples.append(SliceSample(study.study_id, task, axis, index, image, mask, box, hu))
    return samples
