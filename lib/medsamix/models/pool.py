"""A model pool: one base SAM model and K >= 1 fine-tuned models of the same architecture, each under an alias."""

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
    """

    alias: str
    path: Path
    sha256: str
    state_dict: dict[str, Tensor]
    report: LoadReport


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

    @classmethod
    def load(
        cls,
        base: tuple[str, str | os.PathLike[str]],
        models: Mapping[str, str | os.PathLike[str]] | Sequence[tuple[str, str | os.PathLike[str]]],
        arch: str | ArchSpec | None = VIT_B,
        checksums: Mapping[str, str] | None = None,
    ) -> "ModelPool":
        """Load a pool from checkpoint files.

        Args:
            base: ``(alias, path)`` of the base model.
            models: ``alias -> path`` (or pairs) of the fine-tuned models, K >= 1.
            arch: Expected architecture: a preset name, a spec, or ``None`` to take the base's inferred one.
            checksums: Already computed sha256 per alias (files not listed are hashed here).

        Raises:
            CheckpointError: a file cannot be loaded (the message names it).
            PoolError: bad or duplicate aliases, fewer than one model, or models that do not fit together.
        """
        pairs = list(models.items()) if isinstance(models, Mapping) else list(models)
        if not pairs:
            raise PoolError("a pool needs at least one fine-tuned model besides the base; none was given")
        spec = None if arch is None else resolve_arch(arch)
        members = []
        for alias, path in [base, *pairs]:
            sd, report = load_sam_checkpoint(path, spec)
            spec = spec or report.arch
            if report.ignored:
                log.warning("%s: ignored %d keys that are not SAM parameters: %s", path, len(report.ignored),
                            ", ".join(report.ignored[:5]))
            digest = (checksums or {}).get(alias) or sha256_file(path)
            members.append(PoolMember(alias, Path(path), digest, sd, report))
        assert spec is not None
        return cls(arch=spec, base=members[0], models=members[1:])


@dataclasses.dataclass
class PoolManifest:
    """A pool folder's ``pool.yaml``: architecture, members with files, checksums and preprocessing.

    Attributes:
        folder: The folder holding ``pool.yaml`` and the checkpoint files.
        arch: The pool's architecture.
        base: Alias of the base model.
        files: Alias -> checkpoint path (base first).
        preprocessing: Alias -> preprocessing dict (``{"style": "sam"|"medsam"}``).
        training_studies: Data source -> study ids used to train pool models (never to be used for calibration
            or test).
    """

    folder: Path
    arch: ArchSpec
    base: str
    files: dict[str, Path]
    preprocessing: dict[str, dict[str, str]]
    training_studies: dict[str, list[str]]
    checksums: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> "PoolManifest":
        import yaml

        folder = Path(folder)
        path = folder / "pool.yaml"
        if not path.is_file():
            raise PoolError(f"{path}: no pool manifest")
        try:
            d = yaml.safe_load(path.read_text())
            members = [d["base"], *d["models"]]
            return cls(
                folder=folder,
                arch=resolve_arch(d["architecture"]),
                base=d["base"]["alias"],
                files={m["alias"]: folder / m["file"] for m in members},
                preprocessing={m["alias"]: dict(m.get("preprocessing") or {"style": "sam"}) for m in members},
                training_studies={k: list(v) for k, v in (d.get("training_studies") or {}).items()},
                checksums={m["alias"]: m["sha256"] for m in members if m.get("sha256")},
            )
        except (KeyError, TypeError, ValueError, yaml.YAMLError) as e:
            raise PoolError(f"{path}: malformed pool manifest ({type(e).__name__}: {e})") from None

    def load_pool(self) -> ModelPool:
        """Load and validate the checkpoints; a file whose sha256 differs from the manifest is refused."""
        actual = {a: sha256_file(p) for a, p in self.files.items() if p.is_file()}
        bad = [f"{self.files[a]} (manifest {want[:12]}..., file {actual[a][:12]}...)"
               for a, want in self.checksums.items() if a in actual and actual[a] != want]
        if bad:
            raise PoolError(f"{self.folder / 'pool.yaml'}: checkpoint checksum mismatch: {'; '.join(bad)}")
        models = [(a, p) for a, p in self.files.items() if a != self.base]
        return ModelPool.load((self.base, self.files[self.base]), models, arch=self.arch, checksums=actual)


def manifest_styles(manifest: PoolManifest) -> dict[str, str]:
    """Alias -> preprocessing style of each model of a pool manifest."""
    return {a: str(p.get("style", "sam")) for a, p in manifest.preprocessing.items()}
