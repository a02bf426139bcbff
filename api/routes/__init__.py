"""One router per resource (FastAPI "Bigger Applications"), and the two helpers every router uses."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response

from api.errors import json_safe
from core.store import Store


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """orjson bytes; non-finite floats become strings (JSON has no NaN), as in problem bodies."""
    return Response(orjson.dumps(json_safe(body)), status_code=status, media_type="application/json", headers=headers)


def store_of(request: Request) -> Store:
    return request.app.state.store
