"""The merge search: space, conversions, SMAC loop (single and multi-task), resume and refusal."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
import yaml

from conftest import TINY, random_state
from medsamix import GroupSetting, MergeConfig, Merger, ModelPool
from medsamix.merging.methods import EXTRAPOLATION
from medsamix.search.evaluate import Evaluator
from medsamix.models.preprocess import STYLES
from medsamix.search.search import (
    COARSE_TOP,
    SearchError,
    SearchSettings,
    coarse_trials,
    initial_configs,
    run_search,
    score,
)
from medsamix.search.space import PREP_STYLE, build_space, component_tie, from_merge_config, to_merge_config
from medsamix.data.slices import SliceSample, tight_box
from medsamix.data.tasks import Task


@pytest.fixture
def merger(tmp_path):
    files = {}
    for i, alias in enumerate(["sam", "ct", "mr"]):
        files[alias] = tmp_path / f"{alias}.pth"
        torch.save(random_state(TINY, i), files[alias])
    pool = ModelPool.load(("sam", files["sam"]), {"ct": files["ct"], "mr": files["mr"]}, arch=TINY)
    return Merger(pool, granularity=2)


@pytest.fixture
def evaluator():
    rng = np.random.default_rng(0)
    samples = []
    for study in range(3):
        for index in range(2):
            image = rng.uniform(0, 80, (40, 40)).astype(np.float32)
            for value, name in ((1, "a"), (2, "b")):
                mask = np.zeros((40, 40), bool)
                mask[5 + 15 * (value - 1): 15 + 15 * (value - 1), 8 + index: 30] = True
                image[mask] = 200
                samples.append(SliceSample(f"s{study}", Task(name, value), 2, index, image, mask, tight_box(mask)))
    return Evaluator(samples)


def test_space_is_named_by_group_and_alias(merger):
    cs = build_space(merger.groups, merger.aliases)
    names = list(cs.keys())
    assert "enc.blocks.0-1:method" in names
    assert "dec.iou_head:linear:w_ct" in names and "enc.neck:pick:source" in names
    base = merger.aliases[0]
    assert "dec.iou_head:task_arithmetic:w_ct" in names  # task-arithmetic weights: the fine-tuned models only
    assert f"dec.iou_head:task_arithmetic:w_{base}" not in names and f"dec.iou_head:linear:w_{base}" in names
    assert all("/" not in n and ".pth" not in n for n in names)
    cfg = cs.sample_configuration()
    assert len(dict(cfg)) < len(names)  # conditional hyper-parameters are inactive


def test_round_trip_preserves_the_merged_model(merger):
    cs = build_space(merger.groups, merger.aliases)
    for seed in range(3):
        mc = MergeConfig.random(merger.groups, merger.aliases, random.Random(seed), granularity=2)
        back = to_merge_config(from_merge_config(cs, mc, merger.aliases), merger.groups, merger.aliases, 2)
        a = {k: v.clone() for k, v in merger.apply(mc).state_dict().items()}
        b = merger.apply(back).state_dict()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6), k
    for c in initial_configs(merger, SearchSettings(tasks=("a",))):
        from_merge_config(cs, c, merger.aliases)  # inside the space



OWN = (("sam", "sam"), ("ct", "medsam"), ("mr", "sam"))  # the "ct" model is served with MedSAM preprocessing


def test_style_is_a_hyper_parameter_unless_the_settings_fix_it(merger):
    searched = SearchSettings(tasks=("a",), own_styles=OWN)
    fixed = SearchSettings(tasks=("a",), preprocessing="medsam", own_styles=OWN)
    assert searched.searched_styles == STYLES and fixed.searched_styles == ()
    for tie in (None, component_tie(merger.groups)):
        cs = build_space(merger.groups, merger.aliases, tie=tie, styles=searched.searched_styles)
        assert PREP_STYLE == "prep:style" and list(cs[PREP_STYLE].choices) == list(STYLES)
        assert PREP_STYLE not in build_space(merger.groups, merger.aliases, tie=tie, styles=fixed.searched_styles)
        seen = set()
        for seed in range(12):  # sampled configurations carry the sampled style; a fixed style otherwise
            cfg = cs.sample_configuration()
            mc = to_merge_config(cfg, merger.groups, merger.aliases, 2, tie=tie)
            assert mc.preprocessing == cfg[PREP_STYLE]
            seen.add(mc.preprocessing)
            assert dict(from_merge_config(cs, mc, merger.aliases, tie))[PREP_STYLE] == mc.preprocessing
            assert to_merge_config(cfg, merger.groups, merger.aliases, 2, tie=tie,
                                   preprocessing="sam").preprocessing == cfg[PREP_STYLE]
        assert seen == set(STYLES)
        plain = build_space(merger.groups, merger.aliases, tie=tie)
        assert to_merge_config(plain.sample_configuration(), merger.groups, merger.aliases, 2, tie=tie,
                               preprocessing="medsam").preprocessing == "medsam"
        with pytest.raises(ValueError, match="has none"):
            from_merge_config(cs, MergeConfig.uniform(merger.groups, "pick", {"source": "ct"}, 2), merger.aliases, tie)
    with pytest.raises(SearchError, match="preprocessing styles"):
        SearchSettings(tasks=("a",), preprocessing="ct")


def test_initial_design_holds_each_single_model_with_its_own_style(merger):
    def single(configs, alias):  # the one-hot linear merge of alias and, for a fine-tuned model, one-hot TA
        return [c for c in configs if c.groups["enc.neck"].params.get("scale", 1.0) == 1.0
                and c.groups["enc.neck"].params.get("weights") in (
                    {a: float(a == alias) for a in merger.aliases}, {a: float(a == alias) for a in merger.aliases[1:]})]

    design = initial_configs(merger, SearchSettings(tasks=("a",), own_styles=OWN))
    assert len(design) == 10  # 5 uniform merges, 3 single models, 2 fine-tuned models extrapolated
    for alias, style in OWN:
        assert [c.preprocessing for c in single(design, alias)] == [style]  # once: no duplicate of a model
    assert all(c.preprocessing == "sam" for c in design[:5])  # the uniform merges: the base model's style
    fixed = initial_configs(merger, SearchSettings(tasks=("a",), preprocessing="medsam", own_styles=OWN))
    assert {c.preprocessing for c in fixed} == {"medsam"}  # a fixed style: no search over it
    assert [c.groups for c in fixed] == [c.groups for c in design]


def test_initial_design_ends_with_each_fine_tuned_model_extrapolated(merger):
    """The last points: theta_0 + EXTRAPOLATION * tau_k for each fine-tuned model k, with the model's own style."""
    design = initial_configs(merger, SearchSettings(tasks=("a",), own_styles=OWN))
    beyond = design[-2:]
    base = merger.pool.base.state_dict
    for config, alias in zip(beyond, merger.aliases[1:]):
        assert {g.method for g in config.groups.values()} == {"task_arithmetic"}
        assert config.preprocessing == dict(OWN)[alias]
        merged = merger.apply(config).state_dict()
        model = merger.pool.member(alias).state_dict
        for key in ("image_encoder.neck.0.weight", "mask_decoder.iou_prediction_head.layers.0.bias"):
            expected = base[key] + EXTRAPOLATION * (model[key] - base[key])
            torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-6)
    # a method without task vectors in the search: no extrapolated points
    linear_only = initial_configs(merger, SearchSettings(tasks=("a",), methods=("linear",)))
    assert all(c.groups["enc.neck"].method == "linear" for c in linear_only) and len(linear_only) == 4


def test_embedding_cache_keys_on_the_style(merger, evaluator):
    config = MergeConfig.uniform(merger.groups, "pick", {"source": "ct"}, 2, preprocessing="sam")
    other_decoder = MergeConfig(2, False, dict(config.groups), "sam")
    other_decoder.groups["dec.iou_head"] = GroupSetting("pick", {"source": "mr"})
    n = evaluator.num_images
    score(merger, evaluator, config, ["a"])
    score(merger, evaluator, other_decoder, ["a"])
    assert evaluator.encoder_passes == n  # same encoder and style: embeddings reused
    medsam = score(merger, evaluator, config.with_preprocessing("medsam"), ["a"])
    assert evaluator.encoder_passes == 2 * n  # another style: another encoder pass
    assert merger.encoder_fingerprint(config) != merger.encoder_fingerprint(config.with_preprocessing("medsam"))
    assert score(merger, evaluator, config.with_preprocessing("medsam"), ["a"]) == medsam
    assert evaluator.encoder_passes == 2 * n
    with pytest.raises(ValueError, match="no preprocessing style"):
        score(merger, evaluator, config.with_preprocessing(None), ["a"])


def test_tied_space_has_one_setting_per_component(merger):
    tie = component_tie(merger.groups)
    assert list(tie) == ["image_encoder", "prompt_encoder", "mask_decoder"]
    assert sorted(n for names in tie.values() for n in names) == sorted(g.name for g in merger.groups)
    cs = build_space(merger.groups, merger.aliases, tie=tie)
    assert {n.split(":")[0] for n in cs.keys()} == set(tie)
    for seed in range(3):  # every group of a component gets the component's setting
        mc = to_merge_config(cs.sample_configuration(), merger.groups, merger.aliases, 2, tie=tie)
        assert set(mc.groups) == {g.name for g in merger.groups}
        for names in tie.values():
            assert len({mc.groups[n].canonical() for n in names}) == 1
        back = to_merge_config(from_merge_config(cs, mc, merger.aliases, tie), merger.groups, merger.aliases, 2,
                               tie=tie)  # linear weights come back rescaled (max 1): the same merged model
        a = {k: v.clone() for k, v in merger.apply(mc).state_dict().items()}
        for k, v in merger.apply(back).state_dict().items():
            assert torch.allclose(a[k], v, atol=1e-6), k
    for c in initial_configs(merger, SearchSettings(tasks=("a",))):
        from_merge_config(cs, c, merger.aliases, tie)  # the initial design lies in the tied space
    mixed = MergeConfig.uniform(merger.groups, "pick", {"source": "sam"}, 2)
    mixed.groups["enc.neck"] = GroupSetting("pick", {"source": "ct"})
    with pytest.raises(ValueError, match="image_encoder"):
        from_merge_config(cs, mixed, merger.aliases, tie)
    with pytest.raises(ValueError, match="every group"):
        build_space(merger.groups, merger.aliases, tie={"image_encoder": tie["image_encoder"]})


def test_single_task_search_never_worse_than_initial_design(merger, evaluator, tmp_path):
    settings = SearchSettings(tasks=("a",), trials=14, granularity=2, seed=0)
    seen = []
    result = run_search(merger, evaluator, settings, tmp_path / "s", on_trial=lambda t, n: seen.append(n))
    assert seen == list(range(1, 15)) and len(result.trials) == 14
    initial = result.trials[: len(initial_configs(merger, settings))]
    assert result.best.dice["a"] >= max(t.dice["a"] for t in initial)
    assert result.aggregation is None
    for t in result.trials:  # plain Python values: recipes are YAML
        yaml.safe_dump(t.config.to_dict())
    # single models are part of the initial design, as one-hot linear merges that reproduce them exactly
    for alias in merger.aliases:
        one_hot = [t for t in initial if t.config.groups["enc.neck"].params.get("weights") ==
                   {a: float(a == alias) for a in merger.aliases}]
        assert len(one_hot) == 1
        configs = [one_hot[0].config]
        if alias != merger.aliases[0]:  # a search without linear has each fine-tuned model as one-hot TA, also exact
            ta_only = initial_configs(merger, dataclasses.replace(settings, methods=("task_arithmetic",)))
            configs += [c for c in ta_only if c.groups["enc.neck"].params ==
                        {"scale": 1.0, "weights": {a: float(a == alias) for a in merger.aliases[1:]}}]
            assert len(configs) == 2
        picked = MergeConfig.uniform(merger.groups, "pick", {"source": alias}, 2)
        for config in configs:
            a = {k: v.clone() for k, v in merger.apply(config).state_dict().items()}
            for k, v in merger.apply(picked).state_dict().items():
                assert torch.equal(a[k], v), (config.groups["enc.neck"].method, k)


def test_multi_task_uses_parego_and_returns_a_front(merger, evaluator, tmp_path):
    settings = SearchSettings(tasks=("a", "b"), trials=12, granularity=2)
    result = run_search(merger, evaluator, settings, tmp_path / "m")
    assert result.aggregation == "ParEGO"
    assert result.pareto and result.best in result.pareto
    for t in result.pareto:  # nobody on the front is dominated
        assert not any(all(o.dice[k] >= t.dice[k] for k in "ab") and any(o.dice[k] > t.dice[k] for k in "ab")
                       for o in result.trials if o.status == "ok")


def test_interrupted_search_resumes_without_losing_trials(merger, evaluator, tmp_path):
    settings = SearchSettings(tasks=("a",), trials=12, granularity=2, seed=3)

    class Stop(Exception):
        pass

    done = []

    def interrupt(trial, n):
        done.append(trial)
        if n == 9:
            raise Stop

    with pytest.raises(Stop):
        run_search(merger, evaluator, settings, tmp_path / "r", on_trial=interrupt)
    result = run_search(merger, evaluator, settings, tmp_path / "r")
    assert len(result.trials) == 12
    for before, after in zip(done, result.trials[:9]):
        assert before.config.to_dict() == after.config.to_dict()
        assert before.dice == pytest.approx(after.dice)



def test_a_moved_run_folder_resumes_and_a_foreign_smac_state_is_refused_without_a_prompt(merger, evaluator,
                                                                                         tmp_path, monkeypatch):
    """SMAC keeps its folder's absolute path in scenario.json and asks on stdin when it differs: a moved (or
    restored) run folder must resume instead, and a state of another search must be refused with a reason."""
    import shutil

    def no_prompt(*args):  # noqa: ANN002
        raise AssertionError("SMAC asked on stdin")

    monkeypatch.setattr("builtins.input", no_prompt)
    settings = SearchSettings(tasks=("a", "b"), trials=16, granularity=2, seed=1)  # a coarse and a per-group stage

    class Stop(Exception):
        pass

    def interrupt(trial, n):
        if n == 13:
            raise Stop

    with pytest.raises(Stop):
        run_search(merger, evaluator, settings, tmp_path / "here", on_trial=interrupt)
    shutil.move(tmp_path / "here", tmp_path / "there")
    seen = []
    result = run_search(merger, evaluator, settings, tmp_path / "there", on_trial=lambda t, n: seen.append(n))
    assert seen == [14, 15, 16] and len(result.trials) == 16  # resumed: the 13 trials were kept, 3 added
    full = run_search(merger, evaluator, settings, tmp_path / "straight")
    assert [t.config.to_dict() for t in result.trials] == [t.config.to_dict() for t in full.trials]
    saved = json.loads((tmp_path / "there" / "smac" / "medsamix" / "1" / "scenario.json").read_text())
    assert saved["output_directory"] == str(tmp_path / "there" / "smac" / "medsamix" / "1")
    scenario = tmp_path / "there" / "smac" / "coarse" / "1" / "scenario.json"
    scenario.write_text(scenario.read_text().replace('"deterministic": true', '"deterministic": false'))
    with pytest.raises(SearchError, match="SMAC's saved state is of another search .differs in deterministic"):
        run_search(merger, evaluator, settings, tmp_path / "there")


def test_crashed_trials_are_recorded_and_the_search_goes_on(merger, evaluator, tmp_path):
    """A trial whose merge is non-finite or whose scoring raises (out of memory) is told to SMAC as crashed, kept in
    the history (also after a resume) and never selected; the search runs its full number of trials."""
    from smac.runhistory.enumerations import StatusType

    from medsamix import MergeError

    calls = {"apply": 0, "evaluate": 0}
    apply, evaluate = merger.apply, evaluator.evaluate

    def flaky_apply(config, check_finite=False):
        calls["apply"] += 1
        model = apply(config, check_finite=check_finite)
        if calls["apply"] == 2:
            raise MergeError("group dec.iou_head: task_arithmetic produced non-finite weights")
        return model

    def flaky_evaluate(*args, **kwargs):
        calls["evaluate"] += 1
        if calls["evaluate"] == 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return evaluate(*args, **kwargs)

    merger.apply, evaluator.evaluate = flaky_apply, flaky_evaluate
    settings = SearchSettings(tasks=("a",), trials=12, granularity=2, seed=1)
    result = run_search(merger, evaluator, settings, tmp_path / "c")
    assert len(result.trials) == 12
    crashed = {t.number: t.status for t in result.trials if t.status != "ok"}
    assert set(crashed) == {1, 4}  # the 2nd merge and the 4th scoring (the 2nd trial never got to scoring)
    assert "non-finite" in crashed[1] and "out of memory" in crashed[4]
    assert result.best.status == "ok" and result.best.number not in crashed
    assert result.trials[1].dice == {} and result.trials[1].mean_dice == 0.0
    # SMAC's run history holds them as crashed: a resumed search reads them back as such (and runs nothing again)
    merger.apply, evaluator.evaluate = apply, evaluate
    history = json.loads((tmp_path / "c" / "smac" / "medsamix" / "1" / "runhistory.json").read_text())
    assert sum(1 for row in history["data"] if row["status"] == StatusType.CRASHED) == 2
    again = run_search(merger, evaluator, settings, tmp_path / "c")
    assert {t.number: t.status for t in again.trials if t.status != "ok"} == crashed
    assert again.best.config.to_dict() == result.best.config.to_dict()



def test_coarse_stage_runs_first_and_seeds_the_per_group_stage(merger, evaluator, tmp_path):
    settings = SearchSettings(tasks=("a",), trials=16, granularity=2, seed=2, coarse_share=0.7)  # 11 coarse trials
    seen = []
    result = run_search(merger, evaluator, settings, tmp_path / "c", on_trial=lambda t, n: seen.append(n))
    assert seen == list(range(1, 17)) and [t.number for t in result.trials] == list(range(16))
    coarse, groups = result.trials[:11], result.trials[11:]
    assert {t.stage for t in coarse} == {"coarse"} and {t.stage for t in groups} == {"groups"}
    tie = component_tie(merger.groups)
    for t in coarse:  # one setting per component
        assert all(len({t.config.groups[n].canonical() for n in names}) == 1 for names in tie.values())
    cs = build_space(merger.groups, merger.aliases, tie=tie)

    def point(config):  # the point of the tied space (recipes may spell the same merge differently)
        return dict(from_merge_config(cs, config, merger.aliases, tie))

    initial = initial_configs(merger, settings)
    assert [point(t.config) for t in coarse[:len(initial)]] == [point(c) for c in initial]  # the initial design
    # the per-group stage starts from the coarse stage's best configurations, in order, with the same scores
    fine = build_space(merger.groups, merger.aliases)

    def fine_point(config):
        return dict(from_merge_config(fine, config, merger.aliases))

    top = []
    for t in sorted((t for t in coarse if t.status == "ok"), key=lambda t: -t.mean_dice):
        if fine_point(t.config) not in [p for p, _ in top]:
            top.append((fine_point(t.config), t.dice))
    assert [(fine_point(t.config), t.dice) for t in groups[:COARSE_TOP]] == top[:COARSE_TOP]
    assert result.best.mean_dice == max(t.mean_dice for t in result.trials if t.status == "ok")
    # resumed in either stage, nothing is lost or run twice
    for stop_at in (5, 13):
        class Stop(Exception):
            pass

        def interrupt(trial, n):
            if n == stop_at:
                raise Stop

        with pytest.raises(Stop):
            run_search(merger, evaluator, settings, tmp_path / f"r{stop_at}", on_trial=interrupt)
        resumed = run_search(merger, evaluator, settings, tmp_path / f"r{stop_at}")
        assert [(t.stage, t.config.to_dict()) for t in resumed.trials] == [
            (t.stage, t.config.to_dict()) for t in result.trials]
        assert [t.dice for t in resumed.trials] == [pytest.approx(t.dice) for t in result.trials]
    for bad in (-0.1, 1.0):
        with pytest.raises(SearchError, match="coarse_share must lie in"):
            run_search(merger, evaluator, dataclasses.replace(settings, coarse_share=bad), tmp_path / "bad")


def test_warm_start_configurations_are_scored_in_the_per_group_stage_and_can_be_selected(merger, evaluator,
                                                                                          tmp_path):
    """A configuration of an earlier search joins the per-group stage's initial design right after the coarse
    stage's best: scored with the same Dice as on its own, selectable, part of the resume key, checked first."""
    settings = SearchSettings(tasks=("a",), trials=16, granularity=2, seed=2, coarse_share=0.7)  # 11 coarse trials
    rng = random.Random(4)
    fine = build_space(merger.groups, merger.aliases)
    warm = to_merge_config(from_merge_config(fine, MergeConfig.random(merger.groups, merger.aliases, rng, 2),
                                             merger.aliases),
                           merger.groups, merger.aliases, 2).with_preprocessing("sam")  # a per-group point
    result = run_search(merger, evaluator, settings, tmp_path / "w", warm=[warm, warm])  # a repeat enters once
    groups = [t for t in result.trials if t.stage == "groups"]
    assert len(result.trials) == 16 and len(groups) == 5
    point = dict(from_merge_config(fine, warm, merger.aliases))
    mine = [t for t in groups[:COARSE_TOP + 1] if dict(from_merge_config(fine, t.config, merger.aliases)) == point]
    assert len(mine) == 1 and mine[0].dice == pytest.approx(score(merger, evaluator, warm, ["a"]))
    assert result.best.mean_dice == max(t.mean_dice for t in result.trials if t.status == "ok")
    assert len(run_search(merger, evaluator, settings, tmp_path / "w", warm=[warm]).trials) == 16  # resumed
    with pytest.raises(SearchError, match="other settings"):  # without it, it is another search
        run_search(merger, evaluator, settings, tmp_path / "w")
    one = MergeConfig.uniform(group_parameters_of(merger, 1), "linear", {}, 1, False, "sam")
    with pytest.raises(SearchError, match="warm-start configuration 1 has granularity 1"):
        run_search(merger, evaluator, settings, tmp_path / "bad", warm=[one])
    outside = dataclasses.replace(warm, groups={**warm.groups, next(iter(warm.groups)): GroupSetting(
        "task_arithmetic", {"scale": 99.0})})
    with pytest.raises(SearchError, match="not in this search's space"):
        run_search(merger, evaluator, settings, tmp_path / "bad", warm=[outside])
    with pytest.raises(SearchError, match="too few trials for the 1 warm-start configuration.*gets 3 of the 13"):
        run_search(merger, evaluator, dataclasses.replace(settings, trials=13), tmp_path / "bad", warm=[warm])
    assert not (tmp_path / "bad").exists()  # refused before anything is written


def group_parameters_of(merger, granularity):
    from medsamix.merging.groups import group_parameters

    return group_parameters([n for n, _ in merger.model.named_parameters()], granularity, False)


def test_coarse_trials_leave_room_for_the_initial_design_and_the_per_group_stage():
    assert coarse_trials(120, 1 / 3, 10) == 40
    assert coarse_trials(30, 1 / 3, 10) == 10  # at least the initial design
    assert coarse_trials(16, 0.9, 10) == 16 - COARSE_TOP  # the per-group stage starts from the best COARSE_TOP
    assert coarse_trials(12, 1 / 3, 10) == 0  # too few trials for both stages: per-group search only
    assert coarse_trials(120, 0.0, 10) == 0


def test_changed_settings_are_refused_unless_restarted(merger, evaluator, tmp_path):
    first = SearchSettings(tasks=("a",), trials=11, granularity=2)
    run_search(merger, evaluator, first, tmp_path / "x")
    other = SearchSettings(tasks=("b",), trials=11, granularity=2)
    # another search space (the style fixed, or other own styles in the initial design) is another search
    for changed in (other, dataclasses.replace(first, preprocessing="sam"), dataclasses.replace(first, own_styles=OWN)):
        with pytest.raises(SearchError, match="other settings"):
            run_search(merger, evaluator, changed, tmp_path / "x")
    result = run_search(merger, evaluator, other, tmp_path / "x", restart=True)
    assert len(result.trials) == 11 and set(result.best.dice) == {"b"}


def test_unknown_task(merger, evaluator, tmp_path):
    with pytest.raises(SearchError, match="no calibration slices"):
        run_search(merger, evaluator, SearchSettings(tasks=("liver",), trials=5, granularity=2), tmp_path / "u")


def test_naive_mode_re_encodes_every_slice_and_scores_the_same(merger, tmp_path):
    """The reference loop: same configurations and scores, but every trial re-encodes every calibration slice."""
    def make():
        rng = np.random.default_rng(0)
        samples = []
        for index in range(3):
            image = rng.uniform(0, 80, (40, 40)).astype(np.float32)
            mask = np.zeros((40, 40), bool)
            mask[5:20, 8 + index:30] = True
            image[mask] = 200
            samples.append(SliceSample("s", Task("a", 1), 2, index, image, mask, tight_box(mask)))
        return Evaluator(samples)

    ours_ev, naive_ev = make(), make()
    ours = run_search(merger, ours_ev, SearchSettings(tasks=("a",), trials=10, granularity=2), tmp_path / "o")
    naive = run_search(merger, naive_ev, SearchSettings(tasks=("a",), trials=10, granularity=2, naive=True),
                       tmp_path / "n")
    assert naive.encoder_passes == 10 * 3
    assert ours.encoder_passes <= naive.encoder_passes
    for a, b in zip(ours.trials, naive.trials):
        assert a.config.to_dict() == b.config.to_dict()
        assert a.dice == pytest.approx(b.dice, abs=1e-6)


def test_multi_fidelity_scores_most_trials_on_fewer_slices(merger, evaluator, tmp_path):
    settings = SearchSettings(tasks=("a", ), trials=16, granularity=2, min_budget=2)
    result = run_search(merger, evaluator, settings, tmp_path / "mf")
    budgets = [t.budget for t in result.trials]
    assert any(b is not None and b < len(evaluator.samples) for b in budgets)
    assert result.best.budget is None  # the selected configuration is scored on all calibration slices
    full = {t.config.fingerprint() for t in result.trials if t.status == "ok" and t.budget is None}
    assert all(c.fingerprint() in full for c in initial_configs(merger, settings))  # none dropped by Hyperband
    # fewer encoder passes than scoring every trial on every slice
    assert result.encoder_passes < len(result.trials) * evaluator.num_images
    with pytest.raises(SearchError, match="single-task"):
        run_search(merger, evaluator, SearchSettings(tasks=("a", "b"), trials=5, granularity=2, min_budget=2),
                   tmp_path / "mf2")


def test_budget_subsets_are_nested(evaluator):
    small = set(evaluator.subset(4, seed=1))
    large = set(evaluator.subset(8, seed=1))
    assert small < large


def test_parallel_trials_on_dask_workers(merger, evaluator, tmp_path):
    from distributed import Client, LocalCluster

    settings = SearchSettings(tasks=("a",), trials=13, granularity=2)  # both stages: coarse 10, per group 3
    serial = run_search(merger, evaluator, settings, tmp_path / "serial")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        result = run_search(merger, evaluator, settings, tmp_path / "dask", client=client)
    assert len(result.trials) == 13 and all(t.status == "ok" for t in result.trials)
    assert [t.stage for t in result.trials] == ["coarse"] * 10 + ["groups"] * 3
    assert result.encoder_passes >= 10  # counted on the workers
    # the initial design is the same whichever runs it, so its scores must agree with the serial run
    by_config = {json.dumps(t.config.to_dict(), sort_keys=True): t.dice for t in serial.trials}
    shared = [t for t in result.trials if json.dumps(t.config.to_dict(), sort_keys=True) in by_config]
    assert len(shared) >= len(initial_configs(merger, settings))
    for t in shared:
        assert t.dice == pytest.approx(by_config[json.dumps(t.config.to_dict(), sort_keys=True)], abs=1e-6)
