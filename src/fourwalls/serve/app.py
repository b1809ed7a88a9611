"""The FastAPI app: the route modules, health and metrics, and a gate that every request passes first."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Scope, Send

from fourwalls.errors import FourwallsError
from fourwalls.files import disk_full
from fourwalls.serve import conversations, embeddings, messages, openai, rag, responses
from fourwalls.serve.common import CurrentCaller, error_from, error_response
from fourwalls.serve.state import ServerState

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/adapters", "/healthz", "/readyz",
          "/metrics", "/openapi.json", "/docs", "/redoc", "/v1/adapters/{name}", "/v1/embeddings", "/v1/collections",
          "/v1/collections/{name}", "/v1/collections/{name}/documents", "/v1/collections/{name}/documents/{source}",
          "/v1/collections/{name}/search", "/v1/me", "/v1/conversations", "/v1/conversations/{id}",
          "/v1/conversations/{id}/export", "/", "/ui/{path}", "/v1/responses", "/v1/responses/{response_id}",
          "/v1/messages")
# {source} and {path} may hold slashes; other parameters may not.
_TEMPLATES = [(re.compile(re.sub(r"\{\w+\}", "[^/]+", re.sub(r"\{(source|path)\}", "(.+)", t))), t)
              for t in ROUTES if "{" in t]
UI = Path(__file__).with_name("ui")  # the web page: static files, plus its two libraries in ui/vendor/
UI_LIBRARIES = ("vendor/marked.esm.js", "vendor/purify.es.js")  # built by scripts/build-ui, not committed
# The page runs only its own scripts: no inline script, nothing from another origin, so text that slips through
# as HTML still cannot run.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def route_label(path: str) -> str:
    """The metrics label of a request path: its route template, or "other" (no label per collection)."""
    if path in ROUTES:
        return path
    return next((t for pattern, t in _TEMPLATES if pattern.fullmatch(path)), "other")


def create_app(state: ServerState) -> FastAPI:
    # /docs and /redoc with Swagger UI's and ReDoc's files served from the fastapi-offline package: FastAPI's own
    # pages load them (and Google fonts) from CDNs, which is blank without internet and a request outside the walls.
    app = FastAPIOffline(title="fourwalls", version="1", description=f"OpenAI-compatible API serving {state.lm.name}",
                         swagger_ui_parameters={"validatorUrl": None})
    app.state.fourwalls = state
    for routes in (openai, responses, messages, rag, embeddings, conversations):
        app.include_router(routes.router)
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's document, with the served model's name as the example of every ``model`` field."""
        if app.openapi_schema is None:
            schema = default_openapi()
            for component in schema.get("components", {}).get("schemas", {}).values():
                if "model" in component.get("properties", {}):  # the embeddings request has its own example
                    component["properties"]["model"].setdefault("examples", [state.lm.name])
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/healthz")
    async def healthz() -> Response:
        """Alive, and the engine loop is ticking (a stuck engine turns this red)."""
        stalled = time.monotonic() - state.engine.last_tick
        if not state.engine.thread.is_alive() or stalled > state.stall_timeout:
            return error_response(503, f"the engine loop has not ticked for {stalled:.0f} s")
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        """Ready for traffic: the model is loaded and the server is not draining."""
        if state.draining:
            return error_response(503, "draining")
        if not state.engine.thread.is_alive():
            return error_response(503, "the engine is not running")
        return JSONResponse({"status": "ready", "model": state.lm.name, "digest": state.lm.digest})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/me")
    async def me(caller: CurrentCaller) -> dict[str, Any]:
        """Who is calling and what it may do: the key's name (null without keys), ``admin``, the document
        ``groups`` it reads (null: all), the ``models`` it may use, whether the server has keys (``auth``), and
        the largest request body (``max_body_bytes``, which bounds uploads). The web page shows what this allows."""
        groups = caller.groups
        return {"object": "caller", "name": caller.name, "admin": caller.admin,
                "groups": None if groups is None else sorted(groups),
                "models": ["*"] if caller.key is None else caller.key.models, "auth": state.keys is not None,
                "max_body_bytes": state.max_body_bytes}

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        """The web chat (serve/ui/), which uses only the API above."""
        return FileResponse(UI / "index.html", headers=PAGE_HEADERS)

    app.mount("/ui", StaticFiles(directory=UI), name="ui")

    @app.exception_handler(FourwallsError)
    async def fourwalls_error(request: Request, e: FourwallsError) -> Response:
        return error_from(e, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> Response:
        path = request.url.path
        # the deepest error says most: a bad field inside one member of a union, not "input is not a string"
        first = max(e.errors(), key=lambda err: len(err.get("loc", ())), default={})
        loc = [str(x) for x in first.get("loc", ()) if x != "body" and "[" not in str(x)]
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", code="invalid_json", path=path)
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid value')}"
        return error_response(400, message, param=loc[0] if loc else None, code=first.get("type"), path=path)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> Response:
        return error_response(e.status_code, str(e.detail), headers=getattr(e, "headers", None),
                              path=request.url.path)

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception) -> Response:
        if disk_full(e):  # a write that does not say so itself
            return error_response(507, "the disk is full on the server; free some space there and try again",
                                  code="disk_full", path=request.url.path)
        return error_response(500, f"internal error ({type(e).__name__})", path=request.url.path)

    return Gate(app, state)  # type: ignore[return-value]


class Gate:
    """Pure ASGI, around the whole app: refuses work while draining, caps the body size, stamps the model digest
    on every response and counts responses by route and status."""

    def __init__(self, app: FastAPI, state: ServerState) -> None:
        self.app, self.state = app, state

    def __getattr__(self, name: str) -> Any:  # tests and tools reach app.state, app.openapi() ... through us
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, status = scope["path"], [500]

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = MutableHeaders(scope=message)
                headers.append("x-fourwalls-model-digest", self.state.lm.digest)
                if status[0] >= 500 and "connection" not in headers:  # the server may drop the connection after
                    headers.append("connection", "close")  # an error: a client must not send the next request on it
            await send(message)

        self.state.in_flight += 1
        try:
            if self.state.draining and path.startswith("/v1/"):
                await error_response(503, "the server is draining; retry on another replica",
                                     headers={"Retry-After": "1", "Connection": "close"},
                                     path=path)(scope, receive, stamped)
                return
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._read_body(receive)
                if body is None:
                    limit = self.state.max_body_bytes
                    await error_response(413, f"the request body exceeds {limit} bytes",
                                         code="request_too_large", path=path)(scope, receive, stamped)
                    return
                field = _lone_surrogate(body)
                if field is not None:
                    await error_response(400, f"{field}: holds a lone surrogate (a \\ud800-\\udfff escape without "
                                              "its pair), which is not text; send valid Unicode", param=field,
                                         code="invalid_unicode", path=path)(scope, receive, stamped)
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, stamped)
        finally:
            self.state.in_flight -= 1
            self.state.metrics.requests.labels(route_label(path), str(status[0])).inc()

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None as soon as it passes the limit."""
        limit, parts, size = self.state.max_body_bytes, [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > limit:
                return None
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        return b"".join(parts)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(body: bytes) -> str | None:
    """The path (``messages.0.content``) of the first string in a JSON body that holds a lone surrogate, a JSON
    escape that decodes to no character: no tokenizer, database or file can take it."""
    if not _SURROGATE_ESCAPE.search(body):  # a pair decodes to one valid character, so this looks first
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None  # the route answers that the body is not JSON

    def find(v: Any, path: list[str]) -> list[str] | None:
        if isinstance(v, str):
            return path if _SURROGATE.search(v) else None
        for k, x in v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ():
            if isinstance(k, str) and _SURROGATE.search(k):
                return [*path, k]
            found = find(x, [*path, str(k)])
            if found is not None:
                return found
        return None

    found = find(value, [])
    if found is None:
        return None
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", ".".join(found) or "body")


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then wait for the client to disconnect, as the server would tell us

    return replay

