"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status.

Every error path of the app answers in this shape: parameter errors (400), authentication (401),
admin access (403), unknown routes (404), body too large (413), overload or no executor (503, with
``Retry-After``). An unexpected exception is logged with its traceback and answered with 500; the
fuzz tests hold that no client input reaches that path.
"""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("pagedserve.gateway")


class APIError(Exception):
    """An error answered to the client in the OpenAI shape.

    Args:
        status: HTTP status code.
        message: what went wrong, for a person.
        type: OpenAI error type (``invalid_request_error``, ``authentication_error``, ...).
        param: the request field at fault, if any.
        code: a short machine-readable code.
        headers: extra response headers (``Retry-After``, ``WWW-Authenticate``).
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """HTTP 400, ``invalid_request_error``."""
    return APIError(400, message, "invalid_request_error", param, code)


def unavailable(message: str, code: str, retry_after_s: int = 1) -> APIError:
    """HTTP 503 with ``Retry-After``: overloaded, or no executor / block manager answers."""
    return APIError(503, message, "service_unavailable", None, code, headers={"Retry-After": str(retry_after_s)})


_NOT_AN_OBJECT = {"model_attributes_type", "model_type", "dict_type"}
_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


def _body_message(body, content_type: str | None) -> str:
    """Why a request body that is not a JSON object was refused.

    FastAPI parses the body as JSON only under a JSON ``Content-Type``; otherwise the route gets
    the raw bytes, which is how a missing or other ``Content-Type`` shows here.
    """
    if isinstance(body, (bytes, bytearray)):
        sent = f"Content-Type: {content_type[:100]}" if content_type else "no Content-Type"
        return f"the request body must be JSON (Content-Type: application/json); this request has {sent}"
    return f"the request body must be a JSON object, not {_JSON_TYPES.get(type(body), 'that')}"


def _validation_message(exc: RequestValidationError, content_type: str | None = None) -> tuple[str, str | None]:
    """The message and ``param`` of the first validation error.

    Args:
        content_type: the request's ``Content-Type`` header, named when the body was not JSON.
    """
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", []) if p != "body"]
    # pydantic names the union member it tried (e.g. "list[int]"); the client named only the field.
    fields = [p for p in loc if not any(c in p for c in "[]")]
    param = fields[0] if fields else None
    where = ".".join(p for p in loc if not any(c in p for c in "[]"))
    message = first.get("msg", "invalid value")
    message = message.removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', message)}", None
    if first.get("type") == "missing" and not loc:
        return "the request body is missing (send a JSON object with Content-Type: application/json)", None
    if first.get("type") in _NOT_AN_OBJECT and not loc:
        return _body_message(first.get("input"), content_type), None
    # Our own checks name their field already ("max_tokens must be at least 1, got 0").
    if where and not message.startswith(f"{where} "):
        message = f"{where}: {message}"
    return message, param


def install_handlers(app) -> None:
    """Make every error path answer in the OpenAI shape."""

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc, request.headers.get("content-type"))
        return bad_request(message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        return APIError(exc.status_code, str(exc.detail), kind, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error answering %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error: {type(exc).__name__}", "internal_error").response()
