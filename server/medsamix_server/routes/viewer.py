"""The OHIF viewer MONAI Label bundles (``GET /ohif/...``, public static files) and the DICOMweb proxy it reads
studies through (``GET /proxy/dicom/{qido,wado}/...``, annotator, DICOMweb studies only).

The proxy is confined to QIDO-RS / WADO-RS reads below the configured DICOMweb root: ``studies``, a study, its
series, a series' instances, metadata, frames and rendered views, with UIDs of digits and dots only; a short
allow-list of query parameters; GET only (no STOW, no other PACS REST call). It passes the viewer's ``Accept``
header (so the PACS need not transcode), adds the configured PACS credentials itself, streams the answer with
connect/read timeouts and never blocks other requests.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import monailabel
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response, StreamingResponse

from ..context import ANNOTATOR, ctx_of
from ..security import RequestError, contained, pacs_failed

router = APIRouter()

_UID = r"[0-9]+(?:\.[0-9]+)*"
_FRAMES = r"[0-9]+(?:,[0-9]+)*"
# Anchored with \Z and matched with fullmatch: a plain "$" also matches before a trailing newline.
DICOMWEB_PATH = re.compile(
    rf"studies(?:/{_UID}(?:/(?:metadata|rendered|thumbnail|series(?:/{_UID}(?:/(?:metadata|rendered|thumbnail|"
    rf"instances(?:/{_UID}(?:/(?:metadata|rendered|thumbnail|frames/{_FRAMES}(?:/rendered)?))?)?))?)?))?)?\Z",
    re.ASCII)
QUERY_KEYS = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID", "PatientName", "StudyDate",
              "StudyDescription", "AccessionNumber", "ModalitiesInStudy", "Modality", "SeriesNumber", "limit",
              "offset", "fuzzymatching", "includefield", "00100020", "00100010", "00080020", "00080050",
              "00081030", "00080061", "0020000D", "0020000E", "00080060", "00200011"}
MAX_QUERY_PARAMS = 32
MAX_QUERY_VALUE = 256
PASS_HEADERS = ("content-type", "content-length", "content-encoding", "etag", "last-modified", "cache-control")
OHIF_DIR = Path(monailabel.__file__).resolve().parent / "endpoints" / "static" / "ohif"


def dicomweb_path(path: str) -> str:
    """``path`` if it is a QIDO-RS / WADO-RS resource path the proxy serves (see the module docstring), else
    :class:`RequestError` (400)."""
    if not isinstance(path, str) or len(path) > 1024 or not DICOMWEB_PATH.fullmatch(path):
        raise RequestError(f"not a QIDO-RS / WADO-RS resource path: {str(path)[:200]!r}", 400)
    return path


def proxy_query(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The query parameters passed to the PACS: allow-listed names, at most :data:`MAX_QUERY_PARAMS` of them, values
    of at most :data:`MAX_QUERY_VALUE` characters without control characters; else :class:`RequestError` (400)."""
    if len(items) > MAX_QUERY_PARAMS:
        raise RequestError(f"more than {MAX_QUERY_PARAMS} query parameters", 400)
    out = []
    for k, v in items:
        if k not in QUERY_KEYS or len(v) > MAX_QUERY_VALUE or any(ord(c) < 32 or ord(c) == 127 for c in v):
            raise RequestError(f"query parameter {k[:64]!r} is not allowed here", 400)
        out.append((k, v))
    return out


OVERLAY_DIR = Path(__file__).resolve().parents[1] / "static" / "ohif"
OVERLAY_PREFIX = "medsamix/"
# the project's overlay on the bundled viewer (box prompts, label submit, training progress): a versioned script
OVERLAY_TAG = b'<script src="/ohif/medsamix/overlay.js?v=1"></script>'


@router.get("/ohif/{path:path}", include_in_schema=False)
@router.get("/ohif", include_in_schema=False)
async def ohif(path: str = "") -> Response:
    """The bundled OHIF viewer's files (sub-folders included); any other path is a viewer route and gets
    ``index.html``, with the project's overlay script added. ``/ohif/medsamix/...`` are the overlay's own files."""
    root, rel = OHIF_DIR, path
    if path.startswith(OVERLAY_PREFIX):
        root, rel = OVERLAY_DIR, path[len(OVERLAY_PREFIX):]
    target = OHIF_DIR / "index.html"
    if rel:
        try:
            real = contained(root / rel, root, "path")
        except RequestError:
            raise RequestError("not found", 404) from None
        if real.is_file():
            target = real
        elif root is OVERLAY_DIR:
            raise RequestError("not found", 404)
    if not target.is_file():
        raise RequestError("the OHIF viewer is not installed", 404)
    if target.name == "index.html" and target.parent == OHIF_DIR:
        html = target.read_bytes()
        if (OVERLAY_DIR / "overlay.js").is_file():
            html = html.replace(b"</body>", OVERLAY_TAG + b"</body>", 1)
        return Response(html, media_type="text/html", headers={"Cache-Control": "no-cache"})
    return FileResponse(target)


@router.get("/proxy/dicom/{op}/{path:path}", dependencies=[ANNOTATOR], include_in_schema=False)
async def proxy(request: Request, op: str, path: str) -> Response:
    ctx = ctx_of(request)
    if not ctx.config.dicomweb:
        raise RequestError("the studies are not a DICOMweb server; nothing to proxy", 404)
    if op not in ("qido", "wado"):
        raise RequestError("only /proxy/dicom/qido/... and /proxy/dicom/wado/... are served", 404)
    path = dicomweb_path(path.strip("/"))
    params = proxy_query(request.query_params.multi_items())
    prefix = os.environ.get("MONAI_LABEL_WADO_PREFIX" if op == "wado" else "MONAI_LABEL_QIDO_PREFIX") or ""
    url = "/".join(p.strip("/") for p in (ctx.config.studies, prefix, path) if p.strip("/"))
    headers = {"Accept": request.headers.get("accept", "*/*")[:512]}
    user = os.environ.get("MONAI_LABEL_DICOMWEB_USERNAME") or os.environ.get("MONAI_LABEL_DATASTORE_USERNAME")
    password = os.environ.get("MONAI_LABEL_DICOMWEB_PASSWORD") or os.environ.get("MONAI_LABEL_DATASTORE_PASSWORD")
    timeout = ctx.config.limits.proxy_timeout_s
    client = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)), follow_redirects=False,
                               auth=(user, password) if user and password else None)
    try:
        upstream = await client.send(client.build_request("GET", url, params=params, headers=headers), stream=True)
    except httpx.HTTPError as e:
        await client.aclose()
        raise pacs_failed(e) from None

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.HTTPError:
            return
        finally:
            await upstream.aclose()
            await client.aclose()

    out_headers = {k: v for k, v in upstream.headers.items() if k.lower() in PASS_HEADERS}
    return StreamingResponse(body(), status_code=upstream.status_code, headers=out_headers)


@router.api_route("/proxy/{rest:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
                  include_in_schema=False)
@router.api_route("/proxy", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
async def proxy_refused(request: Request, rest: str = "") -> Response:
    """Everything else below ``/proxy`` (STOW, ``/proxy/dicom/tools``, other methods, MONAI Label's unrestricted
    ``/proxy/dicom/{path}``): refused here, so no slash redirect or other route ever answers it."""
    status = 404 if request.method in ("GET", "HEAD") else 405
    raise RequestError("only GET /proxy/dicom/qido/... and /proxy/dicom/wado/... (QIDO-RS / WADO-RS reads) are "
                       "served", status)
