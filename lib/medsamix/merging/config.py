"""Merge configurations: a method and hyper-parameters for every layer group, and the preprocessing style the merged
model is scored and served with."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from random import Random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from medsamix.errors import ConfigError
from medsamix.merging.groups import Group, check_granularity
from medsamix.merging.methods import REGISTRY, get_method
from medsamix.models.preprocess import check_style, check_window


@dataclasses.dataclass(frozen=True)
class GroupSetting:
    """Method name and alias-keyed hyper-parameters of one group (as written in a recipe)."""

    method: str
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "params": _plain(self.params)}

    def canonical(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclasses.dataclass
class MergeConfig:
    """A complete layer-wise merge configuration.

    Attributes:
        granularity: ViT blocks per encoder group (1-4).
        separate: Whether encoder groups are split into attn / mlp / norm.
        groups: Group name -> setting; must cover exactly the groups of the architecture.
        preprocessing: Input convention of the merged model ("sam" / "medsam", :data:`~medsamix.models.preprocess.STYLES`)
            when the configuration fixes it: every configuration of a search does (the style is one of its
            dimensions, an encoder pass depends on it). ``None``: not part of this configuration (a recipe keeps
            it in its own ``preprocessing`` section; :attr:`medsamix.merging.recipe.Recipe.config` puts it back).
        ct_window: The CT window of the merged model (a name of :data:`~medsamix.models.preprocess.CT_WINDOWS`)
            when a search chose it (on CT data); ``None``: the default window. Kept like ``preprocessing``.
    """

    granularity: int
    separate: bool
    groups: dict[str, GroupSetting]
    preprocessing: str | None = None
    ct_window: str | None = None

    def __post_init__(self) -> None:
        check_granularity(self.granularity, error=ConfigError)
        if self.preprocessing is not None:
            check_style(self.preprocessing, "preprocessing", ConfigError)
        if self.ct_window is not None:
            check_window(self.ct_window, "ct_window", ConfigError)

    @classmethod
    def uniform(cls, groups: Sequence[Group], method: str, params: Mapping[str, Any], granularity: int = 1,
                separate: bool = False, preprocessing: str | None = None) -> "MergeConfig":
        """The same method and parameters for every group (the paper's uniform baselines)."""
        return cls(granularity, separate, {g.name: GroupSetting(method, dict(params)) for g in groups}, preprocessing)

    def with_preprocessing(self, style: str | None) -> "MergeConfig":
        """The same merge with another preprocessing style (``None``: none)."""
        return dataclasses.replace(self, preprocessing=style)

    def with_ct_window(self, window: str | None) -> "MergeConfig":
        """The same merge with another CT window (``None``: none, i.e. the default)."""
        return dataclasses.replace(self, ct_window=window)

    @classmethod
    def random(cls, groups: Sequence[Group], aliases: Sequence[str], rng: Random, granularity: int = 1,
               separate: bool = False, methods: Iterable[str] | None = None) -> "MergeConfig":
        """A random layer-wise configuration: per group a method drawn uniformly and parameters from its ranges."""
        names = sorted(methods or REGISTRY)
        out = {}
        for g in groups:
            m = get_method(rng.choice(names))
            out[g.name] = GroupSetting(m.name, m.sample(rng, aliases))
        return cls(granularity, separate, out)

    def validate(self, groups: Sequence[Group], aliases: Sequence[str]) -> dict[str, tuple[str, dict[str, Any]]]:
        """Check the configuration against a grouping and a pool.

        Returns:
            Group name -> ``(method, index-form params)``.

        Raises:
            ConfigError: wrong granularity, unknown or missing groups, unknown methods, bad parameters.
        """
        expected = [g.name for g in groups]
        unknown = sorted(set(self.groups) - set(expected))
        if unknown:
            raise ConfigError(f"groups: unknown group(s) {unknown}; this architecture at granularity "
                              f"{self.granularity} has {expected}")
        missing = [g for g in expected if g not in self.groups]
        if missing:
            raise ConfigError(f"groups: no setting for {missing}")
        out = {}
        for name in expected:
            s = self.groups[name]
            try:
                method = get_method(s.method)
            except ConfigError as e:
                raise ConfigError(f"groups.{name}.method: {e}") from None
            out[name] = (s.method, method.resolve(s.params, aliases, where=f"groups.{name}"))
        return out

    def fingerprint(self, group_names: Iterable[str] | None = None) -> str:
        """Short hash of the settings of some groups (all by default) and of the preprocessing style, if any.

        Two configurations with the same fingerprint over the image-encoder groups produce the same image
        embeddings (same encoder weights, same input convention), which lets an evaluator reuse them.
        """
        names = sorted(self.groups if group_names is None else group_names)
        head: list[Any] = [self.granularity, self.separate]
        if self.preprocessing is not None:  # configurations without a style keep their fingerprint
            head.append({"preprocessing": self.preprocessing})
        if self.ct_window is not None:  # likewise without a window
            head.append({"ct_window": self.ct_window})
        payload = json.dumps(head + [[n, self.groups[n].canonical()] for n in names])
        return hashlib.sha1(payload.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """Plain (YAML-safe) form; ``preprocessing`` only when the configuration has a style."""
        out: dict[str, Any] = {"granularity": self.granularity, "separate": self.separate}
        if self.preprocessing is not None:
            out["preprocessing"] = self.preprocessing
        if self.ct_window is not None:
            out["ct_window"] = self.ct_window
        out["groups"] = {n: s.to_dict() for n, s in self.groups.items()}
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "") -> "MergeConfig":
        pre = f"{where}: " if where else ""
        try:
            groups = d["groups"]
            if not isinstance(groups, Mapping):
                raise ConfigError(f"{pre}groups: expected a mapping group -> setting")
            settings = {}
            for name, s in groups.items():
                if not isinstance(s, Mapping) or "method" not in s:
                    raise ConfigError(f"{pre}groups.{name}: expected {{method: ..., params: {{...}}}}, got {s!r}")
                extra = sorted(set(s) - {"method", "params"})
                if extra:
                    raise ConfigError(f"{pre}groups.{name}: unknown field(s) {extra}")
                params = s.get("params") or {}
                if not isinstance(params, Mapping):
                    raise ConfigError(f"{pre}groups.{name}.params: expected a mapping, got {params!r}")
                settings[str(name)] = GroupSetting(str(s["method"]), dict(params))
            granularity = check_granularity(d.get("granularity", 1), f"{pre}granularity", ConfigError)
            style, window = d.get("preprocessing"), d.get("ct_window")
            if style is not None:
                check_style(style, f"{pre}preprocessing", ConfigError)
            if window is not None:
                check_window(window, f"{pre}ct_window", ConfigError)
            return cls(granularity, bool(d.get("separate", False)), settings, style, window)
        except KeyError as e:
            raise ConfigError(f"{pre}missing field {e.args[0]!r}") from None


def _plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def uniform_merges(groups: Sequence[Group], aliases: Sequence[str], granularity: int = 1,
                   separate: bool = False, preprocessing: str | None = None) -> dict[str, MergeConfig]:
    """The uniform baselines of every registered method (:attr:`~medsamix.merging.methods.MergeMethod.uniform`),
    by name in name order, each applied to every group (with ``preprocessing``): the paper's linear with equal
    weights over all sources, SLERP t=0.5, task arithmetic 0.5 and TIES keep 0.5 / scale 0.5.

    Raises:
        ValueError: two methods register a baseline of the same name.
    """
    out: dict[str, MergeConfig] = {}
    for method in REGISTRY.values():
        for name, params in method.uniform_baselines(aliases).items():
            if name in out:
                raise ValueError(f"uniform baseline {name!r} registered by two methods")
            out[name] = MergeConfig.uniform(groups, method.name, params, granularity, separate, preprocessing)
    return dict(sorted(out.items()))
