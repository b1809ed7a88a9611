"""What every route module imports: the server's state and the caller as FastAPI dependencies, server-sent events,
and the error objects (OpenAI's, and Anthropic's for /v1/messages).

A route module (openai.py, responses.py, messages.py, rag.py, embeddings.py) takes ``state: State`` and
``caller: CurrentCaller`` and imports from here, never from another route module; what two route modules share
belongs here, or in turns.py when it is generating an assistant turn.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from fastapi.responses import JSONResponse

from fourwalls.errors import FourwallsError
from fourwalls.serve.caller import Caller
from fourwalls.serve.state import ServerState

_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error", 503: "service_unavailable",
          504: "timeout"}  # any other 4xx is an invalid_request_error, any other 5xx a server_error
_ANTHROPIC_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                    413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error"}  # any other 4xx is an invalid_request_error, any other 5xx an api_error
ANTHROPIC_PATHS = ("/v1/messages",)  # routes that answer errors in Anthropic's shape


def get_state(request: Request) -> ServerState:
    return request.app.state.fourwalls


State = Annotated[ServerState, Depends(get_state)]


def get_caller(state: State, authorization: Annotated[str | None, Header()] = None,
               x_api_key: Annotated[str | None, Header()] = None) -> Caller:
    """The key the request's Authorization header (or, as Anthropic's clients send it, x-api-key) names (401 if
    none does), or anyone when there are no keys."""
    return Caller() if state.keys is None else state.keys.authenticate(authorization, x_api_key)


CurrentCaller = Annotated[Caller, Depends(get_caller)]

DONE = "data: [DONE]\n\n"  # the event that ends an OpenAI stream


def sse(obj: Any) -> str:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The OpenAI error object."""
    kind = _TYPES.get(status) or ("invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error object."""
    kind = _ANTHROPIC_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None, path: str = "") -> JSONResponse:
    """The error object of the API that ``path`` belongs to (OpenAI's unless it is Anthropic's)."""
    body = (anthropic_error_body(status, message) if path.startswith(ANTHROPIC_PATHS)
            else error_body(status, message, param, code))
    return JSONResponse(body, status_code=status, headers=headers)


def client_closed(path: str = "") -> JSONResponse:
    """The answer to a client that disconnected before a response that is not streamed was ready: nobody reads
    it, but it is counted (499, as nginx logs a client that closed the request)."""
    return error_response(499, "the client closed the connection before the response was ready", path=path)


def error_from(e: FourwallsError, path: str = "") -> JSONResponse:
    headers = {"Retry-After": str(e.retry_after)} if hasattr(e, "retry_after") else None
    if e.http_status == 503:
        headers = {"Retry-After": "1"}
    return error_response(e.http_status, str(e), e.param, e.code, headers, path)
