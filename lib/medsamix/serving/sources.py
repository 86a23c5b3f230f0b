"""The models a segmentation server offers: each pool member, and the merged model with hot reload.

* :func:`describe_pool` describes the pool (:class:`~medsamix.models.pool.PoolManifest`) from a ``pool.yaml`` folder or
  from ``alias=path`` pairs (first = base), with each member's preprocessing style; :func:`load_served_pool` loads it.
* :func:`member_model` builds a ``Sam`` module holding one member's weights; :class:`PoolLoader` describes a pool
  without reading its weights and loads it (and each member's module) once, on demand.
* :class:`MergedModelSource` serves whatever :func:`medsamix.runs.publish.current` names in the published folder, with
  the preprocessing its recipe records (:meth:`~medsamix.merging.recipe.Recipe.preprocessor`: the style the search
  selected); it checks that pointer on every :meth:`~MergedModelSource.get` (one small file read) and loads a new
  version when it changed. Before anything is published it serves the pool's uniform linear merge
  (``config.uniform_merges(...)["linear"]`` materialised by :class:`~medsamix.merging.merger.Merger`) with the base
  model's preprocessing, and says so in its description.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from pathlib import Path

from torch import nn

from medsamix.errors import MedSAMixError, PoolError
from medsamix.merging.config import uniform_merges
from medsamix.merging.merger import Merger
from medsamix.models.checkpoint import load_sam_checkpoint
from medsamix.models.pool import ModelPool, PoolManifest
from medsamix.models.preprocess import Preprocessor, check_style
from medsamix.runs.publish import PublishError, current

log = logging.getLogger(__name__)


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


def describe_pool(pool_dir: str | os.PathLike[str] | None = None, models: str | None = None,
                  preprocessing: str | None = None) -> PoolManifest:
    """The pool a server offers, described without reading weights: ``models`` (``"alias=path,..."``, first = base,
    with ``preprocessing`` ``"alias=style,..."``) when given, else the pool folder ``pool_dir`` (whose manifest
    gives the styles; ``preprocessing`` is then ignored).

    Raises:
        PoolError: Malformed ``models`` / ``preprocessing``, unreadable manifest, or neither given.
    """
    if models:
        return PoolManifest.from_spec(models, preprocessing)
    if pool_dir is None:
        raise PoolError("no pool: give a pool folder (pool.yaml) or models alias=path,alias=path")
    return PoolManifest.load(pool_dir)


def load_served_pool(pool_dir: str | os.PathLike[str] | None = None, models: str | None = None,
                     preprocessing: str | None = None) -> ModelPool:
    """Load the pool a server offers (arguments as :func:`describe_pool`), each member with its style.

    Raises:
        PoolError, CheckpointError: With the file and the reason.
    """
    return describe_pool(pool_dir, models, preprocessing).load_pool()


def member_model(pool: ModelPool, alias: str) -> ServedModel:
    """A ``Sam`` module with one pool member's weights, served with the member's style.

    Raises:
        PoolError: no member ``alias``.
    """
    m = pool.member(alias)
    model = pool.arch.build_with(m.state_dict)  # the pool's tensors themselves: no copy of the member's weights
    return ServedModel(alias, model, m.preprocessor(pool.arch.img_size), f"{alias}@{m.sha256[:12]}",
                       _member_description(alias, pool.base.alias, m.style, f"{pool.arch.name}, "))


def _member_description(alias: str, base: str, style: str, arch: str = "") -> str:
    role = "base model" if alias == base else "fine-tuned pool model"
    return f"{alias}: {role} of the pool ({arch}{style} preprocessing), box/point prompts, 2D or 3D propagation"


class PoolLoader:
    """A server's pool described up front (:func:`describe_pool`: aliases, base, styles; files checked to exist)
    and loaded once, on demand.

    MONAI Label builds the app in every training subprocess too; describing the pool without reading the weights
    keeps those processes light, while the server preloads everything once it has started.

    Args: as :func:`describe_pool`.

    Raises:
        PoolError, CheckpointError: Malformed ``models`` / ``preprocessing``, unreadable manifest, missing files.
    """

    def __init__(self, pool_dir: str | os.PathLike[str] | None = None, models: str | None = None,
                 preprocessing: str | None = None) -> None:
        self.manifest = describe_pool(pool_dir, models, preprocessing)
        self.manifest.check_files()
        self.aliases: list[str] = self.manifest.aliases
        self.base = self.manifest.base
        self._pool: ModelPool | None = None
        self._members: dict[str, ServedModel] = {}
        self._lock = threading.Lock()

    @property
    def styles(self) -> dict[str, str]:
        """Alias -> preprocessing style of each member."""
        return self.manifest.styles

    def load(self) -> ModelPool:
        """The loaded pool (read and validated on the first call)."""
        with self._lock:
            if self._pool is None:
                t0 = time.perf_counter()
                self._pool = self.manifest.load_pool()
                log.info("loaded the pool (%s) in %.1f s", ", ".join(self.aliases), time.perf_counter() - t0)
            return self._pool

    def member(self, alias: str) -> ServedModel:
        """One member's model (built on the first call)."""
        if alias not in self.aliases:
            raise PoolError(f"no pool member {alias!r}; members: {self.aliases}")
        pool = self.load()
        with self._lock:
            if alias not in self._members:
                self._members[alias] = member_model(pool, alias)
            return self._members[alias]

    def describe(self, alias: str) -> str:
        """A member's description, without loading anything."""
        return _member_description(alias, self.base, self.styles[alias])


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
        if style is not None:
            check_style(style, "merged_preprocessing", PoolError)
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
            pool = self.loader.load()
            digest = hashlib.sha256("|".join(f"{a}:{s}" for a, s in pool.checksums.items()).encode()).hexdigest()
            merger = Merger(pool)
            # the merger's module is served as it is (its parameters are the merge's output tensors); the merger's
            # sources are the pool's own tensors (the pool's state dicts are views of them): nothing is copied
            model = merger.apply(uniform_merges(merger.groups, pool.aliases)["linear"], check_finite=True)
            self._uniform = ServedModel(
                self.name, model, Preprocessor(self.style, pool.arch.img_size), f"uniform-linear@{digest[:12]}",
                f"{self.name}: nothing published yet - serving the uniform linear merge of the pool "
                f"({', '.join(pool.aliases)}; equal weights, {self.style} preprocessing)")
        return self._uniform

    def _load(self, version: str, recipe_path: Path, checkpoint: Path, published_at: str) -> ServedModel:
        from medsamix.merging.recipe import Recipe

        recipe = Recipe.load(recipe_path)
        sd, _ = load_sam_checkpoint(checkpoint, recipe.arch)
        model = recipe.arch.build_with(sd)  # the loaded tensors themselves
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
