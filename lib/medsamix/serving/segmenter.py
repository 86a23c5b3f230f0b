"""Interactive box/point segmentation of 3D volumes with a SAM-architecture model and an image-embedding cache.

A :class:`Segmenter` wraps one ``segment_anything`` ``Sam`` module, its :class:`~medsamix.models.preprocess.Preprocessor`
and a model version string. Image embeddings are cached per ``(image key, slice index, model version)`` in an LRU
cache bounded in bytes, so a repeated prompt on an already embedded slice costs only the prompt encoder and the mask
decoder. Swapping the model (a new published merge) changes the version, so stale embeddings are never used.

Coordinates (see :mod:`medsamix.serving.prompts`): volumes are ``(I, J, K)`` 0-255 float32 arrays (``data.intensity.normalize``);
slice ``k`` is ``volume[:, :, k]`` with shape ``(H, W) = (I, J)``; boxes are XYXY and points XY with x = J, y = I.

3D propagation: after the seed slice, each next slice outward (k+1, k+2, ... then k-1, k-2, ...) is prompted with
the tight box of the previous slice's mask, widened by ``margin`` pixels and clipped to the user's box, plus the
user's points on that slice. Masks are confined to the user's box (a box prompt says where the structure is).
Propagation in a direction stops at the end of the range, at an empty prediction, or
when the IoU of the new mask with the previous slice's mask falls below ``iou_threshold`` (that slice is dropped).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor, nn

from medsamix.models.encoding import DEFAULT_ENCODE_MEMORY_BYTES, batch_size_for, encode_batches
from medsamix.models.forward import predict_masks
from medsamix.models.preprocess import Preprocessor
from medsamix.serving.prompts import SlicePrompt, VolumePrompt
from medsamix.data.slices import tight_box

DEFAULT_CACHE_BYTES = 512 * 1024 * 1024
DEFAULT_IOU_THRESHOLD = 0.4
DEFAULT_MARGIN = 2.0


@dataclasses.dataclass
class Latency:
    """Time spent on one request (milliseconds) and what the embedding cache did.

    Attributes:
        encoder_ms: Image preprocessing + image encoder, summed over the slices that were not cached.
        decoder_ms: Prompt encoder + mask decoder (and the masks' upsampling to the slice), summed over the
            segmented slices.
        total_ms: The whole :meth:`Segmenter.segment` call.
        cache_hits: Slices whose embedding came from the cache.
        cache_misses: Slices pushed through the image encoder.
        preencoded_hits: Cache hits whose embedding the background pre-encoder computed.
    """

    encoder_ms: float = 0.0
    decoder_ms: float = 0.0
    total_ms: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    preencoded_hits: int = 0

    @property
    def cache_hit(self) -> bool:
        """Every segmented slice came from the cache (no encoder pass)."""
        return self.cache_misses == 0 and self.cache_hits > 0

    def to_dict(self) -> dict[str, float | int | bool]:
        return {"encoder_ms": round(self.encoder_ms, 3), "decoder_ms": round(self.decoder_ms, 3),
                "total_ms": round(self.total_ms, 3), "cache_hit": self.cache_hit, "cache_hits": self.cache_hits,
                "cache_misses": self.cache_misses, "preencoded_hits": self.preencoded_hits}


@dataclasses.dataclass
class Segmentation:
    """The result of one request.

    Attributes:
        mask: ``(I, J, K)`` uint8, 1 inside the segmented structure.
        slices: K indices segmented, in processing order.
        stop_reasons: Why propagation ended in each direction ("up"/"down" -> reason); empty in 2D.
        latency: Timings and cache use.
    """

    mask: np.ndarray
    slices: list[int]
    stop_reasons: dict[str, str]
    latency: Latency


def confine(mask: np.ndarray, box: np.ndarray | None) -> np.ndarray:
    """Zero an ``(H, W)`` mask outside an XYXY box (x = column, y = row, max inclusive); None leaves it as is."""
    if box is None:
        return mask
    x0, y0 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
    x1, y1 = int(np.ceil(box[2])), int(np.ceil(box[3]))
    out = np.zeros_like(mask)
    out[y0:y1 + 1, x0:x1 + 1] = mask[y0:y1 + 1, x0:x1 + 1]
    return out


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks of one shape (1.0 when both are empty)."""
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


class EmbeddingCache:
    """LRU cache of image embeddings ``(C, h, w)`` bounded by their total size in bytes.


    Keys are ``(image key, slice index, model version)``. Thread-safe: several infer tasks may share one cache.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[tuple[str, int, str], Tensor] = collections.OrderedDict()
        self._bytes = 0
        self._preencoded: set[tuple[str, int, str]] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[tuple[str, int, str]]:
        with self._lock:
            return list(self._items)

    @property
    def nbytes(self) -> int:
        """Bytes of the cached embeddings."""
        return self._bytes

    def __contains__(self, key: tuple[str, int, str]) -> bool:
        with self._lock:
            return key in self._items

    def is_preencoded(self, key: tuple[str, int, str]) -> bool:
        """The cached embedding under ``key`` was computed by the background pre-encoder."""
        with self._lock:
            return key in self._preencoded

    def get(self, key: tuple[str, int, str]) -> Tensor | None:
        with self._lock:
            t = self._items.get(key)
            if t is not None:
                self._items.move_to_end(key)
            return t

    def put(self, key: tuple[str, int, str], value: Tensor, preencoded: bool = False) -> None:
        """Store ``value`` under ``key`` (``preencoded``: computed in the background, not for a request)."""
        with self._lock:
            self._pop(key)
            self._items[key] = value
            self._bytes += value.element_size() * value.nelement()
            if preencoded:
                self._preencoded.add(key)
            while self._bytes > self.max_bytes and len(self._items) > 1:
                self._pop(next(iter(self._items)))

    def _pop(self, key: tuple[str, int, str]) -> None:
        t = self._items.pop(key, None)
        self._preencoded.discard(key)
        if t is not None:
            self._bytes -= t.element_size() * t.nelement()

    def drop_version(self, version: str) -> None:
        """Forget the embeddings computed with model version ``version``."""
        with self._lock:
            for key in [k for k in self._items if k[2] == version]:
                self._pop(key)


class Segmenter:
    """Box/point-prompted segmentation of volumes with one SAM model and a per-slice embedding cache.

    Args:
        model: A ``segment_anything`` ``Sam`` (its image encoder, prompt encoder and mask decoder are used).
        prep: The model's input convention (SAM or MedSAM preprocessing, input size).
        version: Identifies the weights; part of every cache key.
        cache: Embedding cache (a new one of :data:`DEFAULT_CACHE_BYTES` if None).
        device: Where the model runs.
        encode_batch: Slices per image-encoder pass when several are encoded together (pre-encoding, 3D
            propagation); None: :func:`~medsamix.models.encoding.batch_size_for` under ``encode_memory_bytes``
            (1 on a CPU, where batching gains nothing).
        bf16: bf16 autocast for the image encoder on CUDA (fp32 otherwise and by default).
    """

    def __init__(self, model: nn.Module, prep: Preprocessor, version: str, cache: EmbeddingCache | None = None,
                 device: str | torch.device = "cpu", encode_batch: int | None = None,
                 encode_memory_bytes: int = DEFAULT_ENCODE_MEMORY_BYTES, bf16: bool = False) -> None:
        self.device = torch.device(device)
        self.cache = cache if cache is not None else EmbeddingCache()
        self.encoder_passes = 0
        self.encoder_calls = 0
        self.bf16 = bf16
        self._encode_batch = encode_batch
        self.encode_memory_bytes = encode_memory_bytes
        self._lock = threading.RLock()
        self.set_model(model, prep, version)

    def set_model(self, model: nn.Module, prep: Preprocessor, version: str) -> None:
        """Serve other weights from now on; the previous version's embeddings are dropped from the cache."""
        with self._lock:
            old = getattr(self, "version", None)
            self.model = model.to(self.device).eval()
            self.prep = prep
            self.version = version
            if old is not None and old != version:
                self.cache.drop_version(old)

    def _sync(self) -> None:
        """Wait for queued GPU work, so that latencies measure the computation, not its launch."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def encode_batch(self) -> int:
        """Slices per image-encoder pass (see the class arguments)."""
        if self._encode_batch is not None:
            return max(1, self._encode_batch)
        return batch_size_for(self.model.image_encoder, self.device, self.encode_memory_bytes)

    def encode_slices(self, image_key: str, volume: np.ndarray, ks: Iterable[int], preencoded: bool = False,
                      lat: Latency | None = None) -> list[int]:
        """Embed slices ``ks`` of ``volume`` ``(I, J, K)`` that are not cached yet, in batches of :attr:`encode_batch`.

        Returns:
            The slice indices encoded now (in the order given), their embeddings stored in the cache.
        """
        with self._lock:
            todo = [k for k in dict.fromkeys(int(k) for k in ks) if (image_key, k, self.version) not in self.cache]
            if not todo:
                return []
            t0 = time.perf_counter()
            batch = self.encode_batch
            for i in range(0, len(todo), batch):
                part = todo[i:i + batch]
                x = self.prep.images(np.stack([volume[:, :, k] for k in part]))
                embs = encode_batches(self.model.image_encoder, x, batch, self.device, self.bf16)
                self.encoder_calls += 1
                for k, emb in zip(part, embs):
                    self.cache.put((image_key, k, self.version), emb, preencoded)
            self._sync()
            self.encoder_passes += len(todo)
            if lat is not None:
                lat.encoder_ms += (time.perf_counter() - t0) * 1e3
                lat.cache_misses += len(todo)
            return todo

    @torch.no_grad()
    def _embedding(self, image_key: str, volume: np.ndarray, k: int, lat: Latency,
                   ahead: Iterable[int] = ()) -> Tensor:
        """Slice ``k``'s embedding ``(C, h, w)``; on a miss, the next slices ``ahead`` are encoded in the same batch."""
        key = (image_key, k, self.version)
        emb = self.cache.get(key)
        if emb is not None:
            lat.cache_hits += 1
            lat.preencoded_hits += int(self.cache.is_preencoded(key))
            return emb
        extra = [j for j in ahead if j != k][:self.encode_batch - 1]
        self.encode_slices(image_key, volume, [*extra, k], lat=lat)  # k stored last: the newest entry
        emb = self.cache.get(key)
        assert emb is not None, "an embedding just computed is the newest cache entry and is never dropped"
        return emb

    @torch.no_grad()
    def predict_slice(self, image_key: str, volume: np.ndarray, prompt: SlicePrompt,
                      lat: Latency | None = None, ahead: Iterable[int] = ()) -> np.ndarray:
        """Segment slice ``prompt.index`` of ``volume`` ``(I, J, K)``; returns an ``(I, J)`` bool mask.

        A single point without a box uses SAM's three-mask output and keeps the mask with the best predicted IoU
        (SAM's recipe for ambiguous prompts); otherwise one mask is predicted. ``ahead``: slices likely needed
        next (3D propagation), encoded in the same batch when this slice's embedding is missing.
        """
        lat = lat if lat is not None else Latency()
        with self._lock:
            emb = self._embedding(image_key, volume, prompt.index, lat, ahead)
            hw = (int(volume.shape[0]), int(volume.shape[1]))
            t0 = time.perf_counter()
            has_points = len(prompt.labels) > 0
            mask = predict_masks(self.model, self.prep, emb, hw, None if prompt.box is None else prompt.box[None],
                                 prompt.points[None] if has_points else None,
                                 prompt.labels[None] if has_points else None,
                                 multimask=prompt.box is None and len(prompt.labels) == 1)[0]
            lat.decoder_ms += (time.perf_counter() - t0) * 1e3
            return mask

    def segment(self, image_key: str, volume: np.ndarray, prompt: VolumePrompt,
                iou_threshold: float = DEFAULT_IOU_THRESHOLD, margin: float = DEFAULT_MARGIN) -> Segmentation:
        """Segment a volume from a parsed prompt (2D seeds, optionally propagated in 3D).

        Args:
            image_key: Identifies the image (and its content, e.g. path + modification time) in cache keys.
            volume: ``(I, J, K)`` float32 0-255 image.
            prompt: From :func:`medsamix.serving.prompts.parse_prompt` with ``volume.shape``.
            iou_threshold: Propagation stops when a slice's IoU with the previous one falls below this.
            margin: Pixels added on each side of the previous mask's tight box for the next slice's box.

        Returns:
            The mask and what was done.
        """
        if tuple(volume.shape) != tuple(prompt.shape):
            raise ValueError(f"volume shape {volume.shape} differs from the prompt's {prompt.shape}")
        t0 = time.perf_counter()
        lat = Latency()
        mask = np.zeros(volume.shape, dtype=np.uint8)
        done: list[int] = []
        stops: dict[str, str] = {}
        with self._lock:
            for seed in prompt.seeds:
                pred = confine(self.predict_slice(image_key, volume, seed, lat), prompt.roi_box)
                mask[:, :, seed.index] |= pred.astype(np.uint8)
                done.append(seed.index)
            if prompt.propagate is not None:
                k_lo, k_hi = prompt.propagate
                start = prompt.seeds[0].index
                for name, ks in (("up", range(start + 1, k_hi + 1)), ("down", range(start - 1, k_lo - 1, -1))):
                    stops[name] = self._propagate(image_key, volume, prompt, mask, start, ks, iou_threshold,
                                                  margin, lat, done)
        lat.total_ms = (time.perf_counter() - t0) * 1e3
        return Segmentation(mask, done, stops, lat)

    def _propagate(self, image_key: str, volume: np.ndarray, prompt: VolumePrompt, mask: np.ndarray, start: int,
                   ks: Iterable[int], iou_threshold: float, margin: float, lat: Latency, done: list[int]) -> str:
        prev = mask[:, :, start].astype(bool)
        h, w = prev.shape
        if not prev.any():
            return f"empty mask on the seed slice {start}"
        ks = list(ks)
        for n, k in enumerate(ks):
            box = tight_box(prev) + np.array([-margin, -margin, margin, margin], dtype=np.float32)
            lo = prompt.roi_box if prompt.roi_box is not None else np.array([0, 0, w - 1, h - 1], np.float32)
            box = np.array([max(box[0], lo[0]), max(box[1], lo[1]), min(box[2], lo[2]), min(box[3], lo[3])],
                           dtype=np.float32)
            pts, lab = prompt.points.get(k, (np.zeros((0, 2), np.float32), np.zeros(0, np.int64)))
            pred = confine(self.predict_slice(image_key, volume, SlicePrompt(k, box, pts, lab), lat, ks[n + 1:]),
                           prompt.roi_box)
            if not pred.any():
                return f"empty prediction on slice {k}"
            iou = mask_iou(pred, prev)
            if iou < iou_threshold:
                return f"IoU {iou:.2f} < {iou_threshold} on slice {k}"
            mask[:, :, k] = pred
            done.append(k)
            prev = pred
        return "end of the box's slice range"


__all__ = ["EmbeddingCache", "Latency", "Segmentation", "Segmenter", "confine", "mask_iou"]
