"""Run the real MONAI Label server on the MedSAMix app for end-to-end tests.

``running_server(studies, conf)`` starts ``monailabel start_server --app apps/medsamix`` as a child process on a free
loopback port, waits until ``/info/`` answers, yields the base URL and stops the process afterwards (its whole
process group). Unless ``conf`` names a ``model_dir``, a fresh temporary one is used, so tests never read or write the
app's real model folder (published merged models); sessions go to a temporary folder too. The server's output is kept in a log file whose tail is shown
when start-up fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "medsamix"
START_TIMEOUT_S = 120.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


def fetch_info(url: str) -> dict | None:
    """The server's /info/ answer, or None while it does not answer."""
    try:
        with urllib.request.urlopen(f"{url}/info/", timeout=5) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
        return None


@contextlib.contextmanager
def running_server(studies: Path, conf: dict[str, str] | None = None,
                   timeout_s: float = START_TIMEOUT_S, kind: str = "monailabel") -> Iterator[str]:
    """Start the MedSAMix MONAI Label server on ``studies`` and yield its base URL (``http://127.0.0.1:<port>``).

    Args:
        studies: The datastore folder (``--studies``).
        conf: App configuration (each pair becomes ``--conf key value``); ``model_dir`` defaults to a temporary
            folder removed afterwards.
        timeout_s: How long to wait for ``/info/`` before giving up (the log tail is in the error).
        kind: ``"monailabel"`` (``monailabel start_server``, the unhardened path) or ``"hardened"`` (the project's
            server, ``python -m medsamix_server``, authentication off on loopback).

    Raises:
        RuntimeError: The server exited or did not answer in time.
    """
    if kind == "hardened":
        from hardened_server import hardened_server

        with hardened_server(studies, conf, timeout_s=timeout_s) as srv:
            yield srv.url
        return
    conf = dict(conf or {})
    with tempfile.TemporaryDirectory(prefix="medsamix-server-") as tmp:
        conf.setdefault("model_dir", str(Path(tmp) / "model"))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = Path(tmp) / "server.log"
        cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR),
               "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port)]
        for k, v in conf.items():
            cmd += ["--conf", k, str(v)]
        env = dict(os.environ)
        env.setdefault("MEDSAMIX_COMPILE", "0")
        env.setdefault("MONAI_LABEL_SESSION_PATH", str(Path(tmp) / "sessions"))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "lib"), env.get("PYTHONPATH", "")) if p)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        try:
            deadline = time.monotonic() + timeout_s
            while fetch_info(url) is None:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with status {proc.returncode} before answering /info/:\n"
                                       f"{_tail(log_path)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server did not answer /info/ within {timeout_s:.0f} s:\n{_tail(log_path)}")
                time.sleep(0.5)
            yield url
            if proc.poll() is not None:
                raise RuntimeError(f"server died during the test (status {proc.returncode}):\n{_tail(log_path)}")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=15)

