"""A real Orthanc PACS (DICOMweb plugin) and the MedSAMix MONAI Label server on it, for end-to-end tests.

Isolation: Orthanc has no bind-address option (it listens on every interface), so both Orthanc and the MONAI Label
server run inside a private network namespace that has only a loopback interface (``ip netns add``; nothing they
open is reachable from the host's interfaces). The test process talks to them from a worker thread that joined the
namespace (``setns(2)`` on that thread only; the rest of the pytest process stays in the host's namespace):
:meth:`Sandbox.call` runs a function there. Orthanc is further configured with ``RemoteAccessAllowed: false``, no
DICOM (DIMSE) server, its own temporary storage and index folders, and the DICOMweb plugin at ``/dicom-web/``.

Fallback when network namespaces cannot be created (not root, no ``ip`` command, a sandbox without ``CAP_SYS_ADMIN``;
or forced with the environment variable ``MEDSAMIX_TEST_NO_NETNS=1``):
everything runs on the host's loopback and Orthanc's ``RemoteAccessAllowed: false`` is the only guard (Orthanc would
then listen on all interfaces but refuse every non-loopback client); :attr:`Sandbox.isolated` says which applies.

Everything is torn down on exit, also on failure: the processes (their whole process groups, and anything left in
the namespace), then the namespace itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from app_server import APP_DIR, REPO, _tail, free_port

ORTHANC = os.environ.get("MEDSAMIX_ORTHANC") or shutil.which("Orthanc") or "/usr/sbin/Orthanc"  # the executable
DICOMWEB_PLUGINS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so.1.7")
CLONE_NEWNET = 0x40000000
ORTHANC_PORT = 8042  # inside a private namespace every port is free
START_TIMEOUT_S = 120.0


GDCM_PLUGIN = "/usr/share/orthanc/plugins/libOrthancGdcm.so"  # orthanc-gdcm: decodes JPEG 2000 when transcoding
JPEG2000_SYNTAXES = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
                     "1.2.840.10008.1.2.4.93")


def dicomweb_plugin() -> str | None:
    """Path of the Orthanc DICOMweb plugin (Debian package ``orthanc-dicomweb``), or None."""
    found = [p for p in DICOMWEB_PLUGINS if os.path.exists(p)]
    return found[0] if found else None


def missing_requirements() -> str | None:
    """Why the Orthanc tests cannot run here (None when they can)."""
    if not os.path.exists(ORTHANC):
        return f"Orthanc is not installed ({ORTHANC} is missing; Debian: apt-get install orthanc orthanc-dicomweb)"
    if dicomweb_plugin() is None:
        return "the Orthanc DICOMweb plugin is not installed (Debian: apt-get install orthanc-dicomweb)"
    if shutil.which("itkimage2segimage", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                  os.environ.get("PATH", "")])) is None:
        return "itkimage2segimage (PyPI package dcmqi) is missing: MONAI Label writes DICOM SEG with it"
    return None


class Sandbox:
    """A private network namespace with only loopback (or, if impossible, the host's loopback).

    ``prefix`` goes before a command to start it inside; :meth:`call` runs a Python function in a thread that joined
    the namespace, so its sockets (urllib, requests, MONAILabelClient) reach the servers inside.
    """

    def __init__(self) -> None:
        self.name = f"medsamix-{uuid.uuid4().hex[:10]}"
        self.isolated = False
        self.reason = ""
        self._procs: list[subprocess.Popen] = []
        self._pool: ThreadPoolExecutor | None = None

    # -- set-up / tear-down
    def __enter__(self) -> "Sandbox":
        ip = shutil.which("ip")
        if os.environ.get("MEDSAMIX_TEST_NO_NETNS"):
            self.reason = "MEDSAMIX_TEST_NO_NETNS is set"
        elif ip is None or os.geteuid() != 0:
            self.reason = "no 'ip' command" if ip is None else "not root"
        else:
            r = subprocess.run([ip, "netns", "add", self.name], capture_output=True, text=True)
            if r.returncode != 0:
                self.reason = f"ip netns add failed: {r.stderr.strip()}"
            else:
                up = subprocess.run([ip, "-n", self.name, "link", "set", "lo", "up"], capture_output=True, text=True)
                # `ip netns exec` also remounts /sys, which restricted containers refuse: probe it once
                probe = up if up.returncode != 0 else subprocess.run([ip, "netns", "exec", self.name, "true"],
                                                                     capture_output=True, text=True)
                if probe.returncode != 0:
                    subprocess.run([ip, "netns", "del", self.name], capture_output=True)
                    self.reason = f"{' '.join(probe.args[1:])} failed: {probe.stderr.strip()}"
                else:
                    self.isolated = True
        if self.isolated:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netns",
                                            initializer=self._join_namespace)
            try:
                self.call(lambda: None)  # fails here if setns is refused
            except OSError as e:
                self._drop_namespace()
                self.isolated, self.reason = False, f"setns refused: {e}"
        return self

    def __exit__(self, *exc: Any) -> None:
        for p in reversed(self._procs):
            stop(p)
        if self.isolated:
            self._drop_namespace()

    def _join_namespace(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        finally:
            os.close(fd)

    def _drop_namespace(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        # anything still running in the namespace was started by this sandbox
        r = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True)
        for pid in r.stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    # -- use
    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name] if self.isolated else []

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` with the namespace's network (directly when not isolated)."""
        if self._pool is None:
            return fn(*args, **kwargs)
        return self._pool.submit(fn, *args, **kwargs).result()

    def start(self, cmd: list[str], log_path: Path, **kwargs: Any) -> subprocess.Popen:
        """Start ``cmd`` inside the namespace in its own process group, output to ``log_path``; stopped on exit."""
        with open(log_path, "wb") as log:
            p = subprocess.Popen(self.prefix + cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                 **kwargs)
        self._procs.append(p)
        return p

    def wait_http(self, url: str, proc: subprocess.Popen, log_path: Path, what: str,
                  timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait until GET ``url`` answers 200 (from inside the namespace)."""
        deadline = time.monotonic() + timeout_s
        while not self.call(_answers, url):
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with status {proc.returncode}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not answer {url} within {timeout_s:.0f} s:\n{_tail(log_path)}")
            time.sleep(0.3)


def stop(proc: subprocess.Popen) -> None:
    """Stop a process started with its own session: SIGTERM to its group, SIGKILL after 15 s."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def orthanc_config(storage: Path, http_port: int) -> dict[str, Any]:
    """A minimal private Orthanc: own storage/index, HTTP on ``http_port``, loopback clients only, no DICOM server,
    the DICOMweb plugin at ``/dicom-web/``."""
    return {
        "Name": "MedSAMixTest",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "Plugins": [dicomweb_plugin()] + ([GDCM_PLUGIN] if os.path.exists(GDCM_PLUGIN) else []),
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "HttpCompressionEnabled": False,
        "ConcurrentJobs": 1,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Ssl": False,
                     "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        # GDCM only for what Orthanc's own codecs cannot decode: with it on every file, Orthanc 1.10 + GDCM plugin 1.5
        # intermittently crashed (SIGSEGV) serving the DICOM SEG back over WADO-RS
        "Gdcm": {"Enable": True, "RestrictTransferSyntaxes": list(JPEG2000_SYNTAXES)},
    }


class Orthanc:
    """REST helpers for a running Orthanc (every request goes through the sandbox)."""

    def __init__(self, sandbox: Sandbox, url: str, proc: subprocess.Popen | None = None) -> None:
        self.sandbox, self.url, self.proc = sandbox, url, proc
        self.dicomweb = f"{url}/dicom-web"

    def crashed(self) -> int | None:
        """The signal that killed the Orthanc process (for example 11, a segfault in its GDCM plugin), else None."""
        if self.proc is None or self.proc.poll() is None or self.proc.returncode >= 0:
            return None
        return -self.proc.returncode

    def _request(self, method: str, path: str, body: bytes | None = None, ctype: str | None = None) -> Any:
        def go() -> Any:
            req = urllib.request.Request(f"{self.url}{path}", data=body, method=method)
            if ctype:
                req.add_header("Content-Type", ctype)
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    data = r.read()
            except urllib.error.HTTPError as e:
                raise RuntimeError(f"Orthanc {method} {path}: HTTP {e.code}: {e.read()[:2000]!r}") from None
            return json.loads(data) if data[:1] in (b"{", b"[") else data
        return self.sandbox.call(go)

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def upload(self, files: list[Path]) -> list[dict[str, Any]]:
        """POST each DICOM file to ``/instances`` (Orthanc's REST upload); returns Orthanc's answers."""
        return [self._request("POST", "/instances", Path(f).read_bytes(), "application/dicom") for f in files]

    def tags(self, instance: str) -> dict[str, Any]:
        """Simplified DICOM tags of an instance (``/instances/<id>/simplified-tags``)."""
        return self.get(f"/instances/{instance}/simplified-tags")

    def file(self, instance: str) -> bytes:
        return self.get(f"/instances/{instance}/file")

    def instances_by_modality(self, modality: str) -> list[str]:
        found = self._request("POST", "/tools/find", json.dumps(
            {"Level": "Instance", "Query": {"Modality": modality}}).encode(), "application/json")
        return list(found)


@contextlib.contextmanager
def running_orthanc(sandbox: Sandbox, workdir: Path) -> Iterator[Orthanc]:
    """Start a private Orthanc in ``sandbox`` (storage under ``workdir``) and yield its REST helper."""
    port = ORTHANC_PORT if sandbox.isolated else _free_host_port()
    storage = workdir / "orthanc-db"
    storage.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "orthanc.json"
    cfg.write_text(json.dumps(orthanc_config(storage, port), indent=1))
    log = workdir / "orthanc.log"
    proc = sandbox.start([ORTHANC, str(cfg)], log)
    url = f"http://127.0.0.1:{port}"
    try:
        sandbox.wait_http(f"{url}/system", proc, log, "Orthanc", timeout_s=60)
        yield Orthanc(sandbox, url, proc)
    finally:
        stop(proc)


@contextlib.contextmanager
def running_dicomweb_server(sandbox: Sandbox, studies_url: str, workdir: Path, conf: dict[str, str] | None = None,
                            port: int = 8000, timeout_s: float = START_TIMEOUT_S, kind: str = "monailabel",
                            app_dir: Path = APP_DIR) -> Iterator[str]:
    """Start the MedSAMix MONAI Label server in ``sandbox`` with ``--studies <DICOMweb URL>``; yield its base URL.

    ``kind``: ``"monailabel"`` (``monailabel start_server``) or ``"hardened"`` (``python -m medsamix_server``, its
    state folder under ``workdir``). The DICOMweb cache is a folder under ``workdir``; ``itkimage2segimage`` (PyPI
    ``dcmqi``, DICOM SEG writing) is found through the virtual environment's ``bin`` on ``PATH``; ``model_dir``
    defaults to ``workdir/model``; ``app_dir`` is the app folder (default ``apps/medsamix``; tests may pass a
    modified copy).
    """
    conf = dict(conf or {})
    conf.setdefault("model_dir", str(workdir / "model"))
    if not sandbox.isolated:
        port = _free_host_port()
    url = f"http://127.0.0.1:{port}"
    if kind == "hardened":
        cmd = [sys.executable, "-m", "medsamix_server", "--studies", studies_url, "--host", "127.0.0.1",
               "--port", str(port), "--state-dir", str(workdir / "state"), "--app", str(app_dir)]
    else:
        cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app_dir), "--studies",
               studies_url, "--host", "127.0.0.1", "--port", str(port)]
    for k, v in conf.items():
        cmd += ["--conf", k, str(v)]
    env = dict(os.environ)
    env.setdefault("MEDSAMIX_COMPILE", "0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "lib"), str(REPO / "server"),
                                                     env.get("PYTHONPATH", "")) if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["MONAILABEL_PYEXE"] = sys.executable
    env["MONAI_LABEL_DICOMWEB_CACHE_PATH"] = str(workdir / "dicomweb-cache")
    env["MONAI_LABEL_DICOMWEB_CACHE_EXPIRY"] = "1"  # series lists are re-queried (new SEGs show up at once)
    log = workdir / "server.log"
    proc = sandbox.start(cmd, log, cwd=REPO, env=env)
    try:
        sandbox.wait_http(f"{url}/info/", proc, log, "MedSAMix server", timeout_s=timeout_s)
        yield url
        if proc.poll() is not None:
            raise RuntimeError(f"server died during the test (status {proc.returncode}):\n{_tail(log)}")
    finally:
        stop(proc)


def _free_host_port() -> int:
    return free_port()


def with_fixed_uids(src: Path, out: Path, key: str) -> list[Path]:
    """Copies of the DICOM files in ``src`` (an anonymised series, such as ``../shared/data``'s JPEG 2000 CT) with the
    UIDs its anonymisation emptied, which Orthanc refuses files without: study and series UIDs derived from ``key``,
    each SOP Instance UID from its file meta. The pixel data stays as stored."""
    import pydicom
    from pydicom.uid import generate_uid

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for f in sorted(src.iterdir()):
        ds = pydicom.dcmread(str(f))
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[f"{key}-study"])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[f"{key}-series"])
        ds.PatientID = ds.PatientID or "totalseg-example"
        files.append(out / f"{f.name}.dcm")
        ds.save_as(str(files[-1]))
    return files
