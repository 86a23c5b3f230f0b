"""Atomic publishing of merged models (medsamix.publish)."""

from __future__ import annotations

import json

import pytest
import torch

from medsamix.architecture import TINY256
from medsamix.config import MergeConfig
from medsamix.groups import group_parameters
from medsamix.architecture import reference_param_names
from medsamix.publish import PublishError, current, publish
from medsamix.recipe import ModelRef, Recipe


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
