"""Training lifecycle of the hardened server under faults: kill -9 of the training process, kill -9 of the server
during a search and after a killed publish, restart; and an orphaned worker found at start-up.

What must hold: the run resumes with every finished trial kept exactly once, no training process outlives the server
that started it (or survives the next server's start), the served merged model is always a complete published
version, and a second train request while one runs is refused (429), ``enqueue=true`` included.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from app_server import free_port
from conftest import RUN_TIMEOUT_S
from hardened_server import start, stop, wait_ready
from medsamix.runs.lock import process_started
from test_merge_run import make_datastore

POOL = Path(__file__).resolve().parents[1] / "sample-data" / "pool"


def _call(url: str, method: str = "GET", body: dict[str, Any] | None = None, timeout: float = 60
          ) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def _stats(url: str) -> dict[str, Any]:
    return _call(f"{url}/info/")[1].get("train_stats", {}).get("merge", {})


def _wait(cond, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def _workers(state: Path) -> list[int]:
    """Pids of the live training workers of the servers on ``state`` (a worker runs in its server's state folder;
    other tests on this machine may run their own)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
                cwd = os.readlink(d / "cwd")
            except OSError:
                continue
            if b"medsamix_server.train_worker" in cmd and Path(cwd) == state and _alive(int(d.name)):
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return st.rsplit(")", 1)[1].split()[0] != "Z"


def _trial_numbers(run_dir: Path) -> list[int]:
    return [json.loads(line)["trial"] for line in (run_dir / "trials.jsonl").read_text().splitlines()
            if line.strip()]


def _setup(tmp_path: Path) -> tuple[Path, Path, Path, dict[str, str], int, str, Path]:
    """Studies (4 of 5 labelled), state and model folders, app settings, a free port, the URL and the log file."""
    studies = make_datastore(tmp_path / "studies", n=5, labelled=4)
    port = free_port()
    return (studies, tmp_path / "state", tmp_path / "model",
            {"pool": str(POOL), "labels": "ellipsoid", "merge_report": "false"}, port, f"http://127.0.0.1:{port}",
            tmp_path / "server.log")


@pytest.mark.slow
def test_kill_server_mid_search_and_mid_publish_then_resume(tmp_path):
    studies, state, model, conf, port, url, log = _setup(tmp_path)
    request = {"task": "ellipsoid", "trials": 24}
    assert not _workers(state)

    proc = start(studies, state, model, log, port, conf)
    try:
        wait_ready(url, proc, log)
        code, task = _call(f"{url}/train/merge", "POST", request)
        assert code == 200 and task["status"] == "RUNNING", task
        worker = task["pid"]
        _wait(lambda: _stats(url).get("epoch", 0) >= 4, RUN_TIMEOUT_S, "4 trials")
        # one run at a time, a queue included
        for q in ("", "?enqueue=true"):
            code, body = _call(f"{url}/train/merge{q}", "POST", request)
            assert code == 429, body
        # kill -9 the server alone (not its process group): the worker must die with it
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        _wait(lambda: not _alive(worker), 10, "the worker to die with the server")
        assert not _workers(state)
    finally:
        stop(proc)
    run_dir = next((model / "runs").glob("ellipsoid-*"))
    done_before = _trial_numbers(run_dir)
    assert len(done_before) >= 4

    # a publish killed midway leaves a temporary version and pointer behind: the next start cleans them
    merged = model / "merged"
    (merged / "versions" / ".tmp-deadbeef").mkdir(parents=True)
    (merged / "versions" / ".tmp-deadbeef" / "merged.pth").write_bytes(b"cut off")
    (merged / ".current.json.tmp-deadbeef").write_text("{")

    proc = start(studies, state, model, log, port, conf)
    try:
        wait_ready(url, proc, log)
        assert not (merged / "versions" / ".tmp-deadbeef").exists()
        assert not (merged / ".current.json.tmp-deadbeef").exists()
        assert _stats(url).get("status") == "stopped"
        # a synchronous train request waits without holding up anyone: /info/ is polled meanwhile
        latencies: list[float] = []
        stop_polling = threading.Event()

        def poll() -> None:
            while not stop_polling.is_set():
                t0 = time.perf_counter()
                _call(f"{url}/info/")
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.2)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            code, task = _call(f"{url}/train/merge?run_sync=true", "POST", request, timeout=600)
        finally:
            stop_polling.set()
            poller.join(timeout=30)
        assert code == 200, task
        assert len(latencies) > 10 and max(latencies) < 5.0, (len(latencies), max(latencies))
        st = _stats(url)
        assert st["status"] == "done" and st["epoch"] == request["trials"], st
        assert st["resumed_trials"] >= len(done_before), st
        numbers = _trial_numbers(run_dir)
        assert len(numbers) == len(set(numbers)), f"a trial logged twice: {numbers}"
        assert set(done_before) <= set(numbers)
        # the served model is a complete published version
        code, info = _call(f"{url}/info/")
        assert "nothing published" not in info["models"]["medsamix"]["description"] or not st["promoted"]
        assert not list((merged / "versions").glob(".tmp-*"))
    finally:
        stop(proc)
    assert not _workers(state)


@pytest.mark.slow
def test_kill_the_training_process_then_the_same_request_resumes(tmp_path):
    studies, state, model, conf, port, url, log = _setup(tmp_path)
    request = {"task": "ellipsoid", "trials": 16}
    proc = start(studies, state, model, log, port, conf)
    try:
        wait_ready(url, proc, log)
        code, task = _call(f"{url}/train/merge", "POST", request)
        assert code == 200, task
        _wait(lambda: _stats(url).get("epoch", 0) >= 3, RUN_TIMEOUT_S, "3 trials")
        os.kill(task["pid"], signal.SIGKILL)
        t = _wait(lambda: (lambda s: s if s["status"] != "RUNNING" else None)(_call(f"{url}/train/")[1]), 30,
                  "the task to end")
        assert t["status"] == "ERROR"
        assert _stats(url)["status"] == "stopped"  # its progress file says so, with what it had done
        code, _ = _call(f"{url}/train/?check_if_running=true")
        assert code == 404
        code, res = _call(f"{url}/train/merge?run_sync=true", "POST", request, timeout=600)
        assert code == 200, res
        run_dir = next((model / "runs").glob("ellipsoid-*"))
        numbers = _trial_numbers(run_dir)
        assert sorted(numbers) == list(range(request["trials"])), numbers
        # DELETE with nothing running
        code, body = _call(f"{url}/train/", "DELETE")
        assert code == 404, body
    finally:
        stop(proc)
    assert not _workers(state)


def test_an_orphaned_worker_is_stopped_when_the_server_starts(tmp_path):
    """A worker that survived its server (here a stand-in process recorded in worker.json) is stopped by the next
    server before it serves anything; a recorded pid that now belongs to another process is left alone."""
    studies = make_datastore(tmp_path / "studies", n=2, labelled=1)
    state, model = tmp_path / "state", tmp_path / "model"
    (state / "train").mkdir(parents=True)
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        (state / "train" / "worker.json").write_text(json.dumps(
            {"pid": orphan.pid, "started": process_started(orphan.pid)}))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = tmp_path / "server.log"
        proc = start(studies, state, model, log, port, {"pool": str(POOL)})
        try:
            wait_ready(url, proc, log)
            assert orphan.wait(timeout=20) is not None
            assert "orphaned training process" in log.read_text()
        finally:
            stop(proc)
        # a stale record whose pid is now another process (different start time) is not killed
        (state / "train" / "worker.json").write_text(json.dumps(
            {"pid": bystander.pid, "started": (process_started(bystander.pid) or 0) + 12345}))
        proc = start(studies, state, model, log, port, {"pool": str(POOL)})
        try:
            wait_ready(url, proc, log)
            assert bystander.poll() is None
        finally:
            stop(proc)
    finally:
        for p in (orphan, bystander):
            if p.poll() is None:
                p.kill()
                p.wait()
