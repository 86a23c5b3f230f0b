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

import bisect
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from medsamix.errors import ConfigError
from medsamix.merging import kernels
from medsamix.merging.registry import (  # re-exported: the registry is filled by importing this module
    REGISTRY,
    MergeMethod,
    MethodFn,
    Params,
    ParamSpec,
    SingleFn,
    Sources,
    UniformFn,
    get_method,
    register,
    unregister,
)

__all__ = ["EXTRAPOLATION", "REGISTRY", "MergeMethod", "MethodFn", "ParamSpec", "Params", "SingleFn", "Sources", "UniformFn",
           "dare", "get_method", "linear", "pick", "register", "slerp", "task_arithmetic", "ties",
           "ties_trim_thresholds", "unregister"]


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


EXTRAPOLATION = 1.25
"""Scale of the initial design's point past each fine-tuned model: ``theta_0 + 1.25 tau_k``, a quarter further along
the model's own task vector than fine-tuning went (model extrapolation, as in ExPO, Zheng et al., 2024). A model
fine-tuned on the site's kind of data can be under-trained in its direction: on the shared hippocampus set's
calibration slices, extrapolating the pool's hippocampus model at scales 1.1, 1.2 and 1.3 beat that model by 0.005 to
0.011 Dice, a region the search had not reached from the one-hot points in 60 trials (``results/search_quality.md``).
1.25 is a round value inside that range, one for every pool and site; the search refines it (scale is searched up to
1.5)."""


def _one_model(alias: str, aliases: Sequence[str], scale: float) -> dict[str, Any] | None:
    """Task arithmetic with fine-tuned model ``alias`` alone at ``scale`` (1: bit-identical to it; ``None`` for the
    base, which has no task vector)."""
    return None if alias == aliases[0] else {"scale": scale, "weights": _one_hot(alias, list(aliases)[1:])}


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
    single=lambda alias, aliases: _one_model(alias, aliases, 1.0),
    beyond=lambda alias, aliases: _one_model(alias, aliases, EXTRAPOLATION))
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


_TIES_TABLE_POINTS = 32
"""Order statistics per model in TIES' threshold table: a threshold is then selected among ~1/32 of the entries."""


def _magnitude_table(src: Sources) -> tuple[list[int], Tensor, Tensor]:
    """Exact order statistics of ``|tau_k|``: ranks ``R`` (``Q + 1`` ascending ranks from 0 to ``n - 1``), their
    values ``(K, Q + 1)`` and, per value, how many entries are strictly smaller ``(K, Q + 1)``; memoised (about
    ``12 K (Q + 1)`` bytes per tensor: kept whatever the memo's cap). Built with one sort per tensor and pool."""

    def make() -> tuple[list[int], Tensor, Tensor]:
        ordered = src.task_vectors().abs_().sort(dim=1).values
        n = ordered.shape[1]
        ranks = sorted({round(j * (n - 1) / _TIES_TABLE_POINTS) for j in range(_TIES_TABLE_POINTS + 1)})
        values = ordered[:, ranks].contiguous()
        below = torch.stack([torch.searchsorted(ordered[k], values[k], side="left") for k in range(len(ordered))])
        return ranks, values, below

    return src.memo("ties_table", make)


def _sorted_magnitudes(src: Sources) -> Tensor | None:
    """``|tau_k|`` of each model sorted ascending, shape ``(K, n)``: memoised when the memo's cap has room for it
    (the fastest path: a threshold is then one lookup), else ``None``."""
    return src.memo_within_cap("sorted_abs", src.models_nbytes, lambda: src.task_vectors().abs_().sort(dim=1).values)


def ties_trim_thresholds(src: Sources, keep: float) -> Tensor:
    """Per-model magnitude threshold keeping the ``ceil(keep * n)`` largest entries, shape ``(K, 1)``: the
    ``r = (n - k)``-th smallest ``|tau_k|`` (0-based), exactly.

    From the sorted magnitudes when the memo holds them; else from the magnitude table (:func:`_magnitude_table`):
    the table brackets the rank, ``R_j <= r < R_{j+1}``, so the threshold lies in ``[v_j, v_{j+1}]``; it is the
    ``(r - below_j)``-th smallest of the entries in that bracket (every entry below ``v_j`` ranks before it),
    selected among ~``n / Q`` entries after one pass over the tensor.
    """
    n = src.models.shape[1]
    k = min(n, max(1, math.ceil(keep * n - 1e-9)))
    r = n - k
    ordered = _sorted_magnitudes(src)
    if ordered is not None:
        return ordered[:, r: r + 1].clone()
    ranks, values, below = _magnitude_table(src)
    j = bisect.bisect_right(ranks, r) - 1
    if ranks[j] == r:
        return values[:, j: j + 1].clone()
    out = torch.empty(src.num_models, 1, dtype=src.models.dtype, device=src.models.device)
    for i in range(src.num_models):
        magnitude = (src.models[i] - src.base).abs_()
        inside = (magnitude >= values[i, j]).logical_and_(magnitude <= values[i, j + 1])
        out[i, 0] = torch.kthvalue(magnitude[inside], r - int(below[i, j]) + 1).values
    return out


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


def _slerp_geometry(src: Sources) -> tuple[list[float], float]:
    """The models' spherical centroid as coefficients of the models, ``theta* = sum_k c_k theta_k`` (``K`` floats),
    and its angle ``omega`` to the base; from the Gram matrix of base and models in float64; memoised (a few
    numbers per tensor: kept whatever the memo's cap)."""

    def make() -> tuple[list[float], float]:
        s = torch.cat([src.base[None], src.models]).double()
        gram = (s @ s.T).tolist()  # (K + 1, K + 1): index 0 the base, 1..K the models
        k = src.num_models
        norms = [math.sqrt(max(gram[i][i], 0.0)) for i in range(1, k + 1)]
        mean = [1.0 / k] * k
        if k == 1:
            coef = [1.0]
        elif min(norms) == 0:
            coef = mean
        else:  # theta* = mean_k ||theta_k|| * d / ||d||, d = sum_k theta_k / ||theta_k||
            u = [1.0 / x for x in norms]
            dn = math.sqrt(max(0.0, sum(u[i] * u[j] * gram[i + 1][j + 1] for i in range(k) for j in range(k))))
            # antipodal models have no spherical centroid: fall back to the mean (dn is a norm of a sum of K unit
            # vectors; its rounding error from the Gram form is ~1e-8)
            coef = mean if dn < 1e-6 else [x * (sum(norms) / k) / dn for x in u]
        bn = math.sqrt(max(gram[0][0], 0.0))
        tn = math.sqrt(max(0.0, sum(coef[i] * coef[j] * gram[i + 1][j + 1] for i in range(k) for j in range(k))))
        dot = sum(coef[i] * gram[0][i + 1] for i in range(k))
        cos = dot / (bn * tn) if bn > 0 and tn > 0 else 1.0
        return coef, math.acos(max(-1.0, min(1.0, cos)))

    return src.memo("slerp", make)


@register("slerp", [ParamSpec("t", "float", 0.0, 1.0, default=0.5, doc="0 = base, 1 = models' centroid")],
          task_vectors=False, uniform={"slerp_0.5": {"t": 0.5}}, warmup={"t": 0.5})
def slerp(src: Sources, params: Mapping[str, Any], out: Tensor | None = None) -> Tensor:
    """Spherical linear interpolation from the base towards the models' spherical centroid."""
    t = params["t"]
    coef, omega = _slerp_geometry(src)
    so = math.sin(omega)
    if so < 1e-6:
        a, b = 1.0 - t, t
    else:
        a, b = math.sin((1.0 - t) * omega) / so, math.sin(t * omega) / so
    return _combine(src, [a] + [b * c for c in coef], out)


def _dare_field(src: Sources, seed: int) -> Tensor:
    """Uniform random field in [0, 1), shape ``(K, n)``, from a generator seeded by ``(seed, key)``: the memoised
    field of this seed, else drawn now (and memoised, replacing another seed's, if the memo has room)."""
    cached = src.memoised("dare")
    if cached is not None and cached[0] == seed:
        return cached[1]
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(src.key.encode()))
    field = torch.rand(src.models.shape, generator=g, dtype=src.models.dtype).to(src.models.device)
    src.cache.put((src.key, "dare"), (seed, field))
    return field


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
