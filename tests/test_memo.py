"""The merger's bounded memo: merges are the same whatever the cap; the cap bounds what is kept."""

from __future__ import annotations

import math
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


@pytest.mark.parametrize("n", [1, 2, 33, 5003])
def test_ties_thresholds_equal_the_sorted_magnitudes(n):
    """The table + bracket selection gives exactly the sorted magnitudes' entry, duplicates and zeros included."""
    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=g)
    models = base + torch.randint(-4, 5, (3, n), generator=g).float() * 0.25  # many exact duplicates, zeros
    noisy = base + torch.randn(3, n, generator=g)
    for sources in (models, noisy):
        ordered = (sources - base).abs().sort(dim=1).values
        src = Sources(base, sources, "w", MemoCache(0))
        for keep in (0.0001, 0.05, 0.2, 0.37, 0.5, 0.77, 0.999, 1.0):
            k = min(n, max(1, math.ceil(keep * n - 1e-9)))
            assert torch.equal(ties_trim_thresholds(src, keep), ordered[:, n - k: n - k + 1]), (n, keep)


def test_cache_policy_small_values_always_large_first_come():
    big = SMALL_BYTES // 4 + 1  # float32 elements of a value just over the small limit
    cache = MemoCache(3 * big * 4)
    small = torch.zeros(SMALL_BYTES // 4)
    assert cache.put(("a", "coef"), small) and cache.small_bytes == SMALL_BYTES and cache.nbytes == 0
    assert cache.put(("a", "field"), torch.zeros(2 * big)) and cache.nbytes == 2 * big * 4
    assert not cache.put(("b", "field"), torch.zeros(2 * big))  # no room: not stored, the first stays
    assert ("a", "field") in cache and ("b", "field") not in cache
    assert cache.put(("a", "field"), torch.zeros(3 * big))  # replacing its own key frees its bytes first
    assert cache.nbytes == 3 * big * 4
    assert cache.get(("a", "coef")) is small and cache.get(("x", "y")) is None
    assert (cache.hits, cache.misses) == (1, 1)
    zero = MemoCache(0)
    assert not zero.put(("a", "field"), torch.zeros(big)) and len(zero) == 0
    assert zero.put(("a", "coef"), (1.0, 2.0))  # per-tensor scalars are kept even at cap 0
    with pytest.raises(ValueError):
        MemoCache(-1)


def test_lowering_the_cap_drops_the_large_values():
    big = SMALL_BYTES // 4 + 1
    cache = MemoCache(None)
    cache.put(("a", "field"), torch.zeros(big))
    cache.put(("a", "coef"), (1.0,))
    cache.set_max_bytes(10 * big * 4)
    assert cache.nbytes == big * 4
    cache.set_max_bytes(0)
    assert cache.nbytes == 0 and ("a", "coef") in cache and ("a", "field") not in cache
