"""Attacks on the real hardened server process (``python -m medsamix_server``), each a pytest case of its own.

Two servers are started once for the module, in parallel, on 127.0.0.1:

* ``main``: authentication on (annotator ``ann``, admins ``adm``, annotator ``victim`` for the login throttle), one
  extra CORS origin, default limits. Its studies folder is booby-trapped before start: ``evil.nii.gz`` and
  ``labels/final/evil.nii.gz`` are symbolic links to the canary file, the final label of the last image is a link to
  the canary, ``labels/original`` is a link to the canary folder and ``dangle.nii.gz`` is a dangling link to a file
  outside the studies folder.
* ``lim``: small limits (``--max-upload-mb 5 --max-voxels 2000000 --max-json-kb 16 --max-3d-slices 5
  --max-sessions 2``) and one-second-scale tokens (``--token-ttl-h``) for the expiry case.

After every case (the autouse ``guard`` fixture): both processes are alive; the canary file and canary folder are
byte-for-byte what they were (content hashes, not times) and still regular; no file appeared, changed or vanished
anywhere under the module's temporary root (studies, state, model and TMPDIR folders included) except what the case
itself declares (a positive control's label, the training run's own folders) and the server-managed contents of
``state/{logs,sessions}`` and ``datastore_v2.json``; ``state/tmp`` and the dedicated ``TMPDIR`` are empty; no
``sitecustomize`` marker exists. Every refused request must answer 4xx with a JSON ``detail`` reason (helper
:func:`check`); positive controls make sure the suite fails if everything were simply refused.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import gzip
import hashlib
import hmac
import http.client
import io
import json
import os
import select
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import time
import urllib.parse
import warnings
import zipfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import requests

from hardened_server import start, stop, wait_ready, write_users
from app_server import free_port

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / ".demo" / "studies"
PW = {"ann": "annotator-pass-123", "adm": "admin-pass-12345", "victim": "victim-pass-1234"}
GOOD_ORIGIN = "http://good.example:8080"
EVIL_ORIGIN = "http://evil.example"
LIM_ARGS = ["--max-upload-mb", "5", "--max-voxels", "2000000", "--max-json-kb", "16", "--max-3d-slices", "5",
            "--max-sessions", "2", "--token-ttl-h", "0.0012"]  # tokens live int(4.32) = 4 s
TOKEN_TTL_S = 4
TIMEOUT = 60


# =============================================================================================== the world
@dataclasses.dataclass
class Srv:
    name: str
    url: str
    port: int
    proc: subprocess.Popen
    folder: Path  # <root>/<name>: studies, state, model, tmpdir, server.log
    tokens: dict[str, str] = dataclasses.field(default_factory=dict)
    login_each_call: bool = False

    @property
    def studies(self) -> Path:
        return self.folder / "studies"

    @property
    def state(self) -> Path:
        return self.folder / "state"

    @property
    def tmpdir(self) -> Path:
        return self.folder / "tmpdir"

    def log(self, lines: int = 60) -> str:
        try:
            return "\n".join((self.folder / "server.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def login(self, user: str) -> str:
        r = requests.post(f"{self.url}/auth/token", data={"username": user, "password": PW[user]}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        return r.json()["access_token"]

    def token(self, user: str = "adm") -> str:
        if self.login_each_call or user not in self.tokens:
            self.tokens[user] = self.login(user)
        return self.tokens[user]

    def auth(self, user: str | None = "adm") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(user)}"} if user else {}


@dataclasses.dataclass
class World:
    root: Path
    main: Srv
    lim: Srv
    ids: list[str]  # image ids of the studies (sorted); ids[-1] has its final label replaced by a canary link
    canary: Path
    canary_dir: Path
    canary_hash: str
    canary_dir_tree: dict[str, Any]
    bundle: Path
    marker: Path
    allowed: set[str] = dataclasses.field(default_factory=set)  # extra changes a case declares (path prefixes)

    @property
    def a(self) -> str:  # a plain image with a plain final label (positive controls)
        return self.ids[0]

    @property
    def b(self) -> str:
        return self.ids[1]

    @property
    def trapped(self) -> str:  # its labels/final file is a symbolic link to the canary
        return self.ids[-1]

    def fmt(self, s: str) -> str:
        return (s.replace("{A}", self.a).replace("{B}", self.b).replace("{T}", self.trapped)
                .replace("{CANARY}", str(self.canary)).replace("{ROOT}", str(self.root))
                .replace("{STUDIES}", str(self.main.studies)))


def _tree(folder: Path, root: Path, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """relative path -> ("f", sha256, mode) | ("l", link target) | ("d", mode) for everything under folder, links
    not followed; paths starting with one of ``skip`` (relative to ``root``) are left out."""
    out: dict[str, Any] = {}
    for dirpath, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if any(rel == s.rstrip("/") or rel.startswith(s) for s in skip):
                if name in dirs:
                    dirs.remove(name)
                continue
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode))
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("f", hashlib.sha256(p.read_bytes()).hexdigest(), stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("?", st.st_mode)
    return out


# Server-managed contents that change on their own (logs, live sessions, the datastore's index and lock file);
# state/tmp and tmpdir are not skipped: they must stay empty.
SKIP = tuple(f"{s}/{p}" for s in ("main", "lim") for p in (
    "state/logs/", "state/sessions/", "studies/datastore_v2.json", "studies/.lock", "server.log"))


def snapshot(w: World) -> dict[str, Any]:
    return _tree(w.root, w.root, SKIP)


def _make_studies(dest: Path) -> None:
    if DEMO.is_dir() and any(DEMO.glob("*.nii.gz")):
        dest.mkdir(parents=True)
        for p in DEMO.iterdir():
            if p.name.endswith((".nii.gz", ".nii", ".nrrd")) or p.name == ".medsamix-labels.json":
                shutil.copy2(p, dest / p.name)
        shutil.copytree(DEMO / "labels", dest / "labels")
        return
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "make_sample_studies.py"), "--out", str(dest)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def _start(name: str, root: Path, src: Path, users: dict[str, tuple[str, str]], args: list[str]) -> Srv:
    folder = root / name
    (folder / "tmpdir").mkdir(parents=True)
    shutil.copytree(src, folder / "studies", symlinks=True)
    (folder / "state").mkdir()
    write_users(folder / "state" / "users.json", users)
    port = free_port()
    proc = start(folder / "studies", folder / "state", folder / "model", folder / "server.log", port, args=args,
                 env={"TMPDIR": str(folder / "tmpdir")})
    return Srv(name, f"http://127.0.0.1:{port}", port, proc, folder)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Any:
    root = tmp_path_factory.mktemp("attacks")
    src = root / "src"
    _make_studies(src)
    ids = sorted(p.name[: -len(".nii.gz")] for p in src.glob("*.nii.gz"))
    assert len(ids) >= 3
    canary = root / "canary.txt"
    canary.write_bytes(os.urandom(4096))
    canary_dir = root / "canary_dir"
    (canary_dir / "sub").mkdir(parents=True)
    (canary_dir / "a.bin").write_bytes(os.urandom(512))
    (canary_dir / "sub" / "b.bin").write_bytes(os.urandom(512))
    marker = root / "PWNED-sitecustomize"
    bundle = root / "evil_bundle"
    bundle.mkdir()
    (bundle / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    (bundle / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    shutil.rmtree(src / "labels" / "original", ignore_errors=True)
    main_src = root / "main_src"
    shutil.copytree(src, main_src)
    # the traps (placed before start, so the datastore lists what it lists)
    (main_src / "evil.nii.gz").symlink_to(canary)
    (main_src / "labels" / "final" / "evil.nii.gz").symlink_to(canary)
    (main_src / "labels" / "final" / f"{ids[-1]}.nii.gz").unlink()
    (main_src / "labels" / "final" / f"{ids[-1]}.nii.gz").symlink_to(canary)
    (main_src / "labels" / "original").symlink_to(canary_dir, target_is_directory=True)
    (main_src / "dangle.nii.gz").symlink_to(root / "created-through-dangling-link.nii.gz")

    users = {"ann": ("annotator", PW["ann"]), "adm": ("admin", PW["adm"]), "victim": ("annotator", PW["victim"])}
    main = _start("main", root, main_src, users, ["--cors-origin", GOOD_ORIGIN])
    lim = _start("lim", root, src, {"adm": ("admin", PW["adm"])}, LIM_ARGS)
    lim.login_each_call = True
    SERVER_PIDS[:] = [main.proc.pid, lim.proc.pid]
    shutil.rmtree(main_src)
    shutil.rmtree(src)
    try:
        for s in (main, lim):
            wait_ready(s.url, s.proc, s.folder / "server.log")
        w = World(root, main, lim, ids, canary, canary_dir, hashlib.sha256(canary.read_bytes()).hexdigest(),
                  _tree(canary_dir, root), bundle, marker)
        yield w
    finally:
        for s in (main, lim):
            stop(s.proc)


@pytest.fixture(autouse=True)
def guard(request):
    if request.node.name.startswith("test_unit_"):
        yield None
        return
    w: World = request.getfixturevalue("world")
    w.allowed = set()
    before = snapshot(w)
    yield w
    problems = []
    for s in (w.main, w.lim):
        if s.proc.poll() is not None:
            problems.append(f"server {s.name} died (status {s.proc.returncode}):\n{s.log()}")
    if not (w.canary.is_file() and not w.canary.is_symlink()):
        problems.append("the canary file is gone or replaced")
    elif hashlib.sha256(w.canary.read_bytes()).hexdigest() != w.canary_hash:
        problems.append("the canary file changed")
    if _tree(w.canary_dir, w.root) != w.canary_dir_tree:
        problems.append("the canary folder changed")
    if w.marker.exists():
        problems.append("the sitecustomize marker exists: code from a client-chosen folder ran")
    for s in (w.main, w.lim):
        for folder in (s.state / "tmp", s.tmpdir):
            deadline = time.monotonic() + 3
            while folder.is_dir() and os.listdir(folder) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not folder.is_dir() or os.listdir(folder):
                problems.append(f"{folder} is not empty: {os.listdir(folder) if folder.is_dir() else 'missing'}")
    after = snapshot(w)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k)
                     and not any(k.startswith(p) for p in w.allowed))
    if changed:
        problems.append("files appeared/changed/vanished: " + ", ".join(
            f"{k} ({'new' if k not in before else 'gone' if k not in after else 'changed'})" for k in changed[:20]))
    assert not problems, "\n".join(problems)


# =============================================================================================== helpers
@dataclasses.dataclass
class Resp:
    status_code: int
    headers: dict[str, str]
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


def check(r: Any, *codes: int, head: bool = False) -> Any:
    """``r``'s status must be one of ``codes``; a 4xx/5xx must be JSON with a non-empty string ``detail``."""
    assert r.status_code in codes, f"expected {codes}, got {r.status_code}: {r.content[:600]!r}"
    if r.status_code >= 400 and not head:
        ctype = r.headers.get("content-type", "")
        assert ctype.startswith("application/json"), f"{r.status_code} is not JSON ({ctype}): {r.content[:300]!r}"
        detail = json.loads(r.content).get("detail")
        assert isinstance(detail, str) and detail.strip(), f"no detail reason: {r.content[:300]!r}"
        assert "Traceback" not in detail
    return r


def req(s: Srv, method: str, path: str, user: str | None = "adm", headers: dict[str, str] | None = None,
        **kw: Any) -> requests.Response:
    h = dict(s.auth(user))
    h.update(headers or {})
    return requests.request(method, s.url + path, headers=h, timeout=TIMEOUT, **kw)


def raw(s: Srv, method: str, path: str, user: str | None = "adm", headers: dict[str, str] | None = None,
        body: bytes | None = None, chunks: list[bytes] | None = None, host: str | None = None) -> Resp:
    """A request whose target is sent byte for byte (no client-side normalisation of ``..`` or escapes); the body
    as given (Content-Length) or as chunks (chunked transfer). Sending stops early when the server has already
    answered (as a browser does), so a refusal before the body is read is still seen."""
    h = {"Host": host or f"127.0.0.1:{s.port}", "Connection": "close"}
    h.update(s.auth(user))
    h.update(headers or {})
    if chunks is not None:
        h["Transfer-Encoding"] = "chunked"
    elif body is not None:
        h["Content-Length"] = str(len(body))
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=TIMEOUT)
    try:
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n"
        sock.sendall(head.encode("latin-1"))
        pieces: list[bytes] = []
        if chunks is not None:
            pieces = [b"%x\r\n%s\r\n" % (len(c), c) for c in chunks] + [b"0\r\n\r\n"]
        elif body:
            pieces = [body[i:i + (256 << 10)] for i in range(0, len(body), 256 << 10)]
        for piece in pieces:
            if select.select([sock], [], [], 0)[0]:
                break  # the server has answered already
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
        resp = http.client.HTTPResponse(sock, method=method)
        resp.begin()
        data = resp.read()
        return Resp(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        sock.close()


def multipart(fields: dict[str, tuple[str | None, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body: name -> (filename or None for a plain field, content)."""
    boundary = "----attack" + os.urandom(8).hex()
    out = io.BytesIO()
    for name, (filename, content) in fields.items():
        out.write(f"--{boundary}\r\n".encode())
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out.write(f"Content-Disposition: {disp}\r\n".encode())
        if filename is not None:
            out.write(b"Content-Type: application/octet-stream\r\n")
        out.write(b"\r\n" + content + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def infer(s: Srv, image: str | None, params: Any, user: str | None = "ann", model: str = "medsamix",
          session_id: str | None = None, output: str = "json", raw_params: bool = False) -> requests.Response:
    q = {"output": output}
    if image is not None:
        q["image"] = image
    if session_id is not None:
        q["session_id"] = session_id
    text = params if raw_params else json.dumps(params)
    return req(s, "POST", f"/infer/{model}", user, params=q, files={"params": (None, text)})


def nifti_bytes(shape: tuple[int, ...], dtype: Any = np.uint8) -> bytes:
    img = nib.Nifti1Image(np.zeros(shape, dtype), np.eye(4))
    return gzip.compress(img.to_bytes(), compresslevel=9)


def label_for(w: World, image: str) -> bytes:
    """A valid (empty) label on ``image``'s voxel grid."""
    img = nib.load(str(w.main.studies / f"{image}.nii.gz"))
    return gzip.compress(nib.Nifti1Image(np.zeros(img.shape[:3], np.uint8), img.affine).to_bytes())


def label_path(w: World, image: str) -> Path:
    return w.main.studies / "labels" / "final" / f"{image}.nii.gz"


def zip_bytes(members: list[tuple[str, bytes, int | None]]) -> bytes:
    """members: (name, data, unix mode or None)."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        warnings.simplefilter("ignore")  # duplicate names are one of the attacks
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if mode is not None:
                info.external_attr = mode << 16
            z.writestr(info, data)
    return buf.getvalue()


def tar_bytes(members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                t.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                t.addfile(info, io.BytesIO(m[1]))
    return buf.getvalue()


def tar_link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def upload_session(s: Srv, data: bytes, filename: str, uncompress: bool, user: str | None = "ann"
                   ) -> requests.Response:
    return req(s, "PUT", "/session/", user, params={"uncompress": str(uncompress).lower()},
               files={"files": (filename, data)})


SERVER_PIDS: list[int] = []  # this module's servers (other test sessions may run training workers of their own)


def worker_pids() -> list[int]:
    """Training worker processes of this module's servers (``python -m medsamix_server.train_worker <server pid>``)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"medsamix_server.train_worker" in cmd and any(str(p).encode() in cmd for p in SERVER_PIDS):
                pids.append(int(d))
    return pids


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged_jwt(claims: dict[str, Any], key: bytes = b"not-the-server-key", alg: str = "HS256") -> str:
    header = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    payload = b64url(json.dumps(claims).encode())
    if alg == "none":
        return f"{header}.{payload}."
    sig = hmac.new(key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(sig)}"


# =============================================================================================== 0. positive controls
def test_control_login_and_token_work(world):
    r = check(requests.post(f"{world.main.url}/auth/token", data={"username": "ann", "password": PW["ann"]},
                            timeout=TIMEOUT), 200)
    tok = r.json()["access_token"]
    v = check(requests.get(f"{world.main.url}/auth/token/valid", headers={"Authorization": f"Bearer {tok}"},
                           timeout=TIMEOUT), 200)
    assert v.json()["username"] == "ann" and v.json()["roles"] == ["annotator"]
    check(requests.get(f"{world.main.url}/info/", headers={"Authorization": f"Bearer {tok}"}, timeout=TIMEOUT), 200)


def test_control_box_infer_on_a_datastore_image(world):
    r = check(infer(world.main, world.a, {"roi": [5, 25, 5, 30, 10, 10]}), 200)
    assert r.json()["mode"] == "2d" and r.json()["image_shape"]
    r = check(infer(world.main, world.a, {"roi": [5, 25, 5, 30, 10, 10]}, output="image"), 200)
    assert gzip.decompress(r.content)[:4]  # a NIfTI label


def test_control_label_save_then_get(world):
    data = label_path(world, world.a).read_bytes()
    world.allowed.add(f"main/studies/labels/final/{world.a}.nii.gz")
    r = check(req(world.main, "PUT", "/datastore/label", "ann", params={"image": world.a, "tag": "final"},
                  files={"label": (f"{world.a}.nii.gz", data),
                         "params": (None, json.dumps({"label_info": [{"name": "anterior", "idx": 1}]}))}), 200)
    assert r.json()["label"] == world.a
    g = check(req(world.main, "GET", "/datastore/label", "ann", params={"label": world.a, "tag": "final"}), 200)
    assert g.content == data


def test_control_session_upload_infer_and_delete(world):
    data = (world.main.studies / f"{world.b}.nii.gz").read_bytes()
    r = check(upload_session(world.main, data, "local.nii.gz", False), 200)
    sid = r.json()["session_id"]
    assert "/" not in json.dumps(r.json()["session_info"]["image"])  # no server paths
    check(infer(world.main, None, {"roi": [5, 25, 5, 30, 10, 10]}, session_id=sid), 200)
    check(req(world.main, "GET", f"/session/{sid}", "ann"), 200)
    check(req(world.main, "DELETE", f"/session/{sid}", "ann"), 200)
    check(req(world.main, "GET", f"/session/{sid}", "ann"), 404)


def test_control_image_download_and_allowed_cors_origin(world):
    r = check(req(world.main, "GET", "/datastore/image", "ann", params={"image": world.a},
                  headers={"Origin": GOOD_ORIGIN}), 200)
    assert r.content == (world.main.studies / f"{world.a}.nii.gz").read_bytes()
    assert r.headers.get("access-control-allow-origin") == GOOD_ORIGIN


# =============================================================================================== 1. code execution
def test_bundle_path_folder_uploaded_as_session_is_refused(world):
    # the sitecustomize folder as a client would upload it (a zip with uncompress=true): refused, not a series
    up = check(upload_session(world.main, zip_bytes([("bundle/sitecustomize.py", world.bundle.joinpath(
        "sitecustomize.py").read_bytes(), 0o100644)]), "bundle.zip", True), 400, 413)
    assert up.status_code != 200
    sessions = world.main.state / "sessions"
    for target in (world.bundle, sessions, *sessions.glob("*")):
        r = check(req(world.main, "POST", "/train/merge", "adm", json={"bundle_path": str(target), "trials": 1}), 400)
        assert "bundle_path" in r.json()["detail"]
    time.sleep(1.0)
    assert not world.marker.exists() and not worker_pids()


@pytest.mark.parametrize("query", ["", "?run_sync=true", "?enqueue=true"])
def test_bundle_path_train_request_is_refused(world, query):
    r = check(req(world.main, "POST", f"/train/merge{query}", "adm", json={"bundle_path": str(world.bundle)}), 400)
    assert "bundle_path" in r.json()["detail"]
    assert not world.marker.exists() and not worker_pids()


@pytest.mark.parametrize("options", [
    {"pretrained_path": "{ROOT}/evil_bundle"},
    {"model_dir": "{ROOT}"},
    {"conf": {"pool": "{ROOT}/evil_bundle"}},
    {"pool": "{ROOT}/evil_bundle"},
    {"name": "../../x"},
    {"dataset": "Dataset"},
    {"max_epochs": 1},
    {"__class__": "x"},
    {"PYTHONPATH": "{ROOT}/evil_bundle"},
], ids=lambda o: next(iter(o)))
def test_unknown_train_options_are_refused(world, options):
    body = json.loads(world.fmt(json.dumps(options)))
    r = check(req(world.main, "POST", "/train/merge", "adm", json=body), 400)
    assert "unknown option" in r.json()["detail"]
    assert not worker_pids()


@pytest.mark.parametrize("body", [
    '{"trials": ' + "9" * 400 + "}",  # a huge integer
    '{"trials": 1e400}',
    '{"trials": NaN}',
    '{"trials": Infinity}',
    '{"trials": "1; touch /tmp/x"}',
    '{"trials": 0}',
    '{"seed": -1}',
    '{"granularity": [1]}',
    '{"preprocessing": "../../evil"}',
    '{"min_gain": "nan"}',
    '{"separate": "maybe"}',
    "[1]", "null", '"x"', "{", "1",
], ids=lambda b: b[:20])
def test_bad_train_values_are_400_not_500(world, body):
    r = check(req(world.main, "POST", "/train/merge", "adm", data=body,
                  headers={"Content-Type": "application/json"}), 400)
    assert r.json()["detail"]
    assert not worker_pids()


@pytest.mark.parametrize("key, value", [
    ("save_label", True), ("label_tag", "final"), ("device", "cuda:0"), ("model", "sam_tiny"),
    ("image", "/etc/passwd"), ("session", {"image": "/etc/passwd"}), ("result_uri", "file:///tmp/x"),
    ("cache_transforms", True), ("logging", "DEBUG"), ("__class__", "x"),
])
def test_unknown_infer_keys_are_refused(world, key, value):
    r = check(infer(world.main, world.a, {"roi": [5, 25, 5, 30, 10, 10], key: value}), 400)
    assert key in r.json()["detail"]


@pytest.mark.parametrize("field", ["file", "label", "image"])
def test_infer_form_fields_other_than_params_are_refused(world, field):
    data = (world.main.studies / f"{world.a}.nii.gz").read_bytes()
    r = check(req(world.main, "POST", "/infer/medsamix", "ann", params={"image": world.a},
                  files={"params": (None, json.dumps({"roi": [5, 25, 5, 30, 10, 10]})),
                         field: ("x.nii.gz", data)}), 400)
    assert field in r.json()["detail"]


# =============================================================================================== 2. files outside
BAD_IDS = [
    ("../canary", (400,)),
    ("../../canary.txt", (400,)),
    ("..", (400,)),
    (".", (400,)),
    ("/etc/passwd", (400,)),
    ("{CANARY}", (400,)),
    ("{STUDIES}/{A}", (400,)),
    ("{A}/../../canary", (400,)),
    ("{A}\\..\\..\\canary", (400,)),
    ("%2e%2e%2fcanary", (400,)),  # double-encoded: the server sees %2e%2e%2f
    ("{A}\x00", (400,)),
    ("{A}\nx", (400,)),
    ("{A}\r\nX-Injected: 1", (400,)),
    ("a" * 200, (400,)),
    ("a" * 5000, (400,)),
    (".medsamix-labels", (400,)),
    (".hidden", (400,)),
    ("-rf", (400,)),
    ("", (400, 422)),
    ("{A}.nii.gz", (404,)),
    ("nonexistent", (404,)),
    ("dangle", (404,)),
    ("evil", (403,)),  # a link in the studies folder to the canary
]


def _bad_id_param(ids=BAD_IDS):
    return pytest.mark.parametrize("bad, codes", ids, ids=[repr(b)[:24] for b, _ in ids])


@_bad_id_param()
def test_get_image_with_bad_id(world, bad, codes):
    check(req(world.main, "GET", "/datastore/image", "ann", params={"image": world.fmt(bad)}), *codes)


@pytest.mark.parametrize("path, codes", [
    ("/datastore/image?image=..%2f..%2fcanary.txt", (400,)),
    ("/datastore/image?image=%2e%2e%2f%2e%2e%2fcanary.txt", (400,)),
    ("/datastore/image?image=..%252f..%252fcanary.txt", (400,)),
    ("/datastore/image?image=%2fetc%2fpasswd", (400,)),
    ("/datastore/image?image={A}%00.nii.gz", (400,)),
    ("/datastore/image?image={A}%c0%af..", (400,)),
    ("/datastore/image?image=evil", (403,)),
    ("/datastore/label?label=..%2f..%2fcanary&tag=final", (400,)),
    ("/datastore/label?label={A}&tag=..%2f..%2f", (400,)),
    ("/datastore/../../canary.txt", (404,)),
    ("/datastore/image/../../../canary.txt", (404,)),
    ("/session/..%2f..%2fcanary.txt", (400, 404)),
    ("/session/%2e%2e", (400,)),
    ("/session/..", (400,)),
    ("/session/.", (400,)),
    ("/ohif/..%2f..%2f..%2f..%2fetc%2fpasswd", (404,)),
    ("/ohif/../../../../etc/passwd", (404,)),
    ("/ohif/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd", (404,)),
    ("/ohif/medsamix/..%2f..%2f..%2f..%2f..%2fetc%2fpasswd", (404,)),
    ("/ohif/medsamix/../../routes/core.py", (404,)),
    ("/ohif/medsamix/..%2f..%2froutes%2fcore.py", (404,)),
    ("/ohif/medsamix/%2e%2e/%2e%2e/auth.py", (404,)),
], ids=lambda x: x if isinstance(x, str) else None)
def test_raw_traversal_paths(world, path, codes):
    r = check(raw(world.main, "GET", world.fmt(path), "ann"), *codes)
    assert b"root:" not in r.content and b"import" not in r.content


def test_head_image_through_a_link_is_refused(world):
    check(req(world.main, "HEAD", "/datastore/image", "ann", params={"image": "evil"}), 403, head=True)
    check(req(world.main, "HEAD", "/datastore/image", "ann", params={"image": "../canary"}), 400, head=True)


@_bad_id_param([b for b in BAD_IDS if b[0] not in ("{A}.nii.gz", "nonexistent", "evil", "dangle", "")]
               + [("", (400,)), ("evil", (409, 403)), ("dangle", (409, 403)), ("{A}", (409,))])
def test_put_image_with_bad_id(world, bad, codes):
    data = (world.main.studies / f"{world.a}.nii.gz").read_bytes()
    r = req(world.main, "PUT", "/datastore/image", "ann", params={"image": world.fmt(bad)},
            files={"file": ("x.nii.gz" if bad else ".nii.gz", data)})
    check(r, *codes)
    assert not (world.root / "created-through-dangling-link.nii.gz").exists()


@pytest.mark.parametrize("filename", ["..\\..\\canary_dir\\x.nii.gz", ".hidden.nii.gz", "x\x01y.nii.gz",
                                      "a/../../../x.png", "evil.nii.gz", "dangle.nii.gz"])
def test_put_image_with_bad_upload_filename(world, filename):
    data = (world.main.studies / f"{world.a}.nii.gz").read_bytes()
    check(req(world.main, "PUT", "/datastore/image", "ann", files={"file": (filename, data)}), 400, 403, 409)
    assert not (world.root / "created-through-dangling-link.nii.gz").exists()


@pytest.mark.parametrize("image, tag, codes", [
    ("../canary", "final", (400,)),
    ("{CANARY}", "final", (400,)),
    ("{A}", "../../canary", (400,)),
    ("{A}", "original/../../..", (400,)),
    ("{A}", "final\x00", (400,)),
    ("{A}", "other", (400,)),
    ("{A}", "/tmp", (400,)),
    ("evil", "final", (403,)),
    ("{T}", "final", (403,)),  # its final label is a link to the canary: the copy would write through it
    ("{A}", "original", (403,)),  # labels/original is a link to the canary folder
    ("nonexistent", "final", (404,)),
    ("dangle", "final", (404,)),
])
def test_put_label_with_bad_target(world, image, tag, codes):
    data = label_for(world, world.trapped if image == "{T}" else world.a)
    check(req(world.main, "PUT", "/datastore/label", "ann", params={"image": world.fmt(image), "tag": tag},
              files={"label": ("label.nii.gz", data)}), *codes)


@pytest.mark.parametrize("image, tag", [("{T}", "final"), ("{A}", "original")])
def test_put_raw_viewer_label_through_a_link_is_refused(world, image, tag):
    """OHIF's raw label (``.bin``: uint8 voxels in viewer order) is converted to NIfTI before it is stored: the
    stored file's path is what must not be a link."""
    img = nib.load(str(world.main.studies / f"{world.fmt(image)}.nii.gz"))
    raw_label = bytes(int(np.prod(img.shape[:3])))
    r = req(world.main, "PUT", "/datastore/label", "ann", params={"image": world.fmt(image), "tag": tag},
            files={"label": ("label.bin", raw_label)})
    if r.status_code == 400 and "only NIfTI" in r.text:
        pytest.skip("this server takes no raw .bin labels")
    check(r, 403)


@pytest.mark.parametrize("size", ["empty", "short", "long"])
def test_put_raw_viewer_label_of_the_wrong_size_is_400(world, size):
    img = nib.load(str(world.main.studies / f"{world.b}.nii.gz"))
    n = int(np.prod(img.shape[:3]))
    raw_label = {"empty": b"", "short": bytes(n - 1), "long": bytes(n * 8)}[size]
    r = req(world.main, "PUT", "/datastore/label", "ann", params={"image": world.b, "tag": "final"},
            files={"label": ("label.bin", raw_label)})
    if r.status_code == 400 and "only NIfTI" in r.text:
        pytest.skip("this server takes no raw .bin labels")
    check(r, 400)
    assert str(world.root) not in r.text


@pytest.mark.parametrize("fmt", [
    {"result_extension": "../../../canary.txt"}, {"result_extension": ".exe"}, {"result_extension": 5},
    {"result_extension": "/tmp/x.nrrd"}, {"result_dtype": "object"}, {"result_dtype": ["uint8"]},
    {"result_compress": "maybe"}, {"result_extension": ".nrrd", "result_dtype": "float1024"},
], ids=lambda f: json.dumps(f)[:40])
def test_infer_result_format_options_are_checked(world, fmt):
    check(infer(world.main, world.a, dict({"roi": [5, 25, 5, 30, 10, 10]}, **fmt), output="image"), 400)


@pytest.mark.parametrize("label, tag, codes", [
    ("evil", "final", (403,)),
    ("{T}", "final", (403,)),
    ("../canary", "final", (400,)),
    ("{A}", "../final", (400,)),
    ("{A}", "original", (403, 404)),
    ("{A}\x00", "final", (400,)),
])
def test_get_label_with_bad_target(world, label, tag, codes):
    r = check(req(world.main, "GET", "/datastore/label", "ann", params={"label": world.fmt(label), "tag": tag}),
              *codes)
    assert hashlib.sha256(r.content).hexdigest() != world.canary_hash


@pytest.mark.parametrize("image, codes", [
    ("evil", (403,)),
    ("{T}", (403,)),  # deleting the image would delete its labels: the final one resolves to the canary
    ("../canary", (400,)),
    ("{CANARY}", (400,)),
    ("nonexistent", (404,)),
    ("dangle", (404,)),
    ("{A}\n", (400,)),
])
def test_delete_image_as_admin_never_touches_outside(world, image, codes):
    check(req(world.main, "DELETE", "/datastore/image", "adm", params={"id": world.fmt(image)}), *codes)
    assert (world.main.studies / f"{world.trapped}.nii.gz").is_file()


@pytest.mark.parametrize("label, tag, codes", [
    ("evil", "final", (403,)),
    ("{T}", "final", (403,)),
    ("../canary", "final", (400,)),
    ("{A}", "../..", (400,)),
    ("{A}", "original", (403, 404)),
    ("nonexistent", "final", (404,)),
])
def test_delete_label_as_admin_never_touches_outside(world, label, tag, codes):
    check(req(world.main, "DELETE", "/datastore/label", "adm", params={"id": world.fmt(label), "tag": tag}), *codes)


@_bad_id_param()
def test_infer_with_bad_image_id(world, bad, codes):
    codes = tuple(c for c in codes if c != 422) or (400,)
    check(infer(world.main, world.fmt(bad), {"roi": [5, 25, 5, 30, 10, 10]}), *codes)


@pytest.mark.parametrize("sid, codes", [
    ("../../state", (400,)), ("..", (400,)), ("/tmp", (400,)), ("{CANARY}", (400,)), ("x\x00", (400,)),
    ("0a3b3c1e-aaaa-bbbb-cccc-000000000000", (404,)), ("logs", (404,)), ("tmp", (404,)), ("a" * 300, (400,)),
])
def test_infer_with_bad_session_id(world, sid, codes):
    check(infer(world.main, None, {"roi": [5, 25, 5, 30, 10, 10]}, session_id=world.fmt(sid)), *codes)


@pytest.mark.parametrize("sid", ["..", "logs", "..%2f..%2fstate", "%00"])
def test_delete_and_get_session_with_bad_id(world, sid):
    check(raw(world.main, "DELETE", f"/session/{sid}", "ann"), 400, 404)
    check(raw(world.main, "GET", f"/session/{sid}?image=true", "ann"), 400, 404)


def _archives(w: World) -> list[tuple[str, bytes, str]]:
    payload = b"pwned"
    outside = str(w.root / "abs-pwned")
    ifo = tarfile.TarInfo("fifo")
    ifo.type = tarfile.FIFOTYPE
    dev = tarfile.TarInfo("dev")
    dev.type = tarfile.CHRTYPE
    dev.devmajor, dev.devminor = 1, 3
    return [
        ("zip-dotdot", zip_bytes([("../../../pwned-zip", payload, 0o100644)]), "zip"),
        ("zip-dotdot-inner", zip_bytes([("a/../../../../pwned-zip", payload, None)]), "zip"),
        ("zip-absolute", zip_bytes([(outside, payload, 0o100644)]), "zip"),
        ("zip-backslash", zip_bytes([("..\\..\\..\\pwned-zip", payload, None)]), "zip"),
        ("zip-symlink", zip_bytes([("link", str(w.canary).encode(), stat.S_IFLNK | 0o777)]), "zip"),
        ("zip-symlink-dir", zip_bytes([("d", str(w.canary_dir).encode(), stat.S_IFLNK | 0o777),
                                       ("d/pwned", payload, 0o100644)]), "zip"),
        ("zip-drive", zip_bytes([("C:/pwned", payload, None)]), "zip"),
        ("tar-dotdot", tar_bytes([("../../../pwned-tar", payload)]), "tar.gz"),
        ("tar-absolute", tar_bytes([(outside, payload)]), "tar.gz"),
        ("tar-symlink", tar_bytes([tar_link("link", str(w.canary), tarfile.SYMTYPE)]), "tar.gz"),
        ("tar-symlink-then-write", tar_bytes([tar_link("d", str(w.canary_dir), tarfile.SYMTYPE),
                                              ("d/pwned", payload)]), "tar"),
        ("tar-hardlink", tar_bytes([tar_link("hard", str(w.canary), tarfile.LNKTYPE)]), "tar"),
        ("tar-hardlink-rel", tar_bytes([tar_link("hard", "../../../canary.txt", tarfile.LNKTYPE)]), "tar"),
        ("tar-fifo", tar_bytes([ifo]), "tar"),
        ("tar-device", tar_bytes([dev]), "tar"),
        ("not-an-archive", os.urandom(2000), "zip"),
        # damaged or conflicting archives: 400 with the reason, never a 500
        ("zip-duplicate", zip_bytes([("a.dcm", payload, None), ("a.dcm", payload, None)]), "zip"),
        ("zip-file-then-dir", zip_bytes([("a", payload, None), ("a/b", payload, None)]), "zip"),
        ("zip-method-99", _zip_method_99(), "zip"),
        ("zip-bad-crc", _zip_bad_crc(), "zip"),
        ("tar-truncated", tar_bytes([("a.dcm", os.urandom(50000))])[:20000], "tar.gz"),
        ("tar-file-then-dir", tar_bytes([("x", payload), ("x/y", payload)]), "tar"),
    ]


def _zip_method_99() -> bytes:
    """A zip whose member claims compression method 99 (AES), which the reader does not support."""
    d = bytearray(zip_bytes([("a.dcm", b"x" * 100, 0o100644)]))
    d[8:10] = (99).to_bytes(2, "little")
    cd = d.find(b"PK\x01\x02")
    d[cd + 10:cd + 12] = (99).to_bytes(2, "little")
    return bytes(d)


def _zip_bad_crc() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("a.dcm", os.urandom(3000))
    d = bytearray(buf.getvalue())
    d[100:110] = bytes(10)
    return bytes(d)


ARCHIVE_IDS = ["zip-dotdot", "zip-dotdot-inner", "zip-absolute", "zip-backslash", "zip-symlink", "zip-symlink-dir",
               "zip-drive", "tar-dotdot", "tar-absolute", "tar-symlink", "tar-symlink-then-write", "tar-hardlink",
               "tar-hardlink-rel", "tar-fifo", "tar-device", "not-an-archive", "zip-duplicate", "zip-file-then-dir",
               "zip-method-99", "zip-bad-crc", "tar-truncated", "tar-file-then-dir"]
DAMAGED = {"not-an-archive", "zip-duplicate", "zip-file-then-dir", "zip-method-99", "zip-bad-crc", "tar-truncated",
           "tar-file-then-dir"}


@pytest.mark.parametrize("name", ARCHIVE_IDS)
def test_session_archive_members_cannot_escape(world, name):
    data, ext = next((d, e) for n, d, e in _archives(world) if n == name)
    r = check(upload_session(world.main, data, f"series.{ext}", True), 400)
    assert ("archive" if name in DAMAGED else "archive member") in r.json()["detail"], r.json()
    for p in (world.root / "pwned-zip", world.root / "pwned-tar", world.root / "abs-pwned", Path("/pwned")):
        assert not p.exists()


def test_session_archive_with_too_many_members(world):
    data = zip_bytes([(f"f{i:05d}.dcm", b"", 0o100644) for i in range(5001)])
    r = check(upload_session(world.main, data, "many.zip", True), 413)
    assert "members" in r.json()["detail"]


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_session_archive_bomb_over_the_limit(world, kind):
    zeros = b"\0" * (12 << 20)  # 12 MiB unpacked, a few KiB packed; the limit is 5 MiB
    data = zip_bytes([("a.dcm", zeros, 0o100644)]) if kind == "zip" else tar_bytes([("a.dcm", zeros)])
    assert len(data) < 1 << 20
    r = check(upload_session(world.lim, data, f"bomb.{kind}", True, user="adm"), 413)
    assert "bytes" in r.json()["detail"]


@pytest.mark.parametrize("filename", ["../../../pwned.nii.gz", "/tmp/pwned.nii.gz", "x.png", "x.nii.gz"])
def test_session_single_file_names_and_garbage(world, filename):
    # a file's name never becomes a path; garbage content is refused by the header check
    check(upload_session(world.main, os.urandom(3000), filename, False), 400)


def dicom_bytes(rows: int, cols: int, frames: int) -> bytes:
    """A DICOM file header (no pixel data) of a multi-frame image."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.Modality = rows, cols, frames, "CT"
    buf = io.BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=True)
    except TypeError:  # pydicom 2
        ds.save_as(buf, write_like_original=False)
    return buf.getvalue()


def nrrd_bytes(fields: str, data: bytes = b"") -> bytes:
    return f"NRRD0004\ntype: uint8\ndimension: 3\n{fields}\n".encode() + data


@pytest.mark.parametrize("case", ["detached-absolute", "detached-relative", "detached-list", "gzip-bomb",
                                  "bzip2-bomb", "dicom-multiframe"])
def test_volume_headers_that_reach_outside_or_inflate(world, case):
    """An NRRD header may name a separate data file (a reader would open it wherever it points) or carry
    compressed data far larger than its sizes; a DICOM file may hold many frames. All refused at upload."""
    s, user = world.main, "ann"
    if case == "detached-absolute":
        data, name = nrrd_bytes(f"sizes: 4 4 4\nencoding: raw\ndata file: {world.canary}\n"), "x.nrrd"
    elif case == "detached-relative":
        data, name = nrrd_bytes("sizes: 4 4 4\nencoding: raw\ndatafile: ../../../../canary.txt\n"), "x.nrrd"
    elif case == "detached-list":
        data, name = nrrd_bytes("sizes: 4 4 4\nencoding: raw\ndata file: LIST\n../../../../canary.txt\n"), "x.nrrd"
    elif case in ("gzip-bomb", "bzip2-bomb"):
        import bz2

        zeros = b"\0" * (40 << 20)
        packed = gzip.compress(zeros) if case == "gzip-bomb" else bz2.compress(zeros)
        data, name = nrrd_bytes(f"sizes: 10 10 10\nencoding: {case.split('-')[0]}\n", packed), "bomb.nrrd"
        s, user = world.lim, "adm"
    else:
        data, name = zip_bytes([("series/0001.dcm", dicom_bytes(1000, 1000, 50), 0o100644)]), "series.zip"
        s, user = world.lim, "adm"
    r = check(upload_session(s, data, name, name.endswith(".zip"), user=user), 400, 413)
    assert any(w in r.text for w in ("data file", "inflates", "voxels", "unreadable image header")), r.text
    if name.endswith(".nrrd"):
        check(req(s, "PUT", "/datastore/image", user, params={"image": "nrrdtrap"}, files={"file": (name, data)}),
              400, 413)
        assert "nrrdtrap" not in req(s, "GET", "/datastore/?output=ids", user).json()


def test_symlinked_image_get_infer_delete_refused_and_canary_kept(world):
    check(req(world.main, "GET", "/datastore/image", "ann", params={"image": "evil"}), 403)
    check(infer(world.main, "evil", {"roi": [5, 25, 5, 30, 1, 1]}), 403)
    check(req(world.main, "DELETE", "/datastore/image", "adm", params={"id": "evil"}), 403)
    check(req(world.main, "DELETE", "/datastore/label", "adm", params={"id": "evil", "tag": "final"}), 403)
    assert world.canary.is_file() and (world.main.studies / "evil.nii.gz").is_symlink()


# =============================================================================================== 3. auth, CORS, Host
PROTECTED = [
    ("GET", "/info/"), ("POST", "/infer/medsamix?image={A}"), ("GET", "/datastore/"),
    ("GET", "/datastore/?output=all"), ("GET", "/datastore/image?image={A}"), ("HEAD", "/datastore/image?image={A}"),
    ("PUT", "/datastore/image?image=new1"), ("PUT", "/datastore/?image=new1"), ("DELETE", "/datastore/image?id={A}"),
    ("PUT", "/datastore/label?image={A}&tag=final"), ("GET", "/datastore/label?label={A}&tag=final"),
    ("DELETE", "/datastore/label?id={A}&tag=final"), ("PUT", "/session/"), ("GET", "/session/abc"),
    ("DELETE", "/session/abc"), ("GET", "/train/"), ("POST", "/train/merge"), ("DELETE", "/train/"),
    ("GET", "/logs/"), ("GET", "/proxy/dicom/qido/studies"), ("GET", "/auth/token/valid"),
    ("POST", "/activelearning/random"),
]


@pytest.mark.parametrize("method, path", PROTECTED, ids=[f"{m} {p}" for m, p in PROTECTED])
def test_protected_routes_need_a_token(world, method, path):
    body, ctype = multipart({"params": (None, b'{"roi": [5, 25, 5, 30, 10, 10]}')})
    if method in ("POST", "PUT"):
        r = raw(world.main, method, world.fmt(path), None, headers={"Content-Type": ctype}, body=body)
    else:
        r = raw(world.main, method, world.fmt(path), None)
    check(r, 401, head=method == "HEAD")
    assert "bearer" in r.headers.get("www-authenticate", "").lower()


def _bad_tokens(w: World) -> list[tuple[str, str]]:
    ann = w.main.token("ann")
    h, p, s = ann.split(".")
    claims = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
    swapped = b64url(json.dumps(dict(claims, sub="adm")).encode())
    now = int(time.time())
    return [
        ("garbage", "Bearer garbage"),
        ("empty", "Bearer "),
        ("basic", "Basic " + base64.b64encode(b"adm:" + PW["adm"].encode()).decode()),
        ("raw-token", ann),  # no scheme
        ("alg-none", "Bearer " + forged_jwt({"sub": "adm", "exp": now + 3600}, alg="none")),
        ("other-key", "Bearer " + forged_jwt({"sub": "adm", "iat": now, "exp": now + 3600})),
        ("expired-other-key", "Bearer " + forged_jwt({"sub": "adm", "iat": now - 7200, "exp": now - 3600})),
        ("payload-swapped", f"Bearer {h}.{swapped}.{s}"),
        ("signature-cut", f"Bearer {h}.{p}."),
        ("no-exp", "Bearer " + forged_jwt({"sub": "adm"})),
        ("huge", "Bearer " + "A" * 20000),
    ]


BAD_TOKEN_IDS = ["garbage", "empty", "basic", "raw-token", "alg-none", "other-key", "expired-other-key",
                 "payload-swapped", "signature-cut", "no-exp", "huge"]


@pytest.mark.parametrize("kind", BAD_TOKEN_IDS)
def test_forged_tokens_are_401(world, kind):
    value = dict(_bad_tokens(world))[kind]
    for method, path in (("GET", "/info/"), ("DELETE", "/train/"), ("GET", "/logs/")):
        check(raw(world.main, method, path, None, headers={"Authorization": value}), 401)


def test_expired_token_is_401(world):
    tok = world.lim.login("adm")
    check(requests.get(f"{world.lim.url}/info/", headers={"Authorization": f"Bearer {tok}"}, timeout=TIMEOUT), 200)
    time.sleep(TOKEN_TTL_S + 1.2)
    r = check(requests.get(f"{world.lim.url}/info/", headers={"Authorization": f"Bearer {tok}"}, timeout=TIMEOUT),
              401)
    assert "expired" in r.json()["detail"]


@pytest.mark.parametrize("method, path", [
    ("POST", "/train/merge"), ("DELETE", "/train/"), ("DELETE", "/datastore/image?id={A}"),
    ("DELETE", "/datastore/label?id={A}&tag=final"), ("GET", "/logs/"), ("GET", "/logs"),
])
def test_annotator_on_admin_routes_is_403(world, method, path):
    check(req(world.main, method, world.fmt(path), "ann", json={"trials": 1} if method == "POST" else None), 403)
    assert label_path(world, world.a).is_file() and not worker_pids()


def test_login_wrong_password_then_throttled(world):
    url = f"{world.main.url}/auth/token"
    for _ in range(5):
        check(requests.post(url, data={"username": "victim", "password": "wrong-password-1"}, timeout=TIMEOUT), 401)
    check(requests.post(url, data={"username": "victim", "password": "wrong-password-1"}, timeout=TIMEOUT), 429)
    # even the right password waits for the window now
    check(requests.post(url, data={"username": "victim", "password": PW["victim"]}, timeout=TIMEOUT), 429)
    # an unknown name answers like a wrong password
    check(requests.post(url, data={"username": "nobody", "password": "whatever-pass-1"}, timeout=TIMEOUT), 401)
    check(requests.post(url, data={"username": "ann"}, timeout=TIMEOUT), 400)


@pytest.mark.parametrize("origin", [EVIL_ORIGIN, "null", GOOD_ORIGIN + ".evil.com", "http://good.example",
                                    "https://good.example:8080", "http://127.0.0.1:1", "HTTP://EVIL.EXAMPLE/"])
def test_foreign_origin_is_403(world, origin):
    r = check(req(world.main, "GET", "/info/", "ann", headers={"Origin": origin}), 403)
    assert "access-control-allow-origin" not in r.headers


def test_csrf_simple_form_post_to_infer_is_403(world):
    for user in (None, "ann"):
        r = check(req(world.main, "POST", f"/infer/medsamix?image={world.a}", user,
                      headers={"Origin": EVIL_ORIGIN},
                      data={"params": json.dumps({"roi": [5, 25, 5, 30, 10, 10]})}), 403)
        assert "access-control-allow-origin" not in r.headers
    r = check(req(world.main, "POST", "/auth/token", None, headers={"Origin": EVIL_ORIGIN},
                  data={"username": "adm", "password": PW["adm"]}), 403)


def test_preflight_from_evil_origin_is_403(world):
    for path in ("/infer/medsamix", "/datastore/image", "/train/merge"):
        r = check(req(world.main, "OPTIONS", path, None, headers={
            "Origin": EVIL_ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization"}), 403)
        assert "access-control-allow-origin" not in r.headers


def test_configured_origin_gets_only_itself_never_star(world):
    r = check(req(world.main, "OPTIONS", "/infer/medsamix", None, headers={
        "Origin": GOOD_ORIGIN, "Access-Control-Request-Method": "POST"}), 200)
    assert r.headers["access-control-allow-origin"] == GOOD_ORIGIN
    r = check(req(world.main, "GET", "/info/", "ann", headers={"Origin": GOOD_ORIGIN}), 200)
    assert r.headers["access-control-allow-origin"] == GOOD_ORIGIN
    assert r.headers.get("access-control-allow-credentials") is None
    own = f"http://127.0.0.1:{world.main.port}"
    r = check(req(world.main, "GET", "/info/", "ann", headers={"Origin": own}), 200)
    assert "access-control-allow-origin" not in r.headers
    r = check(req(world.main, "GET", "/info/", "ann"), 200)
    assert "*" not in r.headers.get("access-control-allow-origin", "")


@pytest.mark.parametrize("host", ["evil.example", f"evil.example:{{PORT}}", "127.0.0.1.evil.example",
                                  "localhost.evil.example", "127.0.0.2", "0.0.0.0", "[::2]"])
def test_foreign_host_header_is_421(world, host):
    host = host.replace("{PORT}", str(world.main.port))
    check(raw(world.main, "GET", "/info/", "ann", host=host), 421)
    check(raw(world.main, "POST", "/auth/token", None, host=host,
              headers={"Content-Type": "application/x-www-form-urlencoded"},
              body=f"username=adm&password={PW['adm']}".encode()), 421)


def test_loopback_host_names_are_accepted(world):
    for host in (f"localhost:{world.main.port}", f"127.0.0.1:{world.main.port}", "localhost"):
        check(raw(world.main, "GET", "/info/", "ann", host=host), 200)


ABSENT = ["/datastore/dataset", "/datastore/dataset?limit_cases=1", "/model/medsamix", "/model/", "/scoring/",
          "/scoring/dice", "/batch/infer/medsamix", "/batch/infer/medsamix?images=all", "/reload",
          "/docs", "/redoc", "/openapi.json", "/infer/wsi/medsamix", "/datastore/image/info?image={A}",
          "/datastore/label/info?label={A}&tag=final", "/datastore/updatelabelinfo", "/proxy/dicom/studies", "/proxy",
          "/train/merge/../../reload", "/wsi"]


@pytest.mark.parametrize("path", ABSENT)
def test_monai_label_routes_that_are_not_served_are_404(world, path):
    for method in ("GET", "POST", "PUT", "DELETE"):
        r = raw(world.main, method, world.fmt(path), "adm", headers={"Content-Type": "application/json"}, body=b"{}")
        check(r, 404, 405)
    check(raw(world.main, "GET", world.fmt(path), "adm"), 404)


@pytest.mark.parametrize("path, body, codes", [
    ("/activelearning/nope", "{}", (404,)),
    ("/activelearning/..%2f..%2freload", "{}", (404,)),
    ("/activelearning/%2e%2e", "{}", (400,)),
    ("/activelearning/random%00", "{}", (400,)),
    ("/activelearning/random", '{"strategy": "first"}', (400,)),
    ("/activelearning/random", '{"image": "/etc/passwd"}', (400,)),
    ("/activelearning/random", "[1]", (400,)),
    ("/activelearning/random", '{"client_id": NaN}', (400,)),
    ("/activelearning/random", "[" * 50000 + "]" * 50000, (400,)),
], ids=lambda x: x[:40] if isinstance(x, str) else None)
def test_activelearning_refuses(world, path, body, codes):
    check(raw(world.main, "POST", path, "ann", headers={"Content-Type": "application/json"}, body=body.encode()),
          *codes)


def test_control_activelearning_answers_no_paths(world):
    r = check(req(world.main, "POST", "/activelearning/random", "ann", json={"client_id": "slicer"}), 200)
    assert str(world.root) not in r.text and "/" not in "".join(str(v) for v in r.json().values())


# =============================================================================================== 4. proxy
@pytest.mark.parametrize("method, path", [
    ("GET", "/proxy/dicom/qido/studies/../../../x"),
    ("GET", "/proxy/dicom/qido/studies/..%2f..%2f..%2ftools"),
    ("GET", "/proxy/dicom/wado/studies/1.2/series/3/instances/4/bulkdata/../../../../../tools"),
    ("GET", "/proxy/dicom/stow/studies"),
    ("POST", "/proxy/dicom/stow/studies"),
    ("POST", "/proxy/dicom/qido/studies"),
    ("PUT", "/proxy/dicom/wado/studies/1.2"),
    ("DELETE", "/proxy/dicom/wado/studies/1.2"),
    ("GET", "/proxy/dicom/tools/find"),
    ("GET", "/proxy/dicom/tools"),
    ("GET", "/proxy/dicom/qido/studies?url=http://169.254.169.254/"),
    ("GET", "/proxy/dicom/qido/http://169.254.169.254/latest"),
    ("GET", "/proxy/dicom/qido/studies/1.2%0d%0aX-Injected:%201"),
])
def test_proxy_refuses(world, method, path):
    check(raw(world.main, method, path, "ann", headers={"Content-Type": "application/dicom"}, body=b"x"), 400, 404,
          405)


ACCEPTED_DICOMWEB = ["studies", "studies/1.2.840.113619", "studies/1.2/series", "studies/1.2/series/3.4",
                     "studies/1.2/metadata", "studies/1.2/series/3.4/metadata", "studies/1.2/series/3/instances",
                     "studies/1.2/series/3/instances/4.5", "studies/1.2/series/3/instances/4/metadata",
                     "studies/1.2/series/3/instances/4/frames/1", "studies/1.2/series/3/instances/4/frames/1,2,3",
                     "studies/1.2/series/3/instances/4/frames/1/rendered", "studies/1.2/rendered",
                     "studies/1.2/thumbnail", "studies/1/series/2/thumbnail"]
REFUSED_DICOMWEB = ["", "/studies", "studies/", "studies/../tools", "studies/1.2/../../tools", "tools/find",
                    "studies/abc", "studies/1..2", "studies/.1", "studies/1.", "studies/1.2/series/3/bulkdata",
                    "studies/1.2/series/3/instances/4/bulkdata/x", "studies/1.2/series/3/instances/4/frames/",
                    "studies/1.2/series/3/instances/4/frames/1,", "studies\n", "studies/1.2\n", "studies/1.2%2f..",
                    "studies/1.2/series/3.4\x00", "instances", "series/1.2", "studies/1.2/metadata/x",
                    "studies/1.2/series/3/instances/4/frames/1/rendered/x", "http://evil/studies",
                    "studies/\u0661"]  # a non-ASCII digit


@pytest.mark.parametrize("path", ACCEPTED_DICOMWEB)
def test_unit_dicomweb_path_accepted(path):
    from medsamix_server.routes.viewer import DICOMWEB_PATH, dicomweb_path

    assert DICOMWEB_PATH.fullmatch(path)
    assert dicomweb_path(path) == path


@pytest.mark.parametrize("path", REFUSED_DICOMWEB, ids=[repr(p)[:40] for p in REFUSED_DICOMWEB])
def test_unit_dicomweb_path_refused(path):
    from medsamix_server.routes.viewer import dicomweb_path
    from medsamix_server.security import RequestError

    with pytest.raises(RequestError) as e:
        dicomweb_path(path)
    assert e.value.status == 400


@pytest.mark.parametrize("items, ok", [
    ([("StudyInstanceUID", "1.2.3"), ("limit", "25"), ("offset", "0"), ("includefield", "00081030")], True),
    ([("PatientName", "Doe^J*"), ("fuzzymatching", "true"), ("00100020", "P1")], True),
    ([("url", "http://169.254.169.254/")], False),
    ([("StudyInstanceUID", "1.2"), ("redirect", "x")], False),
    ([("limit", "1\n")], False),
    ([("limit", "1\r\nX: y")], False),
    ([("PatientName", "x" * 300)], False),
    ([("PatientName", "a\x7fb")], False),
    ([("../studies", "1")], False),
    ([("limit", "1")] * 40, False),
])
def test_unit_proxy_query_allow_list(items, ok):
    from medsamix_server.routes.viewer import proxy_query
    from medsamix_server.security import RequestError

    if ok:
        assert proxy_query(items) == items
    else:
        with pytest.raises(RequestError):
            proxy_query(items)


# =============================================================================================== 6. size limits
def _big_upload(kind: str, size: int) -> tuple[str, dict[str, tuple[str | None, bytes]]]:
    blob = os.urandom(size)
    if kind == "image":
        return "/datastore/image?image=big", {"file": ("big.nii.gz", blob)}
    if kind == "session":
        return "/session/", {"files": ("big.nii.gz", blob)}
    return "/datastore/label?image={A}&tag=final", {"label": ("big.nii.gz", blob)}


@pytest.mark.parametrize("kind", ["image", "session", "label"])
@pytest.mark.parametrize("transfer", ["content-length", "chunked"])
def test_upload_over_the_limit_is_413(world, kind, transfer):
    path, fields = _big_upload(kind, 6 << 20)
    body, ctype = multipart(fields)
    headers = {"Content-Type": ctype}
    if transfer == "chunked":
        r = raw(world.lim, "PUT", world.fmt(path), "adm", headers=headers,
                chunks=[body[i:i + (64 << 10)] for i in range(0, len(body), 64 << 10)])
    else:
        r = raw(world.lim, "PUT", world.fmt(path), "adm", headers=headers, body=body)
    check(r, 413)
    ids = req(world.lim, "GET", "/datastore/?output=ids").json()
    assert "big" not in ids


@pytest.mark.parametrize("kind", ["image", "session", "label"])
def test_small_file_with_a_huge_header_is_413(world, kind):
    data = nifti_bytes((2001, 1000, 1))  # 2 M voxels + 1000 over the limit, a few KiB on the wire
    assert len(data) < 64 << 10
    if kind == "image":
        r = req(world.lim, "PUT", "/datastore/image", params={"image": "voxelbomb"},
                files={"file": ("voxelbomb.nii.gz", data)})
    elif kind == "session":
        r = upload_session(world.lim, data, "voxelbomb.nii.gz", False, user="adm")
    else:
        r = req(world.lim, "PUT", "/datastore/label", params={"image": world.a, "tag": "final"},
                files={"label": ("l.nii.gz", data)})
    check(r, 413)
    assert "voxelbomb" not in req(world.lim, "GET", "/datastore/?output=ids").json()


def test_json_params_over_the_limit_is_413(world):
    params = json.dumps({"roi": [5, 25, 5, 30, 10, 10], "client_id": "x" * (20 << 10)})
    check(infer(world.lim, world.a, params, user="adm", raw_params=True), 413)
    check(req(world.lim, "POST", "/train/merge", data=params, headers={"Content-Type": "application/json"}), 413)


def test_3d_roi_over_the_slice_limit_is_400(world):
    r = check(infer(world.lim, world.a, {"roi": [5, 25, 5, 30, 0, 20]}, user="adm"), 400)
    assert "slices" in r.json()["detail"]
    check(infer(world.lim, world.a, {"roi": [5, 25, 5, 30, 3, 6]}, user="adm"), 200)  # within the limit


def test_more_sessions_than_the_limit_is_429(world):
    data = (world.lim.studies / f"{world.a}.nii.gz").read_bytes()
    made = []
    try:
        for _ in range(3):
            r = upload_session(world.lim, data, "s.nii.gz", False, user="adm")
            if r.status_code != 200:
                break
            made.append(r.json()["session_id"])
        check(r, 429)
        assert len(made) == 2
    finally:
        for sid in made:
            check(req(world.lim, "DELETE", f"/session/{sid}"), 200)


@pytest.mark.parametrize("srv", ["main", "lim"])
def test_train_body_over_64k_is_413(world, srv):
    s = getattr(world, srv)
    body = json.dumps({"trials": 1, "task": "x" * (70 << 10)})
    check(req(s, "POST", "/train/merge", data=body, headers={"Content-Type": "application/json"}), 413)
    assert not worker_pids()


def test_session_expiry_out_of_range_is_400(world):
    data = (world.main.studies / f"{world.a}.nii.gz").read_bytes()
    for expiry in ("-1", str(10**30), "1e400", "abc"):
        check(req(world.main, "PUT", "/session/", "ann", params={"expiry": expiry},
                  files={"files": ("s.nii.gz", data)}), 400)


# =============================================================================================== 7. training
def test_training_second_request_is_429_and_stop_leaves_no_worker(world):
    world.allowed |= {"main/state/train/", "main/model/runs/", "main/model/merged/"}
    s = world.main
    r = check(req(s, "POST", "/train/merge", json={"trials": 200}), 200)
    try:
        assert r.json()["status"] == "RUNNING"
        for query in ("?enqueue=true", "", "?run_sync=true"):
            check(req(s, "POST", f"/train/merge{query}", json={"trials": 200}), 429)
    finally:
        stopped = req(s, "DELETE", "/train/")
    check(stopped, 200, 404)
    status = check(req(s, "GET", "/train/", "ann"), 200).json()
    assert status["status"] in ("STOPPED", "ERROR", "DONE")
    if stopped.status_code == 200:
        assert status["status"] == "STOPPED"
    deadline = time.monotonic() + 10
    while worker_pids() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not worker_pids()
    check(req(s, "GET", "/train/?check_if_running=true", "ann"), 404)
    check(req(s, "DELETE", "/train/"), 404)


def test_answers_carry_no_server_paths(world):
    """Info, listings, training status and refusals name ids, never the server's folders."""
    s = world.main
    secret = (str(world.root), str(REPO), str(Path.home()))
    answers = [
        req(s, "GET", "/info/", "ann"), req(s, "GET", "/datastore/?output=all", "ann"),
        req(s, "GET", "/datastore/image", "ann", params={"image": "evil"}),
        req(s, "GET", "/datastore/label", "ann", params={"label": world.trapped, "tag": "final"}),
        req(s, "PUT", "/datastore/label", "ann", params={"image": world.trapped, "tag": "final"},
            files={"label": ("l.nii.gz", label_for(world, world.trapped))}),
        upload_session(s, os.urandom(3000), "x.nii.gz", False),
        upload_session(s, zip_bytes([("a.dcm", b"not dicom", 0o100644)]), "s.zip", True),
        infer(s, "evil", {"roi": [5, 25, 5, 30, 1, 1]}),
        infer(s, world.a, {"roi": [500, 600, 5, 30, 1, 1]}),
        req(s, "GET", "/session/0a3b3c1e-aaaa-bbbb-cccc-000000000000", "ann"),
    ]
    nan = np.full((20, 20, 4), np.nan, np.float32)
    sid = check(upload_session(s, gzip.compress(nib.Nifti1Image(nan, np.eye(4)).to_bytes()), "nan.nii.gz", False),
                200).json()["session_id"]
    answers.append(check(infer(s, None, {"roi": [2, 10, 2, 10, 1, 1]}, session_id=sid), 400))
    check(req(s, "DELETE", f"/session/{sid}", "ann"), 200)
    for r in answers:
        assert r.status_code < 500
        for p in secret:
            assert p not in r.text, f"{r.request.method} {r.request.url} answers a server path: {r.text[:400]}"


# =============================================================================================== 8. 500s that must be 4xx
@pytest.mark.parametrize("params", [
    '{"roi": [' + "1" + "0" * 400 + ', 25, 5, 30, 10, 10]}',
    '{"roi": [1e400, 25, 5, 30, 10, 10]}',
    '{"roi": [-1e400, 25, 5, 30, 10, 10]}',
    '{"roi": [' + "9" * 5000 + ', 25, 5, 30, 10, 10]}',
    '{"foreground": [[NaN, 3, 4]]}',
    '{"foreground": [[Infinity, 3, 4]]}',
    '{"foreground": [[1, 3, 4]], "slice": NaN}',
    '{"roi": [5, 25, 5, 30, 10, 10], "iou_threshold": ' + "1" * 400 + "}",
    '{"roi": [5, 25, 5, 30, 10, 10], "margin": 1e400}',
    '{"roi": [5, 25, 5, 30, 10, 10], "margin": "abc"}',
    '{"roi": [5, 25, 5, 30, 10, 10], "iou_threshold": [1]}',
    '{"roi": "5,25,5,30,10,10"}',
    '{"roi": {"a": 1}}',
    '{"roi": [5, 25, 5, 30, 10, 10], "slice": [1]}',
    '{"roi": [5, 25, 5, 30, 10, 10], "mode": {"x": 1}}',
    '{"foreground": {"a": [1, 2, 3]}}',
    '{"foreground": [[1, 2, 3]] , "background": "x"}',
    '{"pos_boxes": [[[1, 2], [3]]]}',
    '{"foreground": [[1, 2, 3, 4]]}',
    '{"foreground": [[true, 2, 3]]}',
    "[1]", "null", '"x"', "1", "true", "{", "{\"roi\": [1,2,", "\xff\xfe",
    "[" * 100000 + "]" * 100000,
    '{"a": ' * 50000 + "1" + "}" * 50000,
], ids=lambda p: repr(p)[:24] + repr(p)[-16:] if len(p) > 40 else repr(p))
def test_bad_infer_params_are_400(world, params):
    r = check(infer(world.main, world.a, params, raw_params=True), 400, 413)
    assert r.status_code == 400 or len(params) > 1 << 20


def test_nul_in_ids_is_400(world):
    check(infer(world.main, f"{world.a}\x00", {"roi": [5, 25, 5, 30, 10, 10]}), 400)
    check(req(world.main, "GET", "/datastore/image", "ann", params={"image": "\x00"}), 400)
    check(req(world.main, "GET", "/datastore/label", "ann", params={"label": world.a, "tag": "\x00"}), 400)
    check(req(world.main, "DELETE", "/datastore/image", "adm", params={"id": "\x00"}), 400)


def test_unknown_ids_are_404(world):
    data = label_path(world, world.a).read_bytes()
    check(req(world.main, "PUT", "/datastore/label", "ann", params={"image": "no_such_image", "tag": "final"},
              files={"label": ("l.nii.gz", data)}), 404)
    check(req(world.main, "DELETE", "/datastore/image", "adm", params={"id": "no_such_image"}), 404)
    check(req(world.main, "DELETE", "/datastore/label", "adm", params={"id": "no_such_image", "tag": "final"}), 404)
    check(req(world.main, "GET", "/datastore/label", "ann", params={"label": "no_such_image", "tag": "final"}), 404)
    check(infer(world.main, "no_such_image", {"roi": [5, 25, 5, 30, 10, 10]}), 404)
    check(infer(world.main, world.a, {"roi": [5, 25, 5, 30, 10, 10]}, model="no_such_model"), 404)
    check(req(world.main, "POST", "/train/no_such_task", "adm", json={}), 404)


@pytest.mark.parametrize("what", ["wrong-shape", "garbage", "no-suffix", "png", "as-field", "two-files"])
def test_bad_label_uploads_are_400(world, what):
    good = label_path(world, world.a).read_bytes()
    files: Any
    if what == "wrong-shape":
        files = {"label": ("l.nii.gz", nifti_bytes((7, 8, 9)))}
    elif what == "garbage":
        files = {"label": ("l.nii.gz", os.urandom(2000))}
    elif what == "no-suffix":
        files = {"label": ("label", good)}
    elif what == "png":
        files = {"label": ("l.png", b"\x89PNG\r\n\x1a\n" + os.urandom(100))}
    elif what == "as-field":
        files = {"label": (None, good)}
    else:
        files = [("label", ("l.nii.gz", good)), ("label", ("m.nii.gz", good))]
    check(req(world.main, "PUT", "/datastore/label", "ann", params={"image": world.b, "tag": "final"},
              files=files), 400)


@pytest.mark.parametrize("method, path, kw", [
    ("GET", "/logs/?lines=" + "9" * 30, {}),
    ("GET", "/logs/?lines=-1", {}),
    ("GET", "/logs/?lines=abc", {}),
    ("GET", "/datastore/?output=xml", {}),
    ("HEAD", "/datastore/image?image={A}&check_sum=MD5:abc", {}),
    ("POST", "/infer/medsamix?image={A}&output=xml", {"files": {"params": (None, "{}")}}),
    ("POST", "/infer/medsamix", {"files": {"params": (None, '{"roi": [5, 25, 5, 30, 10, 10]}')}}),
    ("POST", "/infer/medsamix?image={A}", {"data": b"not multipart",
                                           "headers": {"Content-Type": "multipart/form-data"}}),
    ("POST", "/infer/medsamix?image={A}", {"files": [(f"f{i}", (None, "1")) for i in range(12)]}),
    ("POST", "/infer/medsamix?image={A}", {"files": {"params": ("p.json", b'{"roi": [5, 25, 5, 30, 10, 10]}')}}),
    ("POST", "/train/merge?run_sync=maybe", {"json": {}}),
    ("PUT", "/session/", {"files": {"other": ("x.nii.gz", b"x")}}),
    ("PUT", "/session/", {"data": b"", "headers": {"Content-Type": "application/json"}}),
    ("PUT", "/datastore/image?image=x1", {"files": {"file": (None, "not a file")}}),
    ("POST", "/auth/token", {"data": {"username": "x" * 100000, "password": "y"}}),
], ids=lambda x: x[:40] if isinstance(x, str) else None)
def test_malformed_requests_are_4xx(world, method, path, kw):
    user = None if path.startswith("/auth") else "adm"
    r = req(world.main, method, world.fmt(path), user, **kw)
    check(r, 400, 401, 404, 413, head=method == "HEAD")
    assert not worker_pids()
