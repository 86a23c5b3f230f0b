"""SAM's interactive training objective, for building small SAM-architecture model pools.

One step: encode a batch of images once; for every sample, prompt the decoder with a box, a point or both; then
(optionally) run correction rounds that add a point sampled from the error region and feed the previous logits
back as the mask prompt, as in SAM's and micro_sam's iterative training. Loss per round: focal (weight 20) + Dice
on the low-resolution logits against the area-downsampled ground truth, plus the MSE of the IoU head against the
achieved IoU. A single point prompt predicts SAM's 3 multimask outputs and only the best one is penalised.

Shapes: images ``(H, W)`` float32 0-255, masks ``(H, W)`` bool; model inputs ``(B, 3, S, S)``; low-resolution
logits ``(1, C, S/4, S/4)``; boxes XYXY and points XY in model-input pixels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medsamix.search.evaluate import Evaluator
from medsamix.models.forward import decode
from medsamix.models.preprocess import Preprocessor
from medsamix.data.slices import SliceSample, tight_box
from medsamix.data.tasks import Task

Sample = tuple[np.ndarray, np.ndarray]  # (image 0-255 (H, W), mask (H, W) bool)
Sampler = Callable[[np.random.Generator], Sample]


@dataclasses.dataclass(frozen=True)
class PromptPolicy:
    """Which prompts a training stage uses.

    Attributes:
        box_prob: Probability that the first prompt contains the (jittered) box.
        point_prob: Probability that the first prompt contains a positive point (a point is forced when the
            box is not drawn).
        corrections: Number of correction rounds after the first prediction.
        jitter_at_1024: Box jitter in pixels at 1024 px scale (MedSAM: 20).
    """

    box_prob: float = 0.5
    point_prob: float = 0.5
    corrections: int = 1
    jitter_at_1024: float = 20.0


def target_lowres(mask: np.ndarray, prep: Preprocessor, size: int) -> Tensor:
    """Ground truth ``(H, W)`` -> soft target ``(1, 1, size, size)`` in the decoder's low-resolution frame
    (``size`` = 4 x the image-embedding side: S/4 for SAM's 1024 px / 16 px patches)."""
    h, w = prep.resized_hw(mask.shape)
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    m = F.pad(m, (0, prep.img_size - w, 0, prep.img_size - h))
    return F.adaptive_avg_pool2d(m, size)


def _first_prompt(mask: np.ndarray, prep: Preprocessor, policy: PromptPolicy,
                  rng: np.random.Generator) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    rows, cols = np.nonzero(mask)
    use_box = rng.random() < policy.box_prob
    use_point = (not use_box) or rng.random() < policy.point_prob
    box = coords = labels = None
    if use_box:
        h, w = mask.shape
        r = policy.jitter_at_1024 * max(h, w) / 1024
        b = np.array([cols.min(), rows.min(), cols.max(), rows.max()], dtype=np.float32)
        b += rng.uniform(0, r, 4).astype(np.float32) * np.array([-1, -1, 1, 1], dtype=np.float32)
        b = np.clip(b, 0, [w - 1, h - 1, w - 1, h - 1])
        box = prep.boxes(b[None], mask.shape)
    if use_point:
        i = int(rng.integers(len(rows)))
        coords = prep.points(np.array([[[cols[i], rows[i]]]], dtype=np.float32), mask.shape)
        labels = torch.ones(1, 1)
    return box, coords, labels


def _correction_point(logits: Tensor, target: Tensor, rng: np.random.Generator,
                      scale: float = 4.0) -> tuple[Tensor, Tensor] | None:
    """A point on the larger error (false negatives: positive, false positives: negative) in input pixels;
    ``scale`` = input pixels per low-resolution pixel. None when the prediction is perfect."""
    pred = logits[0, 0] > 0
    gt = target[0, 0] > 0.5
    fn, fp = gt & ~pred, pred & ~gt
    err, label = (fn, 1.0) if fn.sum() >= fp.sum() else (fp, 0.0)
    idx = torch.nonzero(err)
    if len(idx) == 0:
        return None
    y, x = idx[int(rng.integers(len(idx)))].tolist()
    return torch.tensor([[[(x + 0.5) * scale, (y + 0.5) * scale]]]), torch.tensor([[label]])


def mask_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Per-mask focal (x20) + Dice loss: logits ``(1, C, h, w)``, target ``(1, 1, h, w)`` -> ``(C,)``."""
    t = target.expand_as(logits)
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    pt = p * t + (1 - p) * (1 - t)
    focal = (0.25 * t + 0.75 * (1 - t)) * (1 - pt) ** 2 * ce
    inter = (p * t).flatten(2).sum(-1)
    dice = 1 - (2 * inter + 1) / (p.flatten(2).sum(-1) + t.flatten(2).sum(-1) + 1)
    return 20 * focal.flatten(2).mean(-1)[0] + dice[0]


def _iou(logits: Tensor, target: Tensor) -> Tensor:
    pred = logits > 0
    gt = target > 0.5
    inter = (pred & gt).flatten(2).sum(-1).float()
    union = (pred | gt).flatten(2).sum(-1).float().clamp(min=1)
    return (inter / union)[0]


def train_step(model: nn.Module, batch: Sequence[Sample], prep: Preprocessor, policy: PromptPolicy,
               rng: np.random.Generator) -> Tensor:
    """Loss of one batch under ``policy`` (call ``backward`` on it)."""
    images = torch.cat([prep.images(img) for img, _ in batch])
    embeddings = model.image_encoder(images)
    dense_pe = model.prompt_encoder.get_dense_pe()
    total = torch.zeros(())
    lowres = 4 * int(embeddings.shape[-1])
    for i, (_, mask) in enumerate(batch):
        target = target_lowres(mask, prep, lowres)
        box, coords, labels = _first_prompt(mask, prep, policy, rng)
        mask_input = None
        for round_ in range(1 + policy.corrections):
            multi = round_ == 0 and box is None and coords is not None and coords.shape[1] == 1
            logits, iou_pred = decode(model, embeddings[i:i + 1], box, coords, labels, mask_input, multi, dense_pe)
            losses = mask_loss(logits, target)
            best = int(torch.argmin(losses))
            total = total + losses[best] + F.mse_loss(iou_pred[0], _iou(logits.detach(), target))
            if round_ == policy.corrections:
                break
            chosen = logits[:, best:best + 1].detach()
            extra = _correction_point(chosen, target, rng, prep.img_size / lowres)
            if extra is None:
                break
            coords = extra[0] if coords is None else torch.cat([coords, extra[0]], dim=1)
            labels = extra[1] if labels is None else torch.cat([labels, extra[1]], dim=1)
            mask_input = chosen
    return total / len(batch)


def box_dice(model: nn.Module, samples: Sequence[Sample], prep: Preprocessor) -> float:
    """Mean slice Dice of tight-box predictions (validation during training), via :class:`Evaluator`."""
    task = Task("validation", 1)
    slices = [SliceSample(f"val{i}", task, 2, 0, img, mask, tight_box(mask)) for i, (img, mask) in enumerate(samples)]
    result = Evaluator(slices).evaluate(model, prep)
    model.train()
    return float(np.mean(result.per_sample))
