"""A seeded corruption suite for robustness scoring: the same corrupted slices for every model.

Five corruptions of clinical images, each at two severities (``severity`` 1 mild, 2 strong):

* ``noise``: additive Gaussian noise (MONAI ``RandGaussianNoise``, std fixed, not sampled), std 4% / 10% of 255;
* ``blur``: Gaussian blur (MONAI ``GaussianSmooth``), sigma 1 / 2.5 pixels per 256 pixels of the longest side;
* ``motion``: rigid motion during an MR acquisition, simulated in k-space: a random third of the phase-encoding
  lines (rows of the 2D Fourier transform) get the linear phase of a shift along the columns of up to 2% / 5% of the
  width; the magnitude of the inverse transform is kept;
* ``bias``: smooth multiplicative bias field (MONAI ``RandBiasField``, degree 3), coefficients in [0, 0.3] / [0, 0.6];
* ``contrast``: low contrast, intensities compressed towards the slice mean by a factor 0.5 / 0.25.

Images are slices in the :class:`~medsamix.data.slices.SliceSample` convention: ``(H, W)`` or ``(H, W, 3)`` float
arrays on the 0-255 scale. A corrupted image keeps the shape and dtype and is clipped to [0, 255].

Determinism: the random draws of a corruption depend only on (seed, corruption, study_id, axis, index), never on the
severity or the call order, so severity 2 is severity 1's draw made stronger (the noise, the bias-field coefficients
and the motion shifts scale with the severity) and a slice shared by several tasks is corrupted identically.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import GaussianSmooth, RandBiasField, RandGaussianNoise

from medsamix.data.slices import SliceSample

CORRUPTIONS = ("noise", "blur", "motion", "bias", "contrast")
SEVERITIES = (1, 2)
CONDITIONS: tuple[tuple[str, int], ...] = tuple((c, s) for c in CORRUPTIONS for s in SEVERITIES)

_NOISE_STD = {1: 0.04 * 255, 2: 0.10 * 255}
_BLUR_SIGMA_PER_256 = {1: 1.0, 2: 2.5}
_MOTION_SHIFT = {1: 0.02, 2: 0.05}  # largest shift, fraction of the width
_MOTION_LINES = 1 / 3  # share of phase-encoding lines that moved
_BIAS_COEFF = {1: 0.3, 2: 0.6}
_CONTRAST = {1: 0.5, 2: 0.25}


def _seed(seed: int, name: str, key: str) -> np.random.SeedSequence:
    digest = hashlib.sha256(f"{name}|{key}".encode()).digest()
    return np.random.SeedSequence([seed, int.from_bytes(digest[:8], "little")])


def _channels_first(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` -> ``(1, H, W)``; ``(H, W, C)`` -> ``(C, H, W)`` (MONAI's channel-first layout)."""
    return image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0)


def _channels_last(x: np.ndarray, ndim: int) -> np.ndarray:
    return x[0] if ndim == 2 else np.moveaxis(x, 0, -1)


def _to_numpy(x: object) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _motion(x: np.ndarray, max_shift: float, rng: np.random.Generator) -> np.ndarray:
    """k-space motion of a channel-first ``(C, H, W)`` image: rows of the 2D spectrum shifted along the columns."""
    _, h, w = x.shape
    moved = rng.random(h) < _MOTION_LINES
    shifts = np.where(moved, rng.uniform(-1.0, 1.0, h), 0.0) * max_shift  # pixels, per phase-encoding line
    kx = np.fft.fftfreq(w)  # cycles per pixel
    phase = np.exp(-2j * np.pi * shifts[:, None] * kx[None, :])  # (H, W)
    k = np.fft.fft2(x, axes=(-2, -1))
    return np.abs(np.fft.ifft2(k * phase[None], axes=(-2, -1)))


def corrupt(image: np.ndarray, name: str, severity: int, seed: int = 0, key: str = "") -> np.ndarray:
    """One corruption of one slice.

    Args:
        image: ``(H, W)`` or ``(H, W, 3)`` slice on the 0-255 scale.
        name: One of :data:`CORRUPTIONS`.
        severity: 1 (mild) or 2 (strong).
        seed: Seed of the suite.
        key: Identity of the slice (e.g. ``"study|axis|index"``); with ``seed`` and ``name`` it fixes the random draw.

    Returns:
        The corrupted slice, same shape and dtype as ``image``, clipped to [0, 255].

    Raises:
        ValueError: Unknown corruption, severity or image shape.
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; expected one of {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be 1 or 2, got {severity}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
        raise ValueError(f"expected an (H, W) or (H, W, 3) slice, got shape {image.shape}")
    x = _channels_first(np.asarray(image, dtype=np.float32))
    ss = _seed(seed, name, key)
    if name == "noise":
        t = RandGaussianNoise(prob=1.0, std=_NOISE_STD[severity], sample_std=False)
        t.set_random_state(seed=int(ss.generate_state(1)[0]))
        y = _to_numpy(t(x))
    elif name == "blur":
        sigma = _BLUR_SIGMA_PER_256[severity] * max(x.shape[1:]) / 256.0
        y = _to_numpy(GaussianSmooth(sigma=sigma)(x))
    elif name == "motion":
        y = _motion(x, _MOTION_SHIFT[severity] * x.shape[2], np.random.default_rng(ss))
    elif name == "bias":
        t = RandBiasField(degree=3, coeff_range=(0.0, _BIAS_COEFF[severity]), prob=1.0)
        t.set_random_state(seed=int(ss.generate_state(1)[0]))
        if x.shape[0] == 1:
            y = _to_numpy(t(x))
        else:  # one field for all colour channels
            t.randomize(img_size=x.shape[1:])
            field = _to_numpy(t(np.ones_like(x[:1]), randomize=False))
            y = x * field
    else:  # contrast
        mean = x.mean()
        y = mean + (x - mean) * _CONTRAST[severity]
    return _channels_last(np.clip(y, 0.0, 255.0), image.ndim).astype(image.dtype, copy=False)


def corrupt_samples(samples: Sequence[SliceSample], seed: int = 0,
                    conditions: Sequence[tuple[str, int]] = CONDITIONS) -> list[SliceSample]:
    """The corrupted copy of a sample list: each slice under one condition, the conditions spread over the slices.

    Every distinct slice (study, axis, index) gets the condition ``conditions[j % len(conditions)]`` where ``j`` is
    its rank in a ``seed``-fixed shuffle of the distinct slices, so with at least as many slices as conditions every
    condition is used and the counts differ by at most one. Samples sharing a slice get the same corrupted image;
    masks and boxes are unchanged (corruptions are photometric or, for motion, ghosting around the same anatomy).
    The corruption acts on the 0-255 slice, so a corrupted CT slice has no HU values (``hu`` is ``None``) and is seen
    in the default CT window by every model, whatever its :attr:`~medsamix.models.preprocess.Preprocessor.ct_window`.

    Returns:
        New samples in the input order; ``study_id`` unchanged.
    """
    images: dict[str, np.ndarray] = {}
    out = []
    for s, (name, severity) in zip(samples, condition_of_samples(samples, seed, conditions)):
        key = _key(s)
        if key not in images:
            images[key] = corrupt(s.image, name, severity, seed, key)
        out.append(dataclasses.replace(s, image=images[key], hu=None))
    return out


def condition_of_samples(samples: Sequence[SliceSample], seed: int = 0,
                         conditions: Sequence[tuple[str, int]] = CONDITIONS) -> list[tuple[str, int]]:
    """The condition :func:`corrupt_samples` applies to each sample (same order), for per-condition reporting."""
    if not conditions:
        raise ValueError("at least one corruption condition is needed")
    for name, severity in conditions:
        if name not in CORRUPTIONS or severity not in SEVERITIES:
            raise ValueError(f"unknown corruption condition ({name!r}, {severity})")
    keys = list(dict.fromkeys(_key(s) for s in samples))
    order = np.random.default_rng(seed).permutation(len(keys))
    condition_of = {keys[k]: tuple(conditions[rank % len(conditions)]) for rank, k in enumerate(order)}
    return [condition_of[_key(s)] for s in samples]


def _key(sample: SliceSample) -> str:
    return f"{sample.study_id}|{sample.axis}|{sample.index}"


CORRUPTED = "@corrupted"  # suffix of a task's corrupted twin: "<task>@corrupted"


def robust_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    """The objectives of a robust search: every task, then its corrupted twin ``<task>@corrupted``."""
    return tuple(tasks) + tuple(f"{t}{CORRUPTED}" for t in tasks)


def with_corrupted(samples: Sequence[SliceSample], seed: int = 0) -> list[SliceSample]:
    """``samples`` followed by their corrupted copies (:func:`corrupt_samples`) as the tasks ``<task>@corrupted``.

    The copies' ``study_id`` is ``<study_id>@corrupted``, so an :class:`~medsamix.search.evaluate.Evaluator` keeps
    a clean and a corrupted slice apart (it shares images by study, axis and index) and scores the corrupted twin
    of every task as a task of its own: its Dice is the objective ``<task>@corrupted`` of a robust search and a row
    of the report next to the clean one.
    """
    corrupted = corrupt_samples(samples, seed)
    return list(samples) + [
        dataclasses.replace(c, study_id=f"{c.study_id}{CORRUPTED}",
                            task=dataclasses.replace(c.task, name=f"{c.task.name}{CORRUPTED}"))
        for c in corrupted]
