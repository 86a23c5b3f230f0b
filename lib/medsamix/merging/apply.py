"""Reproducing a merged model from a recipe and the pool's checkpoint files."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from medsamix.models.checkpoint import sha256_file
from medsamix.errors import CheckpointError
from medsamix.merging.merger import Merger
from medsamix.models.pool import ModelPool
from medsamix.merging.recipe import Recipe, check_checksums

log = logging.getLogger(__name__)


def merge_from_recipe(recipe: Recipe, checkpoints: Mapping[str, str | os.PathLike[str]], force: bool = False,
                      device: str | torch.device = "cpu") -> Merger:
    """Load the pool named by ``recipe`` from ``checkpoints`` (alias -> file) and materialise the merge.

    The files' sha256 are checked against the recipe before any weights are read; a mismatch raises
    :class:`~medsamix.errors.ConfigError` unless ``force`` (then it is logged).

    Returns:
        The merger; ``merger.model`` holds the merged weights.

    Raises:
        CheckpointError: a file is missing or not a checkpoint of the recipe's architecture.
        ConfigError: aliases or checksums do not match, or the configuration is invalid.
        MergeError: the merge produced non-finite weights.
    """
    for alias, path in checkpoints.items():
        if not Path(path).is_file():
            raise CheckpointError(f"{path}: no such file (checkpoint for {alias!r})")
    actual = {alias: sha256_file(path) for alias, path in checkpoints.items()}
    for mismatch in check_checksums(recipe, actual, force=force):
        log.warning("checksum mismatch (forced): %s", mismatch)
    pool = ModelPool.load(
        (recipe.base.alias, checkpoints[recipe.base.alias]),
        [(m.alias, checkpoints[m.alias]) for m in recipe.models],
        arch=recipe.arch,
        checksums=actual,
    )
    merger = Merger(pool, recipe.merge.granularity, recipe.merge.separate, device=device)
    merger.apply(recipe.merge, check_finite=True)
    return merger
