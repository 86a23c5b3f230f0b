"""The objective: Dice of a SAM-architecture model on box-prompted slices, with image-embedding reuse.

An :class:`Evaluator` holds a fixed list of slice samples (each a 0-255 slice, a ground-truth mask and an XYXY
box). Slices shared by several tasks are encoded once. Image embeddings are cached under a caller-supplied key -
for a merged model, the fingerprint of the image-encoder groups' settings plus the preprocessing - so that
evaluating a configuration that changes only prompt-encoder or decoder groups costs no encoder pass.
:attr:`Evaluator.encoder_passes` counts the slices pushed through an image encoder.

Metrics (computed with MONAI's ``compute_dice``):

* ``dice2d``: per task, the mean over slices of the 2D Dice (the MedSAMix paper's metric);
* ``dice3d``: per task, the mean over volumes of the 3D Dice of the stacked slice predictions against the whole
  ground-truth structure.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice
from torch import Tensor, nn

from medsamix.models.encoding import batch_size_for, encode_batches
from medsamix.models.forward import predict_masks
from medsamix.models.preprocess import Preprocessor
from medsamix.data.slices import SliceSample
from medsamix.search.interactive import STARTS, interactive_masks


@dataclasses.dataclass
class DiceResult:
    """Scores of one model on an evaluator's samples.

    Attributes:
        dice2d: Task name -> mean slice Dice.
        dice3d: Task name -> mean volume Dice.
        per_sample: Dice of every evaluated sample, in sample order (NaN for samples not evaluated).
    """

    dice2d: dict[str, float]
    dice3d: dict[str, float]
    per_sample: np.ndarray

    @property
    def mean2d(self) -> float:
        return float(np.mean(list(self.dice2d.values()))) if self.dice2d else float("nan")


def dice_2d(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two ``(H, W)`` boolean masks via MONAI (1.0 when both are empty)."""
    p = torch.from_numpy(np.ascontiguousarray(pred))[None, None].float()
    g = torch.from_numpy(np.ascontiguousarray(gt))[None, None].float()
    return float(compute_dice(p, g, include_background=True, ignore_empty=False)[0, 0])


class Evaluator:
    """Box-prompt Dice of models on a fixed set of slices.

    Args:
        samples: The slices (0-255 images, masks, boxes); typically a task's calibration or test split.
        batch_size: Slices per image-encoder pass; ``None``: :func:`~medsamix.models.encoding.batch_size_for` the
            model's encoder and ``device`` (1 on a CPU, where a batch costs as much as its slices one by one and
            only adds activation memory; on CUDA as many as fit its activation-memory cap).
        cache_size: Most embedding sets kept (one set per image-encoder key); ``None``: bounded by bytes only.
        cache_bytes: Most bytes of cached embeddings; least recently used sets are dropped first (the set in use
            is never dropped). Multi-fidelity searches need room for every configuration awaiting promotion.
        device: Where models run.
        rounds: 0 scores box prompts; k > 0 scores the interactive protocol (:mod:`medsamix.search.interactive`):
            the initial prompt and k correction clicks, a slice's Dice being its mean over the k + 1 rounds.
        start: Initial prompt of the interactive protocol, "box" or "point".
    """

    def __init__(self, samples: Sequence[SliceSample], batch_size: int | None = None, cache_size: int | None = None,
                 cache_bytes: int = 2 * 2**30, device: str | torch.device = "cpu", rounds: int = 0,
                 start: str = "box") -> None:
        if not samples:
            raise ValueError("an evaluator needs at least one slice sample")
        if rounds < 0 or start not in STARTS:
            raise ValueError(f"rounds must be >= 0 and start one of {STARTS}, got {rounds}, {start!r}")
        self.rounds = rounds
        self.start = start
        self.samples = list(samples)
        self.batch_size = batch_size
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        self.device = torch.device(device)
        self.encoder_passes = 0
        keys: dict[tuple[str, int, int], int] = {}
        self.image_of: list[int] = []  # sample -> unique image index
        self.images: list[np.ndarray] = []
        for s in self.samples:
            k = (s.study_id, s.axis, s.index)
            if k not in keys:
                keys[k] = len(self.images)
                self.images.append(s.image)
            self.image_of.append(keys[k])
        self._cache: collections.OrderedDict[str, dict[int, Tensor]] = collections.OrderedDict()

    @property
    def num_images(self) -> int:
        return len(self.images)

    def subset(self, count: int, seed: int = 0) -> list[int]:
        """Indices of about ``count`` samples, stratified by task, for multi-fidelity evaluation.

        Each task's samples are shuffled once per ``seed`` and the subset takes the same share of every task from
        the front, so a smaller budget's subset is contained in a larger one's (embeddings computed at a low budget
        are reused when a configuration is promoted)."""
        by_task: dict[str, list[int]] = collections.defaultdict(list)
        for i, s in enumerate(self.samples):
            by_task[s.task.name].append(i)
        share = max(1, count // max(1, len(by_task)))
        chosen = []
        for name in sorted(by_task):
            order = np.random.default_rng([seed, len(by_task[name])]).permutation(by_task[name])
            chosen += [int(i) for i in order[:share]]
        return sorted(chosen)

    @torch.no_grad()
    def _embeddings(self, model: nn.Module, prep: Preprocessor, key: str | None,
                    needed: Sequence[int]) -> dict[int, Tensor]:
        cache: dict[int, Tensor] = {}
        if key is not None:
            full_key = f"{key}|{prep.style}|{prep.img_size}"
            cache = self._cache.setdefault(full_key, {})
            self._cache.move_to_end(full_key)
        missing = [i for i in needed if i not in cache]
        by_shape: dict[tuple[int, ...], list[int]] = collections.defaultdict(list)
        for i in missing:
            by_shape[self.images[i].shape].append(i)
        out = dict(cache) if key is not None else {}
        batch = self.batch_size or batch_size_for(model.image_encoder, self.device)
        for idx in by_shape.values():
            for start in range(0, len(idx), batch):
                chunk = idx[start:start + batch]
                x = prep.images(np.stack([self.images[i] for i in chunk]))  # (N, 3, S, S) model inputs
                emb = encode_batches(model.image_encoder, x, batch, self.device)  # (N, C, S/16, S/16)
                self.encoder_passes += len(chunk)
                for i, e in zip(chunk, emb):
                    out[i] = e
                    if key is not None:
                        cache[i] = e
        if key is not None:
            self._evict()
        return out

    @property
    def cached_bytes(self) -> int:
        return sum(e.numel() * e.element_size() for c in self._cache.values() for e in c.values())

    def _evict(self) -> None:
        """Drop least recently used embedding sets beyond ``cache_size`` sets or ``cache_bytes`` (never the newest)."""
        size = self.cached_bytes
        while len(self._cache) > 1 and (
                (self.cache_size is not None and len(self._cache) > self.cache_size) or size > self.cache_bytes):
            _, dropped = self._cache.popitem(last=False)
            size -= sum(e.numel() * e.element_size() for e in dropped.values())

    @torch.no_grad()
    def predict(self, model: nn.Module, prep: Preprocessor, key: str | None = None,
                indices: Sequence[int] | None = None) -> dict[int, np.ndarray]:
        """Box-prompted predictions ``(H, W)`` bool for the given samples (all by default).

        Args:
            model: A ``segment_anything`` ``Sam`` (its image encoder, prompt encoder and mask decoder are used).
            prep: The preprocessing the model expects.
            key: Embedding-cache key; equal keys must mean equal image encoders. ``None`` disables the cache.
            indices: Samples to predict.
        """
        model.eval()
        indices = list(range(len(self.samples))) if indices is None else list(indices)
        emb = self._embeddings(model, prep, key, sorted({self.image_of[i] for i in indices}))
        by_image: dict[int, list[int]] = collections.defaultdict(list)
        for i in indices:
            by_image[self.image_of[i]].append(i)
        dense_pe = model.prompt_encoder.get_dense_pe()
        preds: dict[int, np.ndarray] = {}
        for img, sample_ids in by_image.items():
            boxes = np.stack([self.samples[i].box for i in sample_ids])
            masks = predict_masks(model, prep, emb[img], self.images[img].shape, boxes=boxes, dense_pe=dense_pe)
            for i, m in zip(sample_ids, masks):
                preds[i] = m
        return preds

    @torch.no_grad()
    def predict_rounds(self, model: nn.Module, prep: Preprocessor, key: str | None = None,
                       indices: Sequence[int] | None = None) -> list[dict[int, np.ndarray]]:
        """Predictions ``(H, W)`` bool of every round of the interactive protocol (``self.rounds`` correction
        rounds after ``self.start``), round by round; each slice is encoded once, the rounds are decoder-only."""
        model.eval()
        indices = list(range(len(self.samples))) if indices is None else list(indices)
        emb = self._embeddings(model, prep, key, sorted({self.image_of[i] for i in indices}))
        out: list[dict[int, np.ndarray]] = [{} for _ in range(self.rounds + 1)]
        for i in indices:
            s = self.samples[i]
            masks = interactive_masks(model, prep, emb[self.image_of[i]], s.mask, s.box, self.rounds, self.start)
            for r, m in enumerate(masks):
                out[r][i] = m
        return out

    def evaluate(self, model: nn.Module, prep: Preprocessor, key: str | None = None,
                 indices: Sequence[int] | None = None) -> DiceResult:
        """2D and 3D Dice per task of ``model`` on the given samples (all by default).

        With ``rounds`` > 0 a slice's 2D Dice is its mean over the rounds of the interactive protocol and the 3D
        Dice is that of the last round's predictions."""
        rounds = ([self.predict(model, prep, key, indices)] if self.rounds == 0
                  else self.predict_rounds(model, prep, key, indices))
        preds = rounds[-1]
        per_sample = np.full(len(self.samples), np.nan)
        per_task: dict[str, list[float]] = collections.defaultdict(list)
        volumes: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
        for i, pred in preds.items():
            s = self.samples[i]
            per_sample[i] = float(np.mean([dice_2d(r[i], s.mask) for r in rounds]))
            per_task[s.task.name].append(per_sample[i])
            volumes[(s.task.name, s.study_id)].append(i)
        dice3d: dict[str, list[float]] = collections.defaultdict(list)
        for (task, _), ids in volumes.items():
            p = torch.from_numpy(np.concatenate([preds[i].ravel() for i in ids]))[None, None].float()
            g = torch.from_numpy(np.concatenate([self.samples[i].mask.ravel() for i in ids]))[None, None].float()
            dice3d[task].append(float(compute_dice(p, g, include_background=True, ignore_empty=False)[0, 0]))
        return DiceResult(
            dice2d={t: float(np.mean(v)) for t, v in per_task.items()},
            dice3d={t: float(np.mean(v)) for t, v in dice3d.items()},
            per_sample=per_sample,
        )
