"""The CT window as part of the preprocessing: searched on CT data (``prep:window``), recorded in the recipe, used by
the evaluator and the served model; recipes and data without it keep the default window."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medsamix import Merger, PoolManifest, Recipe
from medsamix.data.studies import Study
from medsamix.data.tasks import Task
from medsamix.data.tasksets import normalized, slices_of
from medsamix.data.volumes import load_volume
from medsamix.errors import ConfigError
from medsamix.merging.config import MergeConfig
from medsamix.models.preprocess import CT_WINDOWS, DEFAULT_CT_WINDOW, Preprocessor, ct_range, to_255
from medsamix.runs.run import run_merge
from medsamix.search.corruptions import corrupt_samples
from medsamix.search.evaluate import Evaluator
from medsamix.search.search import SearchSettings, ct_windows_for, initial_configs, run_search
from medsamix.search.space import PREP_WINDOW, build_space, from_merge_config, to_merge_config

POOL = Path(__file__).resolve().parents[1] / "sample-data" / "pool"
TASK = Task("bone", 1)


def _ct_study(modality: str = "CT") -> Study:
    """A 48 x 48 x 6 phantom in HU: soft tissue (40 HU) with a dense bone disc (900 HU, label 1) and air outside."""
    yy, xx = np.mgrid[:48, :48]
    body = (yy - 24) ** 2 + (xx - 24) ** 2 < 20 ** 2
    disc = (yy - 20) ** 2 + (xx - 26) ** 2 < 7 ** 2
    sl = np.where(disc, 900.0, np.where(body, 40.0, -1000.0)).astype(np.float32)
    image = np.repeat(sl[:, :, None], 6, axis=2) + np.linspace(0, 30, 6, dtype=np.float32)[None, None]
    label = np.repeat(disc[:, :, None], 6, axis=2).astype(np.int16)
    return Study("ct0", image, label, np.eye(4), modality, Path("ct0.nii.gz"), Path("ct0_seg.nii.gz"))


@pytest.fixture(scope="module")
def manifest() -> PoolManifest:
    return PoolManifest.load(POOL)


@pytest.fixture(scope="module")
def ct_samples():
    return slices_of(normalized(_ct_study()), [TASK])


def test_windows_map_hu_and_the_default_keeps_the_loaded_slice():
    assert ct_range("bone") == (400 - 900, 400 + 900) and ct_range(DEFAULT_CT_WINDOW) == (-160, 240)
    hu = np.array([[-1000.0, 40.0, 900.0]], dtype=np.float32)
    default = to_255(hu, *ct_range(DEFAULT_CT_WINDOW))
    assert Preprocessor("sam", 256).window(default, hu) is default  # nothing recomputed for the default window
    bone = Preprocessor("sam", 256, "bone").window(default, hu)
    assert bone[0, 2] == pytest.approx(255 * 1400 / 1800) and default[0, 2] == 255  # the bone is no longer clipped
    assert Preprocessor("sam", 256, "bone").window(default, None) is default  # MR / corrupted slices: no HU
    assert Preprocessor.from_dict({"style": "medsam"}, 256).ct_window == DEFAULT_CT_WINDOW  # old recipes
    with pytest.raises(ValueError, match="CT window: must be one of"):
        Preprocessor("sam", 256, "brain")


def test_ct_slices_carry_hu_mr_slices_and_corrupted_copies_do_not(ct_samples):
    assert all(s.hu is not None and s.hu.shape == s.image.shape for s in ct_samples)
    assert float(ct_samples[0].hu.max()) == pytest.approx(900.0)
    assert ct_windows_for(ct_samples) == tuple(CT_WINDOWS)
    mr = slices_of(normalized(_ct_study("MR")), [TASK])
    assert all(s.hu is None for s in mr) and ct_windows_for(mr) == ()
    assert all(s.hu is None for s in corrupt_samples(ct_samples))


def test_the_space_searches_the_window_only_when_asked(manifest):
    merger = Merger(manifest.load_pool(), 2)
    cs = build_space(merger.groups, merger.aliases, windows=tuple(CT_WINDOWS))
    assert PREP_WINDOW in cs and cs[PREP_WINDOW].default_value == DEFAULT_CT_WINDOW
    assert PREP_WINDOW not in build_space(merger.groups, merger.aliases)
    config = initial_configs(merger, SearchSettings(tasks=("t",), ct_windows=tuple(CT_WINDOWS)))[0]
    assert config.ct_window == DEFAULT_CT_WINDOW
    point = from_merge_config(cs, config.with_ct_window("lung"), merger.aliases)
    assert point[PREP_WINDOW] == "lung"
    back = to_merge_config(point, merger.groups, merger.aliases, 2, preprocessing="sam")
    assert back.ct_window == "lung" and back.fingerprint() != config.fingerprint()
    plain = initial_configs(merger, SearchSettings(tasks=("t",)))[0]
    assert plain.ct_window is None and "ct_window" not in plain.to_dict()
    with pytest.raises(ValueError, match="CT window: must be one of"):
        build_space(merger.groups, merger.aliases, windows=("abdomen", "brain"))


def test_the_evaluator_applies_the_models_window(manifest, ct_samples):
    merger = Merger(manifest.load_pool(), 2)
    model = merger.apply(MergeConfig.uniform(merger.groups, "pick", {"source": "sam_tiny"}, 2))
    ev = Evaluator(ct_samples)
    default = ev.evaluate(model, Preprocessor("sam", 256), key="k").per_sample
    passes = ev.encoder_passes
    bone = ev.evaluate(model, Preprocessor("sam", 256, "bone"), key="k").per_sample
    assert ev.encoder_passes == 2 * passes  # another window: other pixels, other embeddings (not the cached ones)
    assert not np.allclose(default, bone)
    again = ev.evaluate(model, Preprocessor("sam", 256), key="k").per_sample
    assert ev.encoder_passes == 2 * passes and np.array_equal(again, default)


def test_a_search_on_ct_records_the_window_in_the_recipe(manifest, ct_samples, tmp_path):
    pool = manifest.load_pool()
    settings = SearchSettings(tasks=(TASK.name,), trials=12, own_styles=tuple(manifest.styles.items()),
                              ct_windows=ct_windows_for(ct_samples))
    assert "ct_windows" in settings.to_dict() and "ct_windows" not in SearchSettings(tasks=("t",)).to_dict()
    cal, test = ct_samples[:3], ct_samples[3:]
    out = run_merge(pool, cal, test, settings, tmp_path / "run", "phantom", report=False)
    assert {t.config.ct_window for t in out.result.trials} <= set(CT_WINDOWS)
    recipe = Recipe.load(tmp_path / "run" / "recipe.yaml")
    assert recipe.preprocessing["ct_window"] == out.result.best.config.ct_window
    assert recipe.merge.ct_window is None and recipe.config.ct_window == out.result.best.config.ct_window
    assert recipe.preprocessor().ct_window == out.result.best.config.ct_window


def test_recipes_without_a_window_load_and_bad_windows_are_refused(manifest, tmp_path):
    merger = Merger(manifest.load_pool(), 2)
    config = MergeConfig.uniform(merger.groups, "linear", {"weights": {a: 1.0 for a in merger.aliases}}, 2, False,
                                 "sam").with_ct_window("bone")
    assert MergeConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="ct_window: must be one of"):
        MergeConfig.from_dict({**config.to_dict(), "ct_window": "brain"})
    from medsamix.merging.recipe import ModelRef

    pool = manifest.load_pool()
    recipe = Recipe(pool.arch, ModelRef(pool.base.alias, pool.base.sha256),
                    [ModelRef(m.alias, m.sha256) for m in pool.models], config, {"style": "sam"})
    assert recipe.preprocessing == {"style": "sam", "ct_window": "bone"} and recipe.merge.ct_window is None
    d = recipe.to_dict()
    assert Recipe.from_dict(d).preprocessor() == Preprocessor("sam", pool.arch.img_size, "bone")
    old = {**d, "preprocessing": {"style": "sam"}}
    assert Recipe.from_dict(old).preprocessor().ct_window == DEFAULT_CT_WINDOW
    with pytest.raises(ConfigError, match="preprocessing.ct_window: must be one of"):
        Recipe.from_dict({**d, "preprocessing": {"style": "sam", "ct_window": "brain"}}, "r.yaml")
    with pytest.raises(ConfigError, match="merge.ct_window: the ct_window belongs in the recipe's preprocessing"):
        Recipe.from_dict({**d, "merge": {**d["merge"], "ct_window": "bone"}}, "r.yaml")


def test_a_served_ct_volume_is_windowed_for_the_model(tmp_path):
    import nibabel as nib

    study = _ct_study()
    nib.save(nib.Nifti1Image(study.image, np.eye(4)), tmp_path / "ct.nii.gz")
    vol = load_volume(tmp_path / "ct.nii.gz", modality="CT")
    key, pixels = vol.pixels(Preprocessor("sam", 256))
    assert key == vol.key and pixels is vol.image255
    key, pixels = vol.pixels(Preprocessor("sam", 256, "bone"))
    assert key == f"{vol.key}|bone" and pixels.max() < 255 and pixels.shape == vol.image255.shape
    plain = vol.image255.nbytes + vol.hu.nbytes
    assert vol.nbytes == plain + pixels.nbytes  # the windowed copy is kept and counted (a volume cache's bytes)
    assert vol.pixels(Preprocessor("medsam", 256, "bone"))[1] is pixels  # the next prompt does not re-window
    lung = vol.pixels(Preprocessor("sam", 256, "lung"))[1]
    assert lung is not pixels and not np.array_equal(lung, pixels) and vol.nbytes == plain + lung.nbytes  # one kept
    assert np.array_equal(vol.pixels(Preprocessor("sam", 256, "bone"))[1], pixels)
    mr = load_volume(tmp_path / "ct.nii.gz", modality="MR")
    assert mr.hu is None and mr.pixels(Preprocessor("sam", 256, "bone"))[1] is mr.image255
