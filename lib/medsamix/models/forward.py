"""SAM's prompt -> mask forward pass, written once: the prompt encoder and the mask decoder on one image embedding.

Every user of a ``segment_anything`` ``Sam`` module goes through these two functions: the search's objective
(:class:`medsamix.search.evaluate.Evaluator`), the interactive protocol (:mod:`medsamix.search.interactive`), the
server (:class:`medsamix.serving.segmenter.Segmenter`) and pool training (:mod:`medsamix.demo.training`).

* :func:`decode` works in model-input coordinates (what ``Sam.prompt_encoder`` takes): boxes ``(N, 4)`` XYXY,
  points ``(N, P, 2)`` XY with labels ``(N, P)`` (1 foreground, 0 background), a mask prompt ``(N, 1, 4h, 4w)`` of
  low-resolution logits; it returns the low-resolution logits ``(N, C, 4h, 4w)`` and the predicted IoUs ``(N, C)``
  (C = 3 with ``multimask``, else 1), differentiable (training calls it with gradients on).
* :func:`predict_masks` takes prompts in slice pixels (boxes XYXY and points XY with x = column, y = row), maps them
  with the model's :class:`~medsamix.models.preprocess.Preprocessor`, decodes and brings the masks back to the
  slice: ``(N, H, W)`` bool, one mask per prompt (with ``multimask``, the one of best predicted IoU, SAM's recipe
  for an ambiguous single point).

The image embedding is ``(1, C_e, h, w)`` (or ``(C_e, h, w)``), shared by the N prompts (the decoder repeats it).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from medsamix.models.preprocess import Preprocessor


def decode(model: nn.Module, embedding: Tensor, boxes: Tensor | None = None, points: Tensor | None = None,
           labels: Tensor | None = None, mask_input: Tensor | None = None, multimask: bool = False,
           dense_pe: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Prompt encoder + mask decoder of ``model`` on one image embedding, prompts in model-input coordinates.

    Args:
        model: A ``segment_anything`` ``Sam``.
        embedding: ``(1, C_e, h, w)`` or ``(C_e, h, w)`` image embedding.
        boxes: ``(N, 4)`` XYXY, or ``None``.
        points: ``(N, P, 2)`` XY, or ``None``; ``labels`` ``(N, P)`` then (1 = foreground, 0 = background).
        mask_input: ``(N, 1, 4h, 4w)`` low-resolution logits of a previous round, or ``None``.
        multimask: Predict SAM's three masks per prompt instead of one.
        dense_pe: ``model.prompt_encoder.get_dense_pe()`` when the caller already has it.

    Returns:
        Low-resolution logits ``(N, C, 4h, 4w)`` and predicted IoUs ``(N, C)``.
    """
    if points is not None and labels is None:
        raise ValueError("points need labels")
    if embedding.dim() == 3:
        embedding = embedding[None]
    sparse, dense = model.prompt_encoder(points=None if points is None else (points, labels), boxes=boxes,
                                         masks=mask_input)
    pe = model.prompt_encoder.get_dense_pe() if dense_pe is None else dense_pe
    low, iou = model.mask_decoder(image_embeddings=embedding, image_pe=pe, sparse_prompt_embeddings=sparse,
                                  dense_prompt_embeddings=dense, multimask_output=multimask)
    return low, iou


def best_mask(low: Tensor, iou: Tensor) -> Tensor:
    """Of ``C`` masks per prompt ``(N, C, h, w)`` the one with the highest predicted IoU ``(N, C)``:
    ``(N, 1, h, w)``."""
    best = iou.argmax(dim=1)
    return low[torch.arange(low.shape[0], device=low.device), best][:, None]


@torch.no_grad()
def predict_masks(model: nn.Module, prep: Preprocessor, embedding: Tensor, hw: tuple[int, int],
                  boxes: np.ndarray | Tensor | None = None, points: np.ndarray | Tensor | None = None,
                  labels: np.ndarray | Tensor | None = None, multimask: bool = False,
                  dense_pe: Tensor | None = None) -> np.ndarray:
    """Masks of prompts given in slice pixels on one slice of size ``hw`` = ``(H, W)``.

    Args:
        model: A ``segment_anything`` ``Sam`` (eval mode).
        prep: The model's input convention.
        embedding: The slice's image embedding (``(1, C_e, h, w)`` or ``(C_e, h, w)``), on the model's device.
        hw: The slice's ``(H, W)``.
        boxes: ``(N, 4)`` XYXY in slice pixels, or ``None``.
        points: ``(N, P, 2)`` XY in slice pixels, or ``None``; ``labels`` ``(N, P)`` then.
        multimask: Decode three masks per prompt and keep the one of best predicted IoU.
        dense_pe: As in :func:`decode`.

    Returns:
        ``(N, H, W)`` bool masks (logit > 0), on the CPU.
    """
    device = embedding.device
    box_t = None if boxes is None else prep.boxes(boxes, hw).to(device)
    point_t = label_t = None
    if points is not None:
        point_t = prep.points(points, hw).to(device)
        label_t = torch.as_tensor(np.asarray(labels), dtype=torch.int64).to(device)
    low, iou = decode(model, embedding, box_t, point_t, label_t, multimask=multimask, dense_pe=dense_pe)
    if multimask:
        low = best_mask(low, iou)
    return (prep.masks(low, hw)[:, 0] > 0).cpu().numpy()
