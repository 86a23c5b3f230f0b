"""The training process (started by :class:`medsamix_server.training.TrainSupervisor`, never by hand).

``python -m medsamix_server.train_worker <server pid>`` reads ``{"app_dir", "studies", "conf", "request", "result"}``
as JSON on stdin, builds the MONAI Label app and runs its train task, and writes ``{"ok": true, "result": ...}`` or
``{"ok": false, "status": 400, "detail": ...}`` to ``result``. Before anything else it asks the kernel for SIGKILL
when its parent dies and exits if the parent is already not the server that started it.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
from typing import Any

PR_SET_PDEATHSIG = 1


def _die_with_parent(server_pid: int) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass
    if os.getppid() != server_pid:  # the server died before prctl took effect
        sys.exit(3)


def _write(path: str, data: dict[str, Any]) -> None:
    from medsamix.atomic import atomic_write_text  # here: the worker sets its death signal before heavy imports

    atomic_write_text(path, json.dumps(data, default=str))


def main() -> int:
    _die_with_parent(int(sys.argv[1]))
    job = json.loads(sys.stdin.read())
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [%(levelname)s] (%(name)s) %(message)s")
    from fastapi import HTTPException
    from monailabel.interfaces.utils.app import app_instance

    try:
        app = app_instance(app_dir=job["app_dir"], studies=job["studies"], conf=job["conf"])
        result = app.train(job["request"])
    except HTTPException as e:
        logging.error("training failed: %s", e.detail)
        _write(job["result"], {"ok": False, "status": e.status_code, "detail": e.detail})
        return 2
    except Exception as e:  # noqa: BLE001 - reported to the server, which keeps running
        logging.exception("training failed")
        _write(job["result"], {"ok": False, "status": 500, "detail": f"{type(e).__name__}: {e}"})
        return 1
    _write(job["result"], {"ok": True, "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
