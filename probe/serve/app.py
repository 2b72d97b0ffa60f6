"""The HTTP layer: each endpoint parses its request and calls one ``Service`` method; errors become 4xx JSON
``{"detail": "<what was wrong and what is expected>"}``. OpenAPI schema at /openapi.json, docs at /docs.

    GET  /health                          readiness + micro-batching counters        GET /metrics (counters only)
    GET  /models                          backbone, heads, indexes, few-shot sets, limits
    POST /embed                           file                -> embedding
    POST /heads/{name}/classify?k=5&reject=none  file         -> top-k classes with probabilities, or "unknown"
    POST /indexes/{name}/search?k=10      file                -> nearest gallery images
    GET  /indexes/{name}/search?id=3&k=10                     -> neighbours of gallery image 3
    GET  /indexes/{name}/search/text?text=a+bee&k=10          -> nearest gallery images to a text (CLIP indexes)
    GET  /indexes/{name}/items/{id}/image?size=256            -> PNG thumbnail (gallery files only)
    GET  /fewshot                         sets;  POST/GET/DELETE /fewshot/{set}
    POST /fewshot/{set}/examples          file + label        -> add a support image
    POST /fewshot/{set}/classify?k=5      file                -> prototype-head top-k
    GET  /                                the search page (static/)

Before any route: RequestGuard (security.py: Host allowlist, cross-origin check, token), BodyLimit, BodyTimeout.

Example:
    >>> app = create_app(ServeConfig(stores=("cache/demo.h5",)))
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from .. import __version__
from ..errors import ProbeError
from .errors import ServiceError
from .security import AccessPolicy, RequestGuard
from .service import ServeConfig, Service, load_service

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
MULTIPART_SLACK = 64 * 1024  # form boundaries and headers around the file itself


class BodyLimit:
    """ASGI middleware: refuse request bodies above ``max_bytes`` with 413 — at once when Content-Length says
    so, else as soon as the streamed body passes the limit — so a huge upload is never spooled to disk."""

    def __init__(self, app, max_bytes: int, max_mb: float):
        self.app, self.max_bytes, self.max_mb = app, max_bytes, max_mb

    def _message(self, size: str) -> str:
        return (f"the request body is {size}; this server accepts uploads of at most {self.max_mb:g} MB "
                "(--max-upload-mb)")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = JSONResponse({"detail": self._message(f"{int(length) / 2**20:.1f} MB")}, status_code=413,
                                    headers={"Connection": "close"})
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, self._message(f"more than {self.max_bytes / 2**20:.1f} MB"))
            return message

        return await self.app(scope, limited_receive, send)


class BodyTimeout:
    """ASGI middleware: a request body that stalls for ``seconds`` (nothing arrives between two chunks, as nginx's
    client_body_timeout) gets 408 and its connection closed. uvicorn itself waits forever for a body shorter than its
    Content-Length, holding the connection and a worker's upload."""

    def __init__(self, app, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        complete = False

        async def timed_receive():
            nonlocal complete
            if complete:  # after the body, receive() waits for a disconnect: not a stall
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.seconds)
            except asyncio.TimeoutError:  # TimeoutError from Python 3.11 on
                log.warning("%s %s: the request body stalled for %gs; answered 408", scope["method"], scope["path"],
                            self.seconds)
                raise HTTPException(408, f"the request body stalled: nothing arrived for {self.seconds:g} s "
                                         "(--body-timeout); was it shorter than its Content-Length?",
                                    headers={"Connection": "close"}) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return await self.app(scope, timed_receive, send)


def _validation_message(exc: RequestValidationError) -> str:
    """FastAPI's list of validation errors as one readable line: "query k: Input should be >= 1 (got 0)"."""
    parts = []
    for e in exc.errors():
        where = " ".join(str(x) for x in e.get("loc", ()))
        got = f" (got {str(e['input'])[:60]!r})" if e.get("input") is not None and e.get("type") != "missing" else ""
        parts.append(f"{where}: {e.get('msg', 'invalid')}{got}")
    return "; ".join(parts) or "malformed request"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(exc), "errors": _jsonable_errors(exc)}, status_code=422)

    @app.exception_handler(ProbeError)  # from the library: bad input the caller can fix
    async def user_error(request: Request, exc: ProbeError) -> JSONResponse:
        from ..errors import DiskFullError  # the server's disk (full, or a file in the way of its state dir), not
        from ..fs import UnwritableError  # the request: 507 Insufficient Storage

        stored = isinstance(exc, (DiskFullError, UnwritableError))
        return JSONResponse({"detail": str(exc)}, status_code=507 if stored else 422)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); the server log has the traceback"},
                            status_code=500)


def _jsonable_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]


def create_app(config: ServeConfig | None = None, service: Service | None = None) -> FastAPI:
    """The FastAPI app over a loaded service (``load_service(config)`` unless one is given). Loading happens here,
    before any port is bound, so a bad file fails the start with its message; /health answers only when ready."""
    service = service or load_service(config or ServeConfig())
    cfg = service.config

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(title="probe", version=__version__, lifespan=lifespan,
                  description="Embed, classify, few-shot and search images with one pretrained backbone "
                              f"({service.embedder.backbone.name}). Errors are 4xx with a `detail` message.")
    app.state.service = service
    # the last added runs first: who may ask (Host, Origin, token), then how large and how slow a body may be
    app.add_middleware(BodyTimeout, seconds=cfg.body_timeout)
    app.add_middleware(BodyLimit, max_bytes=cfg.max_upload_bytes + MULTIPART_SLACK, max_mb=cfg.max_upload_mb)
    app.add_middleware(RequestGuard, policy=AccessPolicy(token=cfg.token, hosts=(cfg.host, *cfg.allow_hosts)))
    _install_error_handlers(app)
    _status_routes(app, service)
    _embed_classify_routes(app, service)
    _search_routes(app, service)
    _fewshot_routes(app, service)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


# ---- the routes, by concern: each parses its request and calls one Service method
UPLOAD = File(..., description="An image file (JPEG, PNG, WebP, GIF, BMP, TIFF).")


def _hits_param(max_k: int) -> Any:
    return Query(10, ge=1, le=max_k, description="How many hits / classes to return.")


def _classes_param(max_k: int) -> Any:
    return Query(5, ge=1, le=max_k, description="How many classes to return.")


def _status_routes(app: FastAPI, service: Service) -> None:
    @app.get("/health", tags=["status"], summary="Readiness (503 while the batch worker is not running) and counters")
    def health() -> JSONResponse:
        h = service.health()
        return JSONResponse(h, status_code=200 if h["ready"] else 503)

    @app.get("/metrics", tags=["status"], summary="Micro-batching counters: requests, batches, batch sizes")
    def metrics() -> dict[str, Any]:
        return service.metrics()

    @app.get("/models", tags=["status"], summary="The backbone, heads, indexes and few-shot sets loaded")
    def models() -> dict[str, Any]:
        return service.catalog()


def _embed_classify_routes(app: FastAPI, service: Service) -> None:
    top_param = _classes_param(service.config.max_k)

    @app.post("/embed", tags=["embed"], summary="Embed an uploaded image with the served backbone")
    async def embed(file: UploadFile = UPLOAD) -> dict[str, Any]:
        return await service.embed(await file.read())

    @app.post("/heads/{name}/classify", tags=["classify"], summary="Top-k classes of a loaded head")
    async def classify(name: str, file: UploadFile = UPLOAD, k: int = top_param,
                       reject: str = Query("none", description="none (default), auto (the head's threshold, set "
                                                               "on val), or a distance in [0, 2]: farther from "
                                                               "every class mean is 'unknown'.")) -> dict[str, Any]:
        return await service.classify(name, await file.read(), k, reject)


def _search_routes(app: FastAPI, service: Service) -> None:
    k_param = _hits_param(service.config.max_k)

    @app.post("/indexes/{name}/search", tags=["search"], summary="Nearest gallery images to an uploaded image")
    async def search(name: str, file: UploadFile = UPLOAD, k: int = k_param) -> dict[str, Any]:
        return await service.search(name, await file.read(), k)

    @app.get("/indexes/{name}/search", tags=["search"], summary="Nearest gallery images to gallery image `id`")
    def search_id(name: str, id: int = Query(..., description="Gallery id (store row)."),  # noqa: A002
                  k: int = k_param) -> dict[str, Any]:
        return service.search_id(name, id, k)

    @app.get("/indexes/{name}/search/text", tags=["search"],
             summary="Nearest gallery images to a text (an index of a clip/ store: /models says text_search)")
    async def search_text(name: str, text: str = Query(..., min_length=1, description="What to look for, e.g. "
                                                                                      "'a photo of a bee'."),
                          k: int = k_param) -> dict[str, Any]:
        return await service.search_text(name, text, k)

    @app.get("/indexes/{name}/items/{item}/image", tags=["search"], response_class=Response,
             summary="PNG thumbnail of a gallery image (only files of a loaded index)")
    def thumbnail(name: str, item: int, size: int = Query(256, ge=16, le=1024)) -> Response:
        return Response(service.thumbnail(name, item, size), media_type="image/png",
                        headers={"Cache-Control": "max-age=3600"})


def _fewshot_routes(app: FastAPI, service: Service) -> None:
    top_param = _classes_param(service.config.max_k)

    @app.get("/fewshot", tags=["few-shot"], summary="List the few-shot class sets")
    def fewshot_list() -> list[dict[str, Any]]:
        return service.sets.list()

    @app.post("/fewshot/{name}", tags=["few-shot"], status_code=201, summary="Create an empty few-shot set")
    def fewshot_create(name: str) -> dict[str, Any]:
        return service.sets.create(name)

    @app.get("/fewshot/{name}", tags=["few-shot"], summary="A set's classes and example counts")
    def fewshot_get(name: str) -> dict[str, Any]:
        return service.sets.get(name).summary()

    @app.delete("/fewshot/{name}", tags=["few-shot"], summary="Delete a set (and its file)")
    def fewshot_delete(name: str) -> dict[str, Any]:
        return service.sets.delete(name)

    @app.post("/fewshot/{name}/examples", tags=["few-shot"], summary="Add a labelled support image to a set")
    async def fewshot_add(name: str, file: UploadFile = UPLOAD,
                          label: str = Form(..., description="Class name of this image.")) -> dict[str, Any]:
        return await service.fewshot_add(name, label, await file.read(), file.filename or "")

    @app.post("/fewshot/{name}/classify", tags=["few-shot"], summary="Classify against a set (prototype head)")
    async def fewshot_classify(name: str, file: UploadFile = UPLOAD, k: int = top_param) -> dict[str, Any]:
        return await service.fewshot_classify(name, await file.read(), k)
