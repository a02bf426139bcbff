"""Every error the API sends is RFC 9457 problem+json, built in exactly one place (service-design.md §1.7).

Routes raise ``Problem``; the handlers installed by ``install_handlers`` turn it, FastAPI's
validation errors and Starlette's HTTP errors into the same shape. Non-finite inputs are echoed as
strings (FastAPI's default echoes the raw float, which cannot be encoded and becomes a 500:
fastapi#4589), and no traceback ever reaches a client.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

log = logging.getLogger("cvpo.api")

PROBLEM_JSON = "application/problem+json"

_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Payload too large",
    415: "Unsupported media type",
    422: "Unprocessable content",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}

_TYPES = {
    400: "/problems/bad-request",
    401: "/problems/unauthorized",
    403: "/problems/forbidden",
    404: "/problems/not-found",
    405: "/problems/method-not-allowed",
    409: "/problems/conflict",
    413: "/problems/payload-too-large",
    415: "/problems/unsupported-media-type",
    422: "/problems/validation",
    429: "/problems/too-many-requests",
    500: "/problems/internal",
    503: "/problems/unavailable",
}


class Problem(Exception):  # noqa: N818 - RFC 9457 calls it a problem
    """An error a client can act on: status, a stable ``type``, a human ``detail``, optional ``errors``."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        type: str | None = None,
        title: str | None = None,
        errors: Sequence[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.type = type or _TYPES.get(status, "about:blank")
        self.title = title or _TITLES.get(status, "Error")
        self.errors = list(errors) if errors is not None else None
        self.headers = headers or {}
        self.extra = extra or {}


# Containers deeper than this are echoed as "<list>"/"<dict>": orjson refuses to encode past 254
# levels and this function would hit Python's recursion limit near 1000, so echoing a hostile
# deeply nested input back in a 422 used to be a 500. No response of the API nests near this deep.
MAX_ECHO_DEPTH = 32
_INT_RANGE = (-(2**63), 2**64 - 1)  # what orjson can encode; bigger integers are echoed as strings


def json_safe(value: Any, _depth: int = 0) -> Any:
    """Replace what orjson cannot encode (non-finite floats, integers past 64 bits, bytes, very deep
    containers) by strings, so any input can be echoed back."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict | list | tuple) and _depth >= MAX_ECHO_DEPTH:
        return f"<{type(value).__name__}>"
    if isinstance(value, dict):
        return {str(k): json_safe(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v, _depth + 1) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, int) and not isinstance(value, bool) and not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
        return str(value) if value.bit_length() < 4096 else "<int>"  # str() refuses past 4300 digits
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def problem_document(problem: Problem, instance: str | None = None, request_id: str | None = None) -> dict[str, Any]:
    """The problem+json body: type, title, status, detail, then instance and request_id when known."""
    body: dict[str, Any] = {
        "type": problem.type,
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
    }
    if instance is not None:
        body["instance"] = instance
    if request_id:
        body["request_id"] = request_id
    return body


def problem_response(request: Request | None, problem: Problem) -> Response:
    body = (
        problem_document(problem)
        if request is None
        else problem_document(problem, request.url.path, getattr(request.state, "request_id", None))
    )
    if problem.errors is not None:
        body["errors"] = json_safe(problem.errors)
    body.update(json_safe(problem.extra))
    headers = dict(problem.headers)
    if problem.status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    return Response(orjson.dumps(body), status_code=problem.status, media_type=PROBLEM_JSON, headers=headers)


def validation_problem(errors: Sequence[dict[str, Any]], detail: str | None = None) -> Problem:
    """A 422 from FastAPI/pydantic-style error dicts (``loc``, ``msg``, ``input``)."""
    cleaned = [
        {
            "loc": list(e.get("loc", ())),
            "msg": str(e.get("msg", "invalid")),
            **({"input": e["input"]} if "input" in e else {}),
        }
        for e in errors
    ]
    if detail is None:
        first = cleaned[0] if cleaned else {"loc": [], "msg": "invalid"}
        where = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
        detail = f"{where}: {first['msg']}"
    return Problem(422, detail, errors=cleaned)


def page_token_problem(exc: ValueError, page_token: str | None) -> Problem:
    """The 422 every list route gives for a page token the store cannot decode."""
    return validation_problem([{"loc": ["query", "page_token"], "msg": str(exc), "input": page_token}])


def guarded(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """The same problem+json mapping for an endpoint served outside FastAPI's exception middleware."""

    async def run(request: Request) -> Response:
        try:
            return await endpoint(request)
        except Problem as exc:
            return problem_response(request, exc)
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            return problem_response(request, Problem(500, "internal error; the request id is in the server log"))

    return run


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> Response:
        return problem_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        # A body that is not JSON at all is a 400, not a 422 (§1.7).
        if any(e.get("type") == "json_invalid" for e in errors):
            return problem_response(request, Problem(400, "request body is not valid JSON"))
        return problem_response(request, validation_problem(errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        detail = exc.detail if isinstance(exc.detail, str) else _TITLES.get(exc.status_code, "Error")
        return problem_response(request, Problem(exc.status_code, detail, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _defect(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(request, Problem(500, "internal error; the request id is in the server log"))
