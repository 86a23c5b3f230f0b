"""A merge run's progress, for a process that watches it from outside (the MONAI Label server process reads it
while the search runs in a subprocess).

:class:`ProgressFile` is a small JSON file replaced atomically; :class:`RunMonitor` fills it after every trial (and
appends the trial to ``trials.jsonl``); :func:`effective_status` reports a run whose process is gone as stopped;
:class:`RunStatus` names the states.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from medsamix.atomic import atomic_write_text
from medsamix.runs.lock import pid_alive
from medsamix.search.search import Trial

log = logging.getLogger(__name__)

TRIALS_LOG = "trials.jsonl"


class ProgressFile:
    """A small JSON status file replaced atomically (readers see the old or the new content, never a mix)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def write(self, data: Mapping[str, Any]) -> None:
        atomic_write_text(self.path, json.dumps(dict(data), indent=2, default=str))

    def update(self, **fields: Any) -> dict[str, Any]:
        """Read, update with ``fields`` and write back; returns the new content."""
        data = self.read()
        data.update(fields)
        self.write(data)
        return data

    def read(self) -> dict[str, Any]:
        """The content, or ``{}`` when the file does not exist or is unreadable."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}


class RunStatus(StrEnum):
    """The ``status`` of a merge run's progress file (a ``str``: written to and read from JSON as its value)."""

    IDLE = "idle"  # no run yet (reported by the app; never written)
    PREPARING = "preparing"  # loading data and pool, planning
    RUNNING = "running"  # searching
    FINISHING = "finishing"  # search done: scoring, writing the recipe, publishing, the report
    DONE = "done"
    FAILED = "failed"
    STOPPED = "stopped"  # the run's process ended while the run was active (see :func:`effective_status`)


ACTIVE = (RunStatus.PREPARING, RunStatus.RUNNING, RunStatus.FINISHING)


class RunMonitor:
    """Reports a run's progress in a :class:`ProgressFile` in the keys MONAI Label clients read (``epoch`` = trials
    done, ``total_epochs`` = trials, ``best_metric`` = best calibration Dice so far) and appends every trial to
    ``<out_dir>/trials.jsonl`` (so that a resumed run reports the trials it already has at once). Under
    :func:`run_merge` the log is part of the run's checkpoints: a resumed run puts it back as it was after the last
    checkpointed trial (a trial logged after that is run and logged again, once).

    ``best_metric`` counts trials scored on all calibration slices only (multi-fidelity trials on a subset are not
    comparable), unless no trial reached the full budget yet.
    """

    def __init__(self, progress: ProgressFile, out_dir: str | Path, total: int) -> None:
        self.progress = progress
        self.log_path = Path(out_dir) / TRIALS_LOG
        self.total = total
        self.done = 0
        self.best_full: float | None = None
        self.best_any: float | None = None
        for rec in self._records():
            self._count(float(rec.get("mean_dice", 0.0)), rec.get("status") == "ok", rec.get("budget"))
            self.done = max(self.done, int(rec.get("trial", -1)) + 1)

    def _records(self) -> list[dict[str, Any]]:
        try:
            lines = self.log_path.read_text().splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut by a kill: the trial itself is safe in SMAC's history
                continue
        return out

    def _count(self, dice: float, ok: bool, budget: int | None) -> None:
        if not ok:
            return
        self.best_any = dice if self.best_any is None else max(self.best_any, dice)
        if budget is None:
            self.best_full = dice if self.best_full is None else max(self.best_full, dice)

    @property
    def best(self) -> float | None:
        return self.best_full if self.best_full is not None else self.best_any

    def fields(self) -> dict[str, Any]:
        """``epoch``, ``total_epochs`` and ``best_metric`` (0.0 before the first successful trial)."""
        return {"epoch": self.done, "total_epochs": self.total, "best_metric": self.best or 0.0}

    def on_trial(self, trial: Trial, done: int) -> None:
        """``run_search``'s callback: log the trial and update the progress file."""
        self.done = done
        ok = trial.status == "ok"
        self._count(trial.mean_dice, ok, trial.budget)
        rec = {"trial": trial.number, "status": trial.status, "mean_dice": round(trial.mean_dice, 6),
               "dice": trial.dice, "budget": trial.budget}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        last = f"Dice {trial.mean_dice:.4f}" if ok else trial.status
        if trial.budget is not None:
            last += f" on {trial.budget} calibration slices"
        message = f"trial {done}/{self.total}: {last}; best {self.best or 0.0:.4f}"
        log.info(message)
        self.progress.update(**self.fields(), last_trial=rec, message=message)


def effective_status(data: Mapping[str, Any]) -> dict[str, Any]:
    """The progress file's content as it really stands: a run still marked active whose process is gone (killed
    by a stop request, or crashed hard) is reported as ``stopped``, with what it had done. The file's ``pid`` and
    optional ``pid_started`` (:func:`process_started`) identify the run's process."""
    out = dict(data)
    if out.get("status") in ACTIVE and not pid_alive(out.get("pid"), out.get("pid_started")):
        out["status"] = RunStatus.STOPPED
        out["message"] = (f"stopped after {out.get('epoch', 0)}/{out.get('total_epochs', '?')} trials (the run's "
                          "process ended); ask again with the same settings to resume")
    return out
