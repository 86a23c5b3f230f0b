"""Atomic publishing of merged models (medsamix.runs.publish)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from medsamix.models.architecture import TINY256
from medsamix.merging.config import MergeConfig
from medsamix.merging.groups import group_parameters
from medsamix.models.architecture import reference_param_names
from medsamix.runs.promotion import decide_promotion
from medsamix.runs.publish import (NotPromotedError, Published, PublishError, clean_incomplete, current, publish,
                                publish_outcome, publish_run)
from medsamix.merging.recipe import ModelRef, Recipe
from medsamix.runs.lock import RunLockedError


def _recipe() -> Recipe:
    groups = group_parameters(reference_param_names(TINY256), 2, False)
    merge = MergeConfig.uniform(groups, "linear", {"weights": {"base": 1.0, "ft": 1.0}}, 2, False)
    return Recipe(TINY256, ModelRef("base", "a" * 64), [ModelRef("ft", "b" * 64)], merge)


def test_publish_then_current_roundtrip(tmp_path):
    assert current(tmp_path) is None
    sd = {"w": torch.ones(3)}
    first = publish(tmp_path, _recipe(), sd, {"run": "r1"})
    got = current(tmp_path)
    assert got == first and got.info == {"run": "r1"}
    assert torch.equal(torch.load(got.checkpoint, weights_only=True)["w"], sd["w"])
    assert got.load_recipe().merge == _recipe().merge
    second = publish(tmp_path, _recipe(), {"w": torch.zeros(3)})
    assert second.version != first.version and current(tmp_path).version == second.version
    assert first.checkpoint.is_file()  # older versions stay for rollback
    assert not [p for p in (tmp_path / "versions").iterdir() if p.name.startswith(".tmp")]


def test_failed_publish_leaves_current_untouched(tmp_path):
    first = publish(tmp_path, _recipe(), {"w": torch.ones(3)})
    with pytest.raises(Exception):
        publish(tmp_path, _recipe(), {"w": object()})  # not a tensor: saving fails midway
    assert current(tmp_path) == first
    assert not [p for p in (tmp_path / "versions").iterdir() if p.name.startswith(".tmp")]


def test_broken_pointer_is_named(tmp_path):
    publish(tmp_path, _recipe(), {"w": torch.ones(3)})
    entry = json.loads((tmp_path / "current.json").read_text())
    entry["checkpoint"] = "versions/nope/merged.pth"
    (tmp_path / "current.json").write_text(json.dumps(entry))
    with pytest.raises(PublishError, match="does not exist"):
        current(tmp_path)
    (tmp_path / "current.json").write_text("{not json")
    with pytest.raises(PublishError, match="unreadable"):
        current(tmp_path)


def _run(name: str, gain: float, recipe: Recipe | None = None) -> tuple[SimpleNamespace, SimpleNamespace]:
    """A finished run as :func:`publish_outcome` reads it (a RunPlan and a MergeOutcome)."""
    plan = SimpleNamespace(name=name, variant="MedSAMix-S", settings=SimpleNamespace(tasks=("liver",), trials=10))
    promotion = decide_promotion({"liver": 0.8}, {"base": {"liver": 0.7}, "ft": {"liver": 0.75}}, gain)
    outcome = SimpleNamespace(promotion=promotion, recipe=recipe or _recipe(), state_dict={"w": torch.ones(3)},
                              calibration_dice={"liver": 0.8}, test_dice={"liver": 0.7})
    return plan, outcome


def test_a_run_is_published_once_and_an_unpromoted_one_never(tmp_path):
    with pytest.raises(NotPromotedError, match=r"not published to .* \(run r1\): not promoted: merged"):
        publish_outcome(tmp_path, *_run("r1", gain=0.1))
    assert current(tmp_path) is None and not (tmp_path / "versions").exists()
    first = publish_outcome(tmp_path, *_run("r1", gain=0.0))
    assert first.info == {"run": "r1", "variant": "MedSAMix-S", "tasks": ["liver"], "trials": 10,
                          "calibration_dice": {"liver": 0.8}, "test_dice": {"liver": 0.7}, "best_single": "ft",
                          "best_single_dice": 0.75}
    assert publish_outcome(tmp_path, *_run("r1", gain=0.0)) == first  # already served: nothing new
    assert _versions(tmp_path) == [first.version]
    other = _recipe()
    other.notes = "another selection"
    assert publish_run(tmp_path, "r1", other, {"w": torch.ones(3)}).version != first.version  # other recipe text
    again = publish_run(tmp_path, "r2", other, {"w": torch.ones(3)})  # another run, same recipe: published
    assert len(_versions(tmp_path)) == 3 and current(tmp_path) == again
    (tmp_path / "current.json").write_text("{cut")  # a damaged pointer is replaced
    assert publish_run(tmp_path, "r2", other, {"w": torch.ones(3)}) == current(tmp_path)
    assert len(_versions(tmp_path)) == 4


# ------------------------------------------------------------------------------------------------ killed publishes

LIB = Path(__file__).resolve().parents[1] / "lib"

# publish() in a child process that hangs at a chosen point, to be killed there with kill -9
KILLED_PUBLISH = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {lib!r})
import torch
import medsamix.runs.publish as P
from medsamix.merging.recipe import Recipe

folder, where = Path(sys.argv[1]), sys.argv[2]
if where == "saving":  # the checkpoint half written
    def save(sd, path):
        Path(path).write_bytes(b"half a checkpoint")
        time.sleep(300)
    P.save_sam_checkpoint = save
else:  # the version complete, current.json not replaced yet
    replace = os.replace
    def hang(src, dst):
        if Path(dst).name == "current.json":
            time.sleep(300)
        replace(src, dst)
    P.os.replace = hang
P.publish(folder, Recipe.load(sys.argv[3]), {{"w": torch.full((3,), 7.0)}})
"""


def _killed_publish(folder: Path, where: str, served: Published, ready) -> None:
    """Start a publish into ``folder`` that hangs at ``where`` ("saving" / "pointer"), check what others see while it
    hangs there (``ready()``: it got there), then kill it with kill -9."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PUBLISH.format(lib=str(LIB)), str(folder), where,
                             str(served.recipe)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready():
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the publish did not get there in time"
            time.sleep(0.02)
        # publishing (lock held): the served model is the old one, the cleanup leaves the live publish alone and
        # another publish waits for it
        assert current(folder) == served
        assert clean_incomplete(folder) == []
        with pytest.raises(RunLockedError, match=f"locked by process {proc.pid} "):
            publish(folder, _recipe(), {"w": torch.zeros(3)}, wait=0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)


def _versions(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / "versions").iterdir() if not p.name.startswith("."))


def test_a_publish_killed_midway_serves_the_previous_version_and_leaves_removable_leftovers(tmp_path):
    first = publish(tmp_path, _recipe(), {"w": torch.ones(3)})
    # killed while saving the checkpoint: a half-written temporary folder
    _killed_publish(tmp_path, "saving", first,
                    lambda: any((p / "merged.pth").is_file() for p in (tmp_path / "versions").glob(".tmp-*")))
    assert current(tmp_path) == first
    leftovers = list((tmp_path / "versions").glob(".tmp-*"))
    assert len(leftovers) == 1 and (leftovers[0] / "merged.pth").read_bytes() == b"half a checkpoint"
    # a pointer naming it (or an empty checkpoint) is never served
    entry = json.loads((tmp_path / "current.json").read_text())
    (leftovers[0] / "recipe.yaml").write_text(first.recipe.read_text())
    for name in ("recipe", "checkpoint"):
        bad = {**entry, name: f"versions/{leftovers[0].name}/{Path(entry[name]).name}"}
        (tmp_path / "current.json").write_text(json.dumps(bad))
        with pytest.raises(PublishError, match="not the files of a complete version"):
            current(tmp_path)
    (tmp_path / "current.json").write_text(json.dumps(entry))
    assert clean_incomplete(tmp_path) == leftovers
    assert not leftovers[0].exists() and _versions(tmp_path) == [first.version] and current(tmp_path) == first
    # killed after the new version was complete, before current.json was replaced: the pointer's temporary file
    # is removed, the complete (unpublished) version stays
    _killed_publish(tmp_path, "pointer", first, lambda: list(tmp_path.glob(".current.json.tmp-*")))
    assert current(tmp_path) == first
    pointer_tmp = list(tmp_path.glob(".current.json.tmp-*"))
    complete = [v for v in _versions(tmp_path) if v != first.version]
    assert len(pointer_tmp) == 1 and len(complete) == 1
    assert clean_incomplete(tmp_path) == pointer_tmp
    assert _versions(tmp_path) == sorted([first.version, *complete])
    assert torch.equal(torch.load(tmp_path / "versions" / complete[0] / "merged.pth", weights_only=True)["w"],
                       torch.full((3,), 7.0))
    assert clean_incomplete(tmp_path) == [] and current(tmp_path) == first
    # the next publish cleans up by itself too
    (tmp_path / "versions" / ".tmp-left").mkdir()
    (tmp_path / ".current.json.tmp-left").write_text("{")
    third = publish(tmp_path, _recipe(), {"w": torch.zeros(3)})
    assert current(tmp_path) == third
    assert not list((tmp_path / "versions").glob(".tmp-*")) and not list(tmp_path.glob(".current.json.tmp-*"))
    assert len(_versions(tmp_path)) == 3


def test_an_empty_checkpoint_is_never_served(tmp_path):
    pub = publish(tmp_path, _recipe(), {"w": torch.ones(3)})
    pub.checkpoint.write_bytes(b"")
    with pytest.raises(PublishError, match="not the files of a complete version"):
        current(tmp_path)
