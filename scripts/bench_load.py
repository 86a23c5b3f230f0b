"""Load benchmark of the hardened server: does inference hold up other requests?

Starts ``medsamix-server`` on the demo studies (``.demo/studies``, made if missing) on a free loopback port, then runs
``--clients`` concurrent clients that each send ``--prompts`` box prompts (2D boxes around the labelled structure of a
random slice of a random study; every fifth a 3D box over three slices) to ``POST /infer/medsamix``, while one more
client polls ``GET /info/`` every 50 ms. Prints per-kind latency figures and, as the last line exactly::

    requests=<n> errors=<n> infer_p50_ms=<ms> infer_p95_ms=<ms> info_p50_ms=<ms> info_p95_ms=<ms>

Target on 2 cores: errors=0 and info_p95_ms <= 100. Usage: ``.venv/bin/python scripts/bench_load.py``
(``--url http://127.0.0.1:8000`` to load a running server instead).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prompts_for(studies: Path, n: int, rng: random.Random) -> list[tuple[str, dict]]:
    """Box prompts around the labelled structure of random slices (IJK voxel indices)."""
    cases = []
    for img in sorted(studies.glob("*.nii.gz")):
        lab = studies / "labels" / "final" / img.name
        if lab.is_file():
            cases.append((img.name[: -len(".nii.gz")], np.asarray(nib.load(str(lab)).dataobj) > 0))
    out = []
    for q in range(n):
        image_id, mask = rng.choice(cases)
        ks = [k for k in range(mask.shape[2]) if mask[:, :, k].any()]
        k = rng.choice(ks)
        ii, jj = np.nonzero(mask[:, :, k])
        roi = [int(ii.min()) - 1, int(ii.max()) + 1, int(jj.min()) - 1, int(jj.max()) + 1, k, k]
        if q % 5 == 4:
            roi[4], roi[5] = max(0, k - 1), min(mask.shape[2] - 1, k + 1)
        out.append((image_id, {"roi": roi}))
    return out


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="load a running server instead of starting one")
    ap.add_argument("--studies", default=str(REPO / ".demo" / "studies"))
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    studies = Path(args.studies)
    if not studies.is_dir() or not list(studies.glob("*.nii.gz")):
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_sample_studies.py"), "--out", str(studies)],
                       check=True)
    proc = None
    tmp = tempfile.TemporaryDirectory(prefix="bench-load-")
    url = args.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "lib"), str(REPO / "server"), env.get("PYTHONPATH", "")])
        log = open(Path(tmp.name) / "server.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen([sys.executable, "-m", "medsamix_server", "--studies", str(studies), "--port",
                                 str(port), "--state-dir", str(Path(tmp.name) / "state"), "--conf", "model_dir",
                                 str(Path(tmp.name) / "model")], stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        deadline = time.monotonic() + 180
        while True:
            try:
                requests.get(f"{url}/auth/", timeout=2)
                break
            except requests.RequestException:
                if proc.poll() is not None or time.monotonic() > deadline:
                    print((Path(tmp.name) / "server.log").read_text()[-3000:], file=sys.stderr)
                    return 1
                time.sleep(0.5)
    try:
        rng = random.Random(args.seed)
        work = prompts_for(studies, args.clients * args.prompts, rng)
        # warm-up: one prompt per study (first encoder passes, volume reads) before timing
        for image_id in sorted({w[0] for w in work}):
            requests.post(f"{url}/infer/medsamix", params={"image": image_id, "output": "json"},
                          data={"params": json.dumps(next(p for i, p in work if i == image_id))}, timeout=300)
        infer_ms: list[float] = []
        info_ms: list[float] = []
        errors: list[str] = []
        stop = threading.Event()
        lock = threading.Lock()

        def poll_info() -> None:
            s = requests.Session()
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = s.get(f"{url}/info/", timeout=60)
                    ok = r.status_code == 200
                except requests.RequestException as e:
                    ok, r = False, e
                dt = (time.perf_counter() - t0) * 1e3
                with lock:
                    info_ms.append(dt)
                    if not ok:
                        errors.append(f"info: {r}")
                time.sleep(0.05)

        def client(c: int) -> None:
            s = requests.Session()
            for image_id, params in work[c * args.prompts:(c + 1) * args.prompts]:
                t0 = time.perf_counter()
                try:
                    r = s.post(f"{url}/infer/medsamix", params={"image": image_id, "output": "json"},
                               data={"params": json.dumps(params)}, timeout=300)
                    ok = r.status_code == 200
                    why = f"{r.status_code} {r.text[:200]}"
                except requests.RequestException as e:
                    ok, why = False, str(e)
                dt = (time.perf_counter() - t0) * 1e3
                with lock:
                    infer_ms.append(dt)
                    if not ok:
                        errors.append(f"infer: {why}")

        poller = threading.Thread(target=poll_info, daemon=True)
        poller.start()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as ex:
            list(ex.map(client, range(args.clients)))
        wall = time.perf_counter() - t0
        stop.set()
        poller.join(timeout=70)
        for e in errors[:5]:
            print("error:", e, file=sys.stderr)
        print(f"clients={args.clients} prompts_per_client={args.prompts} wall_s={wall:.1f} "
              f"throughput_per_s={len(infer_ms) / wall:.2f} info_polls={len(info_ms)} cores={os.cpu_count()}")
        print(f"requests={len(infer_ms)} errors={len(errors)} infer_p50_ms={pct(infer_ms, 50):.1f} "
              f"infer_p95_ms={pct(infer_ms, 95):.1f} info_p50_ms={pct(info_ms, 50):.1f} "
              f"info_p95_ms={pct(info_ms, 95):.1f}")
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
