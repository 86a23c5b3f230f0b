"""Server settings: where it listens, what it serves, who may use it and how much a request may carry.

Built by :func:`medsamix_server.cli.main` from the command line (``medsamix-server --help``); every limit has a
default sized for real CT volumes (a 600-slice 512 x 512 CT uploads, opens and segments) and can be changed.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Limits:
    """Request and resource limits (answers: 413 for sizes, 400 for counts, 429/503 when busy).

    Attributes:
        upload_bytes: One uploaded file or archive (session image, datastore image, label).
        voxels: Voxels of one volume (header checked before reading; a 600 x 512 x 512 CT is 157 M).
        json_bytes: A request body that is not an upload (JSON, form fields).
        slices_3d: Slices one 3D (propagated) prompt may segment.
        sessions: Live sessions at a time.
        sessions_bytes: All sessions' files together.
        session_expiry_s: Longest session lifetime a client may ask for.
        archive_members: Files in one uploaded archive (a DICOM series zip).
        infer_queue: Inference requests waiting or running at once (then 503 with Retry-After).
        log_lines: Lines ``GET /logs/`` returns at most.
        proxy_timeout_s: Connect/read timeout towards the PACS.
    """

    upload_bytes: int = 2 * GiB
    voxels: int = 320_000_000
    json_bytes: int = 1 * MiB
    slices_3d: int = 1024
    sessions: int = 32
    sessions_bytes: int = 16 * GiB
    session_expiry_s: int = 24 * 3600
    archive_members: int = 5000
    infer_queue: int = 64
    log_lines: int = 5000
    proxy_timeout_s: float = 30.0


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything :func:`medsamix_server.app.create_app` needs.

    Attributes:
        app_dir: The MONAI Label app folder (``apps/medsamix``).
        studies: Datastore folder or DICOMweb root URL.
        conf: App configuration (``--conf key value``).
        state_dir: Sessions, request temp files, logs, the training process's files.
        host / port: Where to listen.
        users_file: Users file; authentication is on exactly when it holds users.
        allowed_hosts: Host header names accepted (DNS rebinding); loopback names are always accepted.
        cors_origins: Origins other than the server's own that browsers may call it from.
        limits: See :class:`Limits`.
        infer_workers: Threads running inference (the event loop never runs it).
        token_ttl_s: Lifetime of a login token.
        allow_train_sync: Whether ``run_sync=true`` train requests are accepted (they wait without blocking).
    """

    app_dir: Path
    studies: str
    conf: dict[str, str]
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    users_file: Path | None = None
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    limits: Limits = Limits()
    infer_workers: int = 1
    token_ttl_s: float = 12 * 3600
    allow_train_sync: bool = True

    @property
    def dicomweb(self) -> bool:
        return self.studies.startswith(("http://", "https://"))

    @property
    def sessions_dir(self) -> Path:
        return self.state_dir / "sessions"

    @property
    def tmp_dir(self) -> Path:
        return self.state_dir / "tmp"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def train_dir(self) -> Path:
        return self.state_dir / "train"

    def host_names(self) -> set[str]:
        """Host header names (without port, lower case) this server answers to."""
        names = {"127.0.0.1", "localhost", "[::1]", "::1"}
        names.update(h.lower() for h in self.allowed_hosts)
        if not is_loopback(self.host) and self.host not in ("0.0.0.0", "::"):
            names.add(self.host.lower())
        return names


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address or name) is a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False
