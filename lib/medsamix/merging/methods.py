"""Merge methods, all in one registry.

A method is a small function ``fn(src, params, out=None) -> Tensor`` of the base tensor, the fine-tuned models'
tensors and its hyper-parameters, applied to one parameter tensor at a time. Tensors are flattened: ``src`` is a
:class:`Sources` holding

* ``base``   - shape ``(n,)``, the base model's (SAM's) tensor;
* ``models`` - shape ``(K, n)``, the K fine-tuned models' tensors, in pool order (task vectors
  ``models - base`` are computed where needed, not stored);

and the method writes the merged ``(n,)`` vector into ``out`` when given (else into a new tensor) and returns it.

Sources are numbered ``0`` (the base) to ``K`` (the last model); in recipes they are named by pool alias and
:meth:`MergeMethod.resolve` turns alias-keyed parameters into index form.

Definitions (``theta_0`` base, ``theta_k`` models, ``tau_k = theta_k - theta_0``, all per tensor):

* ``linear``: ``sum_i w_i theta_i / sum_i w_i`` over all K+1 sources, ``w_i >= 0``, not all zero.
* ``task_arithmetic``: ``theta_0 + scale * sum_k w_k tau_k``, one weight ``w_k >= 0`` per fine-tuned model (all 1
  by default; as mergekit's per-model ``weight``). Weights or scales above 1 extrapolate a task vector (further
  along the direction fine-tuning moved), 0 leaves a model out.
* ``ties``: trim each ``tau_k`` to its ``ceil(keep * n)`` largest magnitudes (ties at the threshold kept), elect
  the sign of ``sum_k trimmed tau_k`` per element, average the trimmed entries that agree with it (disjoint mean),
  ``theta_0 + scale * merged`` (Yadav et al., 2023). ``keep = 0`` gives the base.
* ``slerp``: spherical interpolation from the base (``t = 0``) to the models' spherical centroid (``t = 1``). The
  centroid is ``theta* = mean_k ||theta_k|| * normalize(sum_k theta_k / ||theta_k||)``; for K = 1 it is the single
  model, so the method is ordinary two-point SLERP. With ``omega`` the angle between ``theta_0`` and ``theta*``,
  the result is ``sin((1-t) omega)/sin(omega) theta_0 + sin(t omega)/sin(omega) theta*``, falling back to linear
  interpolation when the two are (anti-)parallel or one is zero. ``t`` spans the whole [0, 1]: there is no cap.
* ``pick``: the values of one source, verbatim (e.g. RobustMedSAM = SAM's encoder with MedSAM's decoder).
* ``dare``: drop each task-vector entry with probability ``drop`` and rescale the rest by ``1 / (1 - drop)``
  (Yu et al., 2024), then ``theta_0 + scale * sum_k``; the drop mask is drawn from a generator seeded by
  ``(seed, src.key)`` (the parameter name in a merger), so the same recipe always gives the same weights.
"""

from __future__ import annotations

import dataclasses
import math
import random
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from medsamix.merging import kernels
from medsamix.errors import ConfigError


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
        key: Stable name (the parameter name) used to seed random methods.
        cache: Memo for quantities that depend only on the sources (sorted magnitudes, centroid, random fields);
            a merger keeps its ``Sources`` alive so these are computed once per pool.
    """

    base: Tensor
    models: Tensor
    key: str = ""
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, base: Tensor, models: Sequence[Tensor] | Tensor, key: str = "") -> "Sources":
        """Build sources from a base tensor of any shape and a list (or stack) of model tensors of that shape."""
        flat_base = base.detach().flatten().clone()
        stacked = torch.stack([m.detach().flatten() for m in models])
        return cls(base=flat_base, models=stacked, key=key)

    @property
    def num_models(self) -> int:
        return int(self.models.shape[0])

    def task_vectors(self) -> Tensor:
        """Task vectors ``models - base``, shape ``(K, n)``: a new tensor (a temporary of one parameter's size)."""
        return self.models - self.base

    def memo(self, name: str, make: Callable[[], Any]) -> Any:
        if name not in self.cache:
            self.cache[name] = make()
        return self.cache[name]


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
        task_vectors: Whether ``fn`` reads ``src.deltas`` (task vectors); ``False`` for methods of the raw weights.
        uniform: The uniform baselines of this method: a callable of the pool aliases (base first) returning
            ``{baseline name: alias-keyed params}`` (:func:`medsamix.merging.config.uniform_merges`; scored in
            reports and part of every search's initial design).
        design: Further uniform settings (alias-keyed params) in every search's initial design.
        single: ``(alias, aliases) -> params`` bit-identical to one source (``None`` for sources it cannot
            express): each such point enters the initial design with that model's style.
        warmup: Index-form params whose evaluation computes this method's memoised quantities
            (:meth:`medsamix.merging.merger.Merger.prepare`; a ``seed`` entry is replaced by the caller's seed);
            ``None`` when the method memoises nothing.
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
             single: SingleFn | None = None, warmup: Params | None = None) -> Callable[[MethodFn], MethodFn]:
    """Decorator adding a merge method to :data:`REGISTRY`: one registration is all a new method needs (the
    merger, the search space, the uniform baselines and the initial design read it). The keyword arguments are the
    :class:`MergeMethod` attributes of the same names; ``uniform`` may also be a fixed mapping name -> params."""

    def deco(fn: MethodFn) -> MethodFn:
        if name in REGISTRY:
            raise ValueError(f"merge method {name!r} registered twice")
        baselines = uniform if uniform is None or callable(uniform) else _fixed(uniform)
        REGISTRY[name] = MergeMethod(name, fn, tuple(params), (fn.__doc__ or "").strip(), task_vectors, baselines,
                                     tuple(design), single, warmup)
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


_SCALE = ParamSpec("scale", "float", 0.0, 3.0, default=1.0, search_low=0.0, search_high=1.5,
                   doc="multiplier of the merged task vector")


def _output(src: Sources, out: Tensor | None) -> Tensor:
    return torch.empty_like(src.base) if out is None else out


def _combine(src: Sources, coefficients: Sequence[float], out: Tensor | None) -> Tensor:
    """``sum_i c_i theta_i`` over base and models: coefficients ``(K+1,)`` -> ``(n,)``."""
    res = _output(src, out)
    c = torch.tensor([coefficients[1:]], dtype=src.models.dtype, device=src.models.device)
    torch.mm(c, src.models, out=res.view(1, -1))
    return res.add_(src.base, alpha=coefficients[0])


def _one_hot(alias: str, names: Sequence[str]) -> dict[str, float]:
    return {b: float(alias == b) for b in names}


@register("linear", [ParamSpec("weights", "weights", doc="non-negative weight per source, normalised to sum 1")],
          task_vectors=False, uniform=lambda aliases: {"linear": {"weights": {a: 1.0 for a in aliases}}},
          single=lambda alias, aliases: {"weights": _one_hot(alias, aliases)})
def linear(src: Sources, params: Mapping[str, Any], out: Tensor | None = None) -> Tensor:
    """Weighted average of base and models."""
    w = params["weights"]
    total = sum(w)
    return _combine(src, [x / total for x in w], out)


@register("task_arithmetic", [
    _SCALE,
    ParamSpec("weights", "model_weights", 0.0, 3.0, search_low=0.0, search_high=1.0,
              doc="weight of each fine-tuned model's task vector (default 1 each)"),
], task_vectors=False,  # computed as a combination of the weights (theta_0 + sum_k c_k (theta_k - theta_0))
    uniform={"task_arithmetic_0.5": {"scale": 0.5}},
    single=lambda alias, aliases: (None if alias == aliases[0]
                                   else {"scale": 1.0, "weights": _one_hot(alias, list(aliases)[1:])}))
def task_arithmetic(src: Sources, params: Mapping[str, Any], out: Tensor | None = None) -> Tensor:
    """Base plus the scaled, weighted sum of task vectors (Ilharco et al., 2023)."""
    lam = params["scale"]
    w = params.get("weights") or [1.0] * src.num_models
    if len(w) != src.num_models:
        raise ConfigError(f"task_arithmetic: {len(w)} weights for {src.num_models} fine-tuned models")
    return _combine(src, [1.0 - lam * sum(w)] + [lam * x for x in w], out)


@register("pick", [ParamSpec("source", "source", doc="the source whose values are taken verbatim")], task_vectors=False)
def pick(src: Sources, params: Mapping[str, Any], out: Tensor | None = None) -> Tensor:
    """One source's values, unchanged."""
    i = params["source"]
    return _output(src, out).copy_(src.base if i == 0 else src.models[i - 1])


def _sorted_magnitudes(src: Sources) -> Tensor:
    """``|tau_k|`` of each model sorted ascending, shape ``(K, n)``; memoised."""
    return src.memo("sorted_abs", lambda: src.task_vectors().abs_().sort(dim=1).values)


def ties_trim_thresholds(src: Sources, keep: float) -> Tensor:
    """Per-model magnitude threshold keeping the ``ceil(keep * n)`` largest entries, shape ``(K, 1)``."""
    ordered = _sorted_magnitudes(src)
    n = ordered.shape[1]
    k = min(n, max(1, math.ceil(keep * n - 1e-9)))
    return ordered[:, n - k: n - k + 1].clone()


@register(
    "ties",
    [ParamSpec("keep", "float", 0.0, 1.0, default=0.2, search_low=0.05, search_high=1.0,
               doc="fraction of each task vector kept by magnitude"), _SCALE],
    uniform={"ties_0.5_0.5": {"keep": 0.5, "scale": 0.5}},
    warmup={"keep": 0.5, "scale": 1.0},
)
def ties(src: Sources, params: Mapping[str, Any], out: Tensor | None = None) -> Tensor:
    """TIES-merging: trim, elect sign, disjoint mean (Yadav et al., 2023)."""
    res = _output(src, out)
    if params["keep"] <= 0:
        return res.copy_(src.base)
    kernels.ties_merge(src.models, ties_trim_thresholds(src, params["keep"]), src.base, params["scale"], res)
    return res


def _slerp_geometry(src: Sources) -> tuple[Tensor, float]:
    """The models' spherical centroid ``theta*`` (shape ``(n,)``) and its angle to the base; memoised."""

    def make() -> tuple[Tensor, float]:
        m = src.models.double()
        norms = m.norm(dim=1)
        if src.num_models == 1:
            target = m[0]
        elif bool((norms == 0).any()):
            target = m.mean(0)
        else:
            direction = (m / norms[:, None]).sum(0)
            dn = direction.norm()
            # antipodal models have no spherical centroid: fall back to the mean
            target = m.mean(0) if dn < 1e-12 else direction * (norms.mean() / dn)
        b = src.base.double()
        bn, tn = b.norm(), target.norm()
        cos = float((b @ target) / (bn * tn)) if bn > 0 and tn > 0 else 1.0
        return target.to(src.base.dtype), math.acos(max(-1.0, min(1.0, cos)))

    return src.memo("slerp", make)


@register("slerp", [ParamSpec("t", "float", 0.0, 1.0, default=0.5, doc="0 = base, 1 = models' centroid")],
          task_vectors=False, uniform={"slerp_0.5": {"t": 0.5}}, warmup={"t": 0.5})
def slerp(src: Sources, params: Mapping[str, Any], out: Tensor | None = None) -> Tensor:
    """Spherical linear interpolation from the base towards the models' spherical centroid."""
    t = params["t"]
    target, omega = _slerp_geometry(src)
    so = math.sin(omega)
    if so < 1e-6:
        a, b = 1.0 - t, t
    else:
        a, b = math.sin((1.0 - t) * omega) / so, math.sin(t * omega) / so
    return torch.mul(src.base, a, out=_output(src, out)).add_(target, alpha=b)


def _dare_field(src: Sources, seed: int) -> Tensor:
    """Uniform random field in [0, 1), shape ``(K, n)``, from a generator seeded by ``(seed, key)``; the field of
    the latest seed is memoised."""
    cached = src.cache.get("dare")
    if cached is None or cached[0] != seed:
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(src.key.encode()))
        field = torch.rand(src.models.shape, generator=g, dtype=src.models.dtype)
        src.cache["dare"] = cached = (seed, field.to(src.models.device))
    return cached[1]


@register(
    "dare",
    [ParamSpec("drop", "float", 0.0, 1.0, default=0.5, high_open=True, search_low=0.1, search_high=0.9,
               doc="probability of dropping a task-vector entry"),
     _SCALE,
     ParamSpec("seed", "int", 0, 2**31 - 1, default=0, doc="seed of the drop mask")],
    design=({"drop": 0.5, "scale": 0.5, "seed": 0},),
    warmup={"drop": 0.5, "scale": 1.0, "seed": 0},
)
def dare(src: Sources, params: Mapping[str, Any], out: Tensor | None = None) -> Tensor:
    """DARE: random drop and rescale of task vectors, then task arithmetic (Yu et al., 2024)."""
    res = _output(src, out)
    kernels.dare_merge(src.models, _dare_field(src, params["seed"]), params["drop"], src.base, params["scale"], res)
    return res
