#!/usr/bin/env python
"""Baselines: every pool model and the uniform merges, on each task's test split.

    .venv/bin/python scripts/benchmark.py --studies ../shared/data --pool sample-data/pool --out results/baseline

Models: each pool member with its own preprocessing, and the uniform merges of the whole pool (linear with equal
weights, SLERP t=0.5, task arithmetic 0.5, TIES keep 0.5 / scale 0.5) with the preprocessing given by
--merged-preprocessing (default: the base model's). Box prompts are the tight ground-truth boxes.
Metric: slice-averaged 2D Dice per task (and per-volume 3D Dice in the CSV). Writes ``<out>.md``, ``<out>.csv``
and ``<out>.png``; the Markdown file records the exact command.

Patients used to train a pool model (``training_studies`` in pool.yaml) never enter a calibration or test split.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medsamix.data.tasks import training_study_ids
from medsamix.merging.config import MergeConfig, uniform_merges
from medsamix.search.evaluate import Evaluator
from medsamix.merging.merger import Merger
from medsamix.models.pool import PoolManifest
from medsamix.models.preprocess import Preprocessor
from medsamix.demo.shared_data import shared_task_sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data",
                    help="the shared real-image data root")
    ap.add_argument("--pool", type=Path, default=Path("sample-data/pool"))
    ap.add_argument("--sets", default="hippocampus,totalseg_ct,totalseg_mr,dcmqi_ct,sammed2d")
    ap.add_argument("--out", type=Path, default=Path("results/baseline"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-patients", type=int, default=None, help="limit the hippocampus patients (quick runs)")
    ap.add_argument("--merged-preprocessing", choices=["sam", "medsam"], default=None)
    args = ap.parse_args()
    if not args.studies.is_dir():
        sys.exit(f"error: {args.studies}: data folder not found")
    t0 = time.time()
    manifest = PoolManifest.load(args.pool)
    pool = manifest.load_pool()
    merger = Merger(pool)
    size = manifest.arch.img_size
    merged_style = args.merged_preprocessing or manifest.styles[manifest.base]
    exclude = training_study_ids(manifest.training_studies)
    sets = shared_task_sets(args.studies, exclude=exclude, seed=args.seed, names=args.sets.split(","),
                            max_patients=args.max_patients)

    models: dict[str, tuple[MergeConfig, Preprocessor]] = {}
    for alias in pool.aliases:
        cfg = MergeConfig.uniform(merger.groups, "pick", {"source": alias})
        models[alias] = (cfg, Preprocessor(manifest.styles[alias], size))
    for name, cfg in uniform_merges(merger.groups, pool.aliases).items():
        models[name] = (cfg, Preprocessor(merged_style, size))

    rows = []  # (set, task, model, dice2d, dice3d, n_slices)
    bar = tqdm(total=len(sets) * len(models), desc="evaluating", unit="model")
    for ts in sets:
        if not ts.test:
            continue
        ev = Evaluator(ts.test, batch_size=16, cache_size=1)
        for name, (cfg, prep) in models.items():
            merger.apply(cfg)
            res = ev.evaluate(merger.model, prep, key=merger.encoder_fingerprint(cfg))
            counts = {t: sum(s.task.name == t for s in ts.test) for t in res.dice2d}
            for task in res.dice2d:
                rows.append((ts.name, task, name, res.dice2d[task], res.dice3d[task], counts[task]))
            bar.update(1)
    bar.close()

    write_outputs(args, rows, sets, list(models), models, pool.aliases, time.time() - t0)


def write_outputs(args: argparse.Namespace, rows: list, sets: list, names: list[str], models: dict,
                  aliases: list[str], seconds: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task_set", "task", "model", "dice2d", "dice3d", "test_slices"])
        for r in rows:
            w.writerow([r[0], r[1], r[2], f"{r[3]:.4f}", f"{r[4]:.4f}", r[5]])
    table: dict[tuple[str, str], dict[str, float]] = {}
    for s, t, m, d2, _, _ in rows:
        table.setdefault((s, t), {})[m] = d2
    lines = [
        "# Baselines: pool models and uniform merges (test splits, box prompts, 2D Dice)",
        "",
        f"Command: `.venv/bin/python {' '.join(sys.argv)}`  ",
        f"Run time: {seconds / 60:.1f} min on this machine. Preprocessing: "
        + ", ".join(f"{n}={models[n][1].style}" for n in names) + ".",
        "",
        "Splits (patients used to train pool models are excluded):",
        "",
    ]
    lines += [f"- **{ts.name}**: {ts.split}; {len(ts.test)} test slices" for ts in sets]
    lines += ["", "| task set | task | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    set_means: dict[str, dict[str, list[float]]] = {}
    for (s, t), scores in table.items():
        best = max(scores.values())
        cells = [f"**{scores[n]:.3f}**" if scores[n] == best else f"{scores[n]:.3f}" for n in names]
        lines.append(f"| {s} | {t} | " + " | ".join(cells) + " |")
        for n in names:
            set_means.setdefault(s, {}).setdefault(n, []).append(scores[n])
    lines += ["", "Mean over the tasks of each set:", "", "| task set | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    for s, per in set_means.items():
        lines.append(f"| {s} | " + " | ".join(f"{np.mean(per[n]):.3f}" for n in names) + " |")
    base = aliases[0]
    lines += ["", "Specialists against the base (tasks where each is better / worse by more than 0.01 Dice):", ""]
    for alias in aliases[1:]:
        better = [f"{s}/{t}" for (s, t), sc in table.items() if sc[alias] > sc[base] + 0.01]
        worse = [f"{s}/{t}" for (s, t), sc in table.items() if sc[alias] < sc[base] - 0.01]
        lines.append(f"- **{alias}** beats {base} on {len(better)} tasks and loses on {len(worse)}: "
                     f"better on {', '.join(better[:12])}{' ...' if len(better) > 12 else ''}; "
                     f"worse on {', '.join(worse[:12])}{' ...' if len(worse) > 12 else ''}")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(set_means), 4.5))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        ax.bar(np.arange(len(set_means)) + i * width, [np.mean(set_means[s][n]) for s in set_means], width, label=n)
    ax.set_xticks(np.arange(len(set_means)) + 0.4 - width / 2, list(set_means))
    ax.set_ylabel("mean 2D Dice (test)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Pool models and uniform merges")
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=110)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
