"""A deepgrow-type infer task over :class:`medsamix.serving.InteractiveService` (box/point prompts, 2D or 3D).

Thin: prompt parsing, segmentation and caching live in ``lib/medsamix``; this class only adapts MONAI Label's request
and writes the label map (NIfTI, the image's affine) to a temporary file that MONAI Label sends back and deletes.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from typing import Any

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from medsamix.serving import InteractiveService
from medsamix.volumes import write_label


class InteractiveInfer(InferTask):
    """Box/point-prompted segmentation with one model (a pool member or the merged model).

    Args:
        service: Does the work.
        labels: Label names offered to clients.
        describe: Returns the current description (the merged model's changes when a new merge is published).
    """

    def __init__(self, service: InteractiveService, labels: list[str], describe: Callable[[], str]) -> None:
        self._describe = describe
        super().__init__(
            type=InferType.DEEPGROW,
            labels=labels,
            dimension=3,
            description=describe(),
            config={"iou_threshold": service.iou_threshold, "margin": service.margin},
        )
        self.service = service

    @property  # type: ignore[override]
    def description(self) -> str:
        return self._describe()

    @description.setter
    def description(self, value: str) -> None:  # InferTask.__init__ assigns it; the live one wins
        pass

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        t0 = time.perf_counter()
        result = self.service.run(request["image"], request)
        with tempfile.NamedTemporaryFile(suffix=".nii.gz", prefix="medsamix-", delete=False) as f:
            path = f.name
        t1 = time.perf_counter()
        write_label(result.mask, result.affine, path)
        t2 = time.perf_counter()
        result.params["latencies"].update(write_ms=round((t2 - t1) * 1e3, 3), task_ms=round((t2 - t0) * 1e3, 3))
        return path, result.params
