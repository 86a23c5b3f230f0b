#!/usr/bin/env python
"""MedSAMix-S and MedSAMix-M against the single pool models and the uniform merges on the shared real data.

For every task set of ``../shared/data`` whose tasks have at least 3 calibration slices (hippocampus: patients
20/80; TotalSegmentator CT and MR: one volume each, split into contiguous slabs of slices), this runs

* MedSAMix-S: one search per task (multi-fidelity Hyperband when the task has many calibration slices),
* MedSAMix-M: one ParEGO search over all tasks of the set,

and scores the selected merges, every single pool model (with its own preprocessing) and every uniform merge on the
test split (box prompts, 2D Dice). Writes ``<out>.md`` and ``<out>.csv``.

    .venv/bin/python scripts/search_quality.py --out results/search_quality
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import tempfile
import time
from pathlib import Path

from medsamix.data.tasks import training_study_ids
from medsamix.search.evaluate import Evaluator
from medsamix.data.tasksets import select_tasks
from medsamix.errors import MergeRunError
from medsamix.models.pool import manifest_styles
from medsamix.runs.run import reference_scores, run_merge
from medsamix.merging.merger import Merger
from medsamix.models.pool import PoolManifest
from medsamix.search.search import SearchSettings
from medsamix.demo.shared_data import shared_task_sets

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", type=Path, default=ROOT / "sample-data" / "pool")
    ap.add_argument("--shared-root", type=Path, default=SHARED)
    ap.add_argument("--sets", nargs="+", default=["hippocampus", "totalseg_ct_full", "totalseg_mr"])
    ap.add_argument("--trials", type=int, default=120, help="per MedSAMix-S search")
    ap.add_argument("--trials-multi", type=int, default=120, help="per MedSAMix-M search")
    ap.add_argument("--mf-threshold", type=int, default=100,
                    help="MedSAMix-S uses multi-fidelity when a task has at least this many calibration slices")
    ap.add_argument("--max-patients", type=int, default=None, help="hippocampus patients used (before the split)")
    ap.add_argument("--granularity", type=int, default=2)
    ap.add_argument("--coarse-share", type=float, default=SearchSettings.coarse_share,
                    help="share of each search's trials in the coarse stage (one setting per model component)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preprocessing", choices=["sam", "medsam"], default=None,
                    help="fix the merged models' preprocessing style (default: searched)")
    ap.add_argument("--work", type=Path, default=None, help="search folders (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "search_quality")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.shared_root.is_dir():
        print(f"error: {args.shared_root} not found: this benchmark needs the shared real-image data", file=sys.stderr)
        return 2
    t_start = time.time()
    manifest = PoolManifest.load(args.pool)
    pool = manifest.load_pool()
    styles = manifest_styles(manifest)
    exclude = training_study_ids(manifest.training_studies)
    work = args.work or Path(tempfile.mkdtemp(prefix="medsamix-quality-"))
    rows: list[dict] = []
    splits: list[str] = []
    for ts in shared_task_sets(args.shared_root, exclude, args.seed, args.sets, args.max_patients):
        tasks = []
        for t in ts.tasks:
            try:
                select_tasks(ts, [t.name])
                tasks.append(t.name)
            except MergeRunError as e:  # too few calibration slices: reported and left out
                print(f"{ts.name}/{t.name}: left out ({e})")
        if not tasks:
            continue
        splits.append(f"- **{ts.name}**: {ts.split}")
        cal_all, test_all = select_tasks(ts, tasks)
        own = tuple(styles.items())
        settings0 = SearchSettings(tasks=tuple(tasks), granularity=args.granularity, preprocessing=args.preprocessing,
                                   own_styles=own)
        merger = Merger(pool, args.granularity, False)
        baselines = reference_scores(merger, Evaluator(test_all), settings0)
        singles = list(pool.aliases)
        uniforms = [n for n in baselines if n not in singles]
        s_test: dict[str, float] = {}
        s_cal: dict[str, float] = {}
        for task in tasks:
            cal, test = select_tasks(ts, [task])
            mb = max(1, len(cal) // 27) if len(cal) >= args.mf_threshold else None
            settings = SearchSettings(tasks=(task,), trials=args.trials, granularity=args.granularity,
                                      seed=args.seed, preprocessing=args.preprocessing, own_styles=own,
                                      min_budget=mb,
                                      coarse_share=args.coarse_share)
            t0 = time.time()
            out = run_merge(pool, cal, test, settings, work / f"{ts.name}-S-{task}", ts.split, report=False)
            s_test[task], s_cal[task] = out.test_dice[task], out.calibration_dice[task]
            print(f"{ts.name}/{task}: S test {s_test[task]:.4f} (cal {s_cal[task]:.4f}, {len(cal)} cal slices"
                  f"{f', min budget {mb}' if mb else ''}) in {time.time() - t0:.0f} s; best single "
                  f"{max(baselines[a][task] for a in singles):.4f}, best uniform "
                  f"{max(baselines[u][task] for u in uniforms):.4f}", flush=True)
        m_test: dict[str, float] = {}
        if len(tasks) > 1:
            settings = SearchSettings(tasks=tuple(tasks), trials=args.trials_multi, granularity=args.granularity,
                                      seed=args.seed, preprocessing=args.preprocessing, own_styles=own,
                                      coarse_share=args.coarse_share)
            t0 = time.time()
            out = run_merge(pool, cal_all, test_all, settings, work / f"{ts.name}-M", ts.split, report=False)
            m_test = dict(out.test_dice)
            print(f"{ts.name}: M test mean {sum(m_test.values()) / len(m_test):.4f} in {time.time() - t0:.0f} s",
                  flush=True)
        for task in tasks:
            best_single = max(singles, key=lambda a: baselines[a][task])
            best_uniform = max(uniforms, key=lambda u: baselines[u][task])
            rows.append({
                "set": ts.name, "task": task, **{n: baselines[n][task] for n in baselines},
                "best_single": best_single, "best_uniform": best_uniform,
                "medsamix_s": s_test[task], "medsamix_s_cal": s_cal[task], "medsamix_m": m_test.get(task, float("nan")),
            })
    minutes = (time.time() - t_start) / 60
    write(args, rows, singles, uniforms, splits, minutes)
    return 0


def write(args: argparse.Namespace, rows: list[dict], singles: list[str], uniforms: list[str], splits: list[str],
          minutes: float) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    names = singles + uniforms
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    beats = [r for r in rows if r["medsamix_s"] > r[r["best_single"]] and r["medsamix_s"] > r[r["best_uniform"]]]
    lines = [
        "# MedSAMix on the shared real data (test splits, box prompts, 2D Dice)", "",
        f"Command: `.venv/bin/python scripts/search_quality.py {' '.join(sys.argv[1:])}`  ",
        f"Run time: {minutes:.1f} min on this machine (2 cores). Pool: the embedded tiny pool. Trials: "
        f"{args.trials} per MedSAMix-S search (Hyperband multi-fidelity when a task has >= {args.mf_threshold} "
        f"calibration slices), {args.trials_multi} per MedSAMix-M search (ParEGO); granularity {args.granularity}; "
        f"seed {args.seed}. Single models use their own preprocessing; uniform merges the base model's; the "
        f"searched merges {'use ' + args.preprocessing if args.preprocessing else 'search it (prep:style)'}.", "",
        "Splits (calibration for the search, test for this table; pool-training patients excluded):", "", *splits, "",
        "| set | task | " + " | ".join(names) + " | MedSAMix-S | MedSAMix-M | S beats best single and best uniform |",
        "|---" * (len(names) + 5) + "|",
    ]
    for r in rows:
        top = max([r[n] for n in names] + [r["medsamix_s"], r["medsamix_m"]])
        cell = lambda v: f"**{v:.3f}**" if abs(v - top) < 1e-12 else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {r['set']} | {r['task']} | " + " | ".join(cell(r[n]) for n in names)
                     + f" | {cell(r['medsamix_s'])} | {cell(r['medsamix_m'])} | "
                     + ("yes" if r in beats else "no") + " |")
    lines += ["", f"MedSAMix-S beats both the best single model and the best uniform merge on {len(beats)} of "
              f"{len(rows)} tasks ({100 * len(beats) / len(rows):.0f}%).", ""]
    lines += ["Task averages per set (MedSAMix-M against every single model):", "",
              "| set | " + " | ".join(singles) + " | MedSAMix-M | M beats every single model |",
              "|---" * (len(singles) + 3) + "|"]
    for s in dict.fromkeys(r["set"] for r in rows):
        rs = [r for r in rows if r["set"] == s]
        if len(rs) < 2:
            continue
        means = {n: sum(r[n] for r in rs) / len(rs) for n in singles}
        m = sum(r["medsamix_m"] for r in rs) / len(rs)
        lines.append(f"| {s} | " + " | ".join(f"{means[n]:.3f}" for n in singles)
                     + f" | {m:.3f} | {'yes' if all(m > v for v in means.values()) else 'no'} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
