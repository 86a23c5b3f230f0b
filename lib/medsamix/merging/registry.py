"""The merge-method registry: what a method is (:class:`MergeMethod`), its inputs (:class:`Sources`), its
hyper-parameters (:class:`ParamSpec`) and :func:`register`.

A method is one registration (mergekit's ``merge_methods`` registry, in one decorator): its function, its
hyper-parameters with their valid and searched ranges, whether it works on task vectors, its uniform baselines, its
further initial-design points, its single-model points, its points past a single model and its warm-up. The merger, the search space, the uniform
merges and the initial design read :data:`REGISTRY`; nothing else needs to know a method.

The built-in methods register themselves in :mod:`medsamix.merging.methods`; import names from there (it
re-exports this module), so that the registry is filled.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from medsamix.errors import ConfigError
from medsamix.merging.memo import MemoCache


@dataclasses.dataclass
class Sources:
    """The inputs of a merge method for one parameter tensor, flattened.

    Both tensors are contiguous and own their storage (not views): compiled kernels then see the same tensor layout
    for every parameter and are compiled once. Task vectors ``models - base`` are not stored: the kernels compute
    them element by element as they merge (:meth:`task_vectors` gives them for one tensor), so a merger holds the
    sources once and not K more full copies.

    Attributes:
        base: Base model tensor, shape ``(n,)``.
        models: Fine-tuned model tensors, shape ``(K, n)``.
        key: Stable name (the parameter name) used to seed random methods and to key memoised values.
        cache: Memo for quantities that depend only on the sources (random fields, TIES' magnitude tables, SLERP
            coefficients), keyed by ``(key, name)``. A merger shares one byte-bounded cache between all its
            sources (:class:`~medsamix.merging.memo.MemoCache`); a standalone ``Sources`` gets its own, unbounded.
            A method must give the same result whether or not a value is memoised.
    """

    base: Tensor
    models: Tensor
    key: str = ""
    cache: MemoCache = dataclasses.field(default_factory=MemoCache)

    @classmethod
    def of(cls, base: Tensor, models: Sequence[Tensor] | Tensor, key: str = "") -> "Sources":
        """Build sources from a base tensor of any shape and a list (or stack) of model tensors of that shape."""
        flat_base = base.detach().flatten().clone()
        stacked = torch.stack([m.detach().flatten() for m in models])
        return cls(base=flat_base, models=stacked, key=key)

    @property
    def num_models(self) -> int:
        return int(self.models.shape[0])

    @property
    def models_nbytes(self) -> int:
        """Bytes of ``models``, i.e. of any ``(K, n)`` quantity of this tensor's dtype."""
        return self.models.numel() * self.models.element_size()

    def task_vectors(self) -> Tensor:
        """Task vectors ``models - base``, shape ``(K, n)``: a new tensor (a temporary of one parameter's size)."""
        return self.models - self.base

    def memoised(self, name: str) -> Any | None:
        """The value memoised as ``name`` for this tensor, or ``None`` (never computed, or not kept)."""
        return self.cache.get((self.key, name))

    def memo(self, name: str, make: Callable[[], Any]) -> Any:
        """The value memoised as ``name``, else ``make()`` (kept in :attr:`cache` if it admits it)."""
        value = self.memoised(name)
        if value is None:
            value = make()
            self.cache.put((self.key, name), value)
        return value

    def memo_within_cap(self, name: str, nbytes: int, make: Callable[[], Any]) -> Any | None:
        """The value memoised as ``name``; else ``make()`` (a value of ``nbytes``) if :attr:`cache` has room for
        it, stored; else ``None``, without calling ``make``: the caller then computes only what it needs now."""
        value = self.memoised(name)
        if value is None and self.cache.admits(nbytes, (self.key, name)):
            value = make()
            self.cache.put((self.key, name), value)
        return value


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One hyper-parameter of a merge method.

    ``kind`` is "float", "int", "weights" (one non-negative float per source, alias-keyed in recipes),
    "model_weights" (one float in ``[low, high]`` per fine-tuned model, base excluded, alias-keyed in recipes; a
    missing model weighs 0, a missing parameter gives every model ``default_each``) or "source" (a source alias).
    ``low``/``high`` bound valid values (inclusive unless ``high_open``); ``search_low`` and ``search_high`` bound
    the range a search explores.
    """

    name: str
    kind: str
    low: float = 0.0
    high: float = 1.0
    default: Any = None
    high_open: bool = False
    search_low: float | None = None
    search_high: float | None = None
    doc: str = ""
    default_each: float = 1.0


MethodFn = Callable[[Sources, Mapping[str, Any], Tensor | None], Tensor]
Params = Mapping[str, Any]
UniformFn = Callable[[Sequence[str]], Mapping[str, Params]]
"""Pool aliases (base first) -> named uniform baselines ``{name: alias-keyed params}``."""
SingleFn = Callable[[str, Sequence[str]], "Params | None"]
"""``(alias, aliases)`` -> alias-keyed params bit-identical to the single source ``alias`` (``None``: none)."""


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    """A registered merge method: everything the merger, the search space and the initial design know of it.

    Attributes:
        name: The name recipes and search spaces use.
        fn: ``fn(src, params, out=None) -> Tensor``, ``params`` in index form (:meth:`resolve`).
        params: Hyper-parameters, with their valid ranges and the ranges a search explores (the ConfigSpace
            hyper-parameters of :func:`medsamix.search.space.build_space` are built from them).
        doc: One-paragraph description.
        task_vectors: Whether ``fn`` works on task vectors ``models - base`` (:meth:`Sources.task_vectors`, or the
            kernels computing them element by element); ``False`` for methods of the raw weights.
        uniform: The uniform baselines of this method: a callable of the pool aliases (base first) returning
            ``{baseline name: alias-keyed params}`` (:func:`medsamix.merging.config.uniform_merges`; scored in
            reports and part of every search's initial design).
        design: Further uniform settings (alias-keyed params) in every search's initial design.
        single: ``(alias, aliases) -> params`` bit-identical to one source (``None`` for sources it cannot
            express): each such point enters the initial design with that model's style.
        warmup: Index-form params whose evaluation computes this method's memoised quantities
            (:meth:`medsamix.merging.merger.Merger.prepare`; a ``seed`` entry is replaced by the caller's seed);
            ``None`` when the method memoises nothing.
        beyond: ``(alias, aliases) -> params`` of a point past one fine-tuned model along its own task vector
            (extrapolation; ``None`` for sources it cannot express): each enters the initial design with that
            model's style, after the single-model points.
    """

    name: str
    fn: MethodFn
    params: tuple[ParamSpec, ...]
    doc: str
    task_vectors: bool = True
    uniform: UniformFn | None = None
    design: tuple[Params, ...] = ()
    single: SingleFn | None = None
    warmup: Params | None = None
    beyond: SingleFn | None = None

    def uniform_baselines(self, aliases: Sequence[str]) -> dict[str, dict[str, Any]]:
        """This method's uniform baselines for a pool with ``aliases``: name -> alias-keyed params."""
        return {} if self.uniform is None else {n: dict(p) for n, p in self.uniform(aliases).items()}

    def resolve(self, params: Mapping[str, Any], aliases: Sequence[str], where: str = "") -> dict[str, Any]:
        """Validate alias-keyed ``params`` and return them in index form.

        Args:
            params: Hyper-parameters as written in a recipe (missing ones take their defaults).
            aliases: Source aliases, base first (index 0) then the models.
            where: Context for error messages, e.g. the group name.

        Raises:
            ConfigError: unknown parameter, missing value without default, wrong type or out of range.
        """
        ctx = f"{where}: {self.name}" if where else self.name
        known = {p.name for p in self.params}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ConfigError(f"{ctx}: unknown parameter(s) {unknown}; expected {sorted(known)}")
        out: dict[str, Any] = {}
        for p in self.params:
            value = params.get(p.name, p.default)
            if value is None and p.kind == "model_weights":
                value = {a: p.default_each for a in list(aliases)[1:]}
            if value is None:
                raise ConfigError(f"{ctx}: parameter {p.name!r} is required")
            out[p.name] = _check(p, value, aliases, f"{ctx}.{p.name}")
        return out

    def sample(self, rng: random.Random, aliases: Sequence[str]) -> dict[str, Any]:
        """Draw alias-keyed hyper-parameters uniformly from the search ranges (used by benchmarks and tests)."""
        out: dict[str, Any] = {}
        for p in self.params:
            lo = p.low if p.search_low is None else p.search_low
            hi = p.high if p.search_high is None else p.search_high
            if p.kind == "weights":
                out[p.name] = {a: round(rng.uniform(0.05, 1.0), 4) for a in aliases}
            elif p.kind == "model_weights":
                out[p.name] = {a: round(rng.uniform(lo, hi), 4) for a in list(aliases)[1:]}
            elif p.kind == "source":
                out[p.name] = rng.choice(list(aliases))
            elif p.kind == "int":
                out[p.name] = p.default
            else:
                out[p.name] = round(rng.uniform(lo, hi), 4)
        return out


def _check(p: ParamSpec, value: Any, aliases: Sequence[str], field: str) -> Any:
    def in_range(v: float) -> bool:
        return p.low <= v and (v < p.high if p.high_open else v <= p.high)

    bound = f"[{p.low}, {p.high}{')' if p.high_open else ']'}"
    if p.kind == "source":
        if value not in aliases:
            raise ConfigError(f"{field}: unknown source {value!r}; pool aliases are {list(aliases)}")
        return list(aliases).index(value)
    if p.kind == "weights":
        weights = _check_weights(value, list(aliases), field, "alias", lambda w: w >= 0, "a finite number >= 0",
                                 f"unknown source(s) {{bad}}; pool aliases are {list(aliases)}")
        if sum(weights) <= 0:
            raise ConfigError(f"{field}: all weights are zero")
        return weights
    if p.kind == "model_weights":
        models = list(aliases)[1:]
        return _check_weights(value, models, field, "model alias", in_range, f"a number in {bound}",
                              f"unknown or base source(s) {{bad}}; the fine-tuned models are {models}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{field}: expected a number, got {value!r}")
    if p.kind == "int":
        if int(value) != value:
            raise ConfigError(f"{field}: expected an integer, got {value!r}")
        value = int(value)
    if not math.isfinite(value) or not in_range(value):
        raise ConfigError(f"{field}: {value!r} is outside {bound}")
    return value if p.kind == "int" else float(value)


def _check_weights(value: Any, names: Sequence[str], field: str, key: str, valid: Callable[[float], bool],
                   wanted: str, unknown: str) -> list[float]:
    """A mapping name -> weight -> one float per name of ``names`` (a missing name weighs 0).

    ``unknown`` is the message for names outside ``names``, with ``{bad}`` standing for them."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{field}: expected a mapping {key} -> weight, got {value!r}")
    bad = sorted(set(value) - set(names))
    if bad:
        raise ConfigError(f"{field}: " + unknown.format(bad=bad))
    weights = []
    for a in names:
        w = value.get(a, 0.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or not valid(w):
            raise ConfigError(f"{field}.{a}: weight must be {wanted}, got {w!r}")
        weights.append(float(w))
    return weights


REGISTRY: dict[str, MergeMethod] = {}


def register(name: str, params: Sequence[ParamSpec] = (), *, task_vectors: bool = True,
             uniform: Mapping[str, Params] | UniformFn | None = None, design: Sequence[Params] = (),
             single: SingleFn | None = None, warmup: Params | None = None,
             beyond: SingleFn | None = None) -> Callable[[MethodFn], MethodFn]:
    """Decorator adding a merge method to :data:`REGISTRY`: one registration is all a new method needs (the
    merger, the search space, the uniform baselines and the initial design read it). The keyword arguments are the
    :class:`MergeMethod` attributes of the same names; ``uniform`` may also be a fixed mapping name -> params."""

    def deco(fn: MethodFn) -> MethodFn:
        if name in REGISTRY:
            raise ValueError(f"merge method {name!r} registered twice")
        baselines = uniform if uniform is None or callable(uniform) else _fixed(uniform)
        REGISTRY[name] = MergeMethod(name, fn, tuple(params), (fn.__doc__ or "").strip(), task_vectors, baselines,
                                     tuple(design), single, warmup, beyond)
        return fn

    return deco


def unregister(name: str) -> MergeMethod:
    """Remove a method from :data:`REGISTRY` (a plug-in or a test undoing its registration) and return it."""
    return REGISTRY.pop(name)


def _fixed(table: Mapping[str, Params]) -> UniformFn:
    return lambda aliases: table


def get_method(name: str) -> MergeMethod:
    """Look up a method by name; :class:`ConfigError` lists the known ones otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown merge method {name!r}; known: {sorted(REGISTRY)}") from None
