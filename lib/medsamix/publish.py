"""Publishing a merged model atomically, and finding the one currently published.

A served model folder looks like this::

    <folder>/versions/<version>/recipe.yaml   the recipe (with its calibration/test scores)
    <folder>/versions/<version>/merged.pth    plain segment_anything state dict
    <folder>/current.json                     {"version", "recipe", "checkpoint", "published_at", ...}

A version folder is written completely under a temporary name and renamed into place; ``current.json`` is
replaced last (``os.replace``), so a reader either sees the previous complete model or the new complete one, never
a half-written file. Readers poll :func:`current` (one small file read) and reload when ``version`` changes.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

from .checkpoint import save_sam_checkpoint, sha256_file
from .errors import MedSAMixError
from .recipe import Recipe

CURRENT = "current.json"
VERSIONS = "versions"


class PublishError(MedSAMixError):
    """A published model folder is unreadable or inconsistent."""


@dataclasses.dataclass(frozen=True)
class Published:
    """The model a folder currently serves."""

    version: str
    recipe: Path
    checkpoint: Path
    published_at: str
    info: dict[str, Any]

    def load_recipe(self) -> Recipe:
        return Recipe.load(self.recipe)


def publish(folder: str | os.PathLike[str], recipe: Recipe, state_dict: Mapping[str, Tensor],
            info: Mapping[str, Any] | None = None) -> Published:
    """Write ``recipe`` and ``state_dict`` as a new version and make it current, atomically.

    Args:
        folder: The served model folder (created if needed).
        recipe: The merged model's recipe; saved as ``recipe.yaml``.
        state_dict: The merged model's parameters (segment_anything names).
        info: Extra JSON-serialisable facts stored in ``current.json`` (for example the search's run id).

    Returns:
        The new :class:`Published` entry.
    """
    folder = Path(folder)
    versions = folder / VERSIONS
    versions.mkdir(parents=True, exist_ok=True)
    tmp = versions / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        save_sam_checkpoint(state_dict, tmp / "merged.pth")
        recipe.save(tmp / "recipe.yaml")
        now = _dt.datetime.now(_dt.timezone.utc)
        version = f"{now:%Y%m%dT%H%M%S%f}-{sha256_file(tmp / 'merged.pth')[:8]}"
        os.rename(tmp, versions / version)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    entry = {
        "version": version,
        "recipe": f"{VERSIONS}/{version}/recipe.yaml",
        "checkpoint": f"{VERSIONS}/{version}/merged.pth",
        "published_at": now.isoformat(timespec="seconds"),
        "info": dict(info or {}),
    }
    pointer_tmp = folder / f".{CURRENT}.tmp-{uuid.uuid4().hex}"
    pointer_tmp.write_text(json.dumps(entry, indent=2, default=str))
    os.replace(pointer_tmp, folder / CURRENT)
    return _entry(folder, entry)


def current(folder: str | os.PathLike[str]) -> Published | None:
    """The currently published model of ``folder``, or ``None`` when nothing was published yet.

    Raises:
        PublishError: ``current.json`` is unreadable or names files that do not exist.
    """
    folder = Path(folder)
    pointer = folder / CURRENT
    if not pointer.exists():
        return None
    try:
        entry = json.loads(pointer.read_text())
        published = _entry(folder, entry)
    except (ValueError, KeyError, TypeError) as e:
        raise PublishError(f"{pointer}: unreadable ({e})") from None
    for p in (published.recipe, published.checkpoint):
        if not p.is_file():
            raise PublishError(f"{pointer}: names {p}, which does not exist")
    return published


def _entry(folder: Path, entry: Mapping[str, Any]) -> Published:
    return Published(str(entry["version"]), folder / entry["recipe"], folder / entry["checkpoint"],
                     str(entry["published_at"]), dict(entry.get("info") or {}))
