"""What every route module imports: the server's state and the caller as FastAPI dependencies, server-sent events,
and the OpenAI error object.

A route module (openai.py, rag.py, embeddings.py, ...) takes ``state: State`` and ``caller: CurrentCaller``
and imports from here, never from another route module; what two route modules share belongs here.
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


def get_state(request: Request) -> ServerState:
    return request.app.state.fourwalls


State = Annotated[ServerState, Depends(get_state)]


def get_caller(state: State, authorization: Annotated[str | None, Header()] = None) -> Caller:
    """The key the request's Authorization header names (401 if none does), or anyone when there are no keys."""
    return Caller() if state.keys is None else state.keys.authenticate(authorization)


CurrentCaller = Annotated[Caller, Depends(get_caller)]

DONE = "data: [DONE]\n\n"  # the event that ends an OpenAI stream


def sse(obj: Any) -> str:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The OpenAI error object."""
    kind = _TYPES.get(status) or ("invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def error_from(e: FourwallsError) -> JSONResponse:
    headers = {"Retry-After": str(e.retry_after)} if hasattr(e, "retry_after") else None
    if e.http_status == 503:
        headers = {"Retry-After": "1"}
    return error_response(e.http_status, str(e), e.param, e.code, headers)
