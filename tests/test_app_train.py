"""The "merge" train task end to end through the real MONAI Label server and monailabel's own client.

Train start, progress in ``/info`` (``train_stats``: epoch = trials done), ``DELETE /train/`` and a resumed run that
keeps the finished trials, the published model served by the ``medsamix`` infer task (its version in the response),
the no-regression guard, a failed request with the reason while the server keeps running, and 429 while a run is
going. The pool is the embedded tiny pool (sample-data/pool, 256 px): trials take about a second each, long enough to
stop a run in the middle.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest

from app_server import running_server
from conftest import RUN_TIMEOUT_S
from medsamix.runs.publish import current
from test_merge_run import make_datastore

# 3-6 minutes on 2 busy cores (server start-up, four train subprocesses, 20 trials of the 256-px pool): in the slow set, run with -m slow;
# the same task in-process (without HTTP and stop) is in the default set: test_app_train_task.py
pytestmark = pytest.mark.slow

TRIALS = 20
POOL = Path(__file__).resolve().parents[1] / "sample-data" / "pool"


@pytest.fixture(scope="module", params=["hardened", "monailabel"])
def server(tmp_path_factory, request):
    studies = make_datastore(tmp_path_factory.mktemp("studies"), n=5, labelled=4)
    model_dir = tmp_path_factory.mktemp("model")
    with running_server(studies, {"pool": str(POOL), "labels": "ellipsoid", "model_dir": str(model_dir)},
                        kind=request.param) as url:
        yield url, model_dir


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    from monailabel.client import MONAILabelClient

    return MONAILabelClient(server[0], tmpdir=str(tmp_path_factory.mktemp("client")))


def _stats(client) -> dict[str, Any]:
    return client.info().get("train_stats", {}).get("merge", {})


def _wait(client, until: Callable[[dict[str, Any]], bool], timeout: float = RUN_TIMEOUT_S) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = _stats(client)
        if until(st):
            return st
        time.sleep(0.25)
    raise AssertionError(f"timed out; last stats {json.dumps(st)[:1500]}; task {client.train_status()}")


def _wait_task(client, timeout: float = RUN_TIMEOUT_S) -> dict[str, Any]:
    """The train task's entry once its process ended (DONE / ERROR / STOPPED)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = client.train_status()
        if task["status"] not in ("SUBMITTED", "RUNNING"):
            return task
        time.sleep(0.25)
    raise AssertionError(f"train task still running: {client.train_status()}")


def test_train_stop_resume_publish_and_serve(client, server):
    from monailabel.client.client import MONAILabelClientException

    _, model_dir = server
    info = client.info()
    assert info["trainers"]["merge"]["config"]["trials"] == 30
    params = {"task": "ellipsoid", "trials": TRIALS}
    task = client.train_start("merge", params)
    assert task["status"] in ("SUBMITTED", "RUNNING")
    # progress advances (epoch = trials done); a second request meanwhile is refused with 429
    st = _wait(client, lambda s: s.get("status") == "running" and (s.get("epoch") or 0) >= 2)
    assert st["total_epochs"] == TRIALS and st["variant"] == "MedSAMix-S" and 0 <= st["best_metric"] <= 1
    with pytest.raises(MONAILabelClientException, match="Status: 429"):
        client.train_start("merge", params)
    later = _wait(client, lambda s: (s.get("epoch") or 0) > st["epoch"] or s.get("status") != "running")
    assert later["epoch"] > st["epoch"]
    # stop through DELETE /train/
    stopped = client.train_stop()
    assert stopped and stopped["status"] == "STOPPED", f"the run ended before it could be stopped: {_stats(client)}"
    st = _wait(client, lambda s: s.get("status") == "stopped", timeout=30)
    done_at_stop = st["epoch"]
    assert 2 <= done_at_stop < TRIALS and "resume" in st["message"]
    assert current(model_dir / "merged") is None  # nothing published by a stopped run
    # the same request resumes with the finished trials kept
    client.train_start("merge", params)
    st = _wait(client, lambda s: s.get("status") in ("done", "failed", "stopped") and s.get("start_ts") != st["start_ts"])
    assert _wait_task(client)["status"] == "DONE"
    assert st["status"] == "done", st
    assert st["resumed_trials"] >= done_at_stop and st["epoch"] == TRIALS and st["total_time"]
    run_dir = model_dir / "runs" / st["run"]
    logged = len((run_dir / "trials.jsonl").read_text().splitlines())
    assert logged == TRIALS  # each trial evaluated and logged once (the log is restored with SMAC's checkpoint)
    assert len((run_dir / "history.csv").read_text().splitlines()) == TRIALS + 1
    # promoted and served by the medsamix infer task without a restart
    assert st["promoted"] is True and st["message"].startswith("promoted")
    pub = current(model_dir / "merged")
    assert pub is not None and pub.version == st["published_version"]
    path, out = client.infer("medsamix", "case0", {"roi": [8, 24, 10, 30, 6, 6]})
    Path(path).unlink()
    assert out["model_version"] == pub.version
    assert pub.version in client.info()["models"]["medsamix"]["description"]


def test_a_merge_not_better_than_the_best_single_model_is_not_published(client, server):
    _, model_dir = server
    before = current(model_dir / "merged")
    client.train_start("merge", {"task": "ellipsoid", "trials": TRIALS, "min_gain": 0.5})
    assert _wait_task(client)["status"] == "DONE"
    st = _stats(client)
    assert st["status"] == "done" and st["promoted"] is False and st["published_version"] is None
    assert st["message"].startswith("not promoted") and "required gain 0.5" in st["message"]
    assert st["promotion"]["best_single"] in ("sam_tiny", "medsam_tiny", "medicosam_tiny")
    after = current(model_dir / "merged")
    assert (after.version if after else None) == (before.version if before else None)


def test_a_bad_request_fails_with_the_reason_and_the_server_keeps_running(client):
    client.train_start("merge", {"task": "liver", "trials": 10})
    task = _wait_task(client)
    assert task["status"] == "ERROR"
    assert any("unknown task(s) ['liver']" in line for line in task["details"])
    st = _stats(client)
    assert st["status"] == "failed" and "unknown task(s) ['liver']; this data has ['ellipsoid', 'label_2']" in st["message"]
    assert "merge" in client.info()["trainers"]


def test_a_synchronous_bad_request_is_answered_with_400_and_the_reason(client, server):
    req = urllib.request.Request(f"{server[0]}/train/merge?run_sync=true", method="POST",
                                 data=json.dumps({"task": "liver", "trials": 10}).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=120)
    assert e.value.code == 400
    assert "unknown task(s) ['liver']" in json.loads(e.value.read())["detail"]
    assert _stats(client)["status"] == "failed"
