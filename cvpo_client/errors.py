"""Exceptions of the client. Every non-2xx answer of the API is a ``CvpoAPIError`` carrying the RFC 9457
problem+json fields the service sends (README, "Input limits and error statuses"), so callers branch
on a class or on ``type`` instead of parsing messages; transport failures are ``CvpoConnectionError``."""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Mapping
from typing import Any


class CvpoError(Exception):
    """Base of everything this package raises on purpose."""


class CvpoConnectionError(CvpoError, ConnectionError):
    """The request could not be sent or its answer not read (refused, reset, timed out)."""


class WaitTimeout(CvpoError, TimeoutError):  # noqa: N818 - reads as what happened, like TimeoutError
    """``wait``/``wait_evaluation`` ran past its timeout; ``last`` is the resource as last seen."""

    def __init__(self, message: str, last: Any) -> None:
        super().__init__(message)
        self.last = last


class CvpoAPIError(CvpoError):
    """A problem+json answer: ``status``, ``type``, ``title``, ``detail``, ``instance``, the response
    ``headers`` (lower-case names) and the parsed ``body`` (a dict, or the text of a non-JSON answer)."""

    def __init__(
        self,
        status: int,
        type: str,
        title: str,
        detail: str,
        instance: str | None,
        headers: Mapping[str, str],
        body: dict[str, Any] | str,
    ) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.instance = instance
        self.headers = dict(headers)
        self.body = body

    @property
    def request_id(self) -> str | None:
        """The id the API logged this request under (quote it in a bug report)."""
        rid = self.body.get("request_id") if isinstance(self.body, dict) else None
        return rid or self.headers.get("x-request-id")


class AuthError(CvpoAPIError):
    """401 (no, unknown, revoked or expired token) or 403 (the token lacks the route's scope)."""


class NotFound(CvpoAPIError):  # noqa: N818 - named after the status, like the other subclasses
    """404: unknown id, or another client's (the API never says which)."""


class Conflict(CvpoAPIError):  # noqa: N818
    """409: e.g. cancelling a finished job, or promoting a checkpoint that does not certify (``body``
    then holds the ``certificate``)."""


class InvalidRequest(CvpoAPIError):  # noqa: N818
    """422: ``errors`` lists ``{"loc": [...], "msg": ...}`` entries naming each offending field."""

    @property
    def errors(self) -> list[dict[str, Any]]:
        found = self.body.get("errors") if isinstance(self.body, dict) else None
        return list(found) if isinstance(found, list) else []


class Busy(CvpoAPIError):  # noqa: N818
    """429 (this client's cap) or 503 (server over capacity, policy loading): retry after
    ``retry_after`` seconds (None when the server sent no usable ``Retry-After``)."""

    @property
    def retry_after(self) -> float | None:
        return parse_retry_after(self.headers.get("retry-after"))


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())


_BY_STATUS: dict[int, type[CvpoAPIError]] = {
    401: AuthError,
    403: AuthError,
    404: NotFound,
    409: Conflict,
    422: InvalidRequest,
    429: Busy,
    503: Busy,
}


def error_for(status: int, reason: str, headers: Mapping[str, str], data: bytes) -> CvpoAPIError:
    """The exception for a non-2xx answer. Answers that are not problem+json (uvicorn's plain-text
    400, a proxy's HTML 502) still become an error of the right class, with the text as detail."""
    body: dict[str, Any] | str
    content_type = headers.get("content-type", "")
    text = data.decode("utf-8", "replace")
    try:
        parsed = json.loads(text) if "json" in content_type else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        body = parsed
        kind = str(parsed.get("type") or "about:blank")
        title = str(parsed.get("title") or reason)
        detail = str(parsed.get("detail") or "")
        instance = parsed.get("instance")
    else:
        body, kind, title, detail, instance = text, "about:blank", reason, text.strip()[:500], None
    cls = _BY_STATUS.get(status, CvpoAPIError)
    return cls(status, kind, title, detail, instance if isinstance(instance, str) else None, headers, body)
