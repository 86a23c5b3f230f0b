"""The interactive protocol: a box (or a centre point), then k correction clicks, as MedicoSAM evaluates.

Round 0 prompts with the sample's XYXY box (``start="box"``) or with one positive point at the centre of the
ground truth (``start="point"``). Each correction round adds one point at the centre (the maximum of the Euclidean
distance transform) of the largest connected error region of the current prediction - positive (label 1) when it is
a false-negative region, negative (label 0) when it is a false-positive one - and runs the prompt encoder and mask
decoder again with every point so far, the initial box and the previous round's low-resolution mask logits
(``mask_input``), as segment_anything's ``SamPredictor`` is used interactively. The image embedding is computed
once per slice by the caller; rounds are decoder-only. A prediction without error gets no point and stays as it is.

Coordinates: masks are ``(H, W)`` bool in slice pixels; points are XY (x = column, y = row) in slice pixels, mapped
to model input coordinates by :meth:`~medsamix.models.preprocess.Preprocessor.points`.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor, nn

from medsamix.models.forward import decode
from medsamix.models.preprocess import Preprocessor

STARTS = ("box", "point")


def region_centre(region: np.ndarray) -> np.ndarray:
    """The pixel of a 2D region farthest from its border (maximum of the distance transform) as XY float32.

    The slice border counts as outside the region, so a region touching it is centred inside too. Among pixels of
    equal (maximal) distance, the one nearest their mean position is taken (the middle of an elongated region)."""
    dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    rows, cols = np.nonzero(dist == dist.max())
    k = int(np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2))
    return np.array([cols[k], rows[k]], dtype=np.float32)


def _largest_component(mask: np.ndarray) -> tuple[np.ndarray, int]:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask, 0
    sizes = ndimage.sum_labels(mask, labels, range(1, n + 1))
    k = int(np.argmax(sizes))
    return labels == k + 1, int(sizes[k])


def correction_point(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, int] | None:
    """The next correction click for a prediction.

    Args:
        pred: ``(H, W)`` bool prediction.
        gt: ``(H, W)`` bool ground truth.

    Returns:
        ``(point, label)``: XY float32 point at the centre of the largest connected error region and 1 if that region
        is a false negative (missed foreground), 0 if it is a false positive; ``None`` when ``pred`` equals ``gt``.
        A tie in size goes to the false negative.
    """
    fn, n_fn = _largest_component(gt & ~pred)
    fp, n_fp = _largest_component(pred & ~gt)
    if n_fn == 0 and n_fp == 0:
        return None
    return (region_centre(fn), 1) if n_fn >= n_fp else (region_centre(fp), 0)


@torch.no_grad()
def interactive_masks(model: nn.Module, prep: Preprocessor, embedding: Tensor, gt: np.ndarray, box: np.ndarray,
                      rounds: int, start: str = "box") -> list[np.ndarray]:
    """The predictions of the protocol on one slice, one per round.

    Args:
        model: A ``segment_anything`` ``Sam`` (prompt encoder and mask decoder are used).
        prep: The model's preprocessing (maps prompts and logits between slice and model coordinates).
        embedding: ``(C, h, w)`` image embedding of the slice (computed once by the caller).
        gt: ``(H, W)`` bool ground truth (places the correction points).
        box: ``(4,)`` XYXY box in slice pixels (used when ``start="box"``).
        rounds: Correction rounds k (>= 0).
        start: ``"box"`` or ``"point"`` (one positive click at the ground truth's centre).

    Returns:
        ``rounds + 1`` bool ``(H, W)`` masks: the initial prediction, then one per correction round.
    """
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    hw = gt.shape
    device = embedding.device
    dense_pe = model.prompt_encoder.get_dense_pe()
    boxes = prep.boxes(box[None], hw).to(device) if start == "box" else None
    points: list[np.ndarray] = [] if start == "box" else [region_centre(_largest_component(gt)[0])]
    labels: list[int] = [] if start == "box" else [1]
    low: Tensor | None = None
    out: list[np.ndarray] = []
    for r in range(rounds + 1):
        if r > 0:
            click = correction_point(out[-1], gt)
            if click is None:  # nothing to correct
                out.append(out[-1])
                continue
            points.append(click[0])
            labels.append(click[1])
        coords = prep.points(np.stack(points)[None], hw).to(device) if points else None
        label_t = torch.tensor([labels], dtype=torch.int, device=device) if points else None
        low, _ = decode(model, embedding, boxes, coords, label_t, mask_input=low, dense_pe=dense_pe)
        out.append((prep.masks(low, hw)[0, 0] > 0).cpu().numpy())
    return out
