"""The preprocessing style as a searched dimension, on the embedded tiny pool (medsam_tiny expects MedSAM
preprocessing, the others SAM's).

The data: phantom studies with wide slices (40 x 240 pixels), where SAM's aspect-preserving resize leaves the
structure a thin strip of the input; there medsam_tiny with its own (MedSAM) preprocessing is the best single model
and every configuration of the old initial design (everything with the base model's SAM preprocessing) is below it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medsamix import Merger, PoolManifest, Recipe
from medsamix.merging.apply import merge_from_recipe
from medsamix.search.evaluate import Evaluator
from medsamix.data.tasksets import select_tasks, task_set_from_pairs
from medsamix.runs.run import run_merge
from medsamix.runs.publish import publish
from medsamix.search.search import SearchSettings, initial_configs, score
from medsamix.serving.service import MergedModelSource, PoolLoader, load_served_pool, member_model
from test_merge_run import make_datastore, pairs_of

POOL = Path(__file__).resolve().parents[1] / "sample-data" / "pool"
TASK = "ellipsoid"


@pytest.fixture(scope="module")
def manifest() -> PoolManifest:
    return PoolManifest.load(POOL)


@pytest.fixture(scope="module")
def slices(tmp_path_factory):
    """Calibration and test slices of two wide-sliced phantom studies (patient split), the split string."""
    root = make_datastore(tmp_path_factory.mktemp("wide"), n=2, labelled=2, shape=(40, 240, 6))
    ts, _ = task_set_from_pairs("wide", pairs_of(root), {1: TASK})
    cal, test = select_tasks(ts, [TASK])
    return cal, test, ts.split


def _settings(manifest: PoolManifest, preprocessing: str | None = None) -> SearchSettings:
    return SearchSettings(tasks=(TASK,), trials=10, preprocessing=preprocessing,
                          own_styles=tuple(manifest.styles.items()))


def _alone(served, alias: str, samples) -> float:
    """Calibration Dice of pool model ``alias`` as the server offers it on its own (its own preprocessing)."""
    model = member_model(served, alias)
    return Evaluator(samples).evaluate(model.model, model.prep).dice2d[TASK]


def test_initial_design_scores_each_single_model_as_it_is_served_alone(manifest, slices):
    cal, _, _ = slices
    served = load_served_pool(POOL)
    merger = Merger(manifest.load_pool(), 2)
    evaluator = Evaluator(cal)
    design = initial_configs(merger, _settings(manifest))
    fixed = initial_configs(merger, _settings(manifest, "sam"))
    for alias in merger.aliases:
        one_hot = {a: float(a == alias) for a in merger.aliases}
        config = next(c for c in design if c.groups["enc.neck"].params.get("weights") == one_hot)
        assert config.preprocessing == manifest.preprocessing[alias]["style"]
        alone = _alone(served, alias, cal)
        assert score(merger, evaluator, config, [TASK])[TASK] == pytest.approx(alone, abs=1e-6)
        if alias == "medsam_tiny":  # with the style fixed to SAM's, the design holds medsam_tiny but not as served
            config = next(c for c in fixed if c.groups["enc.neck"].params.get("weights") == one_hot)
            assert config.preprocessing == "sam"
            assert abs(score(merger, evaluator, config, [TASK])[TASK] - alone) > 0.05


@pytest.fixture(scope="module")
def searched(manifest, slices, tmp_path_factory):
    """A 10-trial search (the initial design) with the style searched, and its output folder."""
    cal, test, split = slices
    out = tmp_path_factory.mktemp("searched") / "run"
    return run_merge(manifest.load_pool(), cal, test, _settings(manifest), out, split, report=False)


def test_search_never_ends_below_a_single_model_that_needs_its_own_preprocessing(manifest, slices, searched,
                                                                                   tmp_path):
    promotion = searched.promotion
    means = {a: sum(d.values()) / len(d) for a, d in promotion.singles.items()}
    assert promotion.best_single == "medsam_tiny" and means["medsam_tiny"] > max(means["sam_tiny"],
                                                                                  means["medicosam_tiny"])
    assert promotion.merged_dice >= max(means.values()) - 1e-9
    assert promotion.promote and promotion.reason.startswith("promoted")
    # the single models of the guard are scored as served alone
    served = load_served_pool(POOL)
    cal, test, split = slices
    assert means["medsam_tiny"] == pytest.approx(_alone(served, "medsam_tiny", cal), abs=1e-6)
    # the same search with the merged model's style fixed to the base model's (SAM) cannot reach medsam_tiny as
    # served: the guard trips, though no gain is required
    fixed = run_merge(manifest.load_pool(), cal, test, _settings(manifest, "sam"), tmp_path / "fixed", split,
                      report=False)
    assert not fixed.promotion.promote and "'medsam_tiny'" in fixed.promotion.reason
    assert {t.config.preprocessing for t in fixed.result.trials} == {"sam"}
    assert fixed.recipe.style == "sam"


def test_recipe_records_the_selected_style_and_apply_and_serving_use_it(manifest, slices, searched, tmp_path):
    cal, _, _ = slices
    style = searched.result.best.config.preprocessing
    assert style in ("sam", "medsam") and searched.recipe.style == style
    saved = yaml.safe_load((searched.out_dir / "recipe.yaml").read_text())
    assert saved["preprocessing"] == {"style": style} and "preprocessing" not in saved["merge"]
    recipe = Recipe.load(searched.out_dir / "recipe.yaml")
    assert recipe.config == searched.result.best.config
    want = searched.calibration_dice[TASK]
    # apply: the recipe's merge with the recipe's input convention reproduces the calibration Dice
    merger = merge_from_recipe(recipe, manifest.files)
    assert Evaluator(cal).evaluate(merger.model, recipe.preprocessor()).dice2d[TASK] == pytest.approx(want, abs=1e-6)
    # serving: the published version is served with the selected style
    publish(tmp_path / "published", searched.recipe, searched.state_dict)
    model = MergedModelSource(PoolLoader(POOL), tmp_path / "published").get()
    assert model.prep.style == style and f"{style} preprocessing" in model.description
    assert Evaluator(cal).evaluate(model.model, model.prep).dice2d[TASK] == pytest.approx(want, abs=1e-6)
