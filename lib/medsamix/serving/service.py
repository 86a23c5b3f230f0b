"""The models a segmentation server offers: each pool member, and the merged model with hot reload.

* :func:`load_served_pool` reads the pool from a ``pool.yaml`` folder (:class:`~medsamix.models.pool.PoolManifest`) or from
  ``alias=path`` pairs (first = base), with each member's preprocessing style.
* :func:`member_model` builds a ``Sam`` module holding one member's weights; :class:`PoolLoader` describes a pool
  without reading its weights and loads it (and each member's module) once, on demand.
* :class:`MergedModelSource` serves whatever :func:`medsamix.runs.publish.current` names in the published folder, with the
  preprocessing its recipe records (:meth:`~medsamix.merging.recipe.Recipe.preprocessor`: the style the search selected); it
  checks that pointer on every :meth:`~MergedModelSource.get` (one small file read) and loads a new version when it
  changed. Before anything is published it serves the pool's uniform linear merge
  (``config.uniform_merges(...)["linear"]`` materialised by :class:`~medsamix.merging.merger.Merger`) with the base model's
  preprocessing, and says so in its description.
* :class:`InteractiveService` ties a model source to a :class:`~medsamix.serving.segmenter.Segmenter`, the volume cache and the
  prompt parser: image path + request fields -> label map, affine and response parameters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from medsamix.models.checkpoint import load_sam_checkpoint
from medsamix.merging.config import uniform_merges
from medsamix.errors import CheckpointError, ConfigError, MedSAMixError, PoolError
from medsamix.merging.merger import Merger
from medsamix.models.pool import ModelPool, PoolManifest
from medsamix.models.preprocess import STYLES, Preprocessor
from medsamix.serving.preencode import PreEncoder
from medsamix.serving.prompts import PromptError, parse_prompt
from medsamix.runs.publish import PublishError, current
from medsamix.serving.segmenter import DEFAULT_IOU_THRESHOLD, DEFAULT_MARGIN, EmbeddingCache, Segmenter
from medsamix.data.volumes import VolumeCache

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ServedPool:
    """A loaded pool and how each member expects its input.

    Attributes:
        pool: The models (base first).
        styles: Alias -> preprocessing style ("sam" or "medsam").
        source: Where it came from (the pool folder, or the list of files), for descriptions.
    """

    pool: ModelPool
    styles: dict[str, str]
    source: str


@dataclasses.dataclass(frozen=True)
class ServedModel:
    """One model ready to segment.

    Attributes:
        name: Task name (alias, or "medsamix" for the merge).
        model: ``segment_anything`` ``Sam`` module (eval mode).
        prep: Its input convention.
        version: Identifies the weights (embedding-cache keys, hot reload).
        description: One line for users.
    """

    name: str
    model: nn.Module
    prep: Preprocessor
    version: str
    description: str


def parse_models_spec(spec: str) -> list[tuple[str, Path]]:
    """``"alias=path,alias=path"`` (first = base) -> ``[(alias, path), ...]``.

    Raises:
        PoolError: An entry is not ``alias=path``, an alias repeats, or fewer than two models are given.
    """
    out: list[tuple[str, Path]] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        alias, sep, path = part.partition("=")
        if not sep or not alias.strip() or not path.strip():
            raise PoolError(f"models: expected alias=path entries separated by commas, got {part!r}")
        out.append((alias.strip(), Path(path.strip()).expanduser()))
    if len(out) < 2:
        raise PoolError(f"models: a pool needs a base and at least one fine-tuned model (alias=path,alias=path), "
                        f"got {spec!r}")
    aliases = [a for a, _ in out]
    if len(set(aliases)) != len(aliases):
        raise PoolError(f"models: duplicate aliases in {aliases}")
    return out


def parse_styles(spec: str | None, aliases: list[str], default: str = "sam") -> dict[str, str]:
    """``"alias=style,..."`` -> a style per alias (``default`` for those not named)."""
    styles = {a: default for a in aliases}
    for part in (p.strip() for p in (spec or "").split(",")):
        if not part:
            continue
        alias, sep, style = part.partition("=")
        alias, style = alias.strip(), style.strip()
        if not sep or alias not in styles:
            raise PoolError(f"preprocessing: expected alias=style for aliases {aliases}, got {part!r}")
        if style not in STYLES:
            raise PoolError(f"preprocessing: style of {alias!r} must be one of {STYLES}, got {style!r}")
        styles[alias] = style
    return styles


def load_served_pool(pool_dir: str | os.PathLike[str] | None = None, models: str | None = None,
                     preprocessing: str | None = None) -> ServedPool:
    """Load the pool a server offers.

    Args:
        pool_dir: Folder with ``pool.yaml`` (used when ``models`` is not given).
        models: ``"alias=path,alias=path"``, first = base; the architecture is inferred from the files.
        preprocessing: ``"alias=style,..."`` for ``models`` (default "sam" for each); ignored for a pool folder,
            whose manifest gives the styles.

    Raises:
        PoolError, CheckpointError: With the file and the reason.
    """
    if models:
        pairs = parse_models_spec(models)
        pool = ModelPool.load(pairs[0], pairs[1:], arch=None)
        return ServedPool(pool, parse_styles(preprocessing, pool.aliases), ", ".join(str(p) for _, p in pairs))
    if pool_dir is None:
        raise PoolError("no pool: give a pool folder (pool.yaml) or models alias=path,alias=path")
    manifest = PoolManifest.load(pool_dir)
    pool = manifest.load_pool()
    styles = {a: str(manifest.preprocessing.get(a, {}).get("style", "sam")) for a in pool.aliases}
    return ServedPool(pool, styles, str(Path(pool_dir)))


def member_model(served: ServedPool, alias: str) -> ServedModel:
    """A ``Sam`` module with one pool member's weights."""
    members = {m.alias: m for m in served.pool.members}
    if alias not in members:
        raise PoolError(f"no pool member {alias!r}; members: {served.pool.aliases}")
    m = members[alias]
    model = served.pool.arch.build()
    model.load_state_dict(m.state_dict)
    style = served.styles[alias]
    return ServedModel(alias, model.eval(), Preprocessor(style, served.pool.arch.img_size), f"{alias}@{m.sha256[:12]}",
                       f"{alias}: {_role(alias, served.pool.base.alias)} of the pool ({served.pool.arch.name}, "
                       f"{style} preprocessing), box/point prompts, 2D or 3D propagation")


def _role(alias: str, base: str) -> str:
    return "base model" if alias == base else "fine-tuned pool model"


class PoolLoader:
    """A server's pool described up front (aliases, base, styles; files checked to exist) and loaded once, on demand.

    MONAI Label builds the app in every training subprocess too; describing the pool without reading the weights
    keeps those processes light, while the server preloads everything once it has started.

    Args: as :func:`load_served_pool`.

    Raises:
        PoolError, CheckpointError: Malformed ``models`` / ``preprocessing``, unreadable manifest, missing files.
    """

    def __init__(self, pool_dir: str | os.PathLike[str] | None = None, models: str | None = None,
                 preprocessing: str | None = None) -> None:
        self.pool_dir, self.models, self.preprocessing = pool_dir, models, preprocessing
        if models:
            pairs = parse_models_spec(models)
            files = dict(pairs)
            self.styles = parse_styles(preprocessing, list(files))
            self.source = ", ".join(str(p) for p in files.values())
        elif pool_dir is not None:
            manifest = PoolManifest.load(pool_dir)
            files = dict(manifest.files)
            self.styles = {a: str(manifest.preprocessing.get(a, {}).get("style", "sam")) for a in files}
            self.source = str(Path(pool_dir))
        else:
            raise PoolError("no pool: give a pool folder (pool.yaml) or models alias=path,alias=path")
        missing = [f"{p} ({a})" for a, p in files.items() if not Path(p).is_file()]
        if missing:
            raise CheckpointError(f"pool checkpoint file(s) not found: {', '.join(missing)}")
        self.aliases: list[str] = list(files)
        self.base = self.aliases[0]
        self._served: ServedPool | None = None
        self._members: dict[str, ServedModel] = {}
        self._lock = threading.Lock()

    def load(self) -> ServedPool:
        """The loaded pool (read and validated on the first call)."""
        with self._lock:
            if self._served is None:
                t0 = time.perf_counter()
                self._served = load_served_pool(self.pool_dir, self.models, self.preprocessing)
                log.info("loaded the pool (%s) in %.1f s", ", ".join(self.aliases), time.perf_counter() - t0)
            return self._served

    def member(self, alias: str) -> ServedModel:
        """One member's model (built on the first call)."""
        if alias not in self.aliases:
            raise PoolError(f"no pool member {alias!r}; members: {self.aliases}")
        served = self.load()
        with self._lock:
            if alias not in self._members:
                self._members[alias] = member_model(served, alias)
            return self._members[alias]

    def describe(self, alias: str) -> str:
        """A member's description, without loading anything."""
        return (f"{alias}: {_role(alias, self.base)} of the pool ({self.styles[alias]} preprocessing), "
                "box/point prompts, 2D or 3D propagation")


class MergedModelSource:
    """The merged model: the currently published version, or the pool's uniform linear merge before any.

    Args:
        loader: The pool (loaded when the uniform merge is first needed).
        published_dir: Folder written by :func:`medsamix.runs.publish.publish`.
        name: Task name used in descriptions.
        style: Preprocessing of the uniform merge (default: the base model's).
    """

    def __init__(self, loader: PoolLoader, published_dir: str | os.PathLike[str], name: str = "medsamix",
                 style: str | None = None) -> None:
        if style is not None and style not in STYLES:
            raise PoolError(f"merged_preprocessing must be one of {STYLES}, got {style!r}")
        self.loader = loader
        self.published_dir = Path(published_dir)
        self.name = name
        self.style = style or loader.styles[loader.base]
        self.warning: str | None = None
        self._lock = threading.Lock()
        self._uniform: ServedModel | None = None
        self._model: ServedModel | None = None

    def uniform(self) -> ServedModel:
        """The uniform linear merge of the whole pool (built once)."""
        if self._uniform is None:
            pool = self.loader.load().pool
            digest = hashlib.sha256("|".join(f"{a}:{s}" for a, s in pool.checksums.items()).encode()).hexdigest()
            merger = Merger(pool)
            merger.apply(uniform_merges(merger.groups, pool.aliases)["linear"], check_finite=True)
            model = pool.arch.build()
            model.load_state_dict(merger.state_dict())
            self._uniform = ServedModel(
                self.name, model.eval(), Preprocessor(self.style, pool.arch.img_size), f"uniform-linear@{digest[:12]}",
                f"{self.name}: nothing published yet - serving the uniform linear merge of the pool "
                f"({', '.join(pool.aliases)}; equal weights, {self.style} preprocessing)")
        return self._uniform

    def _load(self, version: str, recipe_path: Path, checkpoint: Path, published_at: str) -> ServedModel:
        from medsamix.merging.recipe import Recipe

        recipe = Recipe.load(recipe_path)
        sd, _ = load_sam_checkpoint(checkpoint, recipe.arch)
        model = recipe.arch.build()
        model.load_state_dict(sd)
        style = recipe.style  # the style the search selected (or the run fixed): the merged model expects it
        window = recipe.preprocessing.get("ct_window")  # the CT window a search on CT data selected
        scores = recipe.scores or {}
        score = next((f"{k}={v:.3f}" for k, v in scores.items() if isinstance(v, (int, float))), "")
        return ServedModel(
            self.name, model.eval(), recipe.preprocessor(), version,
            f"{self.name}: published merge {version} ({published_at}; {', '.join(recipe.aliases)}; {style} "
            f"preprocessing{', CT window ' + window if window else ''}{'; ' + score if score else ''})")

    def get(self) -> ServedModel:
        """The model to serve now: reloads when the published version changed.

        A broken publication (unreadable pointer or checkpoint) never interrupts serving: the previous model stays
        and :attr:`warning` says why.
        """
        with self._lock:
            try:
                pub = current(self.published_dir)
            except PublishError as e:
                self.warning = f"published model unusable, still serving the previous one: {e}"
                log.warning(self.warning)
                return self._model or self.uniform()
            if pub is None:
                self.warning = None
                self._model = self.uniform()
                return self._model
            if self._model is None or self._model.version != pub.version:
                try:
                    t0 = time.perf_counter()
                    self._model = self._load(pub.version, pub.recipe, pub.checkpoint, pub.published_at)
                    log.info("loaded published merge %s in %.2f s", pub.version, time.perf_counter() - t0)
                    self.warning = None
                except (MedSAMixError, OSError, RuntimeError) as e:
                    self.warning = f"published version {pub.version} could not be loaded ({e}); still serving " \
                                   "the previous model"
                    log.warning(self.warning)
                    return self._model or self.uniform()
            return self._model

    def describe(self) -> str:
        """The current model's description, without loading anything new."""
        try:
            pub = current(self.published_dir)
        except PublishError as e:
            return f"{self.name}: published model unusable ({e})"
        if pub is None:
            return (f"{self.name}: merged model - nothing published yet, serving the uniform linear merge of the pool "
                    f"({', '.join(self.loader.aliases)})")
        return f"{self.name}: merged model, published version {pub.version} ({pub.published_at})"


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
    """

    def __init__(self, name: str, source: Callable[[], ServedModel], volumes: VolumeCache, cache: EmbeddingCache,
                 iou_threshold: float = DEFAULT_IOU_THRESHOLD, margin: float = DEFAULT_MARGIN,
                 status: Callable[[], str | None] | None = None, device: str = "cpu",
                 max_slices: int | None = None, preencoder: PreEncoder | None = None) -> None:
        self.name = name
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
            self._segmenter = Segmenter(served.model, served.prep, served.version, self.cache, self.device)
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
