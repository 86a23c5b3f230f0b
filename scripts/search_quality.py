#!/usr/bin/env python
"""MedSAMix-S and MedSAMix-M against the single pool models and the uniform merges on the shared real data.

For every task set of ``../shared/data`` whose tasks have at least 3 calibration slices (hippocampus: patients
20/80; TotalSegmentator CT and MR: one volume each, split into contiguous slabs of slices), this runs

* MedSAMix-S: one search per task (multi-fidelity Hyperband when the task has many calibration slices),
* MedSAMix-M: one ParEGO search over all tasks of the set,
* MedSAMix-M ``--robust``: the same over every task and its corrupted twin (:mod:`medsamix.search.corruptions`),

and scores the selected merges, every single pool model (with its own preprocessing) and every uniform merge on the
test split three ways: clean (box prompts, 2D Dice), corrupted (the seeded corruption suite, box prompts) and
interactive (the box, then ``--rounds`` correction clicks; a slice's Dice averaged over the rounds,
:mod:`medsamix.search.interactive`). Prints and writes the target checks of issue 13 to ``<out>.md`` and the
figures to ``<out>.csv``.

    .venv/bin/python scripts/search_quality.py --out results/search_quality
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import logging
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from medsamix.data.slices import SliceSample
from medsamix.data.tasks import training_study_ids
from medsamix.data.tasksets import select_tasks
from medsamix.demo.shared_data import shared_task_sets
from medsamix.errors import MergeRunError
from medsamix.merging.config import MergeConfig
from medsamix.merging.merger import Merger
from medsamix.models.pool import PoolManifest
from medsamix.runs.run import reference_scores, run_merge
from medsamix.search.corruptions import CORRUPTED, robust_tasks, with_corrupted
from medsamix.search.evaluate import Evaluator
from medsamix.search.search import SearchSettings, ct_windows_for, score

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
VARIANTS = ("medsamix_s", "medsamix_s_guarded", "medsamix_m", "medsamix_m_robust")
LABELS = {"medsamix_s": "MedSAMix-S", "medsamix_s_guarded": "S guarded", "medsamix_m": "MedSAMix-M",
          "medsamix_m_robust": "MedSAMix-M robust"}
KINDS = ("clean", "corrupted", "interactive")
# Task sets whose data a pool model was fine-tuned on (sample-data/pool/MODEL_CARD.md, scripts/train_pool.py):
# medicosam_tiny on 40 other patients of the MSD hippocampus set, medsam_tiny on a TotalSegmentator CT series
# (example_ct_dicom: 32 TotalSegmentator organs, another acquisition of possibly the same patient as the test CT).
FINE_TUNED_SETS = ("hippocampus", "totalseg_ct_full", "totalseg_ct")


class TestScorer:
    """Clean, corrupted and interactive test Dice of merge configurations on one task set's test slices.

    One evaluator holds the clean slices and their corrupted twins (box prompts), another the clean slices under
    the interactive protocol; both keep their image embeddings between configurations."""

    def __init__(self, merger: Merger, test: Sequence[SliceSample], seed: int, rounds: int, start: str) -> None:
        self.merger = merger
        self.robust = Evaluator(with_corrupted(test, seed), cache_bytes=2**30)
        self.interactive = Evaluator(list(test), cache_bytes=2**30, rounds=rounds, start=start)

    def references(self, settings: SearchSettings) -> dict[str, dict[str, float]]:
        """``{name: {task: clean, task@corrupted: corrupted, task@interactive: interactive}}`` of every single
        model and uniform merge (``settings.tasks``: the clean tasks)."""
        rob = reference_scores(self.merger, self.robust, _with_tasks(settings, robust_tasks(settings.tasks)))
        act = reference_scores(self.merger, self.interactive, settings)
        return {n: {**rob[n], **{f"{t}@interactive": v for t, v in act[n].items()}} for n in rob}

    def config(self, config: MergeConfig, tasks: Sequence[str]) -> dict[str, float]:
        """The same three scores of one configuration on the slices of ``tasks`` only."""
        rob = score(self.merger, self.robust, config, robust_tasks(tasks), _indices(self.robust, robust_tasks(tasks)))
        act = score(self.merger, self.interactive, config, tasks, _indices(self.interactive, tasks))
        return {**rob, **{f"{t}@interactive": v for t, v in act.items()}}


def _indices(ev: Evaluator, tasks: Sequence[str]) -> list[int]:
    return [i for i, s in enumerate(ev.samples) if s.task.name in set(tasks)]


def _with_tasks(settings: SearchSettings, tasks: Sequence[str]) -> SearchSettings:
    return dataclasses.replace(settings, tasks=tuple(tasks))


def _key(task: str, kind: str) -> str:
    return task if kind == "clean" else f"{task}{CORRUPTED}" if kind == "corrupted" else f"{task}@interactive"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", type=Path, default=ROOT / "sample-data" / "pool")
    ap.add_argument("--shared-root", type=Path, default=SHARED)
    ap.add_argument("--sets", nargs="+", default=["hippocampus", "totalseg_ct_full", "totalseg_mr"])
    ap.add_argument("--trials", type=int, default=120, help="per MedSAMix-S search")
    ap.add_argument("--trials-multi", type=int, default=120, help="per MedSAMix-M search")
    ap.add_argument("--trials-robust", type=int, default=None,
                    help="per MedSAMix-M --robust search (default: --trials-multi; 0: no robust search)")
    ap.add_argument("--robust-se", type=float, default=SearchSettings.robust_se,
                    help="MedSAMix-M --robust: standard errors of corrupted gain needed to leave the cleanest "
                         "configuration (0: the plain tolerance rule)")
    ap.add_argument("--no-warm-robust", dest="warm_robust", action="store_false",
                    help="do not start the robust search from clean-only M's selection (--warm-start)")
    ap.add_argument("--rounds", type=int, default=3, help="correction rounds of the interactive test Dice")
    ap.add_argument("--start", choices=["box", "point"], default="box", help="first prompt of the interactive Dice")
    ap.add_argument("--mf-threshold", type=int, default=100,
                    help="MedSAMix-S uses multi-fidelity when a task has at least this many calibration slices")
    ap.add_argument("--max-patients", type=int, default=None, help="hippocampus patients used (before the split)")
    ap.add_argument("--granularity", type=int, default=2)
    ap.add_argument("--coarse-share", type=float, default=SearchSettings.coarse_share,
                    help="share of each search's trials in the coarse stage (one setting per model component)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guard-se", type=float, default=1.0,
                    help="the 'S guarded' column: MedSAMix-S with the single-model guard at this many standard errors "
                         "(the library's default selection, the 'MedSAMix-S' column, has none; 0: no guard)")
    ap.add_argument("--preprocessing", choices=["sam", "medsam"], default=None,
                    help="fix the merged models' preprocessing style (default: searched)")
    ap.add_argument("--fine-tuned-sets", nargs="*", default=list(FINE_TUNED_SETS),
                    help="task sets whose dataset a pool model was fine-tuned on (left out of the 80%% target)")
    ap.add_argument("--work", type=Path, default=None, help="search folders (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "search_quality")
    ap.add_argument("--combine", type=Path, nargs="+", default=None, metavar="CSV",
                    help="no search: merge earlier runs' CSVs (and the split lines of the .md beside each) into "
                         "--out, the target checks over all their sets")
    args = ap.parse_args()
    if args.trials_robust is None:
        args.trials_robust = args.trials_multi
    if args.combine:
        return combine(args)
    logging.basicConfig(level=logging.WARNING)
    if not args.shared_root.is_dir():
        print(f"error: {args.shared_root} not found: this benchmark needs the shared real-image data", file=sys.stderr)
        return 2
    t_start = time.time()
    manifest = PoolManifest.load(args.pool)
    pool = manifest.load_pool()
    styles = dict(manifest.styles)
    exclude = training_study_ids(manifest.training_studies)
    work = args.work or Path(tempfile.mkdtemp(prefix="medsamix-quality-"))
    rows: list[dict] = []
    splits: list[str] = []
    singles = list(pool.aliases)
    uniforms: list[str] = []
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
        common = dict(granularity=args.granularity, seed=args.seed, preprocessing=args.preprocessing, own_styles=own,
                      coarse_share=args.coarse_share)
        merger = Merger(pool, args.granularity, False)
        scorer = TestScorer(merger, test_all, args.seed, args.rounds, args.start)
        t0 = time.time()
        baselines = scorer.references(SearchSettings(tasks=tuple(tasks), **common))
        uniforms = [n for n in baselines if n not in singles]
        print(f"{ts.name}: references scored in {time.time() - t0:.0f} s", flush=True)
        found: dict[str, dict[str, float]] = {v: {} for v in VARIANTS}
        s_cal: dict[str, float] = {}
        s_how: dict[str, str] = {}
        single_cal: dict[str, dict[str, float]] = {}  # task -> alias -> calibration Dice (own style)
        for task in tasks:
            cal, _ = select_tasks(ts, [task])
            mb = max(1, len(cal) // 27) if len(cal) >= args.mf_threshold else None
            settings = SearchSettings(tasks=(task,), trials=args.trials, min_budget=mb, ct_windows=ct_windows_for(cal),
                                      guard_se=args.guard_se,
                                      **common)
            t0 = time.time()
            out = run_merge(pool, cal, [], settings, work / f"{ts.name}-S-{task}", ts.split, report=False)
            best, argmax = out.result.best, out.result.argmax or out.result.best
            chosen = scorer.config(best.config, [task])  # this task's three scores
            found["medsamix_s_guarded"].update(chosen)
            found["medsamix_s"].update(chosen if argmax is best else scorer.config(argmax.config, [task]))
            s_cal[task] = argmax.mean_dice
            s_how[task] = f"{out.result.selection}; {out.promotion.reason}"
            single_cal[task] = {a: d[task] for a, d in out.promotion.singles.items()}
            print(f"{ts.name}/{task}: {s_how[task]}", flush=True)
            print(f"{ts.name}/{task}: S test {found['medsamix_s'][task]:.4f} (cal {argmax.mean_dice:.4f}; guarded "
                  f"{found['medsamix_s_guarded'][task]:.4f}, cal {s_cal[task]:.4f}; {len(cal)} cal "
                  f"slices{f', min budget {mb}' if mb else ''}) in {time.time() - t0:.0f} s; best single "
                  f"{max(baselines[a][task] for a in singles):.4f}, best uniform "
                  f"{max(baselines[u][task] for u in uniforms):.4f}", flush=True)
        if len(tasks) > 1:
            runs = [("medsamix_m", tuple(tasks), cal_all, args.trials_multi)]
            if args.trials_robust:
                runs.append(("medsamix_m_robust", robust_tasks(tasks), with_corrupted(cal_all, args.seed),
                             args.trials_robust))
            warm: list[MergeConfig] = []
            for variant, objectives, cal, trials in runs:
                settings = SearchSettings(tasks=objectives, trials=trials, ct_windows=ct_windows_for(cal),
                                          robust_se=args.robust_se, **common)
                t0 = time.time()
                folder = work / f"{ts.name}-{'M' if variant == 'medsamix_m' else 'M-robust'}"
                out = run_merge(pool, cal, [], settings, folder, ts.split, report=False, warm=warm)
                if variant == "medsamix_m" and args.warm_robust:
                    warm = [out.result.best.config]  # the robust search starts from clean-only M's selection
                print(f"{ts.name}: {LABELS[variant]}: {out.result.selection}", flush=True)
                found[variant] = scorer.config(out.result.best.config, tasks)
                print(f"{ts.name}: {LABELS[variant]} test mean {_mean(found[variant], tasks):.4f} (corrupted "
                      f"{_mean(found[variant], tasks, 'corrupted'):.4f}) in {time.time() - t0:.0f} s", flush=True)
        for task in tasks:
            row: dict = {"set": ts.name, "task": task, "fine_tuned_set": ts.name in args.fine_tuned_sets,
                         "best_single": max(singles, key=lambda a: baselines[a][task]),
                         "best_uniform": max(uniforms, key=lambda u: baselines[u][task])}
            for kind in KINDS:
                suffix = "" if kind == "clean" else f"_{kind}"
                for n in singles + uniforms:
                    row[f"{n}{suffix}"] = baselines[n][_key(task, kind)]
                for v in VARIANTS:
                    row[f"{v}{suffix}"] = found[v].get(_key(task, kind), float("nan"))
            row["medsamix_s_cal"] = s_cal[task]
            row["medsamix_s_selection"] = s_how[task]
            row["best_single_cal"] = max(single_cal[task], key=lambda a: single_cal[task][a])
            row.update({f"{a}_cal": v for a, v in single_cal[task].items()})
            rows.append(row)
        minutes = (time.time() - t_start) / 60
        write(args, rows, singles, uniforms, splits, minutes)  # after every set: a stopped run keeps what it has
    return 0


def _mean(scores: dict[str, float], tasks: Sequence[str], kind: str = "clean") -> float:
    return sum(scores[_key(t, kind)] for t in tasks) / len(tasks)


def _col(name: str, kind: str) -> str:
    return name if kind == "clean" else f"{name}_{kind}"


def targets(rows: list[dict], singles: list[str], fine_tuned: Sequence[str]) -> list[str]:
    """The issue-13 target checks, one markdown bullet (or table) each, on the rows' test Dice."""
    out = s_checks(rows, "medsamix_s", "S", fine_tuned)
    out += [f"  - for comparison, {line[2:]}" for line in s_checks(rows, "medsamix_s_guarded",
                                                                     "S with the single-model guard", fine_tuned)]
    for kind, variant, what in (("clean", "medsamix_m", "M beats every single model on the task average in every set"),
                                ("corrupted", "medsamix_m_robust",
                                 "robust M's corrupted Dice beats every single model's (task average per set) while "
                                 "its clean Dice stays within 0.01 of clean-only M")):
        lines, ok = [], True
        for s in dict.fromkeys(r["set"] for r in rows):
            rs = [r for r in rows if r["set"] == s]
            if len(rs) < 2 or any(r[variant] != r[variant] for r in rs):  # one task or no search (NaN)
                continue
            means = {n: _avg(rs, _col(n, kind)) for n in singles}
            m = _avg(rs, _col(variant, kind))
            good = all(m > v for v in means.values())
            if variant == "medsamix_m_robust":
                clean, clean_m = _avg(rs, "medsamix_m_robust"), _avg(rs, "medsamix_m")
                good = good and clean >= clean_m - 0.01
                lines.append(f"  - {s}: corrupted {m:.3f} vs singles "
                             + ", ".join(f"{n} {v:.3f}" for n, v in means.items())
                             + f"; clean {clean:.3f} vs clean-only M {clean_m:.3f}: {'yes' if good else 'no'}")
            else:
                lines.append(f"  - {s}: {m:.3f} vs " + ", ".join(f"{n} {v:.3f}" for n, v in means.items())
                             + f": {'yes' if good else 'no'}")
            ok = ok and good
        out.append(f"- **{what}**: " + ("met" if ok and lines else "missed" if lines else "not run") + ".")
        out += lines
    return out


def s_checks(rows: list[dict], col: str, name: str, fine_tuned: Sequence[str]) -> list[str]:
    """The two MedSAMix-S target checks of column ``col`` (``name`` in the text), on the rows that have it."""
    rows = [r for r in rows if r.get(col, float("nan")) == r.get(col)]
    below = [r for r in rows if r[col] < r[r["best_single"]] - 0.01]
    out = [f"- **{name} never below the best single model by more than 0.01 (clean Dice)**: "
           f"{'met' if not below else 'missed'} ({len(rows) - len(below)} of {len(rows)} tasks within 0.01)"
           + ("" if not below else "; below on " + ", ".join(
               f"{r['set']}/{r['task']} ({r[col]:.3f} vs {r['best_single']} {r[r['best_single']]:.3f}; best single "
               f"on calibration: {r.get('best_single_cal', '?')})"
               for r in below)) + "."]
    unseen = [r for r in rows if not r["fine_tuned_set"]]
    wins = [r for r in unseen if _beats(r, col)]
    share = len(wins) / len(unseen) if unseen else float("nan")
    out.append(f"- **{name} beats the best single model and the best uniform merge on >= 80% of the tasks whose "
               f"dataset no pool model was fine-tuned on** (sets "
               f"{', '.join(sorted({r['set'] for r in unseen})) or 'none'}; fine-tuned on: {', '.join(fine_tuned)}): "
               f"{'met' if unseen and share >= 0.8 else 'missed' if unseen else 'not run'}, {len(wins)} of "
               f"{len(unseen)} ({100 * share:.0f}%); on all tasks {sum(_beats(r, col) for r in rows)} of {len(rows)}.")
    return out


def _avg(rows: list[dict], col: str) -> float:
    return sum(r[col] for r in rows) / len(rows)


def _beats(r: dict, col: str = "medsamix_s") -> bool:
    return r[col] > r[r["best_single"]] and r[col] > r[r["best_uniform"]]


def write(args: argparse.Namespace, rows: list[dict], singles: list[str], uniforms: list[str], splits: list[str],
          minutes: float) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    lines = [
        "# MedSAMix on the shared real data (test splits, 2D Dice: clean, corrupted, interactive)", "",
        f"Command: `.venv/bin/python scripts/search_quality.py {' '.join(sys.argv[1:])}`  ",
        (f"Run time: {minutes:.1f} min on this machine (2 cores)." if minutes == minutes else
         f"Combined from {', '.join(map(str, args.combine or []))} (no search in this command; the trial counts "
         "below are this command's defaults unless given: see each run's command).")
        + " Pool: the embedded tiny pool. Trials: "
        f"{args.trials} per MedSAMix-S search (Hyperband multi-fidelity when a task has >= {args.mf_threshold} "
        f"calibration slices), {args.trials_multi} per MedSAMix-M search (ParEGO), {args.trials_robust} per "
        f"MedSAMix-M --robust search (every task and its corrupted twin as objectives); granularity "
        f"{args.granularity}; seed {args.seed}. Single models use their own preprocessing; uniform merges the base "
        f"model's; the searched merges "
        f"{'use ' + args.preprocessing if args.preprocessing else 'search it (prep:style)'}.", "",
        f"Clean: box prompts on the test slices. Corrupted: box prompts on the same slices under the seeded corruption "
        f"suite (one of noise, blur, motion, bias field, low contrast at two severities per slice; "
        f"`medsamix.search.corruptions`). Interactive: the {args.start}, then {args.rounds} correction clicks at the "
        f"centre of the largest error region with the previous logits fed back, a slice's Dice averaged over the "
        f"{args.rounds + 1} rounds (`medsamix.search.interactive`). The best uniform merge is the best on clean Dice "
        f"per task (named in the last column); its corrupted and interactive Dice are that merge's.", "",
        "Splits (calibration for the search, test for this table; pool-training patients excluded):", "", *splits, "",
    ]
    names = singles + ["best uniform"] + [LABELS[v] for v in VARIANTS]
    for kind in KINDS:
        lines += [f"**{kind.capitalize()} Dice**", "",
                  "| set | task | " + " | ".join(names) + " | best uniform merge | best single on calibration |",
                  "|---" * (len(names) + 4) + "|"]
        for r in rows:
            vals = [r[_col(n, kind)] for n in singles] + [r[_col(r["best_uniform"], kind)]] + [
                r.get(_col(v, kind), float("nan")) for v in VARIANTS]  # a run of an older script lacks a column
            top = max(v for v in vals if v == v)
            cell = lambda v: "-" if v != v else f"**{v:.3f}**" if abs(v - top) < 1e-12 else f"{v:.3f}"  # noqa: E731
            lines.append(f"| {r['set']} | {r['task']} | " + " | ".join(cell(v) for v in vals)
                         + f" | {r['best_uniform']} | {r.get('best_single_cal', '-')} |")
        lines.append("")
    lines += ["Task averages per set:", "",
              "| set | Dice | " + " | ".join(names[:len(singles)] + names[-len(VARIANTS):]) + " |",
              "|---" * (len(singles) + len(VARIANTS) + 2) + "|"]
    for s in dict.fromkeys(r["set"] for r in rows):
        rs = [r for r in rows if r["set"] == s]
        for kind in KINDS:
            lines.append(f"| {s} | {kind} | " + " | ".join(
                f"{_avg(rs, _col(n, kind)):.3f}" if all(_col(n, kind) in r for r in rs) else "-"
                for n in singles + list(VARIANTS)) + " |")
    check = targets(rows, singles, args.fine_tuned_sets)
    lines += ["", "## Issue-13 targets (computed by the script)", "", *check, ""]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


TEXT_COLUMNS = ("set", "task", "best_single", "best_uniform", "best_single_cal", "medsamix_s_selection")


def _renamed(column: str) -> str:
    """A column of a CSV written before the guard was turned off by default (stop 20), under today's name: there
    ``medsamix_s`` was the guarded selection and ``medsamix_s_argmax`` the best calibration Dice."""
    for old, new in (("medsamix_s_argmax", "medsamix_s"), ("medsamix_s", "medsamix_s_guarded")):
        if column == old or column.startswith(old + "_") and column[len(old) + 1:] in KINDS:
            return new + column[len(old):]
    return column


def combine(args: argparse.Namespace) -> int:
    """``--combine``: the rows of earlier runs' CSVs and the split lines of their .md files, written as one run.

    A set that several of the runs cover (other seeds or trial counts) is named per run, ``<set> (seed S, T
    trials)``, in the rows and split lines, so each run keeps its own set averages; the S targets count every row."""
    runs: list[tuple[list[dict], list[str], str]] = []
    for path in args.combine:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old = "medsamix_s_argmax" in (reader.fieldnames or ())
            rows = [{_renamed(k) if old else k: v if k in TEXT_COLUMNS else v == "True" if k == "fine_tuned_set"
                     else float(v) for k, v in r.items()} for r in reader]
        text = path.with_suffix(".md").read_text()
        md = text.splitlines()
        seed, trials = re.search(r"; seed (\d+)\.", text), re.search(r"Trials: (\d+) per MedSAMix-S", text)
        runs.append((rows, [line for line in md[:md.index("**Clean Dice**")] if line.startswith("- **")],
                     f"seed {seed.group(1) if seed else '?'}, {trials.group(1) if trials else '?'} trials"))
    count = collections.Counter(name for rows, _, _ in runs for name in dict.fromkeys(r["set"] for r in rows))
    rows, splits = [], []
    for run_rows, run_splits, how in runs:
        for r in run_rows:
            rows.append(dict(r, set=f"{r['set']} ({how})") if count[r["set"]] > 1 else r)
        for line in run_splits:
            name = line[len("- **"):line.index("**", len("- **"))]
            splits.append(line.replace(f"**{name}**", f"**{name} ({how})**", 1) if count[name] > 1 else line)
    singles = list(PoolManifest.load(args.pool).files)  # base first
    write(args, rows, singles, [], splits, float("nan"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
