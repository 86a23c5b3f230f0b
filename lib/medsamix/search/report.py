"""The search report: best-so-far curve, Pareto front, per-group method map and per-task comparison tables.

Besides formatting what a search produced (:class:`~medsamix.search.search.SearchResult`), :func:`uniform_scores` scores
the uniform merges a searched merge must beat (the single models are scored by
:func:`medsamix.runs.promotion.single_model_scores`, each with its own preprocessing). Figures are written with matplotlib's non-interactive Agg backend.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medsamix.merging.config import GroupSetting, MergeConfig
from medsamix.search.search import SearchResult, SearchSettings, Trial

Scores = Mapping[str, Mapping[str, float]]  # model name -> task -> Dice


def best_so_far(trials: Sequence[Trial]) -> list[float]:
    """Best mean calibration Dice among full-budget, successful trials up to each trial (NaN before the first)."""
    best, out = math.nan, []
    for t in trials:
        if t.status == "ok" and t.budget is None and not (t.mean_dice <= best):
            best = t.mean_dice
        out.append(best)
    return out


def plot_progress(trials: Sequence[Trial], path: str | Path, title: str = "") -> None:
    """Every trial's mean calibration Dice (colour = budget in slices; full budget in black), the best-so-far
    curve of full-budget trials, and where the per-group stage begins after a coarse stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ok = [t for t in trials if t.status == "ok"]
    low = [t for t in ok if t.budget is not None]
    full = [t for t in ok if t.budget is None]
    if low:
        sc = ax.scatter([t.number for t in low], [t.mean_dice for t in low], c=[t.budget for t in low], s=12,
                        cmap="viridis", label="partial budget")
        fig.colorbar(sc, ax=ax, label="calibration slices")
    ax.scatter([t.number for t in full], [t.mean_dice for t in full], s=14, c="black", label="all slices")
    crashed = [t for t in trials if t.status != "ok"]
    if crashed:
        ax.scatter([t.number for t in crashed], [0.0] * len(crashed), marker="x", c="red", label="crashed")
    ax.step(range(len(trials)), best_so_far(trials), where="post", c="tab:red", label="best so far")
    groups_start = next((t.number for t in trials if t.stage == "groups"), None)
    if groups_start:  # a coarse stage (one setting per model component) came first
        ax.axvline(groups_start - 0.5, c="grey", ls="--", lw=1, label="coarse | per-group stage")
    ax.set_xlabel("trial")
    ax.set_ylabel("mean calibration Dice")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pareto(result: SearchResult, tasks: Sequence[str], path: str | Path, title: str = "") -> None:
    """Per-task calibration Dice of full-budget trials for every pair of tasks; the Pareto front is highlighted
    and the selected configuration starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(itertools.combinations(tasks, 2))[:6]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 4), squeeze=False)
    full = [t for t in result.trials if t.status == "ok" and t.budget is None]
    for ax, (a, b) in zip(axes[0], pairs):
        ax.scatter([t.dice[a] for t in full], [t.dice[b] for t in full], s=10, c="0.6", label="trials")
        front = sorted(result.pareto, key=lambda t: t.dice[a])
        ax.plot([t.dice[a] for t in front], [t.dice[b] for t in front], "o-", c="tab:blue", ms=5,
                label="Pareto front (all tasks)")
        ax.scatter([result.best.dice[a]], [result.best.dice[b]], marker="*", s=180, c="tab:red", zorder=3,
                   label="selected")
        ax.set_xlabel(f"{a} Dice")
        ax.set_ylabel(f"{b} Dice")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _params(setting: GroupSetting) -> str:
    parts = []
    for k, v in setting.params.items():
        if isinstance(v, Mapping):
            parts.append(f"{k}=" + "/".join(f"{a}:{w:.2f}" for a, w in v.items()))
        elif isinstance(v, float):
            parts.append(f"{k}={v:.2f}")
        else:
            parts.append(f"{k}={v}")
    return ", ".join(parts)


def method_map(config: MergeConfig) -> str:
    """Markdown table of the merge method and hyper-parameters of every group (the paper's Table 5)."""
    lines = ["| group | method | hyper-parameters |", "|---|---|---|"]
    for name, setting in config.groups.items():
        lines.append(f"| {name} | {setting.method} | {_params(setting)} |")
    return "\n".join(lines)


def comparison_table(scores: Scores, tasks: Sequence[str], highlight: str | None = None) -> str:
    """Markdown table, a row per task plus the mean, a column per model; the best of each row in bold."""
    names = list(scores)
    lines = ["| task | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    rows = [(t, [scores[n].get(t, math.nan) for n in names]) for t in tasks]
    if len(tasks) > 1:
        rows.append(("**mean**", [sum(scores[n].get(t, math.nan) for t in tasks) / len(tasks) for n in names]))
    for task, values in rows:
        top = max((v for v in values if not math.isnan(v)), default=math.nan)
        cells = [f"**{v:.3f}**" if math.isclose(v, top) else f"{v:.3f}" for v in values]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    if highlight:
        lines.append(f"\n`{highlight}` is the searched merge; bold = best of the row.")
    return "\n".join(lines)


def write_report(out_dir: str | Path, result: SearchResult, settings: SearchSettings,
                 calibration: Scores, test: Scores, header: Sequence[str] = ()) -> Path:
    """Write ``report.md`` (with ``progress.png`` and, for several tasks, ``pareto.png``) into ``out_dir``.

    Args:
        result: The finished search.
        settings: Its settings.
        calibration: Model name -> task -> calibration Dice, including the searched merge under ``"medsamix"``.
        test: The same on the test split (may be empty when there is no test split).
        header: Extra lines (command, data split, timings) printed under the title.
    """
    out = Path(out_dir)
    mode = "MedSAMix-M (ParEGO)" if settings.multi else "MedSAMix-S"
    plot_progress(result.trials, out / "progress.png", f"{mode}: {', '.join(settings.tasks)}")
    lines: list[str] = [f"# {mode} search report", "", *header, ""]
    ok = sum(t.status == "ok" for t in result.trials)
    full = sum(t.status == "ok" and t.budget is None for t in result.trials)
    lines += [f"Trials: {len(result.trials)} ({ok} ok, {len(result.trials) - ok} failed, {full} on all calibration "
              f"slices); image-encoder passes: {result.encoder_passes}; granularity {settings.granularity}"
              f"{', attn/mlp/norm separate' if settings.separate else ''}; seed {settings.seed}; search wall time "
              f"{result.seconds:.0f} s.", ""]
    objective = (f"the interactive protocol (the box, then {settings.rounds} correction clicks at the centre of the "
                 "largest error region; a slice's Dice is its mean over the rounds)" if settings.rounds
                 else "box prompts")
    lines += [f"Objective: Dice of {objective}" + ("; a task `<task>@corrupted` is the same slices under the seeded "
              "corruption suite (noise, blur, motion, bias field, low contrast; two severities)"
              if any(t.endswith("@corrupted") for t in settings.tasks) else "") + ".", ""]
    stages = {k: sum(t.stage == k for t in result.trials) for k in ("coarse", "groups", "rescored")}
    if stages["coarse"]:
        rescored = (f", and {stages['rescored']} initial-design configurations dropped early by Hyperband were scored "
                    "on all calibration slices" if stages["rescored"] else "")
        source = {"coarse": "the coarse stage", "groups": "the per-group stage",
                  "guard": "the single-model guard"}.get(result.best.stage, "the rescoring")
        lines += [f"Stages: {stages['coarse']} trials of a coarse search (one method and its parameters per model "
                  f"component), then {stages['groups']} per layer group, starting from the coarse stage's "
                  f"best{rescored}; the selected configuration comes from {source}.", ""]
    if result.selection:
        lines += [f"Selection: {result.selection}.", ""]
    lines += ["## Best so far", "", "![progress](progress.png)", ""]
    if settings.multi:
        plot_pareto(result, settings.tasks, out / "pareto.png", "calibration Dice")
        lines += ["## Pareto front", "", f"SMAC's multi-objective aggregation: {result.aggregation}. Selection rule: "
                  "the front member with the best mean calibration Dice.", "", "![pareto](pareto.png)", "",
                  "| trial | " + " | ".join(settings.tasks) + " | mean |", "|---" * (len(settings.tasks) + 2) + "|"]
        for t in sorted(result.pareto, key=lambda t: -t.mean_dice):
            star = " (selected)" if t is result.best else ""
            lines.append(f"| {t.number}{star} | " + " | ".join(f"{t.dice[k]:.3f}" for k in settings.tasks)
                         + f" | {t.mean_dice:.3f} |")
        lines.append("")
    lines += ["## Per-task Dice against the single models and the uniform merges", "",
              "Calibration split:", "", comparison_table(calibration, settings.tasks, "medsamix"), ""]
    if test:
        lines += ["Test split (never seen by the search):", "", comparison_table(test, settings.tasks, "medsamix"), ""]
    style = result.best.config.preprocessing
    how = "fixed by the settings" if settings.preprocessing else "searched (`prep:style`)"
    lines += ["## Selected configuration, group by group", "",
              *([f"Preprocessing: {style} ({how})."] + [""] if style else []),
              *([f"CT window: {window} (searched, `prep:window`, among {', '.join(settings.ct_windows)})."] + [""]
                if (window := result.best.config.ct_window) else []),
              method_map(result.best.config), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def uniform_scores(merger: Any, evaluator: Any, settings: SearchSettings,
                   known: Sequence[Trial] = ()) -> dict[str, dict[str, float]]:
    """Dice per task of every uniform merge (:func:`~medsamix.merging.config.uniform_merges`) with the style they have in
    the initial design (the base model's: :meth:`~medsamix.search.search.SearchSettings.design_style`); configurations
    already measured at full budget in ``known`` (trials on ``evaluator``'s slices) are not scored again.
    ``merger``'s model is overwritten."""
    from medsamix.merging.config import uniform_merges
    from medsamix.search.search import score

    style = settings.design_style(merger.aliases[0])
    out: dict[str, dict[str, float]] = {}
    for name, config in uniform_merges(merger.groups, merger.aliases, settings.granularity,
                                       settings.separate, style).items():
        found = next((t for t in known if t.status == "ok" and t.budget is None and t.config == config), None)
        out[name] = dict(found.dice) if found else score(merger, evaluator, config, settings.tasks)
    return out


__all__ = ["best_so_far", "plot_progress", "plot_pareto", "method_map", "comparison_table", "write_report",
           "uniform_scores"]
