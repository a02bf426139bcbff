"""schemathesis over the job, catalogue, promotion and health routes on the real app (real store and
Redis): generated requests, valid and invalid, with and without a token, never get a 5xx."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.conftest import TOKEN

OPERATIONS = [
    ("/jobs", "POST"),
    ("/jobs", "GET"),
    ("/jobs/{job_id}", "GET"),
    ("/jobs/{job_id}/cancel", "POST"),
    ("/jobs/{job_id}", "DELETE"),
    ("/jobs/{job_id}/metrics", "GET"),
    ("/jobs/{job_id}/checkpoints", "GET"),
    ("/jobs/{job_id}/logs", "GET"),
    ("/policies", "POST"),
    ("/envs", "GET"),
    ("/envs/{env_id}", "GET"),
    ("/presets/{preset_id}", "GET"),
    ("/readyz", "GET"),
]


@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_routes_never_answer_5xx(api: Any, path: str, method: str) -> None:
    job_id = api.post("/jobs", json={"env_id": "SafetyPointCircle1-v0", "total_env_steps": 1000}).json()["id"]
    schema = schemathesis.openapi.from_asgi("/openapi.json", api.app)
    operation = schema[path][method]
    strategies = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        for headers in ({"Authorization": f"Bearer {TOKEN}"}, {}):
            strategies.append(operation.as_strategy(mode, headers=headers))
            if "{job_id}" in path:
                strategies.append(operation.as_strategy(mode, headers=headers, path_parameters={"job_id": job_id}))
    statuses: set[int] = set()

    @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=st.one_of(strategies))
    def check(case: schemathesis.Case) -> None:
        response = case.call()
        statuses.add(response.status_code)
        case.validate_response(response, checks=[not_a_server_error])
        if response.status_code >= 400:
            ctype = response.headers.get("content-type") or [""]
            ctype = ctype[0] if isinstance(ctype, list) else ctype
            assert ctype.startswith("application/problem+json"), (response.status_code, response.text)

    check()
    assert statuses, "no request was made"
    if path != "/readyz":
        assert 401 in statuses, "requests without a token were generated and refused"
