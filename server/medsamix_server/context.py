"""What every endpoint shares: the settings, the MONAI Label app instance, authentication, the inference queue and
the training supervisor; plus the FastAPI dependencies that check roles and the helpers that turn request fields
into checked ids and paths."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import math
import os
import pathlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Depends, HTTPException, Request

from .auth import Authenticator, AuthError, User
from .config import ServerConfig
from .security import RequestError, contained, safe_name

if TYPE_CHECKING:
    from .training import TrainSupervisor

T = TypeVar("T")


class InferQueue:
    """Inference on ``workers`` dedicated threads (never the event loop), at most ``capacity`` requests waiting or
    running; more are refused with 503 and ``Retry-After``."""

    def __init__(self, workers: int, capacity: int) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="infer")
        self._capacity = capacity
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        return self._pending

    async def run(self, fn: Callable[[], T]) -> T:
        with self._lock:
            if self._pending >= self._capacity:
                raise HTTPException(503, f"inference queue full ({self._capacity} requests); retry shortly",
                                    headers={"Retry-After": "2"})
            self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        finally:
            with self._lock:
                self._pending -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class TempJanitor:
    """Removes the temp files MONAI Label's datastores leave behind (a DICOMweb series or SEG converted to NIfTI is
    copied into the cache and its temp file kept): datastore calls run one at a time inside :meth:`guard`, and what
    they added to the server's temp folder is removed when they return. Request folders (``req-*``) and inference
    results (``medsamix-*``, deleted by their request) are not touched."""

    KEEP = ("req-", "medsamix-", "train-")

    def __init__(self, folder: pathlib.Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()

    def _entries(self) -> set[str]:
        try:
            return {n for n in os.listdir(self.folder) if not n.startswith(self.KEEP)}
        except FileNotFoundError:
            return set()

    def guard(self, fn: Callable[[], T]) -> T:
        with self._lock:
            before = self._entries()
            try:
                return fn()
            finally:
                from .security import remove_tree

                for name in self._entries() - before:
                    remove_tree(self.folder / name)


@dataclasses.dataclass
class ServerContext:
    """Shared state of one server (``request.app.state.ctx``)."""

    config: ServerConfig
    auth: Authenticator
    infer: InferQueue
    instance: Any = None  # the MONAI Label app (MedSAMixApp), built at start-up
    trainer: TrainSupervisor | None = None
    janitor: TempJanitor | None = None

    def guarded(self, fn: Callable[[], T]) -> T:
        """Run a datastore call whose temp files must not outlive it (see :class:`TempJanitor`)."""
        return self.janitor.guard(fn) if self.janitor is not None else fn()

    # -- ids and paths -------------------------------------------------------------------------------------------
    def datastore(self) -> Any:
        return self.instance.datastore()

    def datastore_root(self) -> pathlib.Path:
        """Folder every datastore file must resolve into (for DICOMweb: MONAI Label's series cache)."""
        if self.config.dicomweb:
            cache = os.environ.get("MONAI_LABEL_DICOMWEB_CACHE_PATH") or os.environ.get(
                "MONAI_LABEL_DATASTORE_CACHE_PATH") or str(pathlib.Path.home() / ".cache" / "monailabel" / "dicom")
            return pathlib.Path(cache)
        return pathlib.Path(self.config.studies)

    def known_image(self, image: object) -> str:
        """A safe image id that the datastore lists (404 otherwise). Blocking (a PACS may be asked)."""
        image_id = safe_name(image, "image")
        if image_id not in set(self.datastore().list_images()):
            raise RequestError(f"image {image_id!r} is not in the datastore", 404)
        return image_id

    def image_path(self, image_id: str) -> pathlib.Path:
        uri = self.datastore().get_image_uri(image_id)
        if uri and self.config.dicomweb and not _inside(uri, self.datastore_root()):
            # MONAI Label's DICOMweb datastore answers its first call for a series with the NIfTI it has just
            # converted in the temp folder, later calls with the cached copy inside the cache: ask again
            uri = self.datastore().get_image_uri(image_id)
        if not uri:
            raise RequestError(f"image {image_id!r} has no file", 404)
        return contained(uri, self.datastore_root(), f"image {image_id!r}")

    def session(self, session_id: object) -> Any:
        sessions = self.instance.sessions()
        if sessions is None:
            raise RequestError("sessions are not enabled on this server", 404)
        sid = safe_name(session_id, "session_id")
        if not (self.config.sessions_dir / sid).is_dir():
            raise RequestError(f"session {sid!r} not found", 404)
        info = sessions.get_session(sid)
        if info is None:
            raise RequestError(f"session {sid!r} not found", 404)
        contained(info.image, self.config.sessions_dir, f"session {sid!r}")
        return info


def _inside(path: str, root: pathlib.Path) -> bool:
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, real_root]) == real_root


def ctx_of(request: Request) -> ServerContext:
    return request.app.state.ctx


def current_user(request: Request) -> User:
    ctx = ctx_of(request)
    try:
        return ctx.auth.user(request.headers.get("authorization"))
    except AuthError as e:
        raise HTTPException(e.status, str(e), headers={"WWW-Authenticate": "Bearer"}) from None


def role(name: str) -> Callable[..., User]:
    """Dependency: the current user, who must have role ``name`` (admins have every role)."""

    def check(user: User = Depends(current_user)) -> User:
        if not user.allows(name):
            raise HTTPException(403, f"this needs the {name} role; user {user.name!r} is {user.role}")
        return user

    return check


ANNOTATOR = Depends(role("annotator"))
ADMIN = Depends(role("admin"))


MAX_JSON_INT_DIGITS = 18  # |n| < 10**18: every count, index and seed a request may carry; bigger is refused


def _json_int(s: str) -> int:
    if len(s.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise RequestError(f"the number {s[:24]}... is too large (at most {MAX_JSON_INT_DIGITS} digits)")
    return int(s)


def _json_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise RequestError(f"the number {s[:24]} is out of range")
    return v


def _json_constant(s: str) -> float:
    raise RequestError(f"{s} is not a JSON number")


def json_object(text: str | bytes | None, what: str, allowed: set[str] | None = None,
                limit: int = 1 << 20) -> dict[str, Any]:
    """A JSON object from a form field or body (``{}`` when empty), its keys checked against ``allowed``.

    Strict JSON: ``NaN`` / ``Infinity``, floats that overflow to infinity, integers of more than
    :data:`MAX_JSON_INT_DIGITS` digits and nesting too deep for the parser are refused (400), so no handler ever
    sees a value that overflows ``float()`` or ``int`` arithmetic."""
    if text is None or text in ("", b""):
        return {}
    if len(text) > limit:
        raise RequestError(f"{what}: larger than {limit} bytes", 413)
    try:
        value = json.loads(text, parse_int=_json_int, parse_float=_json_float, parse_constant=_json_constant)
    except RequestError as e:
        raise RequestError(f"{what}: {e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"{what}: not valid JSON ({e})") from None
    except RecursionError:
        raise RequestError(f"{what}: nested too deeply") from None
    if not isinstance(value, dict):
        raise RequestError(f"{what}: must be a JSON object, got {type(value).__name__}")
    if allowed is not None:
        unknown = sorted(str(k) for k in value if k not in allowed)
        if unknown:
            raise RequestError(f"{what}: unknown option(s) {', '.join(map(repr, unknown[:10]))}; "
                               f"allowed: {', '.join(sorted(allowed))}")
    return value
