"""An exclusive lock per folder (a merge run's output folder, a published model folder), held by one process.

A merge run's folder holds one search: two processes searching into it at once would both append their trials (the
same trial twice in ``trials.jsonl``, a run history rewritten from two sides). :class:`RunLock` is an ``fcntl.flock``
on ``<folder>/.lock``:

* a second acquirer, in another process or in the same one, fails at once with :class:`RunLockedError`, whose
  message names the folder and the holder (pid and start time, written into the lock file for that purpose);
* the kernel drops the lock when its holder's process ends in any way, ``kill -9`` included, so a stopped run never
  leaves a stale lock behind and there is nothing to clean up.

:func:`discard_run` empties a run folder under its lock, so a restart cannot delete the folder of a live run.

The lock file itself is never deleted (a process that opened the old file would then lock another file than a
newcomer). A lock is not inherited across ``exec``; a child made by a bare ``fork`` shares it until it exits.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from types import TracebackType

from medsamix.errors import MedSAMixError

LOCK_FILE = ".lock"


class RunLockedError(MedSAMixError):
    """A folder is locked by another process (or by another lock of this process): a merge run or publish uses it."""


def process_started(pid: int) -> float | None:
    """Start time of process ``pid`` (seconds since the epoch, as psutil gives it), or ``None`` when unknown."""
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:  # noqa: BLE001 - no psutil, no such process, no access: unknown
        return None


def pid_alive(pid: int | None, started: float | None = None) -> bool:
    """Whether a process with this id exists (on this machine) and, when ``started`` is given (see
    :func:`process_started`), is the same process (not a later one that got the id again)."""
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if started is not None:
        now = process_started(int(pid))
        if now is not None and abs(now - float(started)) > 1.0:
            return False
    return True


@dataclasses.dataclass(frozen=True)
class LockHolder:
    """Who holds a lock, as its holder wrote it into the lock file (for messages only: the lock is the flock).

    Attributes:
        pid: Process id.
        started: Start time of that process (seconds since the epoch, :func:`process_started`).
        host: Host name of the holder (a folder on a network file system may be shared).
        acquired_at: When the lock was taken (seconds since the epoch).
    """

    pid: int | None
    started: float | None
    host: str | None
    acquired_at: float | None

    def describe(self) -> str:
        """"process 123 (started 2024-05-01T10:00:00+02:00)", with the host when it is not this one."""
        if self.pid is None:
            return "a process that has not recorded itself yet"
        text = f"process {self.pid} (started {_when(self.started)}"
        if self.host and self.host != socket.gethostname():
            text += f" on {self.host}"
        elif not pid_alive(self.pid, self.started):
            text += "; it has ended, a child process it forked still holds the lock"
        return text + ")"


class RunLock:
    """An exclusive, non-blocking lock on ``<folder>/.lock``; use it as a context manager::

        with RunLock(out_dir):
            ...  # this process alone works in out_dir

    Args:
        folder: The folder to lock (created if needed).
        timeout: Seconds to keep trying while another holder has it; 0 (the default) fails at once.

    Raises:
        RunLockedError: (on :meth:`acquire` / ``with``) the lock is held by another process, by another
            :class:`RunLock` of this process, or already by this one.
    """

    def __init__(self, folder: str | os.PathLike[str], timeout: float = 0.0) -> None:
        self.folder = Path(folder)
        self.timeout = float(timeout)
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_FILE

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> RunLock:
        """Take the lock and record this process in the lock file; returns ``self``."""
        if self._fd is not None:
            raise RunLockedError(self._busy_message())
        self.folder.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.timeout
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RunLockedError(self._busy_message()) from None
                time.sleep(min(0.1, left))
                continue
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the file was removed or replaced after we opened it: lock the one the path names now
        try:
            pid = os.getpid()
            record = {"pid": pid, "started": process_started(pid), "host": socket.gethostname(),
                      "acquired_at": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (nothing happens when it is not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # no stale holder record; the next holder writes its own
        finally:
            os.close(fd)  # closing the only descriptor drops the flock

    def holder(self) -> LockHolder | None:
        """Who holds the lock now, as recorded in the lock file; ``None`` when nobody holds it (found by taking the
        lock for a moment: for messages and tests, not to decide whether to take it)."""
        if self._fd is not None:
            return _read_holder(self.path) or LockHolder(os.getpid(), process_started(os.getpid()), None, None)
        probe = RunLock(self.folder)
        if not self.path.exists():
            return None
        try:
            probe.acquire()
        except RunLockedError:
            return _read_holder(self.path) or LockHolder(None, None, None, None)
        probe.release()
        return None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)

    def _busy_message(self) -> str:
        holder = None
        for _ in range(10):  # the holder may have the flock and not have written its record yet
            holder = _read_holder(self.path)
            if holder is not None:
                break
            time.sleep(0.02)
        who = (holder or LockHolder(None, None, None, None)).describe()
        if self._fd is not None:
            who = f"this lock object, {who}"
        return (f"{self.folder} is in use by another merge run or publish: locked by {who}; wait for it to finish "
                "or stop it, then ask again")


def discard_run(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove everything in a run folder (a restart), under its :class:`RunLock`; the folder and its lock file stay.

    Returns:
        The removed entries (an absent folder removes nothing).

    Raises:
        RunLockedError: another process holds the folder (a live run): nothing is removed.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    removed = []
    with RunLock(out_dir):
        for entry in sorted(out_dir.iterdir()):
            if entry.name == LOCK_FILE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


def _read_holder(path: Path) -> LockHolder | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or "pid" not in data:
        return None

    def num(key: str) -> float | None:
        value = data.get(key)
        return float(value) if isinstance(value, (int, float)) else None

    pid = data.get("pid")
    return LockHolder(int(pid) if isinstance(pid, int) else None, num("started"),
                      str(data["host"]) if data.get("host") else None, num("acquired_at"))


def _when(t: float | None) -> str:
    if t is None:
        return "at an unknown time"
    return _dt.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")
