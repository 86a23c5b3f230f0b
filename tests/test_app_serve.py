"""The README's main job, ``bash scripts/serve.sh``: makes the sample studies when missing and serves them with the
hardened server (``medsamix-server``)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from app_server import fetch_info, free_port

REPO = Path(__file__).resolve().parents[1]


def test_serve_sh_makes_the_studies_and_starts_the_server(tmp_path):
    studies = tmp_path / "studies"
    port = free_port()
    env = dict(os.environ, PORT=str(port), STUDIES=str(studies), MEDSAMIX_COMPILE="0")
    log = tmp_path / "serve.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(["bash", str(REPO / "scripts" / "serve.sh"), "--conf", "model_dir",
                                 str(tmp_path / "model"), "--state-dir", str(tmp_path / "state")], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        info = None
        while info is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1)
            info = fetch_info(f"http://127.0.0.1:{port}")
        assert info is not None, log.read_text()[-3000:]
        assert {"medsamix", "sam_tiny", "medsam_tiny", "medicosam_tiny"} <= set(info["models"])
        images = [p for p in studies.iterdir() if p.name.endswith(".nii.gz")]
        assert images and all((studies / "labels" / "final" / p.name).is_file() for p in images)
        assert info["datastore"]["total"] == len(images)
        assert (tmp_path / "state" / "logs" / "server.log").is_file()  # the hardened server, not monailabel's
        assert "medsamix_server" in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
