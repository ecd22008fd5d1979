"""The ASGI app: the API, the console's files, /docs, /metrics; every error as JSON."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from swagger_ui_bundle import swagger_ui_path

from core.settings import Settings
from fleet.errors import BadInputError, NotFoundError
from ingest_worker.errors import StorageError
from web import api, stream
from web.auth import ApiError, authenticate, state_of
from web.errors import WebError
from web.middleware import SECURITY_HEADERS, BodyLimit, Headers
from web.publisher import NoCertificateError
from web.state import DatabaseUnavailableError, WebState
from web.tokens import TokenRole

STATIC = Path(__file__).parent / "static"

_DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fieldline API</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script src="/docs/assets/swagger-ui-standalone-preset.js"></script>
<script src="/docs/init.js"></script></body></html>
"""
# a file, not an inline script: the CSP allows scripts from 'self' only
_DOCS_INIT = """window.ui = SwaggerUIBundle({
  url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
  layout: "StandaloneLayout", persistAuthorization: false
});
"""


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# the most specific class decides (Starlette looks handlers up along the exception's MRO)
_STATUS_OF: dict[type[Exception], int] = {
    NotFoundError: 404,
    BadInputError: 400,
    NoCertificateError: 503,
    DatabaseUnavailableError: 503,
    WebError: 503,
    StorageError: 503,
}


def _plain(status: int) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    """A handler answering `status` with the exception's own message."""

    async def handler(_r: Request, exc: Exception) -> JSONResponse:
        return _error(status, str(exc))

    return handler


def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "the request is invalid"
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the body is not valid JSON: send a JSON object, e.g. " + '{"name": "reset"}'
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    where = ".".join(loc) or "the body"
    return f"{where}: {first.get('msg', 'invalid')}"


def create_app(
    settings: Settings, *, dsn: str | None = None, metrics_open: bool = False
) -> FastAPI:
    """The app over the database at `dsn` (default: settings' / the embedded cluster's) and
    the broker of `settings`. metrics_open: /metrics without a token (loopback servers)."""
    state = WebState(settings, dsn, metrics_open=metrics_open)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await state.close()

    app = FastAPI(
        lifespan=lifespan,
        title="fieldline API",
        version=api._version(),
        description="The fleet's devices, series, events and commands. Every route but "
        "/api/v1/health needs `Authorization: Bearer flt_...` (docs/web.md).",
        docs_url=None,
        redoc_url=None,
    )
    app.state.web = state
    app.include_router(api.router)
    app.include_router(stream.router)

    # our own errors whose message already says what was wrong: one status each
    for error, status in _STATUS_OF.items():
        app.add_exception_handler(error, _plain(status))

    @app.exception_handler(ApiError)
    async def _api_error(_r: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_r: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(exc))

    @app.exception_handler(HTTPException)
    async def _http(_r: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = "no such route: see /docs for the API"
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(asyncpg.QueryCanceledError)
    async def _slow(_r: Request, _exc: Exception) -> JSONResponse:
        limit = settings.web.statement_timeout_s
        return _error(503, f"the query took longer than {limit:g} s "
                           "(web.statement_timeout_s): ask for a shorter range")  # fmt: skip

    @app.exception_handler(asyncpg.PostgresError)
    async def _db(_r: Request, exc: Exception) -> JSONResponse:
        return _error(503, f"the database failed the query ({type(exc).__name__}): try again")

    @app.exception_handler(Exception)
    async def _unexpected(_r: Request, _exc: Exception) -> JSONResponse:
        # a bug: the traceback goes to the server's log (uvicorn), never to the client; this
        # answer bypasses the middleware, so it carries the security headers itself
        return _error(500, "the server failed this request (a bug: its log has the details); "
                           "try again, or report it", dict(SECURITY_HEADERS))  # fmt: skip

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        page = STATIC / "index.html"
        if not page.is_file():
            return PlainTextResponse("the console is not installed (web/static/index.html)", 404)
        return FileResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return Response(_DOCS_HTML, media_type="text/html")

    @app.get("/docs/init.js", include_in_schema=False)
    async def docs_init() -> Response:
        return Response(_DOCS_INIT, media_type="text/javascript")

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        web = state_of(request)
        if not web.metrics_open:
            token = await authenticate(web, _bearer(request))
            if token.role is not TokenRole.ADMIN:
                raise ApiError(403, "/metrics needs an admin token on a server beyond loopback")
        web.metrics.streams.set(web.streams.total())
        return Response(generate_latest(web.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.mount("/docs/assets", StaticFiles(directory=str(swagger_ui_path)), name="swagger")
    app.mount("/static", StaticFiles(directory=str(STATIC), check_dir=False), name="static")

    app.add_middleware(BodyLimit, limit=settings.web.max_body_bytes, metrics=state.metrics,
                       timeout_s=settings.web.read_timeout_s)  # fmt: skip
    app.add_middleware(Headers, metrics=state.metrics)
    return app


def _bearer(request: Request) -> str | None:
    header: Any = request.headers.get("authorization")
    if isinstance(header, str) and header.lower().startswith("bearer "):
        return header[7:].strip()
    return None
