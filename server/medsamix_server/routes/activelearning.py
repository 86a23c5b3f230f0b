"""``POST /activelearning/{strategy}`` (annotator): the next study to label (3D Slicer's "Next Sample").

The strategy must be one of the app's (``GET /info/`` -> ``strategies``); the body may only carry ``client_id``.
The answer holds the image id and its datastore info, never a server path.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from ..context import ANNOTATOR, ctx_of, json_object
from ..security import RequestError, safe_name

router = APIRouter()


@router.post("/activelearning/{strategy}", dependencies=[ANNOTATOR])
async def next_sample(request: Request, strategy: str) -> dict[str, Any]:
    ctx = ctx_of(request)
    strategy = safe_name(strategy, "strategy")
    body = json_object(await request.body(), "body", {"client_id"}, ctx.config.limits.json_bytes)
    strategies = set(ctx.instance.info_strategies())
    if strategy not in strategies:
        raise RequestError(f"unknown strategy {strategy!r}; available: {', '.join(sorted(strategies))}", 404)

    def pick() -> dict[str, Any]:
        res = ctx.instance.next_sample({"strategy": strategy, **body})
        if not res or not res.get("id"):
            return {}
        info = ctx.datastore().get_image_info(res["id"]) or {}
        out = {k: v for k, v in info.items() if "path" not in k.lower() and isinstance(v, (str, int, float))}
        out["id"] = res["id"]
        return out

    return await run_in_threadpool(ctx.guarded, pick)
