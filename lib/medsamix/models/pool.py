"""A model pool: one base SAM model and K >= 1 fine-tuned models of the same architecture, each under an alias,
each with the preprocessing style it expects (:data:`~medsamix.models.preprocess.STYLES`).

This module owns the pool's metadata: :class:`PoolManifest` describes a pool without reading its weights (from a
pool folder's ``pool.yaml`` or from an ``alias=path,...`` list with ``alias=style,...``), :class:`ModelPool` holds
the loaded weights; every :class:`PoolMember` carries its alias, file, checksum and style.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor

from medsamix.models.architecture import VIT_B, ArchSpec, resolve_arch
from medsamix.models.checkpoint import LoadReport, load_sam_checkpoint, sha256_file
from medsamix.errors import PoolError
from medsamix.models.preprocess import STYLES, Preprocessor, check_style

log = logging.getLogger(__name__)
ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")


@dataclasses.dataclass
class PoolMember:
    """One checkpoint of the pool.

    Attributes:
        alias: Short identifier used in recipes and search spaces (never a file path).
        path: The checkpoint file it was loaded from.
        sha256: Hex digest of that file, for provenance.
        state_dict: Plain float32 state dict (keys of ``segment_anything.modeling.Sam``).
        report: What the loader found in the file.
        style: The preprocessing style the model expects (:data:`~medsamix.models.preprocess.STYLES`).
    """

    alias: str
    path: Path
    sha256: str
    state_dict: dict[str, Tensor]
    report: LoadReport
    style: str = STYLES[0]

    def __post_init__(self) -> None:
        check_style(self.style, f"preprocessing style of {self.alias!r}", PoolError)

    def preprocessor(self, img_size: int) -> Preprocessor:
        """This member's input convention for a model input of side ``img_size``."""
        return Preprocessor(self.style, img_size)


@dataclasses.dataclass
class ModelPool:
    """A base model and K >= 1 fine-tuned models, validated to share keys and shapes.

    Attributes:
        arch: The common architecture.
        base: The base (pre-trained SAM) member; source index 0.
        models: The fine-tuned members; source indices 1..K in this order.
    """

    arch: ArchSpec
    base: PoolMember
    models: list[PoolMember]

    def __post_init__(self) -> None:
        if not self.models:
            raise PoolError("a pool needs a base model and at least one fine-tuned model; none was given")
        seen: set[str] = set()
        for m in self.members:
            if not ALIAS_RE.match(m.alias):
                raise PoolError(
                    f"alias {m.alias!r} ({m.path}) must start with a letter and contain only letters, digits, "
                    "'_' or '-' (at most 32 characters)"
                )
            if m.alias in seen:
                raise PoolError(f"alias {m.alias!r} is used twice")
            seen.add(m.alias)
        ref = self.base.state_dict
        for m in self.models:
            missing = sorted(set(ref) - set(m.state_dict))
            extra = sorted(set(m.state_dict) - set(ref))
            if missing or extra:
                raise PoolError(f"{m.path}: keys differ from the base ({self.base.path}): "
                                f"missing {missing[:5]}, extra {extra[:5]}")
            bad = [k for k in ref if ref[k].shape != m.state_dict[k].shape]
            if bad:
                raise PoolError(f"{m.path}: shapes differ from the base ({self.base.path}) for {bad[:5]}")

    @property
    def members(self) -> list[PoolMember]:
        """Base first, then the models: the source order used by merge methods."""
        return [self.base, *self.models]

    @property
    def aliases(self) -> list[str]:
        return [m.alias for m in self.members]

    @property
    def checksums(self) -> dict[str, str]:
        return {m.alias: m.sha256 for m in self.members}

    @property
    def styles(self) -> dict[str, str]:
        """Alias -> preprocessing style of each member (base first)."""
        return {m.alias: m.style for m in self.members}

    def member(self, alias: str) -> PoolMember:
        """The member named ``alias``.

        Raises:
            PoolError: no such member (the message lists them).
        """
        for m in self.members:
            if m.alias == alias:
                return m
        raise PoolError(f"no pool member {alias!r}; members: {self.aliases}")

    @classmethod
    def load(
        cls,
        base: tuple[str, str | os.PathLike[str]],
        models: Mapping[str, str | os.PathLike[str]] | Sequence[tuple[str, str | os.PathLike[str]]],
        arch: str | ArchSpec | None = VIT_B,
        checksums: Mapping[str, str] | None = None,
        styles: Mapping[str, str] | None = None,
    ) -> "ModelPool":
        """Load a pool from checkpoint files.

        Args:
            base: ``(alias, path)`` of the base model.
            models: ``alias -> path`` (or pairs) of the fine-tuned models, K >= 1.
            arch: Expected architecture: a preset name, a spec, or ``None`` to take the base's inferred one.
            checksums: Already computed sha256 per alias (files not listed are hashed here).
            styles: Preprocessing style per alias (members not listed: "sam").

        Raises:
            CheckpointError: a file cannot be loaded (the message names it).
            PoolError: bad or duplicate aliases, fewer than one model, models that do not fit together, or a
                style for an alias not in the pool.
        """
        pairs = list(models.items()) if isinstance(models, Mapping) else list(models)
        if not pairs:
            raise PoolError("a pool needs at least one fine-tuned model besides the base; none was given")
        styles = dict(styles or {})
        stray = sorted(set(styles) - {a for a, _ in [base, *pairs]})
        if stray:
            raise PoolError(f"preprocessing styles given for {stray}, which are not pool members")
        spec = None if arch is None else resolve_arch(arch)
        members = []
        for alias, path in [base, *pairs]:
            sd, report = load_sam_checkpoint(path, spec)
            spec = spec or report.arch
            if report.ignored:
                log.warning("%s: ignored %d keys that are not SAM parameters: %s", path, len(report.ignored),
                            ", ".join(report.ignored[:5]))
            digest = (checksums or {}).get(alias) or sha256_file(path)
            members.append(PoolMember(alias, Path(path), digest, sd, report, styles.get(alias, STYLES[0])))
        assert spec is not None
        return cls(arch=spec, base=members[0], models=members[1:])




@dataclasses.dataclass
class PoolManifest:
    """A pool described without reading its weights: architecture, members' files, checksums and styles.

    Built from a pool folder's ``pool.yaml`` (:meth:`load`) or from ``alias=path`` pairs (:meth:`from_spec`, the
    architecture then inferred from the files when they load).

    Attributes:
        folder: The folder holding ``pool.yaml`` and the checkpoint files (for a spec: the current folder).
        arch: The pool's architecture (``None``: inferred from the base checkpoint when the pool loads).
        base: Alias of the base model.
        files: Alias -> checkpoint path (base first).
        styles: Alias -> preprocessing style (:data:`~medsamix.models.preprocess.STYLES`) of every member.
        training_studies: Data source -> study ids used to train pool models (never to be used for calibration
            or test).
        checksums: Alias -> sha256 the manifest records (files not listed are not checked).
        source: Where the description came from (the pool folder, or the list of files), for messages.
    """

    folder: Path
    arch: ArchSpec | None
    base: str
    files: dict[str, Path]
    styles: dict[str, str]
    training_studies: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    checksums: dict[str, str] = dataclasses.field(default_factory=dict)
    source: str = ""

    @property
    def aliases(self) -> list[str]:
        """Base first, then the fine-tuned models."""
        return list(self.files)

    @property
    def preprocessing(self) -> dict[str, dict[str, str]]:
        """Alias -> preprocessing section as ``pool.yaml`` writes it (``{"style": ...}``)."""
        return {a: {"style": s} for a, s in self.styles.items()}

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> "PoolManifest":
        """Read ``folder/pool.yaml``.

        Raises:
            PoolError: no manifest, a malformed one, or an unknown style (the message names the file).
        """
        import yaml

        folder = Path(folder)
        path = folder / "pool.yaml"
        if not path.is_file():
            raise PoolError(f"{path}: no pool manifest")
        try:
            d = yaml.safe_load(path.read_text())
            members = [d["base"], *d["models"]]
            styles = {m["alias"]: (m.get("preprocessing") or {}).get("style", STYLES[0]) for m in members}
            for alias, style in styles.items():
                check_style(style, f"{path}: preprocessing style of {alias!r}", PoolError)
            return cls(
                folder=folder,
                arch=resolve_arch(d["architecture"]),
                base=d["base"]["alias"],
                files={m["alias"]: folder / m["file"] for m in members},
                styles=styles,
                training_studies={k: list(v) for k, v in (d.get("training_studies") or {}).items()},
                checksums={m["alias"]: m["sha256"] for m in members if m.get("sha256")},
                source=str(folder),
            )
        except (KeyError, TypeError, ValueError, AttributeError, yaml.YAMLError) as e:
            raise PoolError(f"{path}: malformed pool manifest ({type(e).__name__}: {e})") from None

    @classmethod
    def from_spec(cls, models: str, preprocessing: str | None = None) -> "PoolManifest":
        """A pool given as ``"alias=path,alias=path,..."`` (first = base) with ``"alias=style,..."`` (default "sam").

        Raises:
            PoolError: an entry is not ``alias=path`` / ``alias=style``, an alias repeats or is unknown, fewer than
                two models, or an unknown style.
        """
        pairs = parse_models_spec(models)
        files = dict(pairs)
        return cls(folder=Path("."), arch=None, base=pairs[0][0], files=files,
                   styles=parse_styles(preprocessing, list(files)), source=", ".join(str(p) for p in files.values()))

    def check_files(self) -> None:
        """Raises :class:`~medsamix.errors.CheckpointError` naming every checkpoint file that does not exist."""
        from medsamix.errors import CheckpointError

        missing = [f"{p} ({a})" for a, p in self.files.items() if not Path(p).is_file()]
        if missing:
            raise CheckpointError(f"pool checkpoint file(s) not found: {', '.join(missing)}")

    def load_pool(self) -> ModelPool:
        """Load and validate the checkpoints, each member with its style; a file whose sha256 differs from the
        manifest is refused."""
        actual = {a: sha256_file(p) for a, p in self.files.items() if p.is_file()}
        bad = [f"{self.files[a]} (manifest {want[:12]}..., file {actual[a][:12]}...)"
               for a, want in self.checksums.items() if a in actual and actual[a] != want]
        if bad:
            raise PoolError(f"{self.folder / 'pool.yaml'}: checkpoint checksum mismatch: {'; '.join(bad)}")
        models = [(a, p) for a, p in self.files.items() if a != self.base]
        return ModelPool.load((self.base, self.files[self.base]), models, arch=self.arch, checksums=actual,
                              styles=self.styles)



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


def parse_styles(spec: str | None, aliases: list[str], default: str = STYLES[0]) -> dict[str, str]:
    """``"alias=style,..."`` -> a style per alias (``default`` for those not named).

    Raises:
        PoolError: an entry is not ``alias=style`` for a known alias, or names an unknown style.
    """
    styles = {a: default for a in aliases}
    for part in (p.strip() for p in (spec or "").split(",")):
        if not part:
            continue
        alias, sep, style = part.partition("=")
        alias, style = alias.strip(), style.strip()
        if not sep or alias not in styles:
            raise PoolError(f"preprocessing: expected alias=style for aliases {aliases}, got {part!r}")
        styles[alias] = check_style(style, f"preprocessing: style of {alias!r}", PoolError)
    return styles
