"""Planning a merge run: the options and the data -> search settings, slices and a stable run folder.

:func:`run_name` gives every combination of settings and data a stable output folder name, so a stopped run resumes
when it is asked for again with the same settings; :func:`plan_run` checks everything that can be checked before the
search starts.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medsamix.data.slices import SliceSample
from medsamix.data.tasksets import ONE_STUDY_SPLIT, TaskSet, select_tasks
from medsamix.errors import MergeRunError
from medsamix.models.pool import ModelPool
from medsamix.runs.options import MergeOptions
from medsamix.search.corruptions import robust_tasks, with_corrupted
from medsamix.search.settings import SearchSettings, budget_problem, ct_windows_for, settings_key

def search_context(pool: ModelPool, calibration: Sequence[SliceSample], split: str) -> dict[str, Any]:
    """Facts besides the settings that must match for a search to resume: the pool, the calibration studies."""
    return {"pool": pool.checksums, "calibration": sorted({s.study_id for s in calibration}), "set": split}


def run_name(settings: SearchSettings, context: Mapping[str, Any]) -> str:
    """A stable folder name for a search: readable settings and a hash of everything that defines the search.

    Equal settings on equal data (pool checksums, calibration studies) give the same name, so asking again
    resumes; other settings or new labelled studies give another folder instead of an incompatible-history error.
    A fixed preprocessing style shows as ``prep_<style>`` (a searched one adds nothing); the hash covers it and
    the pool models' own styles (the initial design), so a changed search space is another run.
    """
    tasks = "+".join(re.sub(r"[^A-Za-z0-9_.-]", "_", t) for t in settings.tasks)[:60]
    parts = [tasks, f"t{settings.trials}", f"g{settings.granularity}{'s' if settings.separate else ''}",
             f"seed{settings.seed}"]
    if settings.preprocessing is not None:
        parts.append(f"prep_{settings.preprocessing}")
    if settings.min_budget is not None:
        parts.append(f"mb{settings.min_budget}")
    return "-".join(parts) + "-" + settings_key(settings, dict(context))[:10]


@dataclasses.dataclass
class RunPlan:
    """A merge run ready to start: its settings, slices and stable output folder."""

    name: str
    out_dir: Path
    settings: SearchSettings
    calibration: list[SliceSample]
    test: list[SliceSample]
    split: str
    available_tasks: list[str]

    @property
    def variant(self) -> str:
        return "MedSAMix-M" if self.settings.multi else "MedSAMix-S"

    @property
    def one_study(self) -> bool:
        """Whether calibration and test are slabs of a single labelled study (:func:`one_study_task_set`)."""
        return self.split.startswith(ONE_STUDY_SPLIT)


def plan_run(task_set: TaskSet, options: MergeOptions, pool: ModelPool, runs_dir: str | Path) -> RunPlan:
    """Choose tasks, slices, settings and the run folder ``runs_dir/<run_name>``; each pool model's own
    preprocessing style is its member's (:attr:`~medsamix.models.pool.ModelPool.styles`).

    Raises:
        MergeRunError: unknown task, too few calibration slices, multi-fidelity with several tasks or a
            ``min_budget`` not below the number of calibration slices.
    """
    available = [t.name for t in task_set.tasks]
    tasks = options.tasks or tuple(available)
    cal, test = select_tasks(task_set, tasks)
    problem = budget_problem(options.min_budget, len(tasks), len(cal), f"task {tasks[0]!r}", options.robust)
    if problem:
        raise MergeRunError(problem)
    if options.robust:
        cal, test, tasks = with_corrupted(cal, options.seed), with_corrupted(test, options.seed), robust_tasks(tasks)
    settings = dataclasses.replace(options.settings(tasks, pool.styles),
                                   ct_windows=ct_windows_for(cal))  # CT data: the window is searched too
    name = run_name(settings, search_context(pool, cal, task_set.split))
    return RunPlan(name, Path(runs_dir) / name, settings, cal, test, task_set.split, available)
