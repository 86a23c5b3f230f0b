"""Datastore and sessions, with every id, tag, path and upload checked.

* ``GET /datastore/?output=stats|all|ids`` (annotator).
* ``GET|HEAD /datastore/image?image=<id>`` (annotator): the image file (inside the datastore folder only).
* ``PUT /datastore/image?image=<id>`` and ``PUT /datastore/?image=<id>`` (annotator): a new image (NIfTI or NRRD;
  an existing id is refused with 409; local datastores only).
* ``DELETE /datastore/image?id=<id>`` (admin).
* ``PUT /datastore/label?image=<id>&tag=<tag>`` (annotator): a label on an image's voxel grid (form ``label``,
  ``params`` ``{"label_info": [{"name": ...}, ...]}``); over DICOMweb a ``final`` label is stored in the PACS as
  DICOM SEG.
* ``GET /datastore/label?label=<id>&tag=<tag>`` (annotator); ``DELETE /datastore/label?id=&tag=`` (admin).
* ``PUT /session/`` (annotator): a volume (NIfTI / NRRD file, or several DICOM files, or a zip / tar of a DICOM
  series with ``uncompress=true``) for inference without adding it to the datastore; ``GET`` / ``DELETE
  /session/{id}`` (annotator).

Uploads are written into a folder of their own under the server's temp folder and removed when the request ends,
whatever happens.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response
from starlette.datastructures import UploadFile

from medsamix.errors import StudyError
from medsamix.data.labelfile import label_from_viewer_bytes
from medsamix.data.volumes import check_voxels

from ..auth import User
from ..context import ADMIN, ANNOTATOR, ServerContext, ctx_of, json_object
from ..security import RequestError, contained, extract_archive, folder_bytes, remove_tree, safe_name, unlinked

logger = logging.getLogger(__name__)
router = APIRouter()

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd")
TAGS = ("final", "original")


@contextlib.contextmanager
def request_folder(ctx: ServerContext) -> Iterator[Path]:
    """A fresh folder for one request's files, removed when the request ends."""
    folder = ctx.config.tmp_dir / f"req-{uuid.uuid4().hex}"
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        remove_tree(folder)


def _suffix(filename: str | None, what: str) -> str:
    name = (filename or "").lower()
    for s in IMAGE_SUFFIXES:
        if name.endswith(s):
            return s
    raise RequestError(f"{what}: only NIfTI (.nii, .nii.gz) and NRRD (.nrrd) files are accepted, got "
                       f"{os.path.basename(filename or '')!r}")


def _save(upload: UploadFile, path: Path) -> None:
    with open(path, "xb") as out:
        shutil.copyfileobj(upload.file, out, 1 << 20)


def _check_volume(ctx: ServerContext, path: Path, what: str) -> tuple[int, ...]:
    try:
        return check_voxels(path, ctx.config.limits.voxels)
    except StudyError as e:
        raise RequestError(f"{what}: {e}", 413 if "over the limit" in str(e) else 400) from None


async def _form(request: Request, files: int, fields: int) -> Any:
    return await request.form(max_files=files, max_fields=fields)


def _only(form: Any, allowed: set[str]) -> None:
    for name in form:
        if name not in allowed:
            raise RequestError(f"form field {name!r} is not accepted here (allowed: {', '.join(sorted(allowed))})")


def _file(form: Any, name: str) -> UploadFile:
    f = form.get(name)
    if not isinstance(f, UploadFile):
        raise RequestError(f"a file in form field {name!r} is required")
    return f


def _params(ctx: ServerContext, form: Any, allowed: set[str]) -> dict[str, Any]:
    raw = form.get("params")
    if raw is not None and not isinstance(raw, str):
        raise RequestError("params must be a JSON form field, not a file")
    return json_object(raw, "params", allowed, ctx.config.limits.json_bytes)


# -- what MONAI Label's local datastore writes and deletes -------------------------------------------------------
# It copies a new image onto ``realpath(<studies>/<id><ext>)``, a label onto ``<studies>/labels/<tag>/<id><ext>``
# (following a link there) and deletes the resolved paths of an image and of all its labels: a symbolic link placed
# in the studies folder would make it write or delete outside (or elsewhere inside). Every such path is checked
# with :func:`unlinked` (inside the folder, no link on the way) before the datastore is called.
def _unlinked_stored(ctx: ServerContext, uri: str, folder: Path, file_id: str, what: str) -> Path:
    """The datastore file ``uri`` (MONAI Label's resolved path of ``<folder>/<file_id><ext>``) if it is that very
    file, not reached through a link."""
    name = os.path.basename(uri or "")
    if not name.startswith(f"{file_id}."):
        raise RequestError(f"{what} resolves to another file through a symbolic link; refused", 403)
    path = unlinked(folder / name, ctx.datastore_root(), what)
    if os.path.realpath(uri) != str(path):
        raise RequestError(f"{what} resolves to another file through a symbolic link; refused", 403)
    return path


def _check_removable_image(ctx: ServerContext, image_id: str) -> None:
    """Removing an image removes its file and every label of it: none may be (or lie under) a link."""
    ds = ctx.datastore()
    root = ctx.datastore_root()
    _unlinked_stored(ctx, ds.get_image_uri(image_id), root, image_id, f"image {image_id!r}")
    for tag, label_id in (ds.get_labels_by_image_id(image_id) or {}).items():
        tag = safe_name(tag, "tag")
        _unlinked_stored(ctx, ds.get_label_uri(label_id, tag), root / "labels" / tag, label_id,
                         f"label {label_id!r} ({tag}) of image {image_id!r}")


# -- datastore ---------------------------------------------------------------------------------------------------
@router.get("/datastore/", dependencies=[ANNOTATOR])
@router.get("/datastore", dependencies=[ANNOTATOR], include_in_schema=False)
async def datastore(request: Request, output: str = "stats") -> Any:
    ds = ctx_of(request).datastore()
    if output == "stats":
        return await run_in_threadpool(ds.status)
    if output == "all":
        return await run_in_threadpool(ds.json)
    if output == "ids":
        return await run_in_threadpool(ds.list_images)
    raise RequestError("output must be one of stats, all, ids")


def _image_file(ctx: ServerContext, image: str) -> Path:
    image_id = ctx.known_image(image)
    path = ctx.image_path(image_id)
    if not path.is_file():
        raise RequestError(f"image {image_id!r} is a series folder; download it from the PACS", 404)
    return path


def _preencode(ctx: ServerContext, path: Path | str) -> None:
    """The client opened ``path``: let the app pre-encode it in the background (when it offers that)."""
    opener = getattr(ctx.instance, "open_image", None)
    if callable(opener):
        opener(str(path))


@router.get("/datastore/image", dependencies=[ANNOTATOR])
async def download_image(request: Request, image: str) -> FileResponse:
    ctx = ctx_of(request)
    path = await run_in_threadpool(ctx.guarded, lambda: _image_file(ctx, image))
    _preencode(ctx, path)
    return FileResponse(path, media_type="application/octet-stream", filename=path.name)


@router.head("/datastore/image", dependencies=[ANNOTATOR])
async def check_image(request: Request, image: str, check_sum: str | None = None) -> Response:
    ctx = ctx_of(request)
    path = await run_in_threadpool(ctx.guarded, lambda: _image_file(ctx, image))
    if check_sum:
        algo, _, digest = check_sum.rpartition(":")
        if (algo or "SHA256").upper() != "SHA256":
            raise RequestError("check_sum: only SHA256 is supported")
        if await run_in_threadpool(_sha256, path) != digest.lower():
            raise RequestError("image checksum differs", 404)
    return Response(status_code=200)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@router.put("/datastore/image")
@router.put("/datastore/", include_in_schema=False)
async def add_image(request: Request, image: str = "", user: User = ANNOTATOR) -> dict[str, Any]:
    ctx = ctx_of(request)
    if ctx.config.dicomweb:
        raise RequestError("images come from the PACS; upload them there", 405)
    form = await _form(request, 1, 2)
    try:
        _only(form, {"file", "params"})
        upload = _file(form, "file")
        suffix = _suffix(upload.filename, "file")
        image_id = safe_name(image or os.path.basename(upload.filename or "")[: -len(suffix)], "image")
        _params(ctx, form, {"client_id"})  # checked (only client_id may come along), not used
        with request_folder(ctx) as folder:
            path = folder / f"image{suffix}"
            await run_in_threadpool(_save, upload, path)
            await run_in_threadpool(_check_volume, ctx, path, "file")

            def add() -> str:
                if image_id in set(ctx.datastore().list_images()):
                    raise RequestError(f"image {image_id!r} already exists", 409)
                dest = ctx.datastore_root() / f"{image_id}{suffix}"
                unlinked(dest, ctx.datastore_root(), f"image {image_id!r}")
                if os.path.lexists(dest):
                    raise RequestError(f"image {image_id!r}: a file of that name already exists", 409)
                return ctx.datastore().add_image(image_id, str(path), {"user": user.name})

            added = await run_in_threadpool(ctx.guarded, add)
    finally:
        await form.close()
    logger.info("image %s added by %s", added, user.name)
    return {"image": added}


@router.delete("/datastore/image")
@router.delete("/datastore/", include_in_schema=False)
async def remove_image(request: Request, id: str, user: User = ADMIN) -> dict[str, Any]:  # noqa: A002
    ctx = ctx_of(request)
    if ctx.config.dicomweb:
        raise RequestError("images live in the PACS; delete them there", 405)

    def remove() -> None:
        image_id = ctx.known_image(id)
        ctx.image_path(image_id)
        _check_removable_image(ctx, image_id)
        ctx.datastore().remove_image(image_id)

    await run_in_threadpool(ctx.guarded, remove)
    logger.info("image %s removed by %s", id, user.name)
    return {}


def _label_info(params: dict[str, Any]) -> dict[str, Any]:
    info = params.get("label_info")
    if info is None:
        return {}
    if not isinstance(info, list) or len(info) > 255 or not all(
            isinstance(x, dict) and isinstance(x.get("name", ""), str) and len(str(x.get("name", ""))) <= 128
            and set(x) <= {"name", "idx", "color", "model_name", "description"} for x in info):
        raise RequestError("label_info must be a list of at most 255 objects with 'name' (and optionally 'idx', "
                           "'color', 'model_name', 'description')")
    return {"label_info": info}


@router.put("/datastore/label")
async def save_label(request: Request, image: str, tag: str = "final", user: User = ANNOTATOR) -> dict[str, Any]:
    ctx = ctx_of(request)
    tag = safe_name(tag or "final", "tag")
    if tag not in TAGS:
        raise RequestError(f"tag must be one of {', '.join(TAGS)}")
    form = await _form(request, 1, 2)
    try:
        _only(form, {"label", "params"})
        upload = _file(form, "label")
        raw_viewer = (upload.filename or "").lower().endswith(".bin")  # OHIF: uint8 voxels in viewer order
        suffix = ".bin" if raw_viewer else _suffix(upload.filename, "label")
        info = _label_info(_params(ctx, form, {"label_info", "client_id"}))
        with request_folder(ctx) as folder:
            path = folder / f"label{suffix}"
            await run_in_threadpool(_save, upload, path)

            def save() -> str:
                nonlocal path
                image_id = ctx.known_image(image)
                image_path = ctx.image_path(image_id)
                want = None  # the image's header shape, read once
                if raw_viewer:
                    if not image_path.is_file():
                        raise RequestError("a raw (.bin) label needs an image file to take its grid from")
                    want = _check_volume(ctx, image_path, f"image {image_id!r}")
                    nifti = folder / "label.nii.gz"
                    nifti.write_bytes(label_from_viewer_bytes(path.read_bytes(), image_path))
                    path = nifti
                shape = _check_volume(ctx, path, "label")
                if image_path.is_file():
                    if want is None:
                        want = _check_volume(ctx, image_path, f"image {image_id!r}")
                    if tuple(shape[:3]) != tuple(want[:3]):
                        raise RequestError(f"label shape {list(shape)} does not match image {image_id!r} shape "
                                           f"{list(want)}")
                if not ctx.config.dicomweb:  # the datastore copies onto this path, following a link there
                    dest = ctx.datastore_root() / "labels" / tag / f"{image_id}{_suffix(path.name, 'label')}"
                    unlinked(dest, ctx.datastore_root(), f"label of image {image_id!r} ({tag})")
                label_id = ctx.datastore().save_label(image_id, str(path), tag, dict(info, user=user.name))
                ctx.instance.on_save_label(image_id, label_id)
                return label_id

            label_id = await run_in_threadpool(ctx.guarded, save)
    finally:
        await form.close()
    logger.info("label %s (%s) of %s saved by %s", label_id, tag, image, user.name)
    return {"image": image, "label": label_id}


def _label_file(ctx: ServerContext, label: str, tag: str) -> Path:
    label_id = safe_name(label, "label")
    tag = safe_name(tag, "tag")
    uri = ctx.datastore().get_label_uri(label_id, tag)
    if not uri or not os.path.isfile(uri):
        raise RequestError(f"label {label_id!r} ({tag}) not found", 404)
    return contained(uri, ctx.datastore_root(), f"label {label_id!r}")


@router.get("/datastore/label", dependencies=[ANNOTATOR])
async def download_label(request: Request, label: str, tag: str = "final") -> FileResponse:
    ctx = ctx_of(request)
    path = await run_in_threadpool(ctx.guarded, lambda: _label_file(ctx, label, tag))
    return FileResponse(path, media_type="application/octet-stream", filename=path.name)


@router.delete("/datastore/label")
async def remove_label(request: Request, id: str, tag: str, user: User = ADMIN) -> dict[str, Any]:  # noqa: A002
    ctx = ctx_of(request)

    def remove() -> None:
        path = _label_file(ctx, id, tag)
        if not ctx.config.dicomweb:  # the datastore deletes the resolved path
            _unlinked_stored(ctx, str(path), ctx.datastore_root() / "labels" / tag, id, f"label {id!r} ({tag})")
        ctx.datastore().remove_label(id, tag)

    await run_in_threadpool(ctx.guarded, remove)
    logger.info("label %s (%s) removed by %s", id, tag, user.name)
    return {}


# -- sessions ----------------------------------------------------------------------------------------------------
def _session_json(info: Any) -> dict[str, Any]:
    """A session's public fields (never server paths)."""
    return {"name": info.name, "create_ts": info.create_ts, "last_access_ts": info.last_access_ts,
            "expiry": info.expiry, "image": os.path.basename(info.image)}


@router.put("/session/")
@router.put("/session", include_in_schema=False)
async def create_session(request: Request, uncompress: bool = False, expiry: int = 0,
                         user: User = ANNOTATOR) -> dict[str, Any]:
    ctx = ctx_of(request)
    lim = ctx.config.limits
    sessions = ctx.instance.sessions()
    if sessions is None:
        raise RequestError("sessions are not enabled on this server", 404)
    if not 0 <= expiry <= lim.session_expiry_s:
        raise RequestError(f"expiry must be in 0..{lim.session_expiry_s} seconds")
    root = ctx.config.sessions_dir
    live = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    if len(live) >= lim.sessions:
        raise RequestError(f"{len(live)} sessions exist; at most {lim.sessions} (delete some first)", 429)
    form = await request.form(max_files=lim.archive_members, max_fields=lim.archive_members + 2)
    try:
        uploads = form.getlist("files")
        _only(form, {"files"})
        if not uploads or not all(isinstance(u, UploadFile) for u in uploads):
            raise RequestError("upload the image in form field 'files'")
        with request_folder(ctx) as folder:
            if uncompress:
                if len(uploads) != 1:
                    raise RequestError("uncompress=true takes exactly one archive")
                archive = folder / "upload.archive"
                await run_in_threadpool(_save, uploads[0], archive)
                series = folder / "series"
                series.mkdir()
                await run_in_threadpool(extract_archive, archive, series, lim.archive_members, lim.upload_bytes)
                archive.unlink()
                image = series
            elif len(uploads) == 1:
                suffix = _suffix(uploads[0].filename, "files")
                image = folder / f"image{suffix}"
                await run_in_threadpool(_save, uploads[0], image)
            else:  # several DICOM files of one series
                image = folder / "series"
                image.mkdir()
                for i, u in enumerate(uploads):
                    await run_in_threadpool(_save, u, image / f"{i:05d}.dcm")
            await run_in_threadpool(_check_volume, ctx, image, "files")
            size = await run_in_threadpool(folder_bytes, folder)
            used = await run_in_threadpool(folder_bytes, root) if root.is_dir() else 0
            if used + size > lim.sessions_bytes:
                raise RequestError(f"sessions would hold {used + size} bytes; the limit is {lim.sessions_bytes}", 413)
            session_id, info = await run_in_threadpool(sessions.add_session, str(image), expiry, False)
    finally:
        await form.close()
    contained(info.image, root, "session")
    _preencode(ctx, info.image)
    logger.info("session %s created by %s (%d bytes)", session_id, user.name, size)
    return {"session_id": session_id, "session_info": _session_json(info)}


@router.get("/session/{session_id}", dependencies=[ANNOTATOR])
async def get_session(request: Request, session_id: str, update_ts: bool = False, image: bool = False) -> Any:
    ctx = ctx_of(request)
    info = await run_in_threadpool(ctx.session, session_id)
    if image:
        path = contained(info.image, ctx.config.sessions_dir, "session image")
        if not path.is_file():
            raise RequestError("the session holds a DICOM series folder; it cannot be downloaded as one file", 404)
        return FileResponse(path, media_type="application/octet-stream", filename=path.name)
    return _session_json(info)


@router.delete("/session/{session_id}")
async def remove_session(request: Request, session_id: str, user: User = ANNOTATOR) -> dict[str, Any]:
    ctx = ctx_of(request)
    info = await run_in_threadpool(ctx.session, session_id)
    await run_in_threadpool(ctx.instance.sessions().remove_session, info.name)
    logger.info("session %s removed by %s", info.name, user.name)
    return _session_json(info)
