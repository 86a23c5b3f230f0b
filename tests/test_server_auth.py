"""Authentication of the hardened server as 3D Slicer's MONAI Label module does it, with monailabel's own client (the
same client code the module ships): ``GET /auth/`` says it is on, ``POST /auth/token`` with user name and password
gives a bearer token, every call sends it; roles; revocation; the users file and the start-up refusals."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from hardened_server import REPO, hardened_server, write_users
from medsamix_server.auth import read_users
from test_merge_run import make_datastore

POOL = REPO / "sample-data" / "pool"
ANN_PW = "annotator-password-1"
ADM_PW = "admin-password-12345"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    studies = make_datastore(tmp_path_factory.mktemp("studies"), n=2, labelled=1)
    with hardened_server(studies, {"pool": str(POOL), "labels": "ellipsoid"},
                         users={"ann": ("annotator", ANN_PW), "adm": ("admin", ADM_PW)}) as srv:
        yield srv


def _client(url: str, tmp_path: Path):
    from monailabel.client import MONAILabelClient

    return MONAILabelClient(url, tmpdir=str(tmp_path))


def _status(exc: Exception) -> int:
    return int(str(getattr(exc, "msg", exc)).split("Status: ")[1].split(";")[0])


def test_slicer_login_flow_with_monailabels_client(server, tmp_path):
    from monailabel.client.client import MONAILabelClientException

    c = _client(server.url, tmp_path)
    assert c.auth_enabled() is True
    with pytest.raises(MONAILabelClientException) as e:
        c.info()
    assert _status(e.value) == 401
    token = c.auth_token("ann", ANN_PW)
    assert token["token_type"] == "bearer" and token["access_token"]
    c.update_auth(token)
    assert c.auth_valid_token() is True
    info = c.info()
    assert "medsamix" in info["models"]
    path, params = c.infer("medsamix", "case0", {"roi": [8, 24, 10, 30, 6, 6]})
    Path(path).unlink()
    assert params["mode"] == "2d" and params["voxels"] > 0
    # an annotator may not train, stop training or read logs
    with pytest.raises(MONAILabelClientException) as e:
        c.train_start("merge", {"task": "ellipsoid", "trials": 10})
    assert _status(e.value) == 403
    with pytest.raises(MONAILabelClientException) as e:
        c.train_stop()
    assert _status(e.value) == 403


def test_admin_role_and_wrong_passwords(server, tmp_path):
    from monailabel.client.client import MONAILabelClientException

    c = _client(server.url, tmp_path)
    with pytest.raises(MONAILabelClientException) as e:
        c.auth_token("adm", "wrong-password-000")
    assert _status(e.value) == 401
    with pytest.raises(MONAILabelClientException) as e:
        c.auth_token("nobody", ADM_PW)
    assert _status(e.value) == 401
    c.update_auth(c.auth_token("adm", ADM_PW))
    # admin may train: a bad option is checked before any process starts and refused with the reason (400), not 403
    with pytest.raises(MONAILabelClientException) as e:
        c.train_start("merge", {"task": "ellipsoid", "granularity": 9})
    assert _status(e.value) == 400 and "granularity" in str(e.value)
    import requests

    tok = c._headers["Authorization"]
    r = requests.get(f"{server.url}/logs/", params={"lines": 20}, headers={"Authorization": tok}, timeout=30)
    assert r.status_code == 200 and "MedSAMix server ready" in requests.get(
        f"{server.url}/logs/", params={"lines": 5000}, headers={"Authorization": tok}, timeout=30).text


def test_removing_a_user_revokes_its_token_at_once(server, tmp_path):
    import requests

    users_file = server.state_dir / "users.json"
    before = users_file.read_text()
    write_users(users_file, {"ann": ("annotator", ANN_PW), "adm": ("admin", ADM_PW), "tmp": ("annotator", ANN_PW)})
    try:
        tok = requests.post(f"{server.url}/auth/token", data={"username": "tmp", "password": ANN_PW},
                            timeout=30).json()["access_token"]
        h = {"Authorization": f"Bearer {tok}"}
        assert requests.get(f"{server.url}/info/", headers=h, timeout=30).status_code == 200
        users_file.write_text(before)
        r = requests.get(f"{server.url}/info/", headers=h, timeout=30)
        assert r.status_code == 401 and "no longer exists" in r.json()["detail"]
    finally:
        users_file.write_text(before)


def test_users_cli_stores_hashes_only_and_owner_readable(tmp_path):
    f = tmp_path / "users.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "lib"), str(REPO / "server")]))
    cmd = [sys.executable, "-m", "medsamix_server.users_cli", "--file", str(f)]
    r = subprocess.run(cmd + ["add", "alice", "--role", "annotator"], input="short\n", text=True,
                       capture_output=True, env=env)
    assert r.returncode == 2 and "at least 12" in r.stderr and not f.exists()
    r = subprocess.run(cmd + ["add", "alice", "--role", "annotator"], input="a-long-password-1\n", text=True,
                       capture_output=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "a-long-password-1" not in f.read_text()
    assert read_users(f)["alice"]["password"].startswith("scrypt$")
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    r = subprocess.run(cmd + ["list"], text=True, capture_output=True, env=env)
    assert r.stdout.split() == ["alice", "annotator"]
    r = subprocess.run(cmd + ["remove", "bob"], text=True, capture_output=True, env=env)
    assert r.returncode == 2 and "no user 'bob'" in r.stderr
    json.loads(f.read_text())


@pytest.mark.parametrize("args, reason", [
    (["--host", "0.0.0.0"], "authentication is required"),
    (["--cors-origin", "*"], "--cors-origin"),
    (["--max-upload-mb", "0"], "must be positive"),
])
def test_unsafe_start_up_settings_are_refused(tmp_path, args, reason):
    """The refusals happen before anything listens (nothing binds a non-loopback address here)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "lib"), str(REPO / "server")]))
    (tmp_path / "studies").mkdir()
    r = subprocess.run([sys.executable, "-m", "medsamix_server", "--studies", str(tmp_path / "studies"),
                        "--state-dir", str(tmp_path / "state"), *args], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 2 and reason in r.stderr, r.stderr


def test_a_linked_datastore_file_is_refused_at_start(tmp_path):
    """MONAI Label rewrites <studies>/datastore_v2.json with a plain open(): through a link it would overwrite the
    link's target, so the server does not start on such a folder."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "lib"), str(REPO / "server")]))
    studies = tmp_path / "studies"
    studies.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (studies / "datastore_v2.json").symlink_to(target)
    r = subprocess.run([sys.executable, "-m", "medsamix_server", "--studies", str(studies), "--state-dir",
                        str(tmp_path / "state")], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "datastore_v2.json is a symbolic link" in r.stderr, r.stderr
    assert target.read_text() == "keep me"
