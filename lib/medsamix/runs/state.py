"""A merge run's search state on disk: SMAC's state checkpointed after every trial (and restored before a resumed
run), and the history CSV.

:func:`checkpoint_search_state` / :func:`restore_search_state` keep a complete copy of SMAC's state and of the
trials log after every trial, so a run killed anywhere (while SMAC rewrites its files, between two records) resumes
from the last finished trial with every finished trial kept and logged exactly once.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

from medsamix.runs.progress import TRIALS_LOG
from medsamix.search.search import Trial

log = logging.getLogger(__name__)

SMAC_DIR = "smac"
CHECKPOINT_PREFIX = "smac.checkpoint-"


def _checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for p in out_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        tail = p.name[len(CHECKPOINT_PREFIX):]
        if p.is_dir() and tail.isdigit():
            found.append((int(tail), p))
    return sorted(found)


def checkpoint_search_state(out_dir: str | Path, done: int) -> Path:
    """Copy SMAC's state (``out_dir/smac``) and the trials log (``out_dir/trials.jsonl``, see :class:`RunMonitor`)
    to ``out_dir/smac.checkpoint-<done>`` atomically and drop older copies.

    SMAC rewrites its JSON files in place after every trial; a process killed in the middle of that (a stop
    request) could leave them cut off. Called after each trial, this keeps a complete copy of the state as it was
    after the last finished trial, which :func:`restore_search_state` puts back before a resumed run. The trials log
    is part of that state: restored with it, every trial SMAC keeps is logged once and a trial SMAC lost (and runs
    again) is not logged twice. Without a ``smac`` folder (``done`` = 0, a new run) the copy is an empty state.
    """
    out_dir = Path(out_dir)
    src = out_dir / SMAC_DIR
    tmp = out_dir / f".{CHECKPOINT_PREFIX}tmp-{uuid.uuid4().hex}"
    try:
        if src.is_dir():
            shutil.copytree(src, tmp)
        else:
            tmp.mkdir()
        trials_log = out_dir / TRIALS_LOG
        if trials_log.is_file():
            shutil.copyfile(trials_log, tmp / TRIALS_LOG)
        else:
            (tmp / TRIALS_LOG).touch()  # empty: no log at this point
        dst = out_dir / f"{CHECKPOINT_PREFIX}{done}"
        if dst.exists():
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for n, p in _checkpoints(out_dir):
        if n != done:  # older ones, or those of a search this one replaced (restart)
            shutil.rmtree(p, ignore_errors=True)
    for pattern in (f".{CHECKPOINT_PREFIX}tmp-*", f".{SMAC_DIR}.restore-*"):  # left by a killed run
        for p in out_dir.glob(pattern):
            shutil.rmtree(p, ignore_errors=True)
    return dst


def restore_search_state(out_dir: str | Path) -> int | None:
    """Put the newest checkpoint of SMAC's state and of the trials log back in place (see
    :func:`checkpoint_search_state`; a checkpoint written before the log was part of it leaves the log alone).

    Returns:
        The number of trials of the restored state, or ``None`` when there is no checkpoint (a new run).
    """
    out_dir = Path(out_dir)
    found = _checkpoints(out_dir)
    if not found:
        return None
    done, ckpt = found[-1]
    live = out_dir / SMAC_DIR
    tmp = out_dir / f".{SMAC_DIR}.restore-{uuid.uuid4().hex}"
    shutil.copytree(ckpt, tmp)
    saved_log = tmp / TRIALS_LOG
    if saved_log.is_file():
        if saved_log.stat().st_size:
            os.replace(saved_log, out_dir / TRIALS_LOG)
        else:
            saved_log.unlink()
            (out_dir / TRIALS_LOG).unlink(missing_ok=True)
    if live.exists():
        shutil.rmtree(live)
    os.rename(tmp, live)
    log.info("%s: search state restored from the checkpoint after %d trials", out_dir, done)
    return done


def write_history(path: str | Path, trials: Sequence[Trial], tasks: Sequence[str]) -> None:
    """One CSV row per trial: number, status, mean Dice, per-task Dice, budget (calibration slices; '' = all),
    stage (``coarse``: one setting per model component; ``groups``: per layer group; ``rescored``: an initial-design
    configuration dropped early by Hyperband, scored on all calibration slices after the search), preprocessing
    style."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "status", "mean_dice", *tasks, "budget", "stage", "preprocessing"])
        for t in trials:
            w.writerow([t.number, t.status, f"{t.mean_dice:.4f}", *(f"{t.dice.get(k, 0):.4f}" for k in tasks),
                        "" if t.budget is None else t.budget, t.stage, t.config.preprocessing or ""])
