"""The browser dashboard (issue #10): jobs table, job curves, policy page, all served by the API itself.

Pages are public HTML shells with no data in them; ``api/ui/app.js`` asks once for the API token and
calls the JSON routes with ``Authorization: Bearer``, so the dashboard sees exactly what the token
may see and the API's auth stays per-route. Everything ships as package data (``api/ui/*``): no CDN,
no fonts, no third-party files, so it works offline. A strict Content-Security-Policy (same-origin
scripts and styles only, no inline code) limits what an injected string could do with the token.
"""

from __future__ import annotations

import hashlib
import html
import re
from functools import lru_cache
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.errors import Problem

router = APIRouter(include_in_schema=False)

UI = resources.files("api") / "ui"
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
STATIC_NAME = re.compile(r"^[a-z0-9_-]+\.(js|css)$")
PLACEHOLDER = re.compile(r"\{\{(main|title|page|id|v)\}\}")
# No inline script or style anywhere, so a job label or task name rendered by the JS can never run.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate every time (cheap with the ETag) so a redeployed app.js is never mixed with an old page.
    "Cache-Control": "no-cache",
}


@lru_cache(maxsize=32)
def _asset(name: str) -> tuple[bytes, str]:
    """A file of ``api/ui`` and its ETag; read once per process (the files are immutable package data)."""
    data = (UI / name).read_bytes()
    return data, '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


def _assets_version() -> str:
    """A short hash of the script and stylesheet: the pages' asset URLs change whenever either does."""
    return hashlib.sha256((_asset("app.js")[1] + _asset("style.css")[1]).encode()).hexdigest()[:12]


def _page(page: str, title: str, ident: str = "") -> Response:
    """``base.html`` around the page's body fragment; the only dynamic value is the escaped id."""
    values = {
        "main": _asset(f"{page}.html")[0].decode(),
        "title": html.escape(title),
        "page": page,
        "id": html.escape(ident, quote=True),
        "v": _assets_version(),
    }
    # One pass, so text substituted in (an id) is never itself scanned for placeholders.
    text = PLACEHOLDER.sub(lambda m: values[m.group(1)], _asset("base.html")[0].decode())
    return Response(text, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


@router.get("/")
async def jobs_page() -> Response:
    return _page("jobs", "Jobs")


@router.get("/ui/jobs/{job_id}")
async def job_page(job_id: str) -> Response:
    return _page("job", f"Job {job_id}", job_id)


@router.get("/ui/policies/{policy_id}")
async def policy_page(policy_id: str) -> Response:
    return _page("policy", f"Policy {policy_id}", policy_id)


@router.get("/ui/static/{name}")
async def static_asset(request: Request, name: str) -> Response:
    """Only the dashboard's own ``.js``/``.css`` files by plain name (no paths, so no traversal)."""
    suffix = name[name.rfind(".") :] if "." in name else ""
    if not STATIC_NAME.match(name) or not (UI / name).is_file():
        raise Problem(404, f"no dashboard asset {name!r}")
    data, etag = _asset(name)
    headers = {**SECURITY_HEADERS, "ETag": etag}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=STATIC_TYPES[suffix], headers=headers)
