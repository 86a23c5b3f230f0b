"""The training process: one at a time, supervised, never outliving the server.

``POST /train/<model>`` checks the options (allow-listed against the train task's own options; ``bundle_path`` and
anything else unknown is refused) and starts ``python -m medsamix_server.train_worker`` in a process group of its
own. The worker asks the kernel to kill it when the server dies (``PR_SET_PDEATHSIG``) and exits at once if the
server is already gone; its pid and start time are kept in ``<state>/train/worker.json``, so a restarted server finds a
worker that survived anyway and stops it before anything else. The run folder itself is locked by the library
(:class:`medsamix.runs.lock.RunLock`), so two processes can never work on one run. A second request while one runs is
refused with 429 (no hidden queue). ``DELETE /train/`` stops the whole process group. Waiting for a run
(``run_sync=true``) never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from medsamix.runs.lock import pid_alive, process_started

from .config import ServerConfig
from .security import remove_tree

logger = logging.getLogger(__name__)

WORKER_FILE = "worker.json"
RESULT_FILE = "result.json"
LOG_FILE = "train.log"


def _kill_group(pid: int, grace_s: float = 10.0) -> None:
    """SIGTERM then SIGKILL the process group led by ``pid`` (and ``pid`` itself)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for target in (lambda s: os.killpg(pid, s), lambda s: os.kill(pid, s)):
            try:
                target(sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done == pid:
                    return
            except ChildProcessError:  # not our child (an orphan of an earlier server)
                if not pid_alive(pid):
                    return
            time.sleep(0.1)


class TrainSupervisor:
    """Starts, watches and stops the training worker of one server.

    Args:
        config: Server settings (app, studies, conf, state folder).
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.folder = config.train_dir
        self.folder.mkdir(parents=True, exist_ok=True)
        self._proc: asyncio.subprocess.Process | None = None
        self._task: dict[str, Any] | None = None
        self._tasks: collections.deque[dict[str, Any]] = collections.deque(maxlen=20)
        self._done: asyncio.Event | None = None
        self._watch: asyncio.Task[None] | None = None

    # -- start-up ----------------------------------------------------------------------------------------------
    def stop_orphans(self) -> str | None:
        """Stop a worker left by an earlier server (its pid and start time still match); returns what was done."""
        f = self.folder / WORKER_FILE
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            return None
        pid, started = int(data.get("pid", 0)), data.get("started")
        msg = None
        if pid > 0 and pid_alive(pid, started):
            logger.warning("stopping training process %d left by an earlier server", pid)
            _kill_group(pid)
            msg = f"stopped orphaned training process {pid}"
        f.unlink(missing_ok=True)
        return msg

    # -- state -------------------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def summary(self) -> dict[str, Any]:
        t = self._task
        return {"running": self.running, "status": t["status"] if t else None, "id": t["id"] if t else None}

    def status(self, all_tasks: bool = False, check_if_running: bool = False) -> Any:
        """MONAI Label's train status shape; None when there is nothing to report (the endpoint answers 404)."""
        if check_if_running and not self.running:
            return None
        if all_tasks:
            return [self._public(t) for t in self._tasks]
        return self._public(self._task) if self._task else None

    def _public(self, t: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in t.items() if k != "details"}
        out["details"] = list(t["details"])
        return out

    # -- start / stop ------------------------------------------------------------------------------------------
    async def start(self, model: str, request: dict[str, Any]) -> dict[str, Any]:
        """Start the worker for ``request`` (already checked); 429 is the caller's when :attr:`running`."""
        log_path = self.folder / LOG_FILE
        result_path = self.folder / RESULT_FILE
        result_path.unlink(missing_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        env["PYTHONUNBUFFERED"] = "1"
        tmp = self.config.tmp_dir / f"train-{uuid.uuid4().hex}"  # the worker's temp files, removed when it ends
        tmp.mkdir(parents=True)
        env["TMPDIR"] = str(tmp)
        job = {"app_dir": str(self.config.app_dir), "studies": self.config.studies, "conf": self.config.conf,
               "request": dict(request, model=model), "result": str(result_path)}
        log = open(log_path, "wb")  # noqa: SIM115 - handed to the child
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "medsamix_server.train_worker", str(os.getpid()),
                stdin=asyncio.subprocess.PIPE, stdout=log, stderr=asyncio.subprocess.STDOUT, env=env,
                start_new_session=True, cwd=str(self.config.state_dir))
        finally:
            log.close()
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(job).encode())
        await proc.stdin.drain()
        proc.stdin.close()
        (self.folder / WORKER_FILE).write_text(json.dumps({"pid": proc.pid, "started": process_started(proc.pid),
                                                           "server_pid": os.getpid(), "model": model}))
        self._proc = proc
        self._done = asyncio.Event()
        self._task = {"id": str(uuid.uuid4()), "name": "train", "model": model, "status": "RUNNING",
                      "start_ts": time.strftime("%Y-%m-%d %H:%M:%S"), "end_ts": None, "pid": proc.pid,
                      "request": {k: v for k, v in request.items()}, "details": collections.deque(maxlen=20),
                      "result": None}
        self._tasks.append(self._task)
        self._watch = asyncio.create_task(self._wait(proc, self._task, log_path, result_path, self._done, tmp))
        logger.info("training %s started (pid %d): %s", model, proc.pid, json.dumps(request)[:500])
        return self._public(self._task)

    async def _wait(self, proc: asyncio.subprocess.Process, task: dict[str, Any], log_path: Path,
                    result_path: Path, done: asyncio.Event, tmp: Path) -> None:
        try:
            while proc.returncode is None:
                try:
                    await asyncio.wait_for(proc.wait(), timeout=1.0)
                except asyncio.TimeoutError:
                    pass
                task["details"] = collections.deque(_tail_lines(log_path, 20), maxlen=20)
            task["details"] = collections.deque(_tail_lines(log_path, 20), maxlen=20)
            try:
                result = json.loads(result_path.read_text())
            except (OSError, ValueError):
                result = None
            task["result"] = result
            if task["status"] == "RUNNING":
                task["status"] = "DONE" if proc.returncode == 0 else "ERROR"
            task["end_ts"] = time.strftime("%Y-%m-%d %H:%M:%S")
            logger.info("training process %d ended with status %s (%s)", proc.pid, proc.returncode, task["status"])
        finally:
            (self.folder / WORKER_FILE).unlink(missing_ok=True)
            remove_tree(tmp)
            done.set()

    async def wait(self) -> dict[str, Any]:
        """Wait (without blocking the loop) for the running worker; returns its task."""
        if self._done is not None:
            await self._done.wait()
        assert self._task is not None
        return self._public(self._task)

    async def stop(self) -> dict[str, Any] | None:
        """Stop the running worker (its whole process group); None when none runs."""
        proc, task = self._proc, self._task
        if proc is None or proc.returncode is not None or task is None:
            return None
        task["status"] = "STOPPED"
        await asyncio.get_running_loop().run_in_executor(None, _kill_group, proc.pid)
        if self._done is not None:
            await self._done.wait()
        # the train task's progress file now reads "stopped" (medsamix.runs.progress.effective_status: its process ended)
        return self._public(task)

    async def shutdown(self) -> None:
        if self.running:
            await self.stop()


def _tail_lines(path: Path, n: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return []
    return [ln[:500] for ln in lines[-n:]]
