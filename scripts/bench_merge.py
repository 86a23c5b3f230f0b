#!/usr/bin/env python
"""Benchmark: materialising a merged ViT-B in place versus reloading checkpoints for every configuration.

Random-weight ViT-B base plus 3 fine-tuned models (base + seeded noise), saved as plain checkpoints in a temporary
folder. For each of --runs random layer-wise configurations (per group a method drawn uniformly from the
registry, parameters from their search ranges):

* merge_s  - time for ``Merger.apply``: the merged weights written in place into the resident Sam module;
* reload_s - the reference approach's I/O alone: ``torch.load`` of all four checkpoints plus ``torch.save`` of the
  merged state dict. Its merge arithmetic is not counted, so the ratio is a lower bound.

One-time costs (pool load, merger construction, per-method preparation such as TIES' magnitude tables, kernel
compilation) are printed separately. The merges are timed twice on the same merger and configurations: with no memo
cap (``memo_bytes=None``: DARE's random fields and TIES' sorted magnitudes kept for every tensor, 6 x the model size
for K = 3, as before the cap) and with the merger's default cap (0: DARE fields drawn again per merge, TIES thresholds
selected per merge from a small table of magnitude order statistics with one pass over each tensor). The last line is, for the default cap,
``merge_s=<median s> reload_s=<median s> ratio=<reload_s/merge_s>``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from medsamix import VIT_B, MergeConfig, Merger, ModelPool, REGISTRY


def make_checkpoints(folder: Path, num_models: int, noise: float) -> dict[str, Path]:
    torch.manual_seed(0)
    base = VIT_B.build().state_dict()
    paths = {"sam": folder / "sam.pth"}
    torch.save(base, paths["sam"])
    for k in range(num_models):
        g = torch.Generator().manual_seed(k + 1)
        sd = {n: (t + noise * torch.randn(t.shape, generator=g)) if t.is_floating_point() else t
              for n, t in base.items()}
        paths[f"ft{k + 1}"] = folder / f"ft{k + 1}.pth"
        torch.save(sd, paths[f"ft{k + 1}"])
    return paths


def time_merges(merger: Merger, rng: random.Random, granularity: int, runs: int) -> list[float]:
    """Prepare, warm up, then time whole-model merges per method and ``runs`` random layer-wise configurations."""
    t = time.perf_counter()
    merger.prepare()
    print(f"one-time preparation (the memos the cap has room for): {time.perf_counter() - t:.1f} s, "
          f"memo {merger.memo.nbytes / 2**20:.0f} MB")
    t = time.perf_counter()
    for m in sorted(REGISTRY):  # warm-up: compiles the fused kernels
        merger.apply(MergeConfig.random(merger.groups, merger.aliases, rng, granularity, methods=[m]))
    print(f"warm-up (kernel compilation): {time.perf_counter() - t:.1f} s")
    per_method = {}
    for m in sorted(REGISTRY):
        cfg = MergeConfig.random(merger.groups, merger.aliases, rng, granularity, methods=[m])
        t = time.perf_counter()
        merger.apply(cfg)
        per_method[m] = time.perf_counter() - t
    print("whole model with one method: " + ", ".join(f"{m} {s:.3f} s" for m, s in per_method.items()))
    merge_times = []
    for run in range(runs):
        cfg = MergeConfig.random(merger.groups, merger.aliases, rng, granularity)
        t = time.perf_counter()
        merger.apply(cfg)
        merge_times.append(time.perf_counter() - t)
        counts = {m: sum(s.method == m for s in cfg.groups.values()) for m in sorted(REGISTRY)}
        print(f"merge run {run}: {merge_times[-1]:.3f} s (groups per method: {counts})")
    print(f"memo held at the end: {merger.memo.nbytes / 2**20:.0f} MB (+ {merger.memo.small_bytes / 2**10:.0f} KB "
          "of per-tensor scalars)")
    return merge_times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=9, help="random configurations timed (>= 5)")
    ap.add_argument("--models", type=int, default=3, help="fine-tuned models besides the base")
    ap.add_argument("--granularity", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        paths = make_checkpoints(folder, args.models, noise=0.02)
        print(f"made {len(paths)} random ViT-B checkpoints in {time.perf_counter() - t:.1f} s")

        t = time.perf_counter()
        pool = ModelPool.load(("sam", paths["sam"]), {a: p for a, p in paths.items() if a != "sam"})
        print(f"pool load (read + sha256): {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        merger = Merger(pool, granularity=args.granularity)
        print(f"merger construction: {time.perf_counter() - t:.1f} s ({len(merger.groups)} groups)")
        runs = max(5, args.runs)
        timed = {}
        for label, cap in (("no memo cap (before)", None), ("memo cap 0 (default)", 0)):
            print(f"--- {label}")
            merger.memo.set_max_bytes(cap)
            timed[label] = time_merges(merger, random.Random(args.seed), args.granularity, runs)
        out = folder / "merged.pth"
        reload_times = []
        for run in range(runs):  # separately, so the reference's large allocations do not disturb the merge timing
            t = time.perf_counter()
            loaded = [torch.load(p, map_location="cpu", weights_only=True) for p in paths.values()]
            torch.save({k: v.clone() for k, v in merger.state_dict().items()}, out)
            reload_times.append(time.perf_counter() - t)
            del loaded
            print(f"reload run {run}: {reload_times[-1]:.2f} s")
    reload_s = statistics.median(reload_times)
    for label, merge_times in timed.items():
        merge_s = statistics.median(merge_times)
        print(f"{label}: merge_s={merge_s:.4f} reload_s={reload_s:.3f} ratio={reload_s / merge_s:.1f}")
    merge_s = statistics.median(timed["memo cap 0 (default)"])
    print(f"merge_s={merge_s:.4f} reload_s={reload_s:.3f} ratio={reload_s / merge_s:.1f}")


if __name__ == "__main__":
    main()
