"""A merge method is one registration: a toy method registered here (and removed again) reaches the search space,
the uniform baselines, the initial design and the merger without any other file knowing of it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import torch
from torch import Tensor

from conftest import TINY
from medsamix import MergeConfig, Merger, ModelPool
from medsamix.merging.config import uniform_merges
from medsamix.merging.methods import REGISTRY, ParamSpec, Sources, get_method, register, unregister
from medsamix.search.search import SearchSettings, initial_configs
from medsamix.search.space import build_space, from_merge_config, to_merge_config

TOY = "toy_midpoint"


@pytest.fixture
def toy() -> Iterator[dict[str, int]]:
    """Registers ``base + alpha * (first model - base)`` with a warm-up counter; unregistered afterwards."""
    calls = {"warmup": 0}

    @register(TOY, [ParamSpec("alpha", "float", 0.0, 2.0, default=0.5, search_low=0.25, search_high=0.75)],
              uniform={"toy_0.5": {"alpha": 0.5}}, design=({"alpha": 0.25},),
              single=lambda alias, aliases: {"alpha": 1.0} if alias == aliases[1] else None,
              warmup={"alpha": 0.5})
    def toy_midpoint(src: Sources, params: Mapping[str, Any], out: Tensor | None = None) -> Tensor:
        """Moves from the base towards the first fine-tuned model."""
        if out is None:
            calls["warmup"] += 1
            out = torch.empty_like(src.base)
        return torch.add(src.base, src.task_vectors()[0], alpha=params["alpha"], out=out)

    try:
        yield calls
    finally:
        unregister(TOY)


@pytest.fixture
def merger(tiny_pool_files) -> Merger:
    pool = ModelPool.load(("sam", tiny_pool_files["sam"]),
                          {"medsam": tiny_pool_files["medsam"], "medicosam": tiny_pool_files["medicosam"]}, arch=TINY)
    return Merger(pool, granularity=2)


def test_toy_method_reaches_space_baselines_design_and_merger(toy, merger):
    aliases = merger.aliases
    # search space: a method choice with the toy's hyper-parameter over its search range, round-tripping
    cs = build_space(merger.groups, aliases)
    group = merger.groups[0].name
    assert TOY in cs[f"{group}:method"].choices
    hp = cs[f"{group}:{TOY}:alpha"]
    assert (hp.lower, hp.upper) == (0.25, 0.75)
    config = MergeConfig.uniform(merger.groups, TOY, {"alpha": 0.6}, granularity=2)
    back = to_merge_config(from_merge_config(cs, config, aliases), merger.groups, aliases, 2)
    assert back.groups[group].method == TOY and back.groups[group].params == {"alpha": 0.6}

    # uniform baselines and the initial design (default settings search every registered method)
    baselines = uniform_merges(merger.groups, aliases, 2)
    assert baselines["toy_0.5"].groups[group].params == {"alpha": 0.5}
    assert list(baselines) == sorted(baselines)
    settings = SearchSettings(tasks=("a",))
    assert TOY in settings.methods
    toys = [c for c in initial_configs(merger, settings) if c.groups[group].method == TOY]
    assert [c.groups[group].params for c in toys] == [{"alpha": 0.5}, {"alpha": 0.25}]  # linear has the singles
    alone = SearchSettings(tasks=("a",), methods=(TOY,))
    toys = [c for c in initial_configs(merger, alone) if c.groups[group].method == TOY]
    assert [c.groups[group].params for c in toys] == [{"alpha": 0.5}, {"alpha": 0.25}, {"alpha": 1.0}]
    assert toys[-1].preprocessing == settings.design_style(aliases[1])
    others = SearchSettings(tasks=("a",), methods=("linear",))
    assert all(c.groups[group].method == "linear" for c in initial_configs(merger, others))

    # the merger: warm-up through prepare (once per parameter tensor), and alpha = 1 gives the first fine-tuned model
    merger.prepare([TOY])
    assert toy["warmup"] == sum(len(g.params) for g in merger.groups)
    merged = {k: v.clone() for k, v in merger.apply(toys[-1]).state_dict().items()}
    picked = merger.apply(MergeConfig.uniform(merger.groups, "pick", {"source": aliases[1]}, granularity=2))
    for k, v in picked.state_dict().items():
        assert torch.allclose(merged[k], v, atol=1e-6), k


def test_unregistered_toy_is_gone(toy):
    assert get_method(TOY).name == TOY
    unregister(TOY)
    try:
        assert TOY not in REGISTRY and TOY not in SearchSettings(tasks=("a",)).methods
    finally:
        register(TOY)(lambda src, params, out=None: src.base)  # the fixture unregisters it again


def test_builtin_registrations_declare_their_inputs():
    assert {n for n, m in REGISTRY.items() if m.task_vectors} == {"ties", "dare"}
    assert {n for n, m in REGISTRY.items() if m.warmup is not None} == {"ties", "slerp", "dare"}
    assert {n for n, m in REGISTRY.items() if m.single is not None} == {"linear", "task_arithmetic"}
    assert {n for n, m in REGISTRY.items() if m.beyond is not None} == {"task_arithmetic"}
