"""A merge run killed with kill -9 mid-search and resumed keeps every finished trial exactly once; while it runs, a
second process on the same run folder is refused (scripts/merge_search.py, and run_merge driven as the app does)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY, random_state
from test_merge_run import make_datastore

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "scripts" / "merge_search.py"
TRIALS = 14
TIMEOUT = 600  # seconds for one search process (the tiny pool needs well under a minute)

# The app's merge train task without MONAI Label: plan_run + RunMonitor (trials.jsonl) + run_merge
DRIVER = """
import sys
from pathlib import Path
sys.path.insert(0, {lib!r})
from medsamix.errors import MedSAMixError
from medsamix.data.tasksets import datastore_task_set
from medsamix.runs.options import MergeOptions
from medsamix.runs.plan import plan_run
from medsamix.runs.progress import ProgressFile, RunMonitor
from medsamix.runs.run import run_merge
from medsamix.models.pool import PoolManifest

studies, pool_dir, runs, trials = sys.argv[1:]
manifest = PoolManifest.load(pool_dir)
pool = manifest.load_pool()
plan = plan_run(datastore_task_set(studies, {{1: "ellipsoid"}}), MergeOptions(("ellipsoid",), trials=int(trials)),
                pool, runs)
monitor = RunMonitor(ProgressFile(Path(runs) / "status.json"), plan.out_dir, plan.settings.trials)
try:
    out = run_merge(pool, plan.calibration, plan.test, plan.settings, plan.out_dir, plan.split,
                    on_trial=monitor.on_trial, report=False)
except MedSAMixError as e:
    print(f"error: {{e}}", file=sys.stderr)
    sys.exit(2)
print(f"done {{len(out.result.trials)}} trials in {{plan.out_dir}}")
"""


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    return make_datastore(tmp_path_factory.mktemp("studies"), n=5)


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory) -> Path:
    """A pool folder (pool.yaml + checkpoints) of tiny random models: fast trials."""
    d = tmp_path_factory.mktemp("pool")
    members = []
    for i, alias in enumerate(["sam", "medsam", "medicosam"]):
        torch.save(random_state(TINY, i), d / f"{alias}.pth")
        members.append({"alias": alias, "file": f"{alias}.pth", "preprocessing": {"style": "sam"}})
    (d / "pool.yaml").write_text(yaml.safe_dump({"architecture": TINY.to_dict(), "base": members[0],
                                                 "models": members[1:]}))
    return d


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """A search process; its output goes to ``log`` (a pipe nobody reads could fill up and stall it)."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, *args], stdout=f, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def _wait_for(proc: subprocess.Popen, ready, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the search ended (exit {proc.returncode}) before {what}: {proc.args}")
        time.sleep(0.02)
    raise AssertionError(f"no {what} within {TIMEOUT} s")


def _checkpoint(out: Path) -> int:
    """Trials in the newest checkpoint of SMAC's state (what a resumed run keeps)."""
    done = [int(p.name.rsplit("-", 1)[1]) for p in out.glob("smac.checkpoint-*") if p.name.rsplit("-", 1)[1].isdigit()]
    return max(done, default=0)


def _stop_then_refuse_then_kill(first: subprocess.Popen, ready, second: list[str], out) -> Path:
    """Freeze ``first`` once ``ready``: a second process on the same folder (``out()``, known once the search
    started) must be refused while ``first``, alive and holding the lock, is stopped at an arbitrary point of its
    search; then kill -9 ``first``. Returns the run folder."""
    try:
        _wait_for(first, ready, "a few finished trials")
        first.send_signal(signal.SIGSTOP)
        folder = out()
        res = subprocess.run([sys.executable, *second], capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
        assert res.returncode == 2, res.stderr[-3000:]
        assert f"{folder} is in use" in res.stderr and f"locked by process {first.pid} (started " in res.stderr, \
            res.stderr[-3000:]
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    return folder


def _runhistory(smac_dir: Path) -> list[tuple[str, list[dict]]]:
    """(stage, run-history entries with their configuration) of every SMAC stage under ``smac_dir``."""
    found = []
    for rh in sorted(smac_dir.glob("*/*/runhistory.json")):
        d = json.loads(rh.read_text())
        rows = [{"config": d["configs"][str(row["config_id"])], "budget": row["budget"], "cost": row["cost"]}
                for row in d["data"]]
        found.append((rh.parent.parent.name, rows))
    return found


def _assert_each_trial_once(out: Path, trials: int) -> None:
    """SMAC's run history holds ``trials`` trials, no configuration twice in a stage; history.csv numbers them."""
    stages = _runhistory(out / "smac")
    assert [s for s, _ in stages] == ["coarse", "medsamix"]
    assert sum(len(rows) for _, rows in stages) == trials
    for stage, rows in stages:
        configs = [json.dumps(r["config"], sort_keys=True) for r in rows]
        assert len(set(configs)) == len(configs), f"a configuration evaluated twice in stage {stage}"
    history = (out / "history.csv").read_text().splitlines()[1:]
    assert [int(line.split(",")[0]) for line in history] == list(range(trials))


def _assert_kept(before: list[tuple[str, list[dict]]], out: Path, kept: int) -> None:
    """Every trial of the killed run's checkpoint (``smac.checkpoint-<kept>``: ``kept`` trials) is in the resumed
    run's history, with the same cost."""
    final = {s: {json.dumps(r["config"], sort_keys=True): r["cost"] for r in rows}
             for s, rows in _runhistory(out / "smac")}
    assert sum(len(rows) for _, rows in before) == kept
    for stage, rows in before:
        for r in rows:
            assert final[stage].get(json.dumps(r["config"], sort_keys=True)) == r["cost"]


def _records(lines: list[str]) -> list[dict]:
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:  # cut by the kill
            out.append({"trial": "cut"})
    return out


def test_cli_killed_mid_search_resumes_with_each_trial_once(studies, pool_dir, tmp_path):
    out = tmp_path / "run"
    args = [str(CLI), "--studies", str(studies), "--pool", str(pool_dir), "--task", "label_1", "--trials",
            str(TRIALS), "--out", str(out)]
    _stop_then_refuse_then_kill(_start(args, tmp_path / "first.log"), lambda: _checkpoint(out) >= 3, args,
                                lambda: out)
    kept = _checkpoint(out)
    assert 3 <= kept < TRIALS, kept
    before = _runhistory(out / f"smac.checkpoint-{kept}")
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{TRIALS} trials" in res.stdout
    _assert_each_trial_once(out, TRIALS)
    _assert_kept(before, out, kept)


def test_run_killed_mid_search_keeps_its_trials_log_exact(studies, pool_dir, tmp_path):
    runs = tmp_path / "runs"
    args = ["-c", DRIVER.format(lib=str(ROOT / "lib")), str(studies), str(pool_dir), str(runs), str(TRIALS)]

    def logged() -> list[str]:
        found = list(runs.glob("*/trials.jsonl"))
        return found[0].read_text().splitlines() if found else []

    out = _stop_then_refuse_then_kill(_start(args, tmp_path / "first.log"), lambda: len(logged()) >= 3, args,
                                      lambda: next(runs.glob("*/trials.jsonl")).parent)
    kept = _checkpoint(out)
    assert 2 <= kept < TRIALS, kept
    before = _records(logged())
    smac_before = _runhistory(out / f"smac.checkpoint-{kept}")
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"done {TRIALS} trials" in res.stdout
    records = _records(logged())
    why = f"kept {kept}; before the kill {[r['trial'] for r in before]}; after {[r['trial'] for r in records]}"
    assert [r["trial"] for r in records] == list(range(TRIALS)), why  # each trial once, none lost
    assert records[:kept] == before[:kept], why  # the trials finished before the kill were kept, not run again
    _assert_each_trial_once(out, TRIALS)
    _assert_kept(smac_before, out, kept)
