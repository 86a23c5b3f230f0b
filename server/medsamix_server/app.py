"""The FastAPI application: MONAI Label's app instance behind the project's own endpoints and guard.

Route policy (everything not listed answers 404):

======================================  ===========  ===============================================================
route                                   who          notes
======================================  ===========  ===============================================================
``GET /auth/``, ``POST /auth/token``    anyone       login (3D Slicer's module: user name + password -> bearer token)
``GET /auth/token/valid``               any user
``GET /info/``                          annotator
``POST /infer/{model}``                 annotator    prompt fields allow-listed; datastore id or session only
``GET /datastore/``, ``/image``,        annotator    ids checked, files contained in the datastore
``/label``; ``HEAD /datastore/image``
``PUT /datastore/image``, ``/label``    annotator    uploads: size, format, voxel count; label shape = image shape
``DELETE /datastore/image``, ``/label`` admin
``PUT``/``GET``/``DELETE /session/``    annotator    archives extracted safely; count and size limits
``GET /train/``                         annotator
``POST /train/{model}``,                admin        options allow-listed; one run at a time (429)
``DELETE /train/``
``GET /logs/``                          admin
``POST /activelearning/{strategy}``     annotator    the next study to label (id and info, no paths)
``GET /ohif/...``                       anyone       static viewer files
``GET /proxy/dicom/{qido,wado}/...``    annotator    DICOMweb reads only
======================================  ===========  ===============================================================

Absent: MONAI Label's ``/datastore/dataset`` (every image and label as one zip), ``/model``, ``/scoring``,
``/batch``, ``/infer/wsi``, ``/reload``, ``/datastore/*/info`` updates, STOW and the
unrestricted ``/proxy/dicom/{path}``, the API docs.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import tempfile
from collections.abc import AsyncIterator

import requests
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from medsamix.errors import MedSAMixError

from .auth import Authenticator, UserStore
from .config import ServerConfig
from .context import InferQueue, ServerContext, TempJanitor
from .middleware import GuardMiddleware, is_body_too_large
from .security import RequestError, pacs_failed, remove_tree
from .training import TrainSupervisor

logger = logging.getLogger(__name__)

UPLOAD_ROUTES = {("PUT", "/session/"), ("PUT", "/session"), ("PUT", "/datastore/image"), ("PUT", "/datastore/"),
                 ("PUT", "/datastore/label")}


def prepare_environment(config: ServerConfig) -> None:
    """Folders and the MONAI Label settings (environment) this server needs; call before MONAI Label is imported.

    The request temp folder is emptied (left-overs of a killed server) and becomes Python's temp folder, so files
    libraries write for a request stay inside the state folder."""
    for d in (config.state_dir, config.sessions_dir, config.logs_dir, config.train_dir):
        d.mkdir(parents=True, exist_ok=True)
    remove_tree(config.tmp_dir)
    config.tmp_dir.mkdir(parents=True)
    os.chmod(config.state_dir, 0o700)
    tempfile.tempdir = str(config.tmp_dir)
    os.environ["TMPDIR"] = str(config.tmp_dir)
    env = {
        "MONAI_LABEL_APP_DIR": str(config.app_dir),
        "MONAI_LABEL_STUDIES": config.studies,
        "MONAI_LABEL_SERVER_PORT": str(config.port),
        "MONAI_LABEL_SESSION_PATH": str(config.sessions_dir),
        "MONAI_LABEL_SESSION_EXPIRY": str(min(3600, config.limits.session_expiry_s)),
        "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
        "MONAI_LABEL_TASKS_SCORING": "false",
        "MONAI_LABEL_TASKS_BATCH_INFER": "false",
        "MONAI_LABEL_AUTH_ENABLE": "false",  # authentication is this server's, not MONAI Label's
    }
    os.environ.update(env)


def setup_logging(config: ServerConfig) -> None:
    """Server log: ``<state>/logs/server.log`` (rotated, 3 x 10 MB) and stderr."""
    root = logging.getLogger()
    fmt = logging.Formatter("[%(asctime)s] [%(levelname)s] (%(name)s) %(message)s")
    handler = logging.handlers.RotatingFileHandler(config.logs_dir / "server.log", maxBytes=10 << 20, backupCount=3)
    handler.setFormatter(fmt)
    stream = logging.StreamHandler()
    stream.setFormatter(fmt)
    root.handlers = [handler, stream]
    root.setLevel(logging.INFO)


def create_app(config: ServerConfig) -> FastAPI:
    """The server application for ``config`` (:func:`prepare_environment` must have run)."""
    store = UserStore(config.users_file) if config.users_file and config.users_file.exists() else None
    ctx = ServerContext(config=config, auth=Authenticator(store, config.token_ttl_s),
                        infer=InferQueue(config.infer_workers, config.limits.infer_queue),
                        janitor=TempJanitor(config.tmp_dir))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from monailabel.interfaces.utils.app import app_instance

        ctx.trainer = TrainSupervisor(config)
        msg = ctx.trainer.stop_orphans()
        if msg:
            logger.warning(msg)
        instance = app_instance(app_dir=str(config.app_dir), studies=config.studies, conf=config.conf)
        instance.server_mode(True)
        instance.on_init_complete()
        ctx.instance = instance
        logger.info("MedSAMix server ready on %s:%d (authentication %s)", config.host, config.port,
                    "on" if ctx.auth.enabled else "off: loopback only, every local client is admin")
        try:
            yield
        finally:
            await ctx.trainer.shutdown()
            ctx.infer.shutdown()

    app = FastAPI(title="MedSAMix server", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan,
                  redirect_slashes=False)  # unknown paths are 404, not a redirect to a near one
    app.state.ctx = ctx

    from .routes import activelearning, core, data, train, viewer

    for r in (core.router, data.router, train.router, viewer.router, activelearning.router):
        app.include_router(r)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, e: RequestError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=e.status)

    @app.exception_handler(MedSAMixError)
    async def medsamix_error(_: Request, e: MedSAMixError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        reasons = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg')}"
                            for err in e.errors()[:5])
        return JSONResponse({"detail": f"bad request: {reasons}"[:1000]}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        if is_body_too_large(e):
            return JSONResponse({"detail": "request body is over the limit"}, status_code=413)
        return JSONResponse({"detail": e.detail}, status_code=e.status_code, headers=getattr(e, "headers", None))

    # Handlers of specific exception classes run in Starlette's ExceptionMiddleware: the answer is the whole story.
    # The handler of ``Exception`` runs in ServerErrorMiddleware, which re-raises after answering (uvicorn then
    # logs "Exception in ASGI application" with a traceback): only for real internal errors.
    from monailabel.interfaces.exception import MONAILabelException

    @app.exception_handler(MONAILabelException)
    async def monailabel_error(_: Request, e: MONAILabelException) -> JSONResponse:
        return JSONResponse({"detail": str(e.msg)}, status_code=400)

    @app.exception_handler(requests.exceptions.RequestException)
    async def pacs_error(request: Request, e: requests.exceptions.RequestException) -> JSONResponse:
        # the DICOMweb datastore's PACS: down or failing
        logger.warning("PACS request failed on %s %s: %r", request.method, request.url.path, e)
        return await request_error(request, pacs_failed(e))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({type(e).__name__}); see the server log"}, status_code=500)

    def body_limit(method: str, path: str) -> int:
        if (method, path) in UPLOAD_ROUTES:
            return config.limits.upload_bytes
        return config.limits.json_bytes

    app.add_middleware(GuardMiddleware, hosts=config.host_names(), origins=set(config.cors_origins),
                       body_limit=body_limit)
    return app
