"""The merge search space as a ConfigSpace ``ConfigurationSpace``, and conversions to and from merge configs.

Per layer group ``G`` there is a categorical ``G:method`` and, for every method ``M``, its hyper-parameters
``G:M:<param>`` active only when ``G:method == M`` (``EqualsCondition``). Per-source parameters are named by pool
alias, never by file path: linear weights ``G:linear:w_<alias>`` (every source), task-arithmetic weights
``G:task_arithmetic:w_<alias>`` (the fine-tuned models), the pick source ``G:pick:source``. Integer
parameters that are not searched (DARE's seed) are fixed to their defaults. Floats span each parameter's search
range (:class:`~medsamix.merging.methods.ParamSpec`).

The preprocessing style of the merged model is a dimension too when it is searched (``styles``): the categorical
``prep:style`` (:data:`PREP_STYLE`) over the styles; when the settings fix it, it is not in the space and
:func:`to_merge_config` gives every configuration the fixed style. Likewise the CT window (``windows``, on CT data):
the categorical ``prep:window`` (:data:`PREP_WINDOW`) over names of :data:`~medsamix.models.preprocess.CT_WINDOWS`,
default the window slices are normalised with at load; without it a configuration has no window (the default).

A *tied* space (``tie``, see :func:`component_tie`) has one such set of hyper-parameters per unit of several
groups (e.g. ``image_encoder``), shared by all of them: the coarse stage of a search, where one move changes a whole
component at once (extrapolating a task vector everywhere, an encoder from one model and a decoder from another).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from ConfigSpace import Categorical, Configuration, ConfigurationSpace, EqualsCondition, Float

from medsamix.merging.config import GroupSetting, MergeConfig
from medsamix.merging.groups import Group
from medsamix.merging.methods import REGISTRY, get_method
from medsamix.models.preprocess import DEFAULT_CT_WINDOW, check_style, check_window

SEP = ":"
PREP_STYLE = f"prep{SEP}style"
"""The searched preprocessing style (a categorical over :data:`~medsamix.models.preprocess.STYLES`)."""
PREP_WINDOW = f"prep{SEP}window"
"""The searched CT window (a categorical over names of :data:`~medsamix.models.preprocess.CT_WINDOWS`; CT only)."""

Tie = Mapping[str, Sequence[str]]
"""Unit name -> names of the layer groups that share its setting (every group in exactly one unit)."""


def component_tie(groups: Sequence[Group]) -> dict[str, list[str]]:
    """One unit per model component ("image_encoder", "prompt_encoder", "mask_decoder") holding its groups."""
    tie: dict[str, list[str]] = {}
    for g in groups:
        tie.setdefault(g.component, []).append(g.name)
    return tie


def _units(groups: Sequence[str], tie: Tie | None) -> dict[str, str]:
    """Group name -> the name its hyper-parameters carry in the space (itself, or its unit in a tied space)."""
    if tie is None:
        return {g: g for g in groups}
    unit = {name: u for u, names in tie.items() for name in names}
    missing = [g for g in groups if g not in unit]
    if missing or len(unit) != sum(len(n) for n in tie.values()):
        raise ValueError(f"the tie must hold every group exactly once; missing {missing}")
    return {g: unit[g] for g in groups}


def _param_names(group: str, method: str, param: str, kind: str, aliases: Sequence[str]) -> list[str]:
    if kind == "weights":
        return [f"{group}{SEP}{method}{SEP}w_{a}" for a in aliases]
    if kind == "model_weights":
        return [f"{group}{SEP}{method}{SEP}w_{a}" for a in list(aliases)[1:]]
    return [f"{group}{SEP}{method}{SEP}{param}"]


def build_space(groups: Sequence[Group], aliases: Sequence[str], methods: Sequence[str] | None = None,
                seed: int = 0, tie: Tie | None = None, styles: Sequence[str] = (),
                windows: Sequence[str] = ()) -> ConfigurationSpace:
    """The search space over ``groups`` for a pool with ``aliases`` (base first), restricted to ``methods``;
    with ``tie``, over its units (each shared by its groups); with two or more ``styles``, also over the
    preprocessing style (:data:`PREP_STYLE`, default the first style); with two or more ``windows`` (CT data), over
    the CT window (:data:`PREP_WINDOW`, default :data:`~medsamix.models.preprocess.DEFAULT_CT_WINDOW` when listed)."""
    methods = sorted(methods or REGISTRY)
    for m in methods:
        get_method(m)
    distinct = list(dict.fromkeys(styles))
    for s in distinct:
        check_style(s, "preprocessing style")
    wins = list(dict.fromkeys(windows))
    for w in wins:
        check_window(w, "CT window")
    cs = ConfigurationSpace(seed=seed)
    if len(distinct) > 1:
        cs.add(Categorical(PREP_STYLE, distinct))
    if len(wins) > 1:
        cs.add(Categorical(PREP_WINDOW, wins, default=DEFAULT_CT_WINDOW if DEFAULT_CT_WINDOW in wins else wins[0]))
    for name in dict.fromkeys(_units([g.name for g in groups], tie).values()):
        choice = Categorical(f"{name}{SEP}method", methods)
        cs.add(choice)
        for m in methods:
            for p in get_method(m).params:
                lo = p.low if p.search_low is None else p.search_low
                hi = p.high if p.search_high is None else p.search_high
                if p.kind == "int":
                    continue
                if p.kind == "source":
                    hps = [Categorical(_param_names(name, m, p.name, p.kind, aliases)[0], list(aliases))]
                elif p.kind == "weights":
                    hps = [Float(n, (0.0, 1.0), default=0.5) for n in _param_names(name, m, p.name, p.kind, aliases)]
                elif p.kind == "model_weights":
                    each = min(max(p.default_each, lo), hi)
                    hps = [Float(n, (lo, hi), default=each) for n in _param_names(name, m, p.name, p.kind, aliases)]
                else:
                    default = p.default if p.default is not None and lo <= p.default <= hi else (lo + hi) / 2
                    hps = [Float(_param_names(name, m, p.name, p.kind, aliases)[0], (lo, hi), default=default)]
                for hp in hps:
                    cs.add(hp)
                    cs.add(EqualsCondition(hp, choice, m))
    return cs


def to_merge_config(values: Configuration | dict[str, Any], groups: Sequence[Group], aliases: Sequence[str],
                    granularity: int, separate: bool = False, tie: Tie | None = None,
                    preprocessing: str | None = None) -> MergeConfig:
    """A sampled configuration -> :class:`MergeConfig` (alias-keyed parameters, as in recipes); with ``tie``
    (a configuration of a tied space), every group gets its unit's setting. The style is the configuration's
    :data:`PREP_STYLE` when the space has it, else ``preprocessing`` (the settings' fixed style).

    Linear weights that are all zero are replaced by equal weights (a valid point the sampler can produce).
    """
    d = {k: _plain(v) for k, v in dict(values).items()}
    style = d.get(PREP_STYLE, preprocessing)
    window = d.get(PREP_WINDOW)
    settings = {}
    for group, unit in _units([g.name for g in groups], tie).items():
        method = d[f"{unit}{SEP}method"]
        params: dict[str, Any] = {}
        for p in get_method(method).params:
            if p.kind == "int":
                params[p.name] = p.default
            elif p.kind == "weights":
                w = {a: float(d[f"{unit}{SEP}{method}{SEP}w_{a}"]) for a in aliases}
                params[p.name] = w if sum(w.values()) > 0 else {a: 1.0 for a in aliases}
            elif p.kind == "model_weights":
                params[p.name] = {a: float(d[f"{unit}{SEP}{method}{SEP}w_{a}"]) for a in list(aliases)[1:]}
            else:
                params[p.name] = d[f"{unit}{SEP}{method}{SEP}{p.name}"]
        settings[group] = GroupSetting(method, params)
    return MergeConfig(granularity, separate, settings, style, window)


def _plain(v: Any) -> Any:
    """ConfigSpace values come as numpy scalars; recipes need plain Python (YAML-safe) values."""
    if isinstance(v, str):
        return str(v)
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    return v


def from_merge_config(cs: ConfigurationSpace, config: MergeConfig, aliases: Sequence[str],
                      tie: Tie | None = None) -> Configuration:
    """A :class:`MergeConfig` -> a ``Configuration`` of ``cs`` (e.g. to seed the initial design); with ``tie``
    (``cs`` a tied space), the groups of each unit must share one setting. When ``cs`` searches the style
    (:data:`PREP_STYLE`), the configuration's style is its value; otherwise the style is not part of the point.

    Raises:
        ValueError: a value lies outside the space (for example a scale above the search range), the groups of
            a unit differ, or ``cs`` searches the style and the configuration has none.
    """
    units: dict[str, GroupSetting] = {}
    for group, unit in _units(list(config.groups), tie).items():
        s = config.groups[group]
        if unit in units and units[unit].canonical() != s.canonical():
            raise ValueError(f"the groups of {unit!r} differ ({group}); the configuration is not in the tied space")
        units[unit] = s
    values: dict[str, Any] = {}
    if PREP_STYLE in cs:
        if config.preprocessing is None:
            raise ValueError("the space searches the preprocessing style; the configuration has none")
        values[PREP_STYLE] = config.preprocessing
    if PREP_WINDOW in cs:  # a configuration without a window has the default one
        values[PREP_WINDOW] = config.ct_window or DEFAULT_CT_WINDOW
    for name, s in units.items():
        values[f"{name}{SEP}method"] = s.method
        for p in get_method(s.method).params:
            if p.kind == "int":
                continue
            if p.kind == "weights":
                w = s.params.get(p.name, {})
                top = max(w.values()) if w else 1.0
                for a in aliases:
                    values[f"{name}{SEP}{s.method}{SEP}w_{a}"] = float(w.get(a, 0.0)) / top
            elif p.kind == "model_weights":
                w = s.params.get(p.name)
                for a in list(aliases)[1:]:
                    values[f"{name}{SEP}{s.method}{SEP}w_{a}"] = float(p.default_each if w is None else w.get(a, 0.0))
            else:
                values[f"{name}{SEP}{s.method}{SEP}{p.name}"] = s.params[p.name]
    return Configuration(cs, values=values)
