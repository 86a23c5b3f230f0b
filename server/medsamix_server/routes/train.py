"""Training: ``GET /train/`` (annotator), ``POST /train/{model}`` and ``DELETE /train/`` (admin).

Options are the train task's own (``GET /info/`` -> ``trainers.<model>.config``); unknown keys (``bundle_path``
among them) are refused with 400, bad values too (checked before any process starts). One run at a time: a second
request gets 429, ``enqueue=true`` included. ``run_sync=true`` waits for the run and answers its result (or its
error with the reason) without holding up other requests.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool

from medsamix.errors import MedSAMixError

from ..auth import User
from ..context import ADMIN, ANNOTATOR, ctx_of, json_object
from ..security import RequestError, safe_name

logger = logging.getLogger(__name__)
router = APIRouter()
TRAIN_BODY_BYTES = 64 << 10


@router.get("/train/")
@router.get("/train", include_in_schema=False)
async def train_status(request: Request, all: bool = False, check_if_running: bool = False,  # noqa: A002
                       user: User = ANNOTATOR) -> Any:
    """MONAI Label's train task entry; the worker's log lines (``details``) and the request go to admins only
    (they name server folders)."""
    sup = ctx_of(request).trainer
    res = sup.status(all, check_if_running) if sup else None
    if res is None:
        raise HTTPException(404, "no training task is running" if check_if_running else "no training task yet")
    if not user.is_admin:
        strip = ("details", "request", "result")
        res = [{k: v for k, v in t.items() if k not in strip} for t in res] if isinstance(res, list) else \
            {k: v for k, v in res.items() if k not in strip}
    return res


@router.post("/train/{model}")
async def train_start(request: Request, model: str, run_sync: bool = False, enqueue: bool = False,
                      user: User = ADMIN) -> Any:
    ctx = ctx_of(request)
    sup = ctx.trainer
    model = safe_name(model, "model")
    names = ctx.instance.train_names()
    if sup is None or model not in names:
        raise RequestError(f"unknown train task {model!r}; available: {', '.join(names) or 'none'}", 404)
    if run_sync and not ctx.config.allow_train_sync:
        raise RequestError("run_sync is disabled on this server; poll GET /train/ instead", 400)
    body = await request.body()
    if len(body) > TRAIN_BODY_BYTES:
        raise RequestError(f"train options larger than {TRAIN_BODY_BYTES} bytes", 413)
    task = ctx.instance.trainer(model)
    options = json_object(body, "train options", set(task.config()) | {"client_id"}, TRAIN_BODY_BYTES)
    options.pop("client_id", None)  # monailabel's client (3D Slicer's) adds it
    check = getattr(task, "check_options", None)
    if check is not None:
        try:
            await run_in_threadpool(check, options)
        except MedSAMixError as e:
            raise RequestError(str(e)) from None
    if sup.running:
        raise HTTPException(429, "a training run is in progress; stop it (DELETE /train/) or wait for it"
                            + ("; queueing is not supported" if enqueue else ""))
    started = await sup.start(model, options)
    logger.info("training %s started by %s", model, user.name)
    if not run_sync:
        return started
    task_state = await sup.wait()
    res = task_state.get("result") or {}
    if res.get("ok"):
        return res.get("result")
    if task_state["status"] == "STOPPED":
        raise HTTPException(409, "the training run was stopped")
    raise HTTPException(int(res.get("status", 500)) if res else 500,
                        res.get("detail") or f"training failed ({task_state['status']}); see GET /train/")


@router.delete("/train/")
@router.delete("/train", include_in_schema=False)
async def train_stop(request: Request, user: User = ADMIN) -> Any:
    sup = ctx_of(request).trainer
    res = await sup.stop() if sup else None
    if res is None:
        raise HTTPException(404, "no training task is running")
    logger.info("training stopped by %s", user.name)
    return res
