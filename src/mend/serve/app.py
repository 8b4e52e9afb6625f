"""The HTTP service: a FastAPI app over an `Engine`, its web page, auth, limits and metrics.

Reads (the page, generate, score, the list of edits, state, health, metrics, the API docs
at /docs) are open; writes (an edit, a removal) need `Authorization: Bearer <token>`,
compared in constant time. A service started with no token refuses every write (403) unless
it was started with no auth, which it warns about. Every refusal is a JSON object
{"error": message} with a 4xx status: 401 no or wrong token, 403 writes off, 404 unknown
edit, 409 a removal this editor cannot make, 413 too large a body, 422 a body that does not
fit the schema or that mend cannot edit (an empty target, a target that tokenises to nothing,
a prompt longer than the context). Nothing refused is journaled or applied.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from pathlib import Path

import fastapi_offline
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from mend.errors import MendError
from mend.serve.engine import Engine, RequestError
from mend.serve.schema import MAX_BODY_BYTES, MAX_PAGE, EditIn, GenerateIn, ScoreIn

STATIC = Path(__file__).parent / "static"
# Swagger UI's own files (swagger-ui-dist 5, which reads OpenAPI 3.1), as fastapi-offline ships them
DOCS_FILES = Path(fastapi_offline.__file__).parent / "static"
TOKEN_ENV = "MEND_TOKEN"
log = logging.getLogger(__name__)


def load_token(token_file: str | None) -> str | None:
    """The write token: the first line of `token_file`, else $MEND_TOKEN, else None."""
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise MendError(f"--token-file {token_file}: {e.strerror}") from None
        if not token:
            raise MendError(f"--token-file {token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def write_mode(token: str | None, no_auth: bool) -> str:
    """How writes are let in: "token", "open" (no auth) or "off" (no token given)."""
    if no_auth:
        return "open"
    return "token" if token else "off"


class BodyLimit:
    """ASGI middleware: refuse a request body over `max_bytes` with 413, whether announced by
    Content-Length or streamed in chunks."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            response = _error(413, f"request body over {self.max_bytes} bytes")
            return await response(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        return await self.app(scope, limited, send)


def _error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


class Metrics:
    """Prometheus metrics of one app (its own registry, so apps do not share counters)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.edits = Counter("mend_edits", "edits accepted and journaled", registry=r)
        self.rollbacks = Counter("mend_rollbacks", "edits removed", registry=r)
        self.refused = Counter(
            "mend_refused_requests", "requests refused, by status", ["status"], registry=r
        )
        self.applied = Gauge("mend_edits_applied", "edits applied to the model now", registry=r)
        self.latency = Histogram(
            "mend_request_seconds", "request latency by route", ["route"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )  # fmt: skip
        self.edit_seconds = Histogram(
            "mend_edit_seconds", "time to compute and apply an edit (journal excluded)",
            registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )  # fmt: skip


def create_app(engine: Engine, token: str | None, no_auth: bool = False) -> FastAPI:
    """The service over `engine`.

    Args:
        token: the bearer token writes need; with none (and not `no_auth`) every write is
            refused (logged as a warning).
        no_auth: accept writes without a token (logged as a warning).
    """
    writes = write_mode(token, no_auth)
    if writes == "open":
        log.warning("serving with no auth: anyone who reaches this port can edit the model")
    elif writes == "off":
        log.warning(
            "no write token (--token-file FILE or %s): edits and roll-backs are refused",
            TOKEN_ENV,
        )
    app = FastAPI(
        title="mend serve",
        summary="A model whose facts are edited, checked and rolled back over HTTP",
        docs_url=None,  # served below, from files of its own: no other host
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    metrics = Metrics()
    metrics.applied.set(len(engine.seq))
    app.state.engine, app.state.metrics = engine, metrics

    @app.middleware("http")
    async def timed(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        name = f"{request.method} {route.path}" if route is not None else "unrouted"
        metrics.latency.labels(name).observe(time.perf_counter() - start)
        if 400 <= response.status_code < 500:
            metrics.refused.labels(str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = [
            {"where": ".".join(str(p) for p in e["loc"][1:]) or "body", "problem": e["msg"]}
            for e in exc.errors()
        ]
        text = "; ".join(f"{p['where']}: {p['problem']}" for p in problems)
        return _error(422, text, problems=problems)

    @app.exception_handler(StarletteHTTPException)  # (also routing's 404 and 405)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(MendError)
    async def mend_error(request: Request, exc: MendError):
        return _error(422, str(exc))

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError):
        return _error(exc.status, exc.message)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(500, f"the service failed ({type(exc).__name__}); see its log")

    def writer(authorization: str | None = Header(default=None)) -> None:
        if writes == "open":
            return
        if writes == "off":
            raise HTTPException(
                403,
                f"this service takes no edits: it was started without a write token "
                f"(--token-file or {TOKEN_ENV})",
            )
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise HTTPException(401, "writes need a token: send 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(401, "wrong token")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/docs/files", StaticFiles(directory=DOCS_FILES), name="docs-files")

    @app.get("/docs", include_in_schema=False)
    def docs():
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title="mend serve: API",
            swagger_js_url="/docs/files/swagger-ui-bundle.js",
            swagger_css_url="/docs/files/swagger-ui.css",
            swagger_favicon_url="/docs/files/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},  # (no call to swagger.io's validator)
        )

    @app.get("/healthz")
    def health():
        """Liveness: the service answers; the edits applied and how writes are let in
        ("token", "open" or "off")."""
        return {"ok": True, "edits": len(engine.seq), "writes": writes}

    @app.get("/v1/state")
    def state():
        return engine.state()

    @app.get("/v1/edits")
    def edits(
        offset: int = Query(0, ge=0, description="skip this many edits"),
        limit: int = Query(50, ge=1, le=MAX_PAGE, description="at most this many"),
    ):
        """The edits applied, in the order they were made, one page of them."""
        page, total = engine.edits(offset, limit)
        return {"edits": page, "total": total, "offset": offset, "limit": limit}

    @app.get("/v1/edits/{edit_id}")
    def one_edit(edit_id: int):
        return engine.edit_by_id(edit_id)

    @app.post("/v1/edits", status_code=201, dependencies=[Depends(writer)])
    def edit(body: EditIn):
        out = engine.edit([f.request() for f in body.requests], compare=body.compare)
        metrics.edits.inc()
        metrics.edit_seconds.observe(out["seconds"])
        metrics.applied.set(len(engine.seq))
        return out

    @app.delete("/v1/edits/{edit_id}", dependencies=[Depends(writer)])
    def remove(edit_id: int):
        out = engine.remove(edit_id)
        metrics.rollbacks.inc()
        metrics.applied.set(len(engine.seq))
        return out

    @app.post("/v1/generate")
    def generate(body: GenerateIn):
        answer = engine.generate(body.prompt, body.max_new_tokens, body.seed, **body.sampling())
        return {"prompt": body.prompt, "answer": answer, "seed": body.seed}

    @app.post("/v1/score")
    def score(body: ScoreIn):
        """Each answer's log-probability after the prompt (natural log, summed over its
        tokens), its number of tokens, and whether it is the greedy answer's start."""
        return {"prompt": body.prompt, "scores": engine.score(body.prompt, body.answers)}

    @app.get("/metrics", response_class=Response)
    def prometheus():
        """Prometheus text format: edits, roll-backs, refusals, latency histograms."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(app: FastAPI, host: str, port: int) -> None:
    """Run `app` with uvicorn until interrupted (one process: the model is held once)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
