"""Run the hardened MedSAMix server (``python -m medsamix_server``) for end-to-end tests.

``hardened_server(studies, ...)`` starts it as a child process on a free loopback port with its own state folder
and model folder (temporary unless given), waits until it answers, yields a :class:`Server` and stops the process
group afterwards. ``users`` creates a users file first (name -> (role, password)).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from app_server import free_port

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120.0


@dataclasses.dataclass
class Server:
    url: str
    proc: subprocess.Popen
    state_dir: Path
    model_dir: Path
    log_path: Path
    port: int
    tmp: Path

    def log(self, lines: int = 80) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/auth/", timeout=5) as r:
            json.loads(r.read())
            return True
    except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
        return False


def write_users(path: Path, users: dict[str, tuple[str, str]]) -> None:
    from medsamix_server.auth import hash_password, write_users as write

    write(path, {name: {"role": role, "password": hash_password(pw)} for name, (role, pw) in users.items()})


def start(studies: str | Path, state_dir: Path, model_dir: Path, log_path: Path, port: int,
          conf: dict[str, str] | None = None, args: list[str] | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start the server process (not waiting for it)."""
    cmd = [sys.executable, "-m", "medsamix_server", "--studies", str(studies), "--host", "127.0.0.1",
           "--port", str(port), "--state-dir", str(state_dir)]
    conf = dict(conf or {})
    conf.setdefault("model_dir", str(model_dir))
    for k, v in conf.items():
        cmd += ["--conf", k, str(v)]
    cmd += list(args or [])
    e = dict(os.environ)
    e.setdefault("MEDSAMIX_COMPILE", "0")
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "lib"), str(REPO / "server"), e.get("PYTHONPATH", ""))
                                      if p)
    e.update(env or {})
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=e, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not _ready(url):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}:\n"
                               + "\n".join(log_path.read_text(errors="replace").splitlines()[-60:]))
        if time.monotonic() > deadline:
            raise RuntimeError(f"server did not answer within {timeout_s:.0f} s:\n"
                               + "\n".join(log_path.read_text(errors="replace").splitlines()[-60:]))
        time.sleep(0.3)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


@contextlib.contextmanager
def hardened_server(studies: str | Path, conf: dict[str, str] | None = None, args: list[str] | None = None,
                    users: dict[str, tuple[str, str]] | None = None, state_dir: Path | None = None,
                    model_dir: Path | None = None, env: dict[str, str] | None = None,
                    timeout_s: float = START_TIMEOUT_S) -> Iterator[Server]:
    with tempfile.TemporaryDirectory(prefix="medsamix-hardened-") as tmp:
        t = Path(tmp)
        state = state_dir or t / "state"
        model = model_dir or t / "model"
        state.mkdir(parents=True, exist_ok=True)
        if users:
            write_users(state / "users.json", users)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = t / "server.log"
        proc = start(studies, state, model, log_path, port, conf, args, env)
        try:
            wait_ready(url, proc, log_path, timeout_s)
            yield Server(url, proc, state, model, log_path, port, t)
            if proc.poll() is not None:
                raise RuntimeError(f"server died during the test (status {proc.returncode})")
        finally:
            stop(proc)
