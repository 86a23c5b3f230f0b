#!/usr/bin/env python
"""Calibration and test Dice of one pool model moved along task vectors, on a shared task set (issue 13).

The measurement behind :data:`medsamix.merging.methods.EXTRAPOLATION`: on a set where a pool model is the specialist,
is a point past it along its own task vector (``theta_0 + s * tau_k``, s > 1) better than the model itself, and are
blends toward the base or another model worse? Every point is a uniform merge (the same setting for every group),
scored with box prompts on the set's calibration and test splits (the same splits as ``search_quality.py``).

    .venv/bin/python scripts/probe_extrapolation.py --set hippocampus --max-patients 30 --model medicosam_tiny
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from medsamix.data.tasks import training_study_ids
from medsamix.data.tasksets import select_tasks
from medsamix.demo.shared_data import shared_task_sets
from medsamix.merging.config import MergeConfig
from medsamix.merging.merger import Merger
from medsamix.models.pool import PoolManifest
from medsamix.search.evaluate import Evaluator
from medsamix.search.execution import evaluate_config

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", type=Path, default=ROOT / "sample-data" / "pool")
    ap.add_argument("--shared-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--set", default="hippocampus")
    ap.add_argument("--max-patients", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="medicosam_tiny", help="the fine-tuned pool model to move")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.1, 1.2, 1.3])
    args = ap.parse_args()
    if not args.shared_root.is_dir():
        print(f"error: {args.shared_root} not found: this probe needs the shared real-image data", file=sys.stderr)
        return 2
    manifest = PoolManifest.load(args.pool)
    pool = manifest.load_pool()
    aliases = list(pool.aliases)
    if args.model not in aliases[1:]:
        print(f"error: --model must be a fine-tuned pool model, one of {aliases[1:]}", file=sys.stderr)
        return 2
    ts = next(iter(shared_task_sets(args.shared_root, training_study_ids(manifest.training_studies), args.seed,
                                    [args.set], args.max_patients)))
    cal, test = select_tasks(ts, [t.name for t in ts.tasks])
    print(f"{ts.name}: {ts.split}; {len(cal)} calibration / {len(test)} test slices")
    merger = Merger(pool, 2, False)
    style = dict(manifest.styles).get(args.model, "sam")
    evaluators = {"calibration": Evaluator(cal), "test": Evaluator(test)}
    others = [a for a in aliases[1:] if a != args.model]

    def ta(scale: float, extra: float = 0.0) -> MergeConfig:
        weights = {a: (1.0 if a == args.model else extra) for a in aliases[1:]}
        return MergeConfig.uniform(merger.groups, "task_arithmetic", {"scale": scale, "weights": weights}, 2,
                                   preprocessing=style)

    def blend(w: float) -> MergeConfig:
        weights = {a: (w if a == args.model else (1 - w if a == aliases[0] else 0.0)) for a in aliases}
        return MergeConfig.uniform(merger.groups, "linear", {"weights": weights}, 2, preprocessing=style)

    points = [(f"{args.model} alone", ta(1.0))]
    points += [(f"{args.model} extrapolated, scale {s:g}", ta(s)) for s in args.scales]
    points += [(f"linear {w:g} {args.model} + {1 - w:g} {aliases[0]}", blend(w)) for w in (0.95, 0.9, 0.8)]
    points += [(f"{args.model} + {x:g} x task vector of {others[0]}", ta(1.0, x)) for x in (0.1, 0.2) if others]
    for name, config in points:
        t0 = time.time()
        dice = {k: evaluate_config(merger, ev, config).mean2d for k, ev in evaluators.items()}
        print(f"{name:55s} calibration {dice['calibration']:.4f}  test {dice['test']:.4f}  ({time.time() - t0:.0f} s)",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
