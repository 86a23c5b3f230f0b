"""A deepgrow-type infer task over :class:`medsamix.serving.service.InteractiveService` (box/point prompts, 2D or 3D).

Thin: prompt parsing, segmentation and caching live in ``lib/medsamix``; this class only adapts MONAI Label's request
and writes the label map to a temporary file that the server sends back and deletes: in the format the client asks
for (``result_extension`` / ``result_dtype`` / ``result_compress``: NRRD for 3D Slicer and OHIF, whose plugin reads
the raw voxels; NIfTI by default), with the image's geometry (:func:`medsamix.data.labelfile.encode_label`).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from typing import Any

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from medsamix.data.labelfile import ResultFormat, encode_label
from medsamix.serving.service import InteractiveService


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
        fmt = ResultFormat.from_params(request)  # a bad format is refused before any work
        result = self.service.run(request["image"], request)
        t1 = time.perf_counter()
        encoded = encode_label(result.mask, result.affine, fmt, "label")
        with tempfile.NamedTemporaryFile(suffix=fmt.extension, prefix="medsamix-", delete=False) as f:
            f.write(encoded.body)
            path = f.name
        t2 = time.perf_counter()
        result.params["latencies"].update(write_ms=round((t2 - t1) * 1e3, 3), task_ms=round((t2 - t0) * 1e3, 3))
        return path, result.params
