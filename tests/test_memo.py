"""The merger's bounded memo: merges are the same whatever the cap; the cap bounds what is kept."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import TINY
from medsamix import MergeConfig, Merger, ModelPool
from medsamix.merging.memo import SMALL_BYTES, MemoCache
from medsamix.merging.methods import REGISTRY, Sources, get_method, ties_trim_thresholds


def load_pool(files) -> ModelPool:
    return ModelPool.load(("sam", files["sam"]), {"medsam": files["medsam"], "medicosam": files["medicosam"]},
                          arch=TINY)


def configs(merger: Merger, method: str, count: int, seed: int) -> list[MergeConfig]:
    """Whole-model configurations of one method with parameters drawn from its search ranges; DARE gets several
    seeds (its memo is per seed)."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        params = get_method(method).sample(rng, merger.aliases)
        if method == "dare":
            params["seed"] = i % 2
        out.append(MergeConfig.uniform(merger.groups, method, params, granularity=2))
    return out


def model_bytes(merger: Merger) -> int:
    return sum(t.numel() * t.element_size() for t in merger.state_dict().values())


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_method_merges_the_same_with_and_without_memo(tiny_pool_files, method):
    capped = Merger(load_pool(tiny_pool_files), granularity=2, memo_bytes=0)
    free = Merger(load_pool(tiny_pool_files), granularity=2, memo_bytes=None)
    half = Merger(load_pool(tiny_pool_files), granularity=2, memo_bytes=model_bytes(capped) // 2)
    free.prepare()
    for cfg in configs(capped, method, 4, seed=3):
        ref = {k: v.clone() for k, v in free.apply(cfg).state_dict().items()}
        for other in (capped, half):
            got = other.apply(cfg).state_dict()
            for k, v in ref.items():
                assert torch.allclose(got[k], v, rtol=0, atol=1e-6), (method, k)
    assert capped.memo.nbytes == 0  # no per-element memo kept: every merge computed what it needed
    assert half.memo.nbytes <= half.memo.max_bytes
    if method in ("ties", "dare"):  # the methods with (K, n) memos really used them when allowed
        assert free.memo.nbytes > model_bytes(free)
        assert half.memo.nbytes > 0


def test_ties_thresholds_by_selection_equal_the_sorted_memo_with_ties_in_magnitudes():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5003, generator=g)
    # magnitudes with many exact duplicates, zeros, and both signs
    models = base + torch.randint(-4, 5, (3, 5003), generator=g).float() * 0.25
    for keep in (0.0001, 0.05, 0.2, 0.5, 0.77, 0.999, 1.0):
        by_sort = ties_trim_thresholds(Sources(base, models, "w", MemoCache(None)), keep)
        by_select = ties_trim_thresholds(Sources(base, models, "w", MemoCache(0)), keep)
        assert torch.equal(by_sort, by_select), keep


def test_cache_policy_small_values_always_large_first_come():
    cache = MemoCache(1000 * 4)
    small = torch.zeros(SMALL_BYTES // 4)
    assert cache.put(("a", "coef"), small) and cache.small_bytes == SMALL_BYTES and cache.nbytes == 0
    assert cache.put(("a", "field"), torch.zeros(600)) and cache.nbytes == 2400
    assert not cache.put(("b", "field"), torch.zeros(600))  # no room: not stored, the first stays
    assert ("a", "field") in cache and ("b", "field") not in cache
    assert cache.put(("a", "field"), torch.zeros(900))  # replacing its own key frees its bytes first
    assert cache.nbytes == 3600
    assert cache.get(("a", "coef")) is small and cache.get(("x", "y")) is None
    assert (cache.hits, cache.misses) == (1, 1)
    zero = MemoCache(0)
    assert not zero.put(("a", "field"), torch.zeros(600)) and len(zero) == 0
    assert zero.put(("a", "coef"), (1.0, 2.0))  # per-tensor scalars are kept even at cap 0
    with pytest.raises(ValueError):
        MemoCache(-1)


def test_lowering_the_cap_drops_the_large_values():
    cache = MemoCache(None)
    cache.put(("a", "field"), torch.zeros(600))
    cache.put(("a", "coef"), (1.0,))
    cache.set_max_bytes(10_000)
    assert cache.nbytes == 2400
    cache.set_max_bytes(0)
    assert cache.nbytes == 0 and ("a", "coef") in cache and ("a", "field") not in cache
