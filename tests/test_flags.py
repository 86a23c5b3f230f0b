"""True/false settings (``medsamix.errors.check_flag``) and the bf16 switch from the server's command line to the
segmenter: one parser for merge options, app ``--conf`` values and environment switches."""

from __future__ import annotations

import numpy as np
import pytest

from medsamix.data.volumes import VolumeCache
from medsamix.errors import ConfigError, MergeRunError, check_choice, check_flag
from medsamix.serving.preencode import PreEncoder
from medsamix.serving.prompts import parse_prompt
from medsamix.serving.segmenter import EmbeddingCache
from medsamix.serving.service import InteractiveService, ServedModel


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), (1, True), (0, False), ("TRUE", True),
                                             (" on ", True), ("yes", True), ("1", True), ("Off", False),
                                             ("no", False), ("0", False), ("false", False)])
def test_flag_words(value, expected):
    assert check_flag(value, "x") is expected


@pytest.mark.parametrize("default", [True, False])
def test_absent_or_empty_is_the_default(default):
    assert check_flag(None, "x", default=default) is default and check_flag("  ", "x", default=default) is default


@pytest.mark.parametrize("value", ["maybe", 2, 0.5, ["true"], "t" * 5000])
def test_anything_else_names_the_setting_and_cuts_the_value(value):
    with pytest.raises(ConfigError) as err:
        check_flag(value, "conf bf16", ConfigError)
    message = str(err.value)
    assert message.startswith("conf bf16: expected true or false, got ") and len(message) < 100


def test_check_choice_cuts_a_long_value():
    with pytest.raises(MergeRunError, match=r"^objective: must be one of \['box'\], got 'xxx.*\.\.\.$"):
        check_choice("x" * 10_000, ["box"], "objective", MergeRunError)


def test_preencode_switch_refuses_a_word_it_does_not_know(monkeypatch):
    monkeypatch.setenv("MEDSAMIX_PREENCODE", "perhaps")
    with pytest.raises(ConfigError, match="MEDSAMIX_PREENCODE: expected true or false"):
        PreEncoder.from_env()
    monkeypatch.setenv("MEDSAMIX_PREENCODE", "off")
    assert not PreEncoder.from_env().enabled


def test_service_builds_its_segmenter_with_bf16(tiny_segmenter_parts):
    model, prep = tiny_segmenter_parts
    source = lambda: ServedModel("m", model, prep, "v1", "test")  # noqa: E731
    on = InteractiveService("m", source, VolumeCache(), EmbeddingCache(), bf16=True)
    off = InteractiveService("m", source, VolumeCache(), EmbeddingCache())
    assert on.segmenter()[0].bf16 and not off.segmenter()[0].bf16
    # on a CPU the autocast is a no-op: the same mask either way
    vol = np.random.default_rng(0).uniform(0, 255, (40, 48, 3)).astype(np.float32)
    prompt = parse_prompt({"roi": [5, 30, 6, 40, 1, 1]}, vol.shape)
    assert np.array_equal(on.segmenter()[0].segment("a", vol, prompt).mask,
                          off.segmenter()[0].segment("a", vol, prompt).mask)


def test_server_command_line_bf16_reaches_the_app_conf(tmp_path):
    from medsamix_server.cli import config_from_args

    base = ["--studies", str(tmp_path), "--state-dir", str(tmp_path / "state")]
    assert config_from_args(base + ["--bf16"]).conf["bf16"] == "true"
    assert "bf16" not in config_from_args(base).conf
