"""The in-place merger on a tiny SAM-architecture pool."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from conftest import TINY, random_state
from medsamix import GroupSetting, MergeConfig, MergeError, Merger, ModelPool
from medsamix.errors import ConfigError
from medsamix.merging.methods import Sources, get_method


@pytest.fixture
def pool(tiny_pool_files):
    return ModelPool.load(("sam", tiny_pool_files["sam"]),
                          {"medsam": tiny_pool_files["medsam"], "medicosam": tiny_pool_files["medicosam"]}, arch=TINY)


@pytest.fixture
def originals():
    return [random_state(TINY, i) for i in range(3)]


def expected_state(config: MergeConfig, merger: Merger, originals) -> dict[str, torch.Tensor]:
    """Independent reference: apply each group's method tensor by tensor to the original state dicts."""
    out = dict(originals[0])
    resolved = config.validate(merger.groups, merger.aliases)
    for g in merger.groups:
        method, params = resolved[g.name]
        for n in g.params:
            src = Sources.of(originals[0][n], [o[n] for o in originals[1:]], key=n)
            out[n] = get_method(method).fn(src, params, None).view_as(originals[0][n])
    return out


def assert_state(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    sd = model.state_dict()
    assert set(sd) == set(expected)
    for k, v in expected.items():
        assert torch.allclose(sd[k], v, atol=1e-6), k


def test_pick_reproduces_each_member(pool, originals):
    merger = Merger(pool)
    for i, alias in enumerate(["sam", "medsam", "medicosam"]):
        model = merger.apply(MergeConfig.uniform(merger.groups, "pick", {"source": alias}))
        assert_state(model, originals[i] if i == 0 else {
            k: (originals[i][k] if k != "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" else
                originals[0][k]) for k in originals[0]})


def test_random_layerwise_configs_match_reference(pool, originals):
    merger = Merger(pool, granularity=2)
    rng = random.Random(1)
    for _ in range(4):
        cfg = MergeConfig.random(merger.groups, merger.aliases, rng, granularity=2)
        model = merger.apply(cfg)
        assert_state(model, expected_state(cfg, merger, originals))


def test_separate_mode(pool, originals):
    merger = Merger(pool, granularity=1, separate=True)
    assert any(g.name.endswith(".mlp") for g in merger.groups)
    cfg = MergeConfig.random(merger.groups, merger.aliases, random.Random(2), granularity=1, separate=True)
    assert_state(merger.apply(cfg), expected_state(cfg, merger, originals))


def test_unchanged_groups_are_skipped_and_results_do_not_depend_on_history(pool, originals):
    merger = Merger(pool)
    rng = random.Random(3)
    a = MergeConfig.random(merger.groups, merger.aliases, rng)
    merger.apply(a)
    enc = {n: p.detach().clone() for n, p in merger.model.named_parameters() if n.startswith("image_encoder")}
    # change only one decoder group
    b = MergeConfig(a.granularity, a.separate, dict(a.groups))
    b.groups["dec.iou_head"] = GroupSetting("linear", {"weights": {"medsam": 1.0}})
    before = merger.group_settings()
    merger.apply(b)
    after = merger.group_settings()
    assert [n for n in before if before[n] != after[n]] == ["dec.iou_head"]
    for n, p in merger.model.named_parameters():
        if n.startswith("image_encoder"):
            assert torch.equal(p, enc[n])
    assert merger.encoder_fingerprint(a) == merger.encoder_fingerprint(b)
    assert a.fingerprint() != b.fingerprint()
    # back to a: identical to a fresh application of a
    assert_state(merger.apply(a), expected_state(a, merger, originals))


def test_model_parameters_are_the_merged_storage_and_model_runs(pool):
    merger = Merger(pool)
    model = merger.model
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    merger.apply(MergeConfig.uniform(merger.groups, "ties", {"keep": 0.4, "scale": 0.8}))
    assert ptrs == {n: p.data_ptr() for n, p in model.named_parameters()}  # written in place
    with torch.no_grad():
        emb = model.image_encoder(torch.zeros(1, 3, TINY.img_size, TINY.img_size))
        sparse, dense = model.prompt_encoder(points=None, boxes=torch.tensor([[8.0, 8.0, 40.0, 40.0]]), masks=None)
        masks, iou = model.mask_decoder(emb, model.prompt_encoder.get_dense_pe(), sparse, dense, False)
    assert masks.shape == (1, 1, TINY.embedding_size * 4, TINY.embedding_size * 4)
    assert torch.isfinite(masks).all() and iou.shape == (1, 1)


def test_invalid_config_changes_nothing(pool):
    merger = Merger(pool)
    good = MergeConfig.uniform(merger.groups, "linear", {"weights": {"sam": 1, "medsam": 1}})
    merger.apply(good)
    snapshot = {k: v.clone() for k, v in merger.state_dict().items()}
    bad = MergeConfig(1, False, dict(MergeConfig.uniform(merger.groups, "pick", {"source": "medsam"}).groups))
    bad.groups["dec.iou_head"] = GroupSetting("ties", {"keep": 2.0})
    with pytest.raises(ConfigError, match=r"groups.dec.iou_head: ties.keep: 2.0 is outside"):
        merger.apply(bad)
    for k, v in merger.state_dict().items():
        assert torch.equal(v, snapshot[k]), k


@pytest.mark.parametrize("mutate,match", [
    (lambda c: c.groups.pop("enc.neck"), r"no setting for \['enc.neck'\]"),
    (lambda c: c.groups.__setitem__("enc.blocks.7-9", GroupSetting("pick", {"source": "sam"})), "unknown group"),
    (lambda c: c.groups.__setitem__("enc.neck", GroupSetting("fisher", {})), "unknown merge method 'fisher'"),
])
def test_config_errors_name_the_field(pool, mutate, match):
    merger = Merger(pool)
    cfg = MergeConfig.uniform(merger.groups, "pick", {"source": "sam"})
    mutate(cfg)
    with pytest.raises(ConfigError, match=match):
        merger.apply(cfg)


def test_granularity_mismatch(pool):
    merger = Merger(pool, granularity=2)
    other = Merger(ModelPool(pool.arch, pool.base, pool.models), granularity=1)
    with pytest.raises(ConfigError, match="granularity"):
        merger.apply(MergeConfig.uniform(other.groups, "pick", {"source": "sam"}, granularity=1))


def test_non_finite_merge_is_reported(tmp_path):
    base = random_state(TINY, 0)
    huge = {k: v + 2e38 if k.startswith("mask_decoder.iou_prediction_head") else v for k, v in base.items()}
    torch.save(base, tmp_path / "b.pth")
    torch.save(huge, tmp_path / "h.pth")
    pool = ModelPool.load(("sam", tmp_path / "b.pth"), {"big": tmp_path / "h.pth"}, arch=TINY)
    merger = Merger(pool)
    cfg = MergeConfig.uniform(merger.groups, "task_arithmetic", {"scale": 3.0})
    with pytest.raises(MergeError, match="dec.iou_head"):
        merger.apply(cfg, check_finite=True)


def test_pool_state_dicts_share_memory_with_merger(pool):
    merger = Merger(pool)
    name = "image_encoder.blocks.0.attn.qkv.weight"
    before = pool.models[0].state_dict[name].clone()
    merger.apply(MergeConfig.uniform(merger.groups, "slerp", {"t": 0.3}))
    assert torch.equal(pool.models[0].state_dict[name], before)  # sources are never modified
    assert dataclasses.is_dataclass(pool)
