"""Login, server info, inference and logs.

* ``GET /auth/`` (public): whether authentication is on (3D Slicer's module asks this first).
* ``POST /auth/token`` (public): form ``username`` / ``password`` -> ``{"access_token", "token_type": "bearer"}``.
* ``GET /auth/token/valid`` (any user): the current user.
* ``GET /info/`` (annotator): MONAI Label's app info (models, labels, trainers, train progress, datastore counts).
* ``POST /infer/{model}`` (annotator): a box/point prompt on a datastore image or a session's image.
* ``GET /logs/`` (admin): the last lines of the server log.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from requests_toolbelt import MultipartEncoder

from ..auth import AuthError, User
from ..context import ADMIN, ANNOTATOR, ctx_of, current_user, json_object
from ..security import RequestError, safe_name

logger = logging.getLogger(__name__)
router = APIRouter()

# Prompt fields the interactive task reads (medsamix.serving.prompts / medsamix.serving.service).
# and the answer's file format (medsamix.data.labelfile: NRRD for Slicer and OHIF, NIfTI by default).
PROMPT_KEYS = {"roi", "foreground", "background", "pos_points", "neg_points", "pos_boxes", "neg_boxes", "slice",
               "mode", "label", "iou_threshold", "margin", "result_extension", "result_dtype", "result_compress"}
# Fields real clients send along that change nothing here: accepted and dropped.
CLIENT_KEYS = {"client_id", "label_info", "largest_cc", "restore_label_idx"}
OUTPUTS = ("image", "json", "all")


@router.get("/auth/", include_in_schema=False)
@router.get("/auth")
async def auth_enabled(request: Request) -> dict[str, Any]:
    return {"enabled": ctx_of(request).auth.enabled, "client_id": "medsamix", "realm": ""}


@router.post("/auth/token")
async def auth_token(request: Request, username: str = Form(...), password: str = Form(...)) -> dict[str, Any]:
    ctx = ctx_of(request)
    client = request.client.host if request.client else "?"
    try:
        return await run_in_threadpool(ctx.auth.login, username, password, client)
    except AuthError as e:
        logger.warning("login refused for %r from %s: %s", username[:64], client, e)
        raise HTTPException(e.status, str(e)) from None


@router.get("/auth/token/valid")
async def auth_valid(request: Request) -> dict[str, Any]:
    user: User = current_user(request)
    return {"username": user.name, "roles": [user.role], "email": None, "name": user.name}


@router.get("/info/", dependencies=[ANNOTATOR])
@router.get("/info", dependencies=[ANNOTATOR], include_in_schema=False)
async def info(request: Request) -> dict[str, Any]:
    ctx = ctx_of(request)
    data = await run_in_threadpool(ctx.instance.info)
    if ctx.trainer is not None:
        data.setdefault("server", {})["training"] = ctx.trainer.summary()
    return data


def _infer_request(ctx: Any, model: str, image: str, session_id: str, params: dict[str, Any]) -> dict[str, Any]:
    """The checked MONAI Label infer request (blocking: the datastore may ask the PACS)."""
    request: dict[str, Any] = {k: v for k, v in params.items() if k in PROMPT_KEYS}
    request["model"] = model
    if session_id:
        info = ctx.session(session_id)
        request.update(image=info.image, session=info.to_json())
    else:
        image_id = ctx.known_image(image)
        ctx.image_path(image_id)  # contained in the datastore (a symbolic link out of it is refused)
        request["image"] = image_id
    return request


@router.post("/infer/{model}")
async def infer(request: Request, model: str, image: str = "", session_id: str = "", output: str | None = None,
                user: User = ANNOTATOR) -> Response:
    ctx = ctx_of(request)
    model = safe_name(model, "model")
    models = ctx.instance.infer_names()
    if model not in models:
        raise RequestError(f"unknown model {model!r}; available: {', '.join(models)}", 404)
    if output not in (None, *OUTPUTS):
        raise RequestError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    form = await request.form(max_files=2, max_fields=8)
    try:
        for name in form:
            if name not in ("params",):
                raise RequestError(f"form field {name!r} is not accepted: send the prompt in 'params' and the image "
                                   "as a datastore id (?image=) or a session (?session_id=, PUT /session/)")
        raw = form.get("params")
        if raw is not None and not isinstance(raw, str):
            raise RequestError("params must be a form field holding a JSON object, not a file")
        params = json_object(raw, "params", PROMPT_KEYS | CLIENT_KEYS, ctx.config.limits.json_bytes)
    finally:
        await form.close()
    if not image and not session_id:
        raise RequestError("no image: give ?image=<datastore id> or ?session_id=<session>")
    req = await run_in_threadpool(ctx.guarded, lambda: _infer_request(ctx, model, image, session_id, params))
    logger.info("infer %s on %s by %s (%s)", model, session_id or req["image"], user.name,
                ", ".join(sorted(k for k in req if k in PROMPT_KEYS)) or "no prompt")
    result = await ctx.infer.run(lambda: ctx.instance.infer(req))
    path = result.get("file") or result.get("label")
    try:
        body = await run_in_threadpool(_read, path) if path else None
    finally:
        if path:
            try:
                os.unlink(path)
            except OSError:
                pass
    res_json = result.get("params") or {}
    if output == "json" or body is None:
        return JSONResponse(res_json)
    name = os.path.basename(str(path))
    if output == "image":
        return Response(body, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})
    enc = MultipartEncoder(fields={"params": (None, json.dumps(res_json), "application/json"),
                                   "image": (name, body, "application/octet-stream")})
    return Response(enc.to_string(), media_type=enc.content_type)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@router.get("/logs/", dependencies=[ADMIN])
@router.get("/logs", dependencies=[ADMIN], include_in_schema=False)
async def logs(request: Request, lines: int = 300) -> PlainTextResponse:
    ctx = ctx_of(request)
    cap = ctx.config.limits.log_lines
    if not 1 <= lines <= cap:
        raise RequestError(f"lines must be in 1..{cap}")
    path = ctx.config.logs_dir / "server.log"
    text = await run_in_threadpool(_tail, path, lines)
    return PlainTextResponse(text)


def _tail(path: os.PathLike[str], lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - lines * 400))
            data = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(data.splitlines()[-lines:]) + "\n"
