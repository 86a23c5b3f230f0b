"""``medsamix-server``: start the hardened MedSAMix server (``medsamix-server --help``).

It refuses to start on a non-loopback address without a users file that holds at least one user, with a CORS
origin of ``*``, or with limits that are not positive; each refusal names the option.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .config import GiB, Limits, MiB, ServerConfig, is_loopback

REPO = Path(__file__).resolve().parents[2]
DEFAULT_APP = REPO / "apps" / "medsamix"
_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+$")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medsamix-server", description=__doc__.splitlines()[0])
    p.add_argument("--studies", required=True, help="datastore folder or DICOMweb root URL")
    p.add_argument("--app", default=str(DEFAULT_APP), help="MONAI Label app folder (default: apps/medsamix)")
    p.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="app configuration (as monailabel start_server --conf)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--state-dir", help="sessions, temp files, logs, training files (default <app>/state)")
    p.add_argument("--users", help="users file (default <state-dir>/users.json); authentication is on when it "
                   "exists; required off loopback. Edit it with medsamix-users")
    p.add_argument("--allowed-host", action="append", default=[],
                   help="a name clients use for this server (Host header); loopback names are always allowed")
    p.add_argument("--cors-origin", action="append", default=[],
                   help="a web origin (scheme://host[:port]) other than the server's own that may call it")
    p.add_argument("--infer-workers", type=int, default=1, help="inference threads (default 1)")
    d = Limits()
    p.add_argument("--max-upload-mb", type=int, default=d.upload_bytes // MiB)
    p.add_argument("--max-voxels", type=int, default=d.voxels)
    p.add_argument("--max-json-kb", type=int, default=d.json_bytes // 1024)
    p.add_argument("--max-3d-slices", type=int, default=d.slices_3d)
    p.add_argument("--max-sessions", type=int, default=d.sessions)
    p.add_argument("--max-sessions-gb", type=float, default=d.sessions_bytes / GiB)
    p.add_argument("--max-session-expiry-s", type=int, default=d.session_expiry_s)
    p.add_argument("--infer-queue", type=int, default=d.infer_queue)
    p.add_argument("--proxy-timeout-s", type=float, default=d.proxy_timeout_s)
    p.add_argument("--token-ttl-h", type=float, default=12.0)
    p.add_argument("--no-train-sync", action="store_true", help="refuse run_sync=true train requests")
    p.add_argument("--no-preencode", action="store_true",
                   help="no background pre-encoding of opened volumes (also MEDSAMIX_PREENCODE=0)")
    p.add_argument("--preencode-slices", type=int, default=None,
                   help="most slices pre-encoded per opened volume (default 256)")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast for the image encoder on CUDA (default fp32; see scripts/gpu_check.sh)")
    return p


def config_from_args(argv: list[str] | None = None) -> ServerConfig:
    """Settings from the command line; exits with status 2 and the reason for a refused combination."""
    p = parser()
    a = p.parse_args(argv)
    app_dir = Path(a.app).resolve()
    if not (app_dir / "main.py").is_file():
        p.error(f"--app {a.app}: no main.py there")
    studies = a.studies if a.studies.startswith(("http://", "https://")) else str(Path(a.studies).resolve())
    if not studies.startswith("http") and not Path(studies).is_dir():
        p.error(f"--studies {a.studies}: not a folder")
    if not studies.startswith("http"):
        for name in ("datastore_v2.json", ".lock", "labels"):  # MONAI Label writes these; a link would redirect it
            if (Path(studies) / name).is_symlink():
                p.error(f"--studies {a.studies}: {name} is a symbolic link; MONAI Label writes it and would write "
                        "through the link (replace it by a plain file or folder)")
    state = Path(a.state_dir).resolve() if a.state_dir else app_dir / "state"
    users = Path(a.users).resolve() if a.users else state / "users.json"
    for o in a.cors_origin:
        if not _ORIGIN.match(o):
            p.error(f"--cors-origin {o!r}: give scheme://host[:port] (no '*', no path)")
    limits = Limits(upload_bytes=a.max_upload_mb * MiB, voxels=a.max_voxels, json_bytes=a.max_json_kb * 1024,
                    slices_3d=a.max_3d_slices, sessions=a.max_sessions, sessions_bytes=int(a.max_sessions_gb * GiB),
                    session_expiry_s=a.max_session_expiry_s, infer_queue=a.infer_queue,
                    proxy_timeout_s=a.proxy_timeout_s)
    for name, value in vars(limits).items():
        if value <= 0:
            p.error(f"limit {name} must be positive, got {value}")
    has_users = False
    if users.exists():
        from .auth import read_users

        try:
            has_users = bool(read_users(users))
        except ValueError as e:
            p.error(str(e))
    if not is_loopback(a.host) and not has_users:
        p.error(f"--host {a.host} is not a loopback address: authentication is required there, and the users file "
                f"{users} has no users; create one with: medsamix-users --file {users} add <name> --role admin")
    conf = {k: v for k, v in a.conf}
    conf.setdefault("model_dir", str(app_dir / "model"))
    conf["max_slices"] = str(limits.slices_3d)
    if a.no_preencode:
        conf["preencode"] = "false"
    if a.bf16:
        conf["bf16"] = "true"
    if a.preencode_slices is not None:
        if a.preencode_slices < 0:
            p.error(f"--preencode-slices must be >= 0, got {a.preencode_slices}")
        conf["preencode_slices"] = str(a.preencode_slices)
    conf["max_voxels"] = str(limits.voxels)
    return ServerConfig(app_dir=app_dir, studies=studies, conf=conf, state_dir=state, host=a.host, port=a.port,
                        users_file=users if has_users else None, allowed_hosts=tuple(a.allowed_host),
                        cors_origins=tuple(a.cors_origin), limits=limits, infer_workers=a.infer_workers,
                        token_ttl_s=a.token_ttl_h * 3600, allow_train_sync=not a.no_train_sync)


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(argv)
    import os

    # this environment's tools first (dcmqi's itkimage2segimage writes DICOM SEG; without it on PATH MONAI Label
    # tries to download it from the internet)
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    from .app import create_app, prepare_environment, setup_logging

    prepare_environment(config)  # before MONAI Label is imported: it reads its settings from the environment
    setup_logging(config)
    import uvicorn

    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_config=None, server_header=False, proxy_headers=False,
        timeout_keep_alive=5, limit_concurrency=256, h11_max_incomplete_event_size=64 << 10, access_log=True))
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
