"""Recipes: small YAML files that fully describe a merged model.

A recipe names the pool (aliases with the sha256 of each checkpoint), the architecture, the grouping, every group's
method and hyper-parameters, the preprocessing the merged model expects, and room for scores. The preprocessing
style lives in ``preprocessing.style`` only (for a searched merge: the style the search selected, a dimension of its
configuration); :attr:`Recipe.config` is the merge configuration with it, :meth:`Recipe.preprocessor` the input
convention to serve the merged model with. The CT window a search chose on CT data (``preprocessing.ct_window``, a
name of :data:`~medsamix.models.preprocess.CT_WINDOWS`) is kept the same way; a recipe without it (older recipes,
searches on other modalities) is served with the default window. It is what leaves a
hospital after a search; together with the same checkpoints it reproduces the merged weights exactly.

Example::

    medsamix_recipe: 1
    architecture: vit_b
    base: {alias: sam, sha256: 9f...}
    models:
      - {alias: medsam, sha256: 41...}
    preprocessing: {style: medsam, ct_window: bone}
    merge:
      granularity: 2
      separate: false
      groups:
        enc.patch_embed: {method: linear, params: {weights: {sam: 0.3, medsam: 0.7}}}
        ...
    scores: {calibration_dice: {hippocampus: 0.81}}
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from medsamix.models.architecture import PRESETS, TINY256, VIT_B, ArchSpec, reference_param_names, resolve_arch
from medsamix.merging.config import MergeConfig
from medsamix.atomic import atomic_write_text
from medsamix.errors import ConfigError
from medsamix.merging.groups import group_parameters
from medsamix.models.pool import ALIAS_RE
from medsamix.models.preprocess import Preprocessor, check_style, check_window

FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """A pool member as a recipe records it: alias and checkpoint sha256."""

    alias: str
    sha256: str


@dataclasses.dataclass
class Recipe:
    """A complete description of a merged model (see the module docstring for the YAML form)."""

    arch: ArchSpec
    base: ModelRef
    models: list[ModelRef]
    merge: MergeConfig
    preprocessing: dict[str, Any] = dataclasses.field(default_factory=lambda: {"style": "sam"})
    scores: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: str = ""

    def __post_init__(self) -> None:
        style = self.merge.preprocessing
        if style is not None:  # a search's configuration: its style is the recipe's, written in one place
            if style != self.preprocessing.get("style"):
                raise ConfigError(f"merge.preprocessing {style!r} differs from preprocessing.style "
                                  f"{self.preprocessing.get('style')!r}")
            self.merge = self.merge.with_preprocessing(None)
        window = self.merge.ct_window
        if window is not None:  # likewise the searched CT window
            if self.preprocessing.get("ct_window", window) != window:
                raise ConfigError(f"merge.ct_window {window!r} differs from preprocessing.ct_window "
                                  f"{self.preprocessing.get('ct_window')!r}")
            self.preprocessing = {**self.preprocessing, "ct_window": window}
            self.merge = self.merge.with_ct_window(None)

    @property
    def aliases(self) -> list[str]:
        return [self.base.alias] + [m.alias for m in self.models]

    @property
    def style(self) -> str:
        """The merged model's preprocessing style (``preprocessing.style``)."""
        return str(self.preprocessing.get("style", "sam"))

    @property
    def config(self) -> MergeConfig:
        """The merge configuration with the recipe's preprocessing style (as a search scored it)."""
        return self.merge.with_preprocessing(self.style).with_ct_window(self.preprocessing.get("ct_window"))

    def preprocessor(self) -> Preprocessor:
        """The input convention the merged model is served with (its style at the architecture's input size)."""
        return Preprocessor.from_dict(dict(self.preprocessing), self.arch.img_size)

    @property
    def checksums(self) -> dict[str, str]:
        return {m.alias: m.sha256 for m in [self.base, *self.models]}

    def validate(self, where: str = "recipe") -> None:
        """Check aliases, preprocessing and every group setting against the architecture's grouping.

        Raises:
            ConfigError: naming ``where`` (usually the file) and the offending field.
        """
        aliases = self.aliases
        for a in aliases:
            if not ALIAS_RE.match(a):
                raise ConfigError(f"{where}: alias {a!r} must start with a letter and contain only letters, digits, "
                                  "'_' or '-'")
        if len(set(aliases)) != len(aliases):
            raise ConfigError(f"{where}: duplicate aliases in {aliases}")
        if not self.models:
            raise ConfigError(f"{where}: models: at least one fine-tuned model is required")
        check_style(self.preprocessing.get("style"), f"{where}: preprocessing.style", ConfigError)
        if self.preprocessing.get("ct_window") is not None:
            check_window(self.preprocessing["ct_window"], f"{where}: preprocessing.ct_window", ConfigError)
        groups = group_parameters(reference_param_names(self.arch), self.merge.granularity, self.merge.separate)
        try:
            self.merge.validate(groups, aliases)
        except ConfigError as e:
            raise ConfigError(f"{where}: merge.{e}") from None

    def to_dict(self) -> dict[str, Any]:
        named = {**PRESETS, TINY256.name: TINY256}
        arch: Any = self.arch.name if named.get(self.arch.name) == self.arch else self.arch.to_dict()
        return {
            "medsamix_recipe": FORMAT_VERSION,
            "architecture": arch,
            "base": dataclasses.asdict(self.base),
            "models": [dataclasses.asdict(m) for m in self.models],
            "preprocessing": dict(self.preprocessing),
            "merge": self.merge.to_dict(),
            "scores": self.scores,
            "notes": self.notes,
        }

    def dump(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, width=120)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the recipe atomically (temporary file, then rename)."""
        atomic_write_text(path, self.dump())

    @classmethod
    def from_dict(cls, d: Any, where: str = "recipe") -> "Recipe":
        """Parse and validate a recipe mapping; errors name ``where`` and the field."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: expected a YAML mapping at the top level")
        version = d.get("medsamix_recipe")
        if version != FORMAT_VERSION:
            raise ConfigError(f"{where}: medsamix_recipe: expected format version {FORMAT_VERSION}, got {version!r}")
        known = {"medsamix_recipe", "architecture", "base", "models", "preprocessing", "merge", "scores", "notes"}
        extra = sorted(set(d) - known)
        if extra:
            raise ConfigError(f"{where}: unknown field(s) {extra}")
        try:
            arch = resolve_arch(d.get("architecture", VIT_B.name))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}: architecture: {e}") from None
        base = _model_ref(d.get("base"), f"{where}: base")
        models_raw = d.get("models")
        if not isinstance(models_raw, list):
            raise ConfigError(f"{where}: models: expected a list of {{alias, sha256}}")
        models = [_model_ref(m, f"{where}: models[{i}]") for i, m in enumerate(models_raw)]
        merge_raw = d.get("merge")
        if not isinstance(merge_raw, Mapping):
            raise ConfigError(f"{where}: merge: expected a mapping with granularity, separate and groups")
        merge = MergeConfig.from_dict(merge_raw, where=f"{where}: merge")
        preprocessing = d.get("preprocessing") or {"style": "sam"}
        if not isinstance(preprocessing, Mapping):
            raise ConfigError(f"{where}: preprocessing: expected a mapping")
        scores = d.get("scores") or {}
        if not isinstance(scores, Mapping):
            raise ConfigError(f"{where}: scores: expected a mapping")
        for field, value in (("preprocessing", merge.preprocessing), ("ct_window", merge.ct_window)):
            if value is not None:
                raise ConfigError(f"{where}: merge.{field}: the {'style' if field == 'preprocessing' else field} "
                                  "belongs in the recipe's preprocessing section")
        recipe = cls(arch, base, models, merge, dict(preprocessing), dict(scores), str(d.get("notes") or ""))
        recipe.validate(where)
        return recipe

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Recipe":
        """Read a recipe file. Raises :class:`ConfigError` naming the file and field on any problem."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such recipe file")
        try:
            data = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
        return cls.from_dict(data, where=str(path))


def _model_ref(d: Any, where: str) -> ModelRef:
    if not isinstance(d, Mapping) or "alias" not in d or "sha256" not in d:
        raise ConfigError(f"{where}: expected {{alias: ..., sha256: ...}}, got {d!r}")
    sha = str(d["sha256"]).lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ConfigError(f"{where}.sha256: not a hex sha256 digest: {d['sha256']!r}")
    return ModelRef(str(d["alias"]), sha)


def check_checksums(recipe: Recipe, actual: Mapping[str, str], force: bool = False) -> list[str]:
    """Compare the recipe's checksums with those of the given checkpoints.

    Returns:
        Human-readable mismatch descriptions (empty if all match).

    Raises:
        ConfigError: a mismatch and not ``force``; or a recipe alias without a checkpoint / vice versa.
    """
    missing = [a for a in recipe.aliases if a not in actual]
    extra = [a for a in actual if a not in recipe.aliases]
    if missing or extra:
        raise ConfigError(f"checkpoints do not match the recipe's aliases {recipe.aliases}: "
                          f"missing {missing}, not in recipe {extra}")
    mismatches = [
        f"{a}: recipe sha256 {want[:12]}..., file sha256 {actual[a][:12]}..."
        for a, want in recipe.checksums.items() if actual[a] != want
    ]
    if mismatches and not force:
        raise ConfigError("checkpoint checksums differ from the recipe (use --force to merge anyway): "
                          + "; ".join(mismatches))
    return mismatches
