"""Hostile input gets its documented status, as problem+json, never a 500 (issue #9, service-design.md
§1.7, README "Input limits and error statuses"): deeply nested JSON, numbers past float64 and past
64 bits, and odd ids in path parameters, on the real app (lifespan, auth, limits middleware).

Regressions: nested bodies and >64-bit integers echoed back in a 422 could not be encoded (a 500);
``POST /jobs`` with > 1024 nesting levels hit Python's recursion limit (a 500); a policy id holding
``%2F`` on ``/act`` fell out of the one-route act router (a 500)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.errors import MAX_ECHO_DEPTH, json_safe
from tests.api.conftest import OBS_DIM, Served

JSON = {"content-type": "application/json"}
JOB = '{"env_id": "SafetyPointCircle1-v0", "total_env_steps": 1000, %s}'
BIG = "1" + "0" * 400  # 10**400 as an integer literal
ROW = ", ".join(["0.5"] * (OBS_DIM - 1))


def assert_problem(r: httpx.Response, status: int | set[int]) -> dict[str, Any]:
    statuses = {status} if isinstance(status, int) else status
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == r.status_code and body["type"].startswith("/problems/") and body["detail"]
    assert "Traceback" not in r.text
    return body


def post(served: Served, path: str, body: bytes | str) -> httpx.Response:
    content = body.encode() if isinstance(body, str) else body
    return served.client.post(path, content=content, headers=JSON)


def nested(depth: int, kind: str) -> str:
    return "[" * depth + "]" * depth if kind == "list" else '{"a": ' * depth + "1" + "}" * depth


# --------------------------------------------------------------------------------- deep nesting


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_nesting_past_the_parsers_limit_is_400(served: Served, kind: str) -> None:
    deep = "[" * 100_000 if kind == "list" else '{"a": ' * 100_000
    assert_problem(post(served, "/jobs", deep), 400)
    assert_problem(post(served, "/policies", deep), 400)
    # /act refuses it by size before parsing (its byte cap here is 64 KiB); a smaller one is a 400.
    pid = served.policies["plain"]
    assert_problem(post(served, f"/policies/{pid}/act", deep), 413)
    assert_problem(post(served, f"/policies/{pid}/act", deep[:20_000]), 400)


@pytest.mark.parametrize("depth", [300, 900, 1023, 1024, 5000])
@pytest.mark.parametrize("kind", ["list", "dict"])
@pytest.mark.parametrize("field", ["labels", "hyperparams", "cost_limit", "eval", "env_id", "surprise"])
def test_nested_values_in_job_fields_are_4xx(served: Served, field: str, kind: str, depth: int) -> None:
    """Valid JSON nested deeper than any field allows: a 422 naming the field (its echo summarised),
    or a 400 once the whole body is past the parser's 1024 levels (the value sits one level down)."""
    body = JOB % f'"{field}": {nested(depth, kind)}'
    problem = assert_problem(post(served, "/jobs", body), 400 if depth + 1 > 1024 else 422)
    if problem["status"] == 422:
        assert problem["errors"][0]["loc"][:2] == ["body", field]


@pytest.mark.parametrize("depth", [300, 900])
@pytest.mark.parametrize("where", ["observations", "seed", "extra", "deterministic"])
def test_nested_values_in_act_fields_are_422(served: Served, where: str, depth: int) -> None:
    fields = {"observations": f"[[{ROW}, 0]]", where: nested(depth, "list")}
    body = "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"
    problem = assert_problem(post(served, f"/policies/{served.policies['plain']}/act", body), 422)
    assert problem["errors"][0]["loc"][:2] == ["body", where]


@pytest.mark.parametrize("field", ["job_id", "checkpoint_id", "shield"])
def test_nested_values_in_promotion_fields_are_422(served: Served, field: str) -> None:
    other = {"job_id": '"job_x"', field: nested(500, "dict")}
    body = "{" + ", ".join(f'"{k}": {v}' for k, v in other.items()) + "}"
    assert_problem(post(served, "/policies", body), 422 if field != "shield" else {404, 422})


def test_echoes_are_bounded_and_encodable() -> None:
    value: Any = 1
    for _ in range(5000):
        value = [value]
    echoed = json_safe({"input": value, "big": 10**400, "neg": -(2**70), "u64": 2**64 - 1, "inf": float("inf")})
    text = json.dumps(echoed)
    assert text.count("[") == MAX_ECHO_DEPTH - 1 and '"<list>"' in text
    assert echoed["big"] == BIG and echoed["neg"] == str(-(2**70)) and echoed["u64"] == 2**64 - 1
    assert echoed["inf"] == "Infinity"


# -------------------------------------------------------------------------------- huge numbers


@pytest.mark.parametrize(
    ("literal", "status"),
    [("1e400", 422), ("-1e400", 422), (BIG, 422), ("-" + BIG, 422), ("1" + "0" * 5000, 400), ("1e308", 200)],
)
def test_huge_observations(served: Served, literal: str, status: int) -> None:
    """Past float64 (1e400, 10**400) is a non-finite 422 at the culprit; past Python's 4300-digit
    integer limit the body is not JSON it will parse (400); 1e308 is finite and acted on."""
    r = post(served, f"/policies/{served.policies['plain']}/act", f'{{"observations": [[{ROW}, {literal}]]}}')
    if status == 200:
        assert r.status_code == 200, r.text
        assert all(abs(a) < 10 for a in r.json()["actions"][0])
        return
    problem = assert_problem(r, status)
    if status == 422:
        assert problem["errors"][0]["loc"] == ["body", "observations", 0, OBS_DIM - 1]


@pytest.mark.parametrize("literal", ["1e400", BIG, "-" + BIG, "1.5e300"])
@pytest.mark.parametrize("field", ["seed", "deterministic", "request_id"])
def test_huge_numbers_in_act_options_are_422(served: Served, field: str, literal: str) -> None:
    body = f'{{"observations": [[{ROW}, 0]], "{field}": {literal}}}'
    problem = assert_problem(post(served, f"/policies/{served.policies['plain']}/act", body), 422)
    assert problem["errors"][0]["loc"] == ["body", field]


JOB_NUMBER_FIELDS = [
    "total_env_steps",
    "seed",
    "cost_limit",
    "time_limit_s",
    "max_attempts",
    "checkpoint_every_epochs",
    "eval.episodes",
    "hyperparams.batch_size",
    "labels.team",
]
# 1e308 is a finite cost limit (accepted), so that one pair is left out.
JOB_NUMBER_CASES = [
    (field, literal)
    for field in JOB_NUMBER_FIELDS
    for literal in ("1e400", "-1e400", BIG, "-" + BIG, "1e308")
    if (field, literal) != ("cost_limit", "1e308")
]


@pytest.mark.parametrize(("field", "literal"), JOB_NUMBER_CASES, ids=[f"{f}={v[:6]}" for f, v in JOB_NUMBER_CASES])
def test_huge_numbers_in_job_fields_are_422(served: Served, field: str, literal: str) -> None:
    outer, _, inner = field.partition(".")
    value = f'{{"{inner}": {literal}}}' if inner else literal
    assert_problem(post(served, "/jobs", JOB % f'"{outer}": {value}'), 422)
    assert served.client.get("/jobs").json()["items"] == [], "nothing was created"


def test_huge_numbers_in_promotion_are_422(served: Served) -> None:
    for field in ("job_id", "checkpoint_id"):
        for literal in (BIG, "1e400"):
            assert_problem(post(served, "/policies", f'{{"job_id": "job_x", "{field}": {literal}}}'), 422)


def test_huge_numbers_in_query_parameters_are_422(served: Served) -> None:
    for path, name in (("/jobs", "page_size"), ("/policies", "page_size"), ("/jobs/job_x/logs", "after_seq")):
        problem = assert_problem(served.client.get(path, params={name: BIG}), 422)
        assert problem["errors"][0]["loc"] == ["query", name]


# ------------------------------------------------------------------------------- ids in paths

ODD_IDS = [
    "é",
    "%C3%A9",  # é, percent-encoded
    "😀" * 500,
    "%00",  # NUL
    "a%0Ab",  # newline
    "%FF",  # not UTF-8
    "%ED%A0%80",  # an encoded lone surrogate
    "%25",  # a literal %
    "%20",
    "x" * 10_000,
    "pol_' OR 1=1 --",
    "a%2Fb",  # decodes to a slash: the path has another segment
    "..%2F..%2Fetc%2Fpasswd",
]
ROUTES = [
    ("GET", "/jobs/{id}"),
    ("POST", "/jobs/{id}/cancel"),
    ("DELETE", "/jobs/{id}"),
    ("GET", "/jobs/{id}/metrics"),
    ("GET", "/jobs/{id}/logs"),
    ("GET", "/jobs/{id}/checkpoints"),
    ("GET", "/jobs/{id}/events"),
    ("GET", "/policies/{id}"),
    ("GET", "/policies/{id}/export"),
    ("POST", "/policies/{id}/act"),
    ("GET", "/envs/{id}"),
    ("GET", "/presets/{id}"),
]


@pytest.mark.parametrize("odd", ODD_IDS, ids=lambda s: s[:16])
def test_odd_ids_in_paths_are_404(served: Served, odd: str) -> None:
    """Unicode, percent-encoded bytes (NUL, invalid UTF-8, a slash), SQL and 10 000-character ids
    are unknown ids (404) or no route at all (404/405), never a 500."""
    for method, template in ROUTES:
        url = template.replace("{id}", odd)
        body = {"observations": [[0.5] * OBS_DIM]} if url.endswith("/act") else None
        r = served.client.request(method, url, json=body)
        assert_problem(r, {404, 405} if "%2F" in odd else 404)


# ------------------------------------------------------------------------------------- OpenAPI


def test_openapi_refs_resolve_so_fuzzers_generate_job_bodies(served: Served) -> None:
    """Regression: POST /jobs' body schema carried pydantic's ``#/$defs/EvalSpec``, which points at
    nothing inside /openapi.json; schemathesis then sent no body at all (every case was a 400)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    document = served.client.get("/openapi.json").json()
    assert "#/$defs/" not in json.dumps(document)
    body = document["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["eval"]["anyOf"][0]["properties"]["episodes"]["maximum"] == 100
    operation = schemathesis.openapi.from_asgi("/openapi.json", served.client.app)["/jobs"]["POST"]

    @settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(GenerationMode.POSITIVE))
    def check(case: Any) -> None:
        assert isinstance(case.body, dict) and {"env_id", "total_env_steps"} <= set(case.body), case.body

    check()


def test_changing_the_admin_token_revokes_the_previous_one(tmp_path: Path) -> None:
    """Issue #23 item 9: after CVPO_API_TOKEN changed, the old admin token still worked."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from tests.api.conftest import served_settings

    old, new = "old-admin-token-0123456789abcdef", "new-admin-token-0123456789abcdef"
    with TestClient(create_app(served_settings(tmp_path, api_token=old))) as client:
        assert client.get("/jobs", headers={"Authorization": f"Bearer {old}"}).status_code == 200
        client.app.state.store.create_token("arm", ["policies:act"])
    with TestClient(create_app(served_settings(tmp_path, api_token=new))) as client:
        assert client.get("/jobs", headers={"Authorization": f"Bearer {new}"}).status_code == 200
        assert client.get("/jobs", headers={"Authorization": f"Bearer {old}"}).status_code == 401
        assert client.get("/policies", headers={"Authorization": f"Bearer {old}"}).status_code == 401
        names = [t["name"] for t in client.app.state.store.list_tokens()]
        assert names.count("admin (CVPO_API_TOKEN)") == 1 and "arm" in names  # other tokens are untouched
