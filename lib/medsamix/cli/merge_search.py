"""MedSAMix search from the command line (``medsamix-merge-search``, or ``.venv/bin/python scripts/merge_search.py``).

    # one task (MedSAMix-S) on a MONAI Label datastore folder (images + labels/final)
    medsamix-merge-search --studies /data/studies --pool sample-data/pool \
        --task label_1 --trials 120 --out runs/s1

    # several tasks (MedSAMix-M, ParEGO) on a task set of the shared real-image data
    medsamix-merge-search --shared-set totalseg_ct --task liver --task spleen --out runs/m1

Calibration = 20% of the patients (slabs of slices for single-volume sets and for a datastore with one labelled
study), test = the rest. The merged model's preprocessing style is searched (``prep:style``; each pool model enters
the initial design with its own) unless --preprocessing fixes it. Writes into --out:
``recipe.yaml`` (the selected configuration with calibration and test Dice), ``merged.pth`` (plain
segment_anything layout, written atomically), ``history.csv``, ``report.md``, SMAC's state under ``smac/`` and a
copy of it after the last finished trial (``smac.checkpoint-<n>/``). Re-running the same command resumes an
interrupted search (from that copy, so a kill while SMAC rewrites its files loses nothing); a different command on
the same --out is refused unless --restart; a second process on an --out while one searches there is refused with
the first one's pid and start time (``medsamix.runs.lock``). The last line also says whether the merge passes the no-regression
guard (calibration Dice not below the best single pool model's with its own preprocessing, plus --min-gain), as the
server's ``merge`` train task decides before publishing (``medsamix.runs.run``).

--warm-start RECIPE seeds the search with the configuration of an earlier run's recipe (same pool and grouping),
e.g. a --robust search started from the clean-only search of the same tasks.

--publish DIR publishes a promoted merge into the served model folder DIR exactly as the train task does
(``medsamix.runs.publish.publish_outcome``: ``DIR/versions/<version>/{recipe.yaml,merged.pth}`` and
``DIR/current.json``, written atomically; a run already served there is not published twice), e.g.
``--publish apps/medsamix/model/merged`` for the app's ``medsamix`` infer task, which picks it up without a restart.
A merge that is not promoted is not published: the command says why and exits with status 3 (the run's files are
in --out all the same).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

from medsamix.cli import SHARED_DATA
from medsamix.errors import ConfigError, MedSAMixError
from medsamix.merging.config import MergeConfig
from medsamix.merging.recipe import Recipe, check_checksums
from medsamix.data.tasks import read_label_names, training_study_ids
from medsamix.data.tasksets import datastore_task_set, select_tasks
from medsamix.runs.options import parse_min_gain
from medsamix.runs.plan import RunPlan, run_name, search_context
from medsamix.runs.publish import NotPromotedError, publish_outcome
from medsamix.runs.run import MergeOutcome, run_merge
from medsamix.models.pool import PoolManifest
from medsamix.models.preprocess import STYLES
from medsamix.search.corruptions import robust_tasks, with_corrupted
from medsamix.search.search import SearchSettings, budget_problem, ct_windows_for
from medsamix.demo.shared_data import shared_task_sets



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--studies", type=Path, help="MONAI Label datastore folder (images + labels/final)")
    src.add_argument("--shared-set", help="a task set of the shared data: hippocampus, totalseg_ct, ...")
    ap.add_argument("--shared-root", type=Path, default=SHARED_DATA)
    ap.add_argument("--label-names", type=Path,
                    help="label names of --studies: JSON {value: name} or {name: value}, or comma-separated names")
    ap.add_argument("--pool", type=Path, default=Path("sample-data/pool"))
    ap.add_argument("--task", action="append", required=True, help="task name; repeat for MedSAMix-M")
    ap.add_argument("--trials", type=int, default=120)
    ap.add_argument("--granularity", type=int, default=2, choices=[1, 2, 3, 4])
    ap.add_argument("--separate", action="store_true")
    ap.add_argument("--preprocessing", choices=list(STYLES), default=None,
                    help="fix the merged model's preprocessing style (default: searched)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--objective", choices=["box", "interactive"], default="box",
                    help="what a configuration is scored on: box prompts, or the interactive protocol (the box, then "
                         "--rounds correction clicks in the largest error region; Dice averaged over the rounds)")
    ap.add_argument("--rounds", type=int, default=3, help="correction rounds of --objective interactive")
    ap.add_argument("--robust", action="store_true",
                    help="add the corrupted Dice of every task as an objective (<task>@corrupted: the same slices "
                         "under a seeded suite of noise, blur, motion, bias field and low contrast), so the search "
                         "(ParEGO) trades clean against corrupted Dice; the report gets both rows")
    ap.add_argument("--warm-start", type=Path, default=None, metavar="RECIPE",
                    help="recipe.yaml of an earlier search over the same pool and --granularity (e.g. a clean-only "
                         "MedSAMix-M run before a --robust one): its configuration joins the initial design, so this "
                         "search scores it and can select it")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--restart", action="store_true", help="discard an incompatible history in --out")
    ap.add_argument("--min-budget", type=int, default=None,
                    help="multi-fidelity (one task): fewest calibration slices per trial; Hyperband promotes the "
                         "promising configurations up to all slices")
    ap.add_argument("--eta", type=int, default=3, help="multi-fidelity: Hyperband's factor between budgets")
    ap.add_argument("--coarse-share", type=float, default=SearchSettings.coarse_share,
                    help="share of the trials spent first on a coarse search with one setting per model component "
                         "(image encoder, prompt encoder, mask decoder); 0 = per-group search only")
    ap.add_argument("--workers", type=int, default=0,
                    help="run trials in parallel on a local Dask cluster of this many worker processes")
    ap.add_argument("--scheduler", default=None,
                    help="address of an existing Dask scheduler (other GPUs or machines); overrides --workers")
    ap.add_argument("--naive", action="store_true",
                    help="reference loop for comparison: reload checkpoints and re-encode every slice each trial")
    ap.add_argument("--max-patients", type=int, default=None)
    ap.add_argument("--min-gain", type=float, default=0.0,
                    help="calibration Dice the merge must gain over the best single pool model to be promoted")
    ap.add_argument("--publish", type=Path, default=None, metavar="DIR",
                    help="publish the merge, if promoted, into this served model folder as the app's train task "
                         "does (e.g. apps/medsamix/model/merged); exit status 3 when it is not promoted")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("smac").setLevel(logging.WARNING)  # SMAC's per-trial chatter would drown the progress bar
    try:
        if args.publish is not None and args.publish.exists() and not args.publish.is_dir():
            raise MedSAMixError(f"--publish {args.publish}: not a folder")
        parse_min_gain(args.min_gain, "--min-gain")
        manifest = PoolManifest.load(args.pool)
        pool = manifest.load_pool()
        exclude = training_study_ids(manifest.training_studies)
        if args.studies:
            names = read_label_names(args.label_names) if args.label_names else {}
            ts = datastore_task_set(args.studies, names, args.seed)
        else:
            ts = shared_task_sets(args.shared_root, exclude, args.seed, [args.shared_set], args.max_patients)[0]
        cal, test = select_tasks(ts, args.task)
        tasks = tuple(args.task)
        if args.objective == "interactive" and args.rounds < 1:
            raise MedSAMixError(f"--rounds must be >= 1 for --objective interactive, got {args.rounds}")
        problem = budget_problem(args.min_budget, len(tasks), len(cal), robust=args.robust)
        if problem:
            raise MedSAMixError(f"--min-budget: {problem}")
        if args.robust:
            cal, test, tasks = with_corrupted(cal, args.seed), with_corrupted(test, args.seed), robust_tasks(tasks)
        warm = [warm_start(args.warm_start, pool.checksums, args.granularity, args.separate)] if args.warm_start else []
        print(f"data: {ts.name}: {ts.split}", flush=True)
        settings = SearchSettings(tasks=tasks, trials=args.trials, granularity=args.granularity,
                                  separate=args.separate, seed=args.seed, preprocessing=args.preprocessing,
                                  own_styles=tuple(pool.styles.items()), naive=args.naive,
                                  min_budget=args.min_budget, eta=args.eta, coarse_share=args.coarse_share,
                                  rounds=args.rounds if args.objective == "interactive" else 0,
                                  ct_windows=ct_windows_for(cal))  # CT data: the window is searched too
        bar = tqdm(total=args.trials, desc="search", unit="trial")
        best = [0.0]

        def progress(trial, done):  # noqa: ANN001
            best[0] = max(best[0], trial.mean_dice)
            bar.n = done
            bar.set_postfix(best=f"{best[0]:.3f}", last=f"{trial.mean_dice:.3f}")
            bar.refresh()

        plan = RunPlan(run_name(settings, search_context(pool, cal, ts.split)), args.out, settings, cal, test,
                       ts.split, [t.name for t in ts.tasks])
        published: list[str] = []
        refused: list[NotPromotedError] = []

        def ready(outcome: MergeOutcome) -> None:  # publish before the (long) report, as the train task does
            if args.publish is not None:
                try:
                    published.append(publish_outcome(args.publish, plan, outcome).version)
                except NotPromotedError as e:
                    refused.append(e)

        t0 = time.time()
        client = None
        if args.scheduler or args.workers > 0:
            from distributed import Client, LocalCluster

            client = Client(args.scheduler) if args.scheduler else Client(
                LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=None))
        try:
            outcome = run_merge(pool, cal, test, settings, args.out, ts.split, args.restart, progress, client,
                                min_gain=args.min_gain, on_ready=ready, warm=warm)
        finally:
            if client is not None:
                client.close()
        bar.close()
    except MedSAMixError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = outcome.result
    print(f"best calibration Dice {result.best.dice} ({outcome.recipe.style} preprocessing), test Dice "
          f"{outcome.test_dice}, {len(result.trials)} trials, "
          f"{result.encoder_passes} encoder passes; search {result.seconds:.0f} s, with test scoring and report "
          f"{time.time() - t0:.0f} s; {outcome.promotion.reason}; "
          f"wrote {args.out}")
    if refused:
        print(f"error: {refused[0]}", file=sys.stderr)
        return 3
    if published:
        print(f"published version {published[0]} to {args.publish}")
    return 0


def warm_start(path: Path, checksums: dict[str, str], granularity: int, separate: bool) -> MergeConfig:
    """The configuration of the recipe at ``path`` (with its preprocessing) for a search over the pool with
    ``checksums`` (alias -> sha256) and this grouping.

    Raises:
        MedSAMixError: naming the file: unreadable or invalid recipe, other pool models, other grouping.
    """
    recipe = Recipe.load(path)  # ConfigError (a MedSAMixError) naming the file and field
    try:
        check_checksums(recipe, checksums)
    except ConfigError as e:
        raise MedSAMixError(f"--warm-start {path}: {e}") from None
    if (recipe.merge.granularity, recipe.merge.separate) != (granularity, separate):
        raise MedSAMixError(f"--warm-start {path}: merge.granularity {recipe.merge.granularity} / separate "
                            f"{recipe.merge.separate} differ from this search's {granularity} / {separate}")
    return recipe.config


if __name__ == "__main__":
    raise SystemExit(main())
