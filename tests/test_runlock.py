"""medsamix.runs.lock: one process per run folder, refused clearly, released by the kernel even on kill -9."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from medsamix.runs.lock import LOCK_FILE, RunLock, RunLockedError, discard_run

LIB = Path(__file__).resolve().parents[1] / "lib"

# the children load medsamix.runs.lock alone (not the package's __init__, which imports torch: seconds per process)
LIGHT = """
import sys, types
pkg = types.ModuleType("medsamix")
pkg.__path__ = [{lib!r} + "/medsamix"]
sys.modules["medsamix"] = pkg
"""

HOLD = LIGHT + """
import time
from medsamix.runs.lock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""

TRY = LIGHT + """
from medsamix.runs.lock import RunLock, RunLockedError
try:
    with RunLock(sys.argv[1]):
        print("acquired")
except RunLockedError as e:
    print(e)
    sys.exit(3)
"""


def _python(code: str, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code.format(lib=str(LIB)), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _wait_locked(proc: subprocess.Popen, folder: Path, timeout: float = 120.0) -> None:
    """Until ``proc`` holds the lock of ``folder`` (its record in the lock file names it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"holder ended: {proc.communicate()}"
        try:
            if json.loads((folder / LOCK_FILE).read_text()).get("pid") == proc.pid:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError("the holder did not take the lock in time")


def _started(pid: int) -> str:
    return dt.datetime.fromtimestamp(psutil.Process(pid).create_time()).astimezone().isoformat(timespec="seconds")


def test_a_second_process_is_refused_until_the_holder_is_killed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "trials.jsonl").write_text("{}\n")
    holder = _python(HOLD, str(run))
    try:
        _wait_locked(holder, run)
        # another process: refused at once, the message names the folder, the holder's pid and its start time
        t0 = time.monotonic()
        other = _python(TRY, str(run))
        out, err = other.communicate(timeout=120)
        assert other.returncode == 3, (out, err)
        for needle in (str(run), f"process {holder.pid}", f"started {_started(holder.pid)}", "in use"):
            assert needle in out, (needle, out)
        # this process too, and discard_run leaves the live run's folder alone
        with pytest.raises(RunLockedError, match=re.escape(f"locked by process {holder.pid} (started {_started(holder.pid)})")):
            RunLock(run).acquire()
        with pytest.raises(RunLockedError, match="in use"):
            discard_run(run)
        assert (run / "trials.jsonl").is_file()
        h = RunLock(run).holder()
        assert h is not None and h.pid == holder.pid and h.started == pytest.approx(psutil.Process(holder.pid)
                                                                                     .create_time(), abs=1e-3)
        assert time.monotonic() - t0 < 60
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # the kernel dropped the lock with the process: free at once, and restart can discard the folder
    assert RunLock(run).holder() is None
    with RunLock(run) as lock:
        assert lock.held and RunLock(run).holder().pid == os.getpid()
    assert discard_run(run) == [run / "trials.jsonl"]
    assert [p.name for p in run.iterdir()] == [LOCK_FILE]
    other = _python(TRY, str(run))
    out, _ = other.communicate(timeout=120)
    assert other.returncode == 0 and out.strip() == "acquired"


def test_the_same_process_cannot_take_a_lock_twice_and_an_error_releases_it(tmp_path):
    lock = RunLock(tmp_path).acquire()
    with pytest.raises(RunLockedError, match=re.escape(f"process {os.getpid()} (started {_started(os.getpid())})")):
        RunLock(tmp_path).acquire()  # another lock object: another open file, refused like another process
    with pytest.raises(RunLockedError, match="this lock object"):
        lock.acquire()
    lock.release()
    lock.release()  # harmless
    with pytest.raises(KeyError):
        with RunLock(tmp_path):
            raise KeyError("boom")
    with RunLock(tmp_path, timeout=0.0):
        pass
    assert discard_run(tmp_path / "absent") == []


def test_a_lock_with_a_timeout_waits_for_the_holder(tmp_path):
    first = RunLock(tmp_path).acquire()
    t0 = time.monotonic()
    with pytest.raises(RunLockedError):
        RunLock(tmp_path, timeout=0.3).acquire()
    assert 0.25 <= time.monotonic() - t0 < 5
    first.release()
    with RunLock(tmp_path, timeout=0.3):
        pass
