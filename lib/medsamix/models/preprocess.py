"""Per-model preprocessing: intensity normalisation of medical slices and the SAM / MedSAM input conventions.

Two input conventions exist in the SAM family and a model must be evaluated with the one it was trained with:

* ``"sam"`` (SAM, MedicoSAM/micro_sam): resize the longest side to ``img_size`` keeping the aspect ratio
  (segment_anything's ``ResizeLongestSide``), normalise with the SA-1B pixel mean/std on the 0-255 scale, pad
  bottom/right to ``img_size`` square. Boxes and points are scaled by ``img_size / max(H, W)``.
* ``"medsam"`` (MedSAM): resize to ``img_size x img_size`` (aspect ratio not kept), scale to [0, 1], no mean/std.
  Boxes are scaled per axis.

Before either, a slice is mapped to the 0-255 range as in MedSAM's data preparation (:mod:`medsamix.data.intensity`,
whose names are re-exported here): CT by a window (level/width in HU, default abdomen 40/400), other modalities by
clipping to the 0.5-99.5 percentiles of the volume's non-zero voxels. Coordinates: slices are ``(H, W)`` arrays;
boxes are XYXY with x = column, y = row.

The CT window is part of a model's preprocessing (:attr:`Preprocessor.ct_window`, one of the standard windows in
:data:`CT_WINDOWS`; the default :data:`DEFAULT_CT_WINDOW` is the window every slice is normalised with at load).
It applies to CT only: a slice that carries its HU values (``SliceSample.hu``, ``Volume.hu``) is windowed again
with :meth:`Preprocessor.window` when the model's window is not the default; MR and other modalities ignore it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide
from torch import Tensor

from medsamix.data.intensity import (  # noqa: F401 - re-exported
    CT_WINDOW, CT_WINDOWS, DEFAULT_CT_WINDOW, PERCENTILES, check_window, ct_range, intensity_range, to_255)
from medsamix.errors import MedSAMixError, check_choice

STYLES = ("sam", "medsam")


def check_style(style: object, what: str = "preprocessing style", error: type[MedSAMixError] = MedSAMixError) -> str:
    """``style`` if it is one of :data:`STYLES`; otherwise ``error`` naming ``what`` and the styles."""
    return str(check_choice(style, STYLES, what, error))
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclasses.dataclass(frozen=True)
class Preprocessor:
    """Maps 0-255 slices, prompts and predicted masks between slice and model-input coordinates.

    Attributes:
        style: "sam" or "medsam" (see the module docstring).
        img_size: Side of the model's square input (1024 for ViT-B SAM, 256 for the tiny pool).
        ct_window: The CT window (a name of :data:`CT_WINDOWS`) the model's CT slices are mapped to 0-255 with.
    """

    style: str = "sam"
    img_size: int = 1024
    ct_window: str = DEFAULT_CT_WINDOW

    def __post_init__(self) -> None:
        check_style(self.style)
        check_window(self.ct_window)

    @classmethod
    def from_dict(cls, d: dict[str, Any], img_size: int) -> "Preprocessor":
        """From a recipe's ``preprocessing`` section; a section without ``ct_window`` (recipes before it was
        searched) gets the default window."""
        return cls(style=str(d.get("style", "sam")), img_size=img_size,
                   ct_window=str(d.get("ct_window") or DEFAULT_CT_WINDOW))

    def window(self, image255: np.ndarray, hu: np.ndarray | None) -> np.ndarray:
        """The 0-255 pixels this model sees: ``image255`` (normalised at load with the default window or the
        percentiles), or the HU values ``hu`` of a CT image (same shape) under :attr:`ct_window` when that is not
        the default. Any shape."""
        if hu is None or self.ct_window == DEFAULT_CT_WINDOW:
            return image255
        return to_255(hu, *ct_range(self.ct_window))

    def resized_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        """Size of the slice inside the model input before padding."""
        if self.style == "medsam":
            return self.img_size, self.img_size
        return ResizeLongestSide.get_preprocess_shape(hw[0], hw[1], self.img_size)

    def images(self, slices: Tensor | np.ndarray) -> Tensor:
        """0-255 slices ``(N, H, W)`` (one size) -> model input ``(N, 3, img_size, img_size)`` float32."""
        x = torch.as_tensor(np.asarray(slices, dtype=np.float32) if isinstance(slices, np.ndarray) else slices,
                            dtype=torch.float32)
        if x.dim() == 2:
            x = x[None]
        # "sam": ResizeLongestSide.apply_image_torch's interpolation (not the method itself: it takes the target size
        # from the batch and channel dimensions of a BCHW tensor), then Sam.preprocess's normalisation and padding;
        # both pinned to segment_anything by tests/test_preprocess_sam.py
        h, w = self.resized_hw((int(x.shape[-2]), int(x.shape[-1])))
        x = F.interpolate(x[:, None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        x = x.expand(-1, 3, -1, -1)
        if self.style == "medsam":
            return (x / 255.0).clamp_(0, 1).contiguous()
        mean = torch.tensor(SAM_PIXEL_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(SAM_PIXEL_STD).view(1, 3, 1, 1)
        x = (x - mean) / std
        return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))

    def _scale(self, hw: tuple[int, int]) -> tuple[float, float]:
        h, w = self.resized_hw(hw)
        return w / hw[1], h / hw[0]

    def boxes(self, boxes: Tensor | np.ndarray, hw: tuple[int, int]) -> Tensor:
        """XYXY boxes ``(N, 4)`` in slice pixels -> model-input coordinates ``(N, 4)`` float32."""
        return self.points(torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 2, 2), hw).reshape(-1, 4)

    def points(self, coords: Tensor | np.ndarray, hw: tuple[int, int]) -> Tensor:
        """XY points ``(..., 2)`` in slice pixels -> model-input coordinates (float32)."""
        xy = torch.as_tensor(np.asarray(coords, dtype=np.float32))
        if self.style == "sam":
            return ResizeLongestSide(self.img_size).apply_coords_torch(xy, hw)
        sx, sy = self._scale(hw)
        return xy * torch.tensor([sx, sy])

    def masks(self, low_res: Tensor, hw: tuple[int, int]) -> Tensor:
        """Decoder logits ``(N, C, h, w)`` (h = w = img_size / 4) -> logits at slice size ``(N, C, H, W)``; for the
        "sam" style exactly ``Sam.postprocess_masks`` (pinned by tests/test_preprocess_sam.py)."""
        if self.style == "medsam":
            return F.interpolate(low_res, size=hw, mode="bilinear", align_corners=False)
        up = F.interpolate(low_res, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        h, w = self.resized_hw(hw)
        return F.interpolate(up[..., :h, :w], size=hw, mode="bilinear", align_corners=False)
