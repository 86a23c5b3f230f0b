"""A segmentation service: one model source, the volume cache and the prompt parser behind one call.

:class:`InteractiveService` ties a model source (:mod:`medsamix.serving.sources`) to a
:class:`~medsamix.serving.segmenter.Segmenter`, the volume cache and the prompt parser: image path + request fields
-> label map, affine and response parameters. Request fields are hostile input: each is coerced and range-checked
here or in :func:`medsamix.serving.prompts.parse_prompt`.

The model sources (:class:`PoolLoader`, :class:`MergedModelSource`, :func:`load_served_pool`, :func:`member_model`
...) live in :mod:`medsamix.serving.sources` and are re-exported here.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any

import numpy as np

from medsamix.data.volumes import VolumeCache
from medsamix.errors import ConfigError
from medsamix.serving.preencode import PreEncoder
from medsamix.serving.prompts import PromptError, parse_prompt
from medsamix.serving.segmenter import DEFAULT_IOU_THRESHOLD, DEFAULT_MARGIN, EmbeddingCache, Segmenter
from medsamix.serving.sources import (
    MergedModelSource,
    PoolLoader,
    ServedModel,
    describe_pool,
    load_served_pool,
    member_model,
)

__all__ = ["InteractiveResult", "InteractiveService", "MergedModelSource", "PoolLoader", "ServedModel",
           "describe_pool", "load_served_pool", "member_model"]


@dataclasses.dataclass
class InteractiveResult:
    """One served request.

    Attributes:
        mask: ``(I, J, K)`` uint8 label map (1 = structure) on the image's voxel grid.
        affine: ``(4, 4)`` IJK -> RAS affine of the image.
        params: JSON-serialisable response parameters (model, mode, slices, latencies ...).
    """

    mask: np.ndarray
    affine: np.ndarray
    params: dict[str, Any]


class InteractiveService:
    """Serves box/point segmentation requests with one model source.

    Args:
        name: Task name.
        source: Returns the model to use now (called once per request; may swap weights).
        volumes: Shared cache of loaded images.
        cache: Shared embedding cache.
        iou_threshold: Default stop threshold of 3D propagation (a request may give ``iou_threshold``).
        margin: Default box margin for propagation in pixels (a request may give ``margin``).
        status: Returns a warning about the source to pass on in responses (or None).
        device: Where the model runs ("cpu", "cuda", "cuda:1" ...); the model is moved there on first use.
        max_slices: Most slices one request may segment (a 3D box's K range, or the slices of 2D point prompts);
            None: no limit.
        preencoder: Background pre-encoding (shared by the services of one server): the first prompt on a volume
            queues its other slices, nearest first; requests pause it. None: off.
        bf16: bf16 autocast for the image encoder on CUDA (:func:`medsamix.models.encoding.autocast`); fp32 by
            default and always on a CPU. ``scripts/gpu_check.sh`` measures its Dice difference against fp32.
    """

    def __init__(self, name: str, source: Callable[[], ServedModel], volumes: VolumeCache, cache: EmbeddingCache,
                 iou_threshold: float = DEFAULT_IOU_THRESHOLD, margin: float = DEFAULT_MARGIN,
                 status: Callable[[], str | None] | None = None, device: str = "cpu",
                 max_slices: int | None = None, preencoder: PreEncoder | None = None, bf16: bool = False) -> None:
        self.name = name
        self.bf16 = bf16
        self.preencoder = preencoder
        self.max_slices = max_slices
        self.source = source
        self.status = status
        self.device = device
        self.volumes = volumes
        self.cache = cache
        self.iou_threshold = iou_threshold
        self.margin = margin
        self._segmenter: Segmenter | None = None
        self._lock = threading.Lock()

    def segmenter(self) -> tuple[Segmenter, ServedModel]:
        """The segmenter with the source's current model (swapped in when its version changed)."""
        served = self.source()
        if self._segmenter is None:
            self._segmenter = Segmenter(served.model, served.prep, served.version, self.cache, self.device,
                                        bf16=self.bf16)
        elif self._segmenter.version != served.version:
            self._segmenter.set_model(served.model, served.prep, served.version)
        return self._segmenter, served

    def open_image(self, image_path: str | os.PathLike[str]) -> bool:
        """A client opened ``image_path``: pre-encode its slices from the middle one outward (True when queued).

        Raises:
            StudyError: The image cannot be read or is not 3D.
        """
        if self.preencoder is None or not self.preencoder.enabled:
            return False
        volume = self.volumes.get(image_path)
        with self._lock:
            segmenter, _ = self.segmenter()
        return self.preencoder.schedule(segmenter, *volume.pixels(segmenter.prep))

    def _float(self, request: Mapping[str, Any], key: str, default: float, lo: float, hi: float) -> float:
        raw = request.get(key, default)
        try:
            v = float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number in [{lo}, {hi}], got {raw!r}") from None
        if not lo <= v <= hi:
            raise ConfigError(f"{key}: expected a number in [{lo}, {hi}], got {v}")
        return v

    def run(self, image_path: str | os.PathLike[str], request: Mapping[str, Any]) -> InteractiveResult:
        """Segment ``image_path`` with the request's prompt.

        Raises:
            StudyError: The image cannot be read or is not 3D.
            PromptError: The prompt is malformed or does not fit the image.
            ConfigError: ``iou_threshold`` / ``margin`` out of range.
        """
        t0 = time.perf_counter()
        iou_threshold = self._float(request, "iou_threshold", self.iou_threshold, 0.0, 1.0)
        margin = self._float(request, "margin", self.margin, 0.0, 1e4)
        volume = self.volumes.get(image_path)
        prompt = parse_prompt(request, volume.shape)
        n_slices = prompt.propagate[1] - prompt.propagate[0] + 1 if prompt.propagate else len(prompt.seeds)
        if self.max_slices is not None and n_slices > self.max_slices:
            raise PromptError(f"the prompt spans {n_slices} slices; at most {self.max_slices} per request")
        load_ms = (time.perf_counter() - t0) * 1e3
        with self.preencoder.interactive() if self.preencoder is not None else nullcontext(), self._lock:
            segmenter, served = self.segmenter()
            key, pixels = volume.pixels(segmenter.prep)  # the served model's CT window
            result = segmenter.segment(key, pixels, prompt, iou_threshold, margin)
        if self.preencoder is not None:
            self.preencoder.schedule(segmenter, key, pixels, prompt.seeds[0].index if prompt.seeds else None)
        label = str(request.get("label") or "") or "foreground"
        lat = result.latency.to_dict()
        lat["load_ms"] = round(load_ms, 3)
        params: dict[str, Any] = {
            "model": self.name,
            "model_version": served.version,
            "model_description": served.description,
            "mode": prompt.mode,
            "slices": sorted(result.slices),
            "stop_reasons": result.stop_reasons,
            "voxels": int(result.mask.sum()),
            "image_shape": list(volume.shape),
            "modality": volume.modality,
            "device": str(segmenter.device),
            "prompt_clipped": prompt.clipped,
            "ignored_points": prompt.ignored_points,
            "label_names": {label: 1},
            "latencies": lat,
            # no image-encoder pass in this request: every embedding was computed before it (by the background
            # pre-encoder, see latencies.preencoded_hits, or by an earlier prompt)
            "embedding_precomputed": result.latency.cache_misses == 0,
        }
        warning = self.status() if self.status is not None else None
        if warning:
            params["warning"] = warning
        return InteractiveResult(result.mask, volume.affine, params)
