"""Interactive prompts from 3D Slicer and OHIF, parsed and validated into per-slice SAM prompts.

Coordinates:

* Requests give voxel indices **IJK** of the image array exactly as MONAI loads it (``studies`` module: the file's
  storage order, never re-oriented). 3D Slicer computes them with the volume's RAS-to-IJK matrix, so they are the
  same indices whatever the image's direction matrix (RAS, LPS, flipped axes): no world coordinates are involved here.
* The model segments slices through IJK axis 2 (K). Slice ``k`` is ``volume[:, :, k]``, an ``(H, W) = (I, J)``
  array: rows are I, columns are J (the convention of :mod:`medsamix.data.slices`).
* SAM prompts on that slice are **XYXY** boxes ``[x_min, y_min, x_max, y_max]`` and **XY** points with x = column = J
  and y = row = I, max corners inclusive (the last voxel inside the box).

Accepted request fields (all optional, at least one prompt needed):

* ``roi``: ``[i_a, i_b, j_a, j_b, k_a, k_b]`` (Slicer's ROI as IJK index pairs; a pair may come in either order
  because Slicer maps the RAS min/max corners, which swap on flipped axes). A roi that sticks out of the volume is
  clipped to it; one entirely outside, or with no extent in I or J, is an error. ``[]`` or all zeros mean "no roi".
* ``pos_boxes``: OHIF-AI style ``[[[i, j, k], [i, j, k]]]``: one box given by two opposite IJK corners.
* ``foreground`` / ``background``: lists of IJK points ``[i, j, k]`` (Slicer's control points); OHIF-AI's
  ``pos_points`` / ``neg_points`` are added to them. Points outside the volume are an error. ``neg_boxes`` is not
  supported (an error says so).
* ``slice``: the K index to segment in 2D mode (Slicer's current slice); ``-1`` or ``None``: not given.
* ``mode``: ``"2d"`` or ``"3d"``; default: 3D when a box spans several K slices, else 2D.

Modes:

* **3D** (a box spanning ``k_a..k_b``): the seed slice (``slice`` when inside the range, else the middle one) is
  segmented from the box (and the user's points on it); the result is propagated slice by slice outward within the
  range (see :mod:`medsamix.serving.segmenter`).
* **2D** with a box: the seed slice only. **2D** without a box: every slice that carries a foreground point is
  segmented from its own points, or only ``slice`` when given (Slicer's 2D deepgrow sends the current slice).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medsamix.errors import MedSAMixError

SLICE_AXIS = 2
MODES = ("2d", "3d")


class PromptError(MedSAMixError):
    """A request's prompt is malformed, outside the volume, empty, or does not fit the image."""


@dataclasses.dataclass(frozen=True)
class SlicePrompt:
    """The prompt for one slice ``volume[:, :, index]`` in slice pixel coordinates.

    Attributes:
        index: K index of the slice.
        box: ``(4,)`` float32 XYXY box (x = J, y = I, max inclusive) or None.
        points: ``(N, 2)`` float32 XY points (x = J, y = I); N may be 0.
        labels: ``(N,)`` int64 point labels, 1 = foreground, 0 = background.
    """

    index: int
    box: np.ndarray | None
    points: np.ndarray
    labels: np.ndarray

    @property
    def has_foreground(self) -> bool:
        return self.box is not None or bool(np.any(self.labels == 1))


@dataclasses.dataclass(frozen=True)
class VolumePrompt:
    """What to segment in one request.

    Attributes:
        shape: ``(I, J, K)`` of the volume.
        seeds: Slices segmented directly from the user's prompts.
        propagate: Inclusive K range ``(k_min, k_max)`` to propagate the (single) seed over, or None (2D).
        roi_box: ``(4,)`` float32 XYXY box of the roi in slice pixels, which confines propagated boxes; None
            without a box.
        points: K index -> ``(points (N, 2) XY, labels (N,))`` of every user point, for propagated slices.
        ignored_points: User points not used (2D mode: on another slice than the one segmented).
        clipped: The roi was partly outside the volume and was clipped to it.
    """

    shape: tuple[int, int, int]
    seeds: list[SlicePrompt]
    propagate: tuple[int, int] | None
    roi_box: np.ndarray | None
    points: dict[int, tuple[np.ndarray, np.ndarray]]
    ignored_points: int = 0
    clipped: bool = False

    @property
    def mode(self) -> str:
        return "3d" if self.propagate is not None else "2d"


def ijk_box_to_xyxy(i_range: tuple[int, int], j_range: tuple[int, int]) -> np.ndarray:
    """An IJK box's extent in I and J as an XYXY box on a K slice: ``[j_min, i_min, j_max, i_max]`` (float32)."""
    return np.array([j_range[0], i_range[0], j_range[1], i_range[1]], dtype=np.float32)


def ij_to_xy(points_ijk: np.ndarray) -> np.ndarray:
    """IJK points ``(N, 3)`` -> XY slice points ``(N, 2)`` float32 (x = J, y = I)."""
    return np.asarray(points_ijk, dtype=np.float32).reshape(-1, 3)[:, [1, 0]].copy()


MAX_COORDINATE = 1 << 31  # voxel indices beyond this are refused (no volume is that large)
MAX_POINTS = 1000  # points of one kind per request


def _number(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PromptError(f"{what}: expected a number, got {str(v)[:80]!r}")
    if isinstance(v, int) and abs(v) > MAX_COORDINATE:
        raise PromptError(f"{what}: {str(v)[:40]}... is out of range (at most {MAX_COORDINATE} in magnitude)")
    if not math.isfinite(v) or abs(v) > MAX_COORDINATE:
        raise PromptError(f"{what}: expected a finite number, got {v!r}")
    return float(v)


def _index(v: Any, what: str) -> int:
    return int(round(_number(v, what)))


def _points(raw: Any, name: str, shape: tuple[int, int, int]) -> np.ndarray:
    """A list of IJK points -> ``(N, 3)`` int64, each checked to lie inside the volume."""
    if raw is None:
        return np.zeros((0, 3), dtype=np.int64)
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
        raise PromptError(f"{name}: expected a list of [i, j, k] points, got {str(raw)[:80]!r}")
    if len(raw) > MAX_POINTS:
        raise PromptError(f"{name}: {len(raw)} points; at most {MAX_POINTS} per request")
    out = []
    for n, p in enumerate(raw):
        if not isinstance(p, Sequence) or isinstance(p, (str, bytes)) or len(p) != 3:
            raise PromptError(f"{name}[{n}]: expected an [i, j, k] voxel index, got {p!r}")
        ijk = [_index(v, f"{name}[{n}]") for v in p]
        if any(not 0 <= c < s for c, s in zip(ijk, shape)):
            raise PromptError(f"{name}[{n}] = {ijk} lies outside the volume of shape {list(shape)} (IJK)")
        out.append(ijk)
    return np.array(out, dtype=np.int64).reshape(-1, 3)


def _box_ranges(corners: Sequence[float], shape: tuple[int, int, int], name: str
                ) -> tuple[list[tuple[int, int]], bool]:
    """Sorted, clipped inclusive index ranges per IJK axis from ``[a_0, b_0, a_1, b_1, a_2, b_2]``."""
    ranges, clipped = [], False
    for axis in range(3):
        a, b = (_index(corners[2 * axis + s], f"{name}[{2 * axis + s}]") for s in (0, 1))
        lo, hi = min(a, b), max(a, b)
        if hi < 0 or lo > shape[axis] - 1:
            raise PromptError(f"{name} {list(corners)} lies outside the volume of shape {list(shape)}: "
                              f"{'IJK'[axis]} range {lo}..{hi} is not within 0..{shape[axis] - 1}")
        if lo < 0 or hi > shape[axis] - 1:
            clipped = True
            lo, hi = max(lo, 0), min(hi, shape[axis] - 1)
        ranges.append((lo, hi))
    for axis in (0, 1):
        if ranges[axis][0] == ranges[axis][1]:
            raise PromptError(f"{name} {list(corners)} is empty: it has no extent along {'IJK'[axis]} "
                              f"({ranges[axis][0]}..{ranges[axis][1]}); draw a box around the structure")
    return ranges, clipped


def _roi(request: Mapping[str, Any], shape: tuple[int, int, int]) -> tuple[list[tuple[int, int]] | None, bool]:
    roi = request.get("roi")
    boxes = request.get("pos_boxes")
    has_roi = roi is not None and not (isinstance(roi, Sequence) and (len(roi) == 0 or (
        len(roi) == 6 and all(isinstance(v, (int, float)) and v == 0 for v in roi))))
    has_boxes = boxes is not None and not (isinstance(boxes, Sequence) and len(boxes) == 0)
    if has_roi and has_boxes:
        raise PromptError("give either roi or pos_boxes, not both")
    if has_roi:
        if not isinstance(roi, Sequence) or isinstance(roi, (str, bytes)) or len(roi) != 6:
            raise PromptError(f"roi: expected [i_a, i_b, j_a, j_b, k_a, k_b], got {roi!r}")
        return _box_ranges(roi, shape, "roi")
    if has_boxes:
        if not isinstance(boxes, Sequence) or isinstance(boxes, (str, bytes)):
            raise PromptError(f"pos_boxes: expected [[[i, j, k], [i, j, k]]], got {boxes!r}")
        if len(boxes) != 1:
            raise PromptError(f"pos_boxes: exactly one box per request is supported, got {len(boxes)}")
        box = boxes[0]
        if (not isinstance(box, Sequence) or len(box) != 2
                or any(not isinstance(c, Sequence) or isinstance(c, (str, bytes)) or len(c) != 3 for c in box)):
            raise PromptError(f"pos_boxes[0]: expected two corners [[i, j, k], [i, j, k]], got {box!r}")
        a, b = box
        return _box_ranges([a[0], b[0], a[1], b[1], a[2], b[2]], shape, "pos_boxes[0]")
    return None, False


def _slice(request: Mapping[str, Any], shape: tuple[int, int, int]) -> int | None:
    raw = request.get("slice")
    if raw is None or raw == "":
        return None
    k = _index(raw, "slice")
    if k < 0:
        return None
    if k >= shape[SLICE_AXIS]:
        raise PromptError(f"slice {k} lies outside the volume: K runs 0..{shape[SLICE_AXIS] - 1}")
    return k


def parse_prompt(request: Mapping[str, Any], shape: Sequence[int], mode: str | None = None) -> VolumePrompt:
    """Validate a request's prompt fields against a volume shape and turn them into slice prompts.

    Args:
        request: The request's fields (see the module docstring); other keys are ignored.
        shape: ``(I, J, K)`` of the image array.
        mode: ``"2d"``, ``"3d"`` or None (``request["mode"]``, else automatic).

    Returns:
        The parsed prompt.

    Raises:
        PromptError: With the reason: not a 3D image, malformed fields, box or point outside the volume, empty box,
            both roi and pos_boxes, no foreground prompt on the slice to segment, unknown mode.
    """
    if len(shape) != 3:
        raise PromptError(f"interactive segmentation needs a 3D image, got an image of shape {list(shape)}")
    shp = (int(shape[0]), int(shape[1]), int(shape[2]))
    mode = mode or request.get("mode") or None
    if mode is not None:
        mode = str(mode).lower()
        if mode not in MODES:
            raise PromptError(f"mode must be one of {MODES}, got {mode!r}")
    ranges, clipped = _roi(request, shp)
    if request.get("neg_boxes"):
        raise PromptError("neg_boxes is not supported: SAM takes one positive box; use background points instead")
    fg = np.concatenate([_points(request.get("foreground"), "foreground", shp),
                         _points(request.get("pos_points"), "pos_points", shp)])
    bg = np.concatenate([_points(request.get("background"), "background", shp),
                         _points(request.get("neg_points"), "neg_points", shp)])
    k_given = _slice(request, shp)
    all_pts = np.concatenate([fg, bg])
    all_lab = np.concatenate([np.ones(len(fg), np.int64), np.zeros(len(bg), np.int64)])
    by_slice: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for k in sorted(set(all_pts[:, 2].tolist())):
        sel = all_pts[:, 2] == k
        by_slice[int(k)] = (ij_to_xy(all_pts[sel]), all_lab[sel])

    def seed(k: int, box: np.ndarray | None) -> SlicePrompt:
        pts, lab = by_slice.get(k, (np.zeros((0, 2), np.float32), np.zeros(0, np.int64)))
        return SlicePrompt(k, box, pts, lab)

    if ranges is not None:
        box = ijk_box_to_xyxy(ranges[0], ranges[1])
        k_lo, k_hi = ranges[2]
        k0 = k_given if k_given is not None and k_lo <= k_given <= k_hi else (k_lo + k_hi) // 2
        three_d = k_hi > k_lo if mode is None else mode == "3d"
        if three_d:
            used = sum(len(lab) for k, (_, lab) in by_slice.items() if k_lo <= k <= k_hi)
            return VolumePrompt(shp, [seed(k0, box)], (k_lo, k_hi), box, by_slice, len(all_lab) - used, clipped)
        used = len(by_slice.get(k0, ((), ()))[1])
        return VolumePrompt(shp, [seed(k0, box)], None, box, by_slice, len(all_lab) - used, clipped)

    if mode == "3d":
        raise PromptError("3D mode needs a box (roi or pos_boxes) spanning the slices to segment")
    if not len(fg):
        raise PromptError("no prompt: give a box (roi or pos_boxes) or at least one foreground point")
    if k_given is not None:
        if k_given not in by_slice or not np.any(by_slice[k_given][1] == 1):
            raise PromptError(f"no foreground point on slice {k_given}: points are on slices "
                              f"{sorted(by_slice)} (IJK K index)")
        ks = [k_given]
    else:
        ks = [k for k, (_, lab) in by_slice.items() if np.any(lab == 1)]
    used = sum(len(by_slice[k][1]) for k in ks)
    return VolumePrompt(shp, [seed(k, None) for k in ks], None, None, by_slice, len(all_lab) - used, False)
