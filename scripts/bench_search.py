#!/usr/bin/env python
"""The same MedSAMix-S search twice on the tiny pool: the reference loop (--naive) and ours.

naive: every trial reloads the checkpoints from disk, builds a new merger and re-encodes every calibration slice
       (the public reference code's loop), each configuration scored on all calibration slices.
ours:  the pool stays resident and is merged in place, image embeddings are cached by the image-encoder settings,
       and Hyperband (eta 4 by default, smallest budget slices / eta**3) scores most configurations on nested
       subsets of the calibration slices, so a promoted configuration only encodes the slices it has not seen yet.
       Initial-design configurations dropped at small budgets are scored on all slices before selection.

Both searches have the same seed, task, number of trials and search space. Dice is the test-split Dice (2D,
box prompts) of the configuration each search selects. Data: the shared MSD hippocampus MRIs (patient split
20/80, pool-training patients excluded).

    .venv/bin/python scripts/bench_search.py            # prints the figures; the last line is machine-readable

Last line: ``naive_encoder_passes=<n> ours_encoder_passes=<n> pass_ratio=<x> naive_s=<s> ours_s=<s>
wall_ratio=<x> dice_naive=<d> dice_ours=<d>``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

from medsamix.data.tasks import training_study_ids
from medsamix.search.evaluate import Evaluator
from medsamix.merging.merger import Merger
from medsamix.models.pool import PoolManifest
from medsamix.search.search import SearchSettings, run_search, score
from medsamix.demo.shared_data import shared_task_sets

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", type=Path, default=ROOT / "sample-data" / "pool")
    ap.add_argument("--shared-root", type=Path, default=SHARED)
    ap.add_argument("--task", default="hippocampus_anterior")
    ap.add_argument("--max-patients", type=int, default=60, help="hippocampus patients used (before the split)")
    ap.add_argument("--trials", type=int, default=120)
    ap.add_argument("--eta", type=int, default=4, help="ours: Hyperband's factor between budgets")
    ap.add_argument("--min-budget-fraction", type=float, default=None,
                    help="ours: the smallest budget as a fraction of the calibration slices (default 1 / eta**3)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not (args.shared_root / "hippocampus").is_dir():
        print(f"error: {args.shared_root / 'hippocampus'} not found: this benchmark needs the shared MSD "
              "hippocampus data", file=sys.stderr)
        return 2
    manifest = PoolManifest.load(args.pool)
    exclude = training_study_ids(manifest.training_studies)
    ts = shared_task_sets(args.shared_root, exclude, args.seed, ["hippocampus"], args.max_patients)[0]
    cal = [s for s in ts.calibration if s.task.name == args.task]
    test = [s for s in ts.test if s.task.name == args.task]
    style = manifest.styles[manifest.base]
    fraction = args.min_budget_fraction or 1 / args.eta ** 3
    min_budget = max(1, int(len(cal) * fraction))
    print(f"data: hippocampus {ts.split}; task {args.task}: {len(cal)} calibration / {len(test)} test slices")
    print(f"search: {args.trials} trials, granularity 2, seed {args.seed}; ours: Hyperband eta {args.eta}, budgets "
          f"{min_budget}..{len(cal)} slices")
    pool = manifest.load_pool()
    test_ev = Evaluator(test)
    runs = {}
    for name, naive, mb in (("naive", True, None), ("ours", False, min_budget)):
        settings = SearchSettings(tasks=(args.task,), trials=args.trials, seed=args.seed, preprocessing=style,
                                  naive=naive, min_budget=mb, eta=args.eta)
        merger = Merger(pool, settings.granularity, settings.separate)
        merger.prepare()  # one-time set-up (TIES magnitudes, kernels) is common to both; not timed
        evaluator = Evaluator(cal)
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            result = run_search(merger, evaluator, settings, out)
            seconds = time.perf_counter() - t0
        dice = score(merger, test_ev, result.best.config, settings.tasks)[args.task]
        full = sum(t.budget is None for t in result.trials)
        runs[name] = (result.encoder_passes, seconds, dice, result.best.dice[args.task])
        print(f"{name:5s}: {result.encoder_passes} encoder passes, {seconds:.1f} s, {len(result.trials)} trials "
              f"({full} on all slices), calibration Dice {result.best.dice[args.task]:.4f}, test Dice {dice:.4f}")
    (np_, ns, nd, _), (op, os_, od, _) = runs["naive"], runs["ours"]
    print(f"naive_encoder_passes={np_} ours_encoder_passes={op} pass_ratio={np_ / op:.2f} naive_s={ns:.1f} "
          f"ours_s={os_:.1f} wall_ratio={ns / os_:.2f} dice_naive={nd:.4f} dice_ours={od:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
