"""Procedurally generated images with object masks: the stand-in for SA-1B when training the tiny base model.

Each image is a smooth random background texture with 2-6 overlapping objects (rotated ellipses, star polygons
and thresholded noise blobs), each with its own intensity, texture and edge sharpness, plus noise and blur.
Masks are the visible (unoccluded) part of each object. Everything is drawn from a ``numpy.random.Generator``, so
a seed reproduces the data exactly. Arrays are ``(H, W)``; intensities are float32 on the 0-255 scale.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Band-limited noise ``(size, size)`` with unit standard deviation; ``scale`` is the feature size in pixels."""
    small = max(2, int(size / max(scale, 1.0)))
    coarse = rng.standard_normal((small, small)).astype(np.float32)
    field = ndimage.zoom(coarse, size / small, order=3)[:size, :size]
    return (field - field.mean()) / (field.std() + 1e-6)


def _ellipse(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    cy, cx = rng.uniform(0.15, 0.85, 2) * size
    ry, rx = rng.uniform(0.04, 0.25, 2) * size
    a = rng.uniform(0, np.pi)
    y, x = yy - cy, xx - cx
    u, v = x * np.cos(a) + y * np.sin(a), -x * np.sin(a) + y * np.cos(a)
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def _star(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    r0 = rng.uniform(0.05, 0.2) * size
    k = int(rng.integers(3, 8))
    amp = rng.uniform(0.0, 0.5)
    phase = rng.uniform(0, 2 * np.pi)
    ang = np.arctan2(yy - cy, xx - cx)
    rad = np.hypot(yy - cy, xx - cx)
    return rad <= r0 * (1 + amp * np.cos(k * ang + phase))


def _blob(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    field = smooth_noise(rng, size, rng.uniform(size / 8, size / 3))
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    r = rng.uniform(0.08, 0.25) * size
    envelope = 1.5 - np.hypot(yy - cy, xx - cx) / r
    mask = field + envelope > 1.0
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    return labels == (1 + int(np.argmax(sizes)))


_SHAPES = (_ellipse, _star, _blob)


def shapes_image(rng: np.random.Generator, size: int = 256, min_area: int = 30) -> tuple[np.ndarray, list[np.ndarray]]:
    """One random image and the masks of its visible objects.

    Returns:
        ``(image, masks)``: image ``(size, size)`` float32 in 0-255, masks a list of ``(size, size)`` bool arrays
        (each with at least ``min_area`` pixels; at least one mask is always returned).
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = rng.uniform(20, 200) + rng.uniform(5, 40) * smooth_noise(rng, size, rng.uniform(8, 64))
    image += rng.uniform(-40, 40) * (xx / size - 0.5) + rng.uniform(-40, 40) * (yy / size - 0.5)
    owner = np.zeros((size, size), dtype=np.int32)
    for obj in range(1, int(rng.integers(2, 7)) + 1):
        mask = _SHAPES[int(rng.integers(0, len(_SHAPES)))](rng, yy, xx, size)
        contrast = rng.choice([-1.0, 1.0]) * rng.uniform(25, 110)
        texture = rng.uniform(0, 25) * smooth_noise(rng, size, rng.uniform(3, 20))
        soft = ndimage.gaussian_filter(mask.astype(np.float32), rng.uniform(0.3, 2.0))
        image = image * (1 - soft) + (image.mean() + contrast + texture) * soft
        owner[mask] = obj
    image = ndimage.gaussian_filter(image, rng.uniform(0.0, 1.2))
    image += rng.uniform(0, 12) * rng.standard_normal((size, size))
    masks = [owner == i for i in range(1, owner.max() + 1) if (owner == i).sum() >= min_area]
    if not masks:
        return shapes_image(rng, size, min_area)
    return np.clip(image, 0, 255).astype(np.float32), masks
