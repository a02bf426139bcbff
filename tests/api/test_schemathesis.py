"""schemathesis against the policy routes' OpenAPI (service-design.md §5.3): generated requests, valid
and invalid, never get a 5xx, and every answer matches its documented status, media type and schema."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.api.conftest import ADMIN, OBS_DIM, Served

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
VALID, INVALID = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
# (path, method, generation mode, examples). A bare path id has nothing schemathesis could make invalid.
OPERATIONS = [
    ("/policies", "GET", VALID, 30),
    ("/policies", "GET", INVALID, 30),
    ("/policies/{policy_id}", "GET", VALID, 30),
    ("/policies/{policy_id}/act", "POST", VALID, 150),
    ("/policies/{policy_id}/act", "POST", INVALID, 150),
    ("/policies/{policy_id}/export", "GET", VALID, 20),
    ("/policies/{policy_id}/export", "GET", INVALID, 20),
    ("/aliases", "GET", VALID, 20),
    ("/aliases", "GET", INVALID, 20),
    ("/aliases/{name}", "GET", VALID, 20),
    ("/aliases/{name}", "GET", INVALID, 20),
    ("/aliases/{name}", "PUT", VALID, 40),
    ("/aliases/{name}", "PUT", INVALID, 40),
    ("/aliases/{name}/history", "GET", VALID, 20),
    ("/aliases/{name}/history", "GET", INVALID, 20),
    ("/aliases/{name}/rollback", "POST", VALID, 30),
    ("/aliases/{name}/rollback", "POST", INVALID, 30),
    ("/aliases/{name}/act", "POST", VALID, 60),
    ("/aliases/{name}/act", "POST", INVALID, 60),
]
DEEP = 80  # changes of the "deep" alias made up front, so generated rollbacks have targets to return to


@pytest.fixture(scope="module")
def aliased(served: Served) -> Served:
    """Two certified policies of the admin's client and an alias "deep" that alternated between them."""
    served.ids["admin"] = "admin"
    for name in ("adm-a", "adm-b"):
        served.register(name, owner="admin", certified=True, seed=20 + len(name))
    for k in range(DEEP):
        pid = served.policies["adm-a" if k % 2 == 0 else "adm-b"]
        assert served.client.put("/aliases/deep", json={"policy_id": pid}).status_code in (200, 201)
    return served


@pytest.mark.parametrize(
    ("path", "method", "mode", "examples"), OPERATIONS, ids=[f"{m} {p} {g.value}" for p, m, g, _ in OPERATIONS]
)
def test_policy_routes_conform_and_never_fail(
    aliased: Served, path: str, method: str, examples: int, mode: GenerationMode
) -> None:
    served = aliased
    schema = schemathesis.openapi.from_asgi("/openapi.json", served.client.app)
    operation = schema[path][method]
    headers = {"Authorization": f"Bearer {ADMIN}"}
    strategies = [operation.as_strategy(mode, headers=headers)]
    if "{name}" in path:  # an alias that exists, whose rollbacks have somewhere to go
        strategies.append(operation.as_strategy(mode, headers=headers, path_parameters={"name": "deep"}))
    if "{name}" in path and mode is VALID:  # requests that reach the 2xx path (no foreign ?client=)
        known = {"name": "deep"}
        if method == "PUT":
            body = {"policy_id": served.policies["adm-b"]}
            strategies.append(operation.as_strategy(mode, headers=headers, body=body, query={}))
        elif path.endswith("/act"):
            body = {"observations": [[0.5] * OBS_DIM]}
            strategies.append(operation.as_strategy(mode, headers=headers, path_parameters=known, body=body))
        else:
            strategies.append(operation.as_strategy(mode, headers=headers, path_parameters=known, query={}))
    if "{policy_id}" in path:  # random ids only reach the 404 branch; real ones reach the policy
        strategies += [
            operation.as_strategy(mode, headers=headers, path_parameters={"policy_id": served.policies[name]})
            for name in ("plain", "boxed", "hooked")
        ]
    if path.endswith("/act") and mode is VALID:  # a known-good width, so the 200 path is always reached
        pid = {"policy_id": served.policies["plain"]}
        body = {"observations": [[0.5] * OBS_DIM]}
        strategies.append(operation.as_strategy(mode, headers=headers, path_parameters=pid, body=body))
    seen: set[int] = set()

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=st.one_of(strategies))
    def check(case: schemathesis.Case) -> None:
        response = case.call()
        seen.add(response.status_code)
        case.validate_response(response, checks=CHECKS)

    check()
    assert not any(code >= 500 for code in seen), seen
    assert mode is INVALID or any(200 <= code < 300 for code in seen), f"no generated request succeeded: {seen}"
