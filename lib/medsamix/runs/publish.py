"""Publishing a merged model atomically, and finding the one currently published.

A served model folder looks like this::

    <folder>/versions/<version>/recipe.yaml   the recipe (with its calibration/test scores)
    <folder>/versions/<version>/merged.pth    plain segment_anything state dict
    <folder>/current.json                     {"version", "recipe", "checkpoint", "published_at", ...}
    <folder>/.lock                            held while a publish writes (:class:`~medsamix.runs.lock.RunLock`)

A version folder is written completely under a temporary name (``versions/.tmp-*``), flushed to disk and renamed
into place; ``current.json`` is replaced last (``os.replace``), so a reader either sees the previous complete model
or the new complete one, never a half-written file. Readers poll :func:`current` (one small file read) and reload
when ``version`` changes.

A publish killed midway leaves its temporary folder (or ``.current.json.tmp-*``) behind and changes nothing that is
served; :func:`clean_incomplete` removes such leftovers (at server start, and at the start of every publish).
Publishes into one folder take turns on its lock, so a cleanup never removes the files of a publish in progress.

A finished merge run is published with :func:`publish_outcome`, the one step the app's ``merge`` train task and
``scripts/merge_search.py --publish`` both call: refused (:class:`NotPromotedError`) unless the run passed the
no-regression guard, and not repeated when the run is already the served model (:func:`publish_run`).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from torch import Tensor

from medsamix.atomic import TMP_INFIX, atomic_write_text, fsync_path
from medsamix.models.checkpoint import save_sam_checkpoint, sha256_file
from medsamix.errors import MedSAMixError
from medsamix.merging.recipe import Recipe
from medsamix.runs.lock import RunLock, RunLockedError

if TYPE_CHECKING:  # run.py and plan.py import the search (SMAC); the serving side needs only current()
    from medsamix.runs.plan import RunPlan
    from medsamix.runs.run import MergeOutcome

log = logging.getLogger(__name__)

CURRENT = "current.json"
VERSIONS = "versions"
TMP_VERSION = ".tmp-"  # prefix of a version folder being written
TMP_POINTER = f".{CURRENT}{TMP_INFIX}"  # prefix of a current.json being written
FILES = ("recipe.yaml", "merged.pth")  # what a complete version folder holds
PUBLISH_WAIT = 600.0
"""Seconds :func:`publish` waits for another publish into the same folder to finish."""


class PublishError(MedSAMixError):
    """A published model folder is unreadable or inconsistent."""


class NotPromotedError(MedSAMixError):
    """A run's merged model did not pass the no-regression guard (:mod:`medsamix.runs.promotion`): not published."""


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
            info: Mapping[str, Any] | None = None, wait: float = PUBLISH_WAIT) -> Published:
    """Write ``recipe`` and ``state_dict`` as a new version and make it current, atomically.

    Args:
        folder: The served model folder (created if needed).
        recipe: The merged model's recipe; saved as ``recipe.yaml``.
        state_dict: The merged model's parameters (segment_anything names).
        info: Extra JSON-serialisable facts stored in ``current.json`` (for example the search's run id).
        wait: Seconds to wait for another publish into ``folder`` to finish.

    Returns:
        The new :class:`Published` entry.

    Raises:
        RunLockedError: another publish into ``folder`` did not finish within ``wait`` seconds.
    """
    folder = Path(folder)
    with RunLock(folder, timeout=wait):
        _remove_incomplete(folder)  # leftovers of killed publishes: no other publish runs now
        versions = folder / VERSIONS
        versions.mkdir(parents=True, exist_ok=True)
        tmp = versions / f"{TMP_VERSION}{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            save_sam_checkpoint(state_dict, tmp / "merged.pth")
            recipe.save(tmp / "recipe.yaml")
            for name in FILES:
                fsync_path(tmp / name)
            fsync_path(tmp)
            now = _dt.datetime.now(_dt.timezone.utc)
            version = f"{now:%Y%m%dT%H%M%S%f}-{sha256_file(tmp / 'merged.pth')[:8]}"
            os.rename(tmp, versions / version)
            fsync_path(versions)
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
        atomic_write_text(folder / CURRENT, json.dumps(entry, indent=2, default=str))  # temp: TMP_POINTER*
        fsync_path(folder)
    return _entry(folder, entry)


def publish_run(folder: str | os.PathLike[str], run: str, recipe: Recipe, state_dict: Mapping[str, Tensor],
                info: Mapping[str, Any] | None = None, wait: float = PUBLISH_WAIT) -> Published:
    """:func:`publish` the merged model of the run named ``run``, unless it already is the model ``folder`` serves.

    "Already published" means: ``current.json`` names the same run (``info["run"]``) and its ``recipe.yaml`` has
    the same text as ``recipe`` (the same selected configuration and scores), so a finished run asked for again
    publishes nothing new. A damaged ``current.json`` is replaced by the new version (with a warning).

    Args:
        folder: The served model folder.
        run: The run's name (:func:`medsamix.runs.plan.run_name`); stored as ``info["run"]``.
        recipe, state_dict, info, wait: As for :func:`publish`.

    Returns:
        The served entry: the new version, or the current one when the run was already published.
    """
    try:
        now = current(folder)
    except PublishError as e:  # a damaged pointer: the new version replaces it
        log.warning("%s; publishing a new version", e)
        now = None
    if now is not None and now.info.get("run") == run and now.recipe.read_text() == recipe.dump():
        log.info("run %s is already published as version %s", run, now.version)
        return now
    return publish(folder, recipe, state_dict, {"run": run, **{k: v for k, v in (info or {}).items() if k != "run"}},
                   wait)


def publish_outcome(folder: str | os.PathLike[str], plan: "RunPlan", outcome: "MergeOutcome",
                    wait: float = PUBLISH_WAIT) -> Published:
    """Publish a finished merge run's model into the served folder ``folder``, as the app's train task does.

    ``current.json``'s ``info`` holds the run's name, variant, tasks and trials, its calibration and test Dice and
    the best single pool model with its calibration Dice (the no-regression guard's reference).

    Raises:
        NotPromotedError: the run did not pass the no-regression guard (the reason is in the message); nothing
            is written.
        RunLockedError: another publish into ``folder`` did not finish within ``wait`` seconds.
    """
    promotion = outcome.promotion
    if not promotion.promote:
        raise NotPromotedError(f"not published to {folder} (run {plan.name}): {promotion.reason}")
    info = {"variant": plan.variant, "tasks": list(plan.settings.tasks), "trials": plan.settings.trials,
            "calibration_dice": outcome.calibration_dice, "test_dice": outcome.test_dice,
            "best_single": promotion.best_single, "best_single_dice": promotion.best_single_dice}
    return publish_run(folder, plan.name, outcome.recipe, outcome.state_dict, info, wait)


def clean_incomplete(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove what killed publishes left in ``folder``: ``versions/.tmp-*`` and ``.current.json.tmp-*``.

    Complete versions stay, also one a killed publish wrote but did not make current. Safe to call any time (at
    server start): while another process publishes into ``folder`` nothing is removed.

    Returns:
        The removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    try:
        with RunLock(folder):
            return _remove_incomplete(folder)
    except RunLockedError as e:
        log.info("not cleaning up now: %s", e)
        return []


def current(folder: str | os.PathLike[str]) -> Published | None:
    """The currently published model of ``folder``, or ``None`` when nothing was published yet.

    Only a complete version is returned: ``current.json`` must name the ``recipe.yaml`` and ``merged.pth`` of a
    version folder under ``versions/`` (not a temporary one), and both files must exist and not be empty.

    Raises:
        PublishError: ``current.json`` is unreadable or names files that do not exist or no complete version.
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
    version_dir = folder / VERSIONS / published.version
    complete = (
        not published.version.startswith(".") and "/" not in published.version  # never a temporary folder
        and (published.recipe, published.checkpoint) == tuple(version_dir / name for name in FILES)
        and all(p.stat().st_size > 0 for p in (published.recipe, published.checkpoint))
    )
    if not complete:
        raise PublishError(f"{pointer}: names {published.recipe} and {published.checkpoint}, which are not the "
                           f"files of a complete version folder {version_dir}")
    return published


def _remove_incomplete(folder: Path) -> list[Path]:
    """:func:`clean_incomplete` with the folder's lock held."""
    found = sorted((folder / VERSIONS).glob(f"{TMP_VERSION}*")) + sorted(folder.glob(f"{TMP_POINTER}*"))
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        log.warning("removed %s, left by a publish that did not finish", p)
    return found


def _entry(folder: Path, entry: Mapping[str, Any]) -> Published:
    return Published(str(entry["version"]), folder / entry["recipe"], folder / entry["checkpoint"],
                     str(entry["published_at"]), dict(entry.get("info") or {}))
