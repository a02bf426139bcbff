"""A long fuzzing run over every route of /openapi.json, as a benchmark: how many requests were
generated and how many server errors they found (goal: 0). Issue #9; the test suite runs the same
kind of fuzzing with a small fixed budget (tests/api/test_schemathesis.py, tests/e2e/test_jobs_fuzz.py).

The real app (lifespan, auth, limits middleware) in-process, with a real redis-server and SQLite
store, synthetic policies (plain, box-shielded, hook-shielded, another client's) and jobs (queued,
cancelled). For every operation, schemathesis generates valid and invalid requests, each with the
admin token, an act-only token and no token; path ids are random or real ones (so the deep code
paths are reached). Then Hypothesis sends arbitrary bytes, arbitrary JSON documents and job specs
with arbitrary values in their fields as the body of ``POST /jobs``, ``POST /policies`` and
``POST /policies/{id}/act``. A server error is any 5xx, or
a 4xx that is not problem+json. The job caps are lifted so that valid job specs reach the store.

    .venv/bin/python bench/fuzz_long.py [--examples 200] [--seed 0]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import logging
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.results_io import machine_load, write_result
from service.launcher import free_port, redis_command, wait_for_redis

ROOT = Path(__file__).resolve().parents[1]


ADMIN = "fuzz-admin-token"


class Tally:
    """Requests and findings, per operation."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.statuses: dict[str, Counter[int]] = {}
        self.findings: list[dict[str, Any]] = []
        self.n_findings = 0
        self.unsatisfiable: list[str] = []  # operations with no invalid request to generate

    def record(self, op: str, status: int, content_type: str, detail: dict[str, Any]) -> None:
        self.requests[op] += 1
        self.statuses.setdefault(op, Counter())[status] += 1
        bad = status >= 500 or (status >= 400 and not content_type.startswith("application/problem+json"))
        if bad:
            self.n_findings += 1
            if len(self.findings) < 50:
                self.findings.append({"operation": op, "status": status, "content_type": content_type, **detail})


def _ctype(headers: Any) -> str:
    value = headers.get("content-type") or ""
    return value[0] if isinstance(value, list) else value


def setup(client: Any, tmp: Path) -> dict[str, Any]:
    """Tokens, policies and jobs for the generated requests to hit."""
    from bench.synthetic import write_random_artefact
    from core.promotion import create_policy_from_artefact

    store = client.app.state.store
    ids: dict[str, Any] = {"tokens": {}, "policies": {}, "jobs": {}}
    _, ids["tokens"]["act_only"] = store.create_token("controller", ["policies:act"], client="admin")
    other_id, _ = store.create_token("other", ["policies:read", "policies:act"])
    specs = {
        "plain": ({}, "admin"),
        "boxed": ({"shield": {"type": "box", "low": [-0.5, -0.5], "high": [0.5, 0.5]}}, "admin"),
        "hooked": ({"shield": {"type": "hook", "name": "slow"}}, "admin"),
        "foreign": ({}, other_id),
    }
    for k, (name, (kw, owner)) in enumerate(specs.items()):
        artefact = write_random_artefact(tmp / "artefacts" / name, obs_dim=6, seed=k)
        ids["policies"][name] = create_policy_from_artefact(store, artefact, owner, job_id=f"job_{name}", **kw).id
    spec = {"env_id": "SafetyPointCircle1-v0", "total_env_steps": 1000}
    headers = {"Authorization": f"Bearer {ADMIN}"}
    ids["jobs"]["queued"] = client.post("/jobs", json=spec, headers=headers).json()["id"]
    cancelled = client.post("/jobs", json=spec, headers=headers).json()["id"]
    client.post(f"/jobs/{cancelled}/cancel", headers=headers)
    ids["jobs"]["cancelled"] = cancelled  # its event stream ends: a queued job's would never
    return ids


def fuzz_operations(app: Any, ids: dict[str, Any], examples: int, seed: int, tally: Tally) -> None:
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    auths = {"admin": {"Authorization": f"Bearer {ADMIN}"}, "act_only": {
        "Authorization": f"Bearer {ids['tokens']['act_only']}"}, "none": {}}  # fmt: skip
    for result in schema.get_all_operations():
        operation = result.ok()
        name = f"{operation.method.upper()} {operation.path}"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategies = []
            for headers in auths.values():
                if "{job_id}" in operation.path:
                    for job in ids["jobs"].values():
                        strategies.append(operation.as_strategy(mode, headers=headers, path_parameters={"job_id": job}))
                    strategies.append(operation.as_strategy(mode, headers=headers))
                elif "{policy_id}" in operation.path:
                    for pid in ids["policies"].values():
                        strategies.append(
                            operation.as_strategy(mode, headers=headers, path_parameters={"policy_id": pid})
                        )
                    strategies.append(operation.as_strategy(mode, headers=headers))
                    if operation.path.endswith("/act") and mode is GenerationMode.POSITIVE:  # reach the 200s
                        pid = {"policy_id": ids["policies"]["plain"]}
                        body = {"observations": [[0.5] * 6, [-3.0] * 6]}
                        strategies.append(operation.as_strategy(mode, headers=headers, path_parameters=pid, body=body))
                elif "{env_id}" in operation.path or "{preset_id}" in operation.path:
                    key = "env_id" if "{env_id}" in operation.path else "preset_id"
                    real = {"env_id": "SafetyPointCircle1-v0", "preset_id": "circle"}[key]
                    strategies.append(operation.as_strategy(mode, headers=headers, path_parameters={key: real}))
                    strategies.append(operation.as_strategy(mode, headers=headers))
                else:
                    strategies.append(operation.as_strategy(mode, headers=headers))
            started = time.perf_counter()
            skip = ids["jobs"]["queued"] if operation.path.endswith("/events") else None
            _run_cases(name, strategies, skip, examples, seed, tally)
            print(json.dumps({"operation": name, "mode": mode.value, "requests": tally.requests[name],
                              "seconds": round(time.perf_counter() - started, 1)}), flush=True)  # fmt: skip


def _run_cases(name: str, strategies: list[Any], skip_job: str | None, examples: int, seed: int, tally: Tally) -> None:
    """Call every generated case; ``skip_job``: a job whose event stream would stay open forever."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st
    from hypothesis.errors import Unsatisfiable

    @hseed(seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=st.one_of(strategies))
    def run(case: Any) -> None:
        if skip_job is not None and case.path_parameters.get("job_id") == skip_job:
            return
        response = case.call()
        text = response.content[:300].decode("utf-8", "replace")  # ONNX exports are binary
        detail = {"path": case.formatted_path, "body": str(case.body)[:200], "response": text}
        tally.record(name, response.status_code, _ctype(response.headers), detail)

    try:
        run()
    except Unsatisfiable:
        # No invalid request exists for this operation (nothing in it can be made invalid: a route
        # without parameters, or a free-form string id); the valid mode covered it.
        tally.unsatisfiable.append(name)
    except Exception as exc:  # anything else, from the harness or the app, is a finding
        tally.n_findings += 1
        tally.findings.append({"operation": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})


def fuzz_bodies(client: Any, ids: dict[str, Any], examples: int, seed: int, tally: Tally) -> None:
    """Arbitrary bytes and arbitrary JSON documents as bodies of the three POST routes with bodies."""
    from hypothesis import strategies as st

    json_docs = st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30)),
        lambda inner: st.one_of(st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=12), inner, max_size=6)),
        max_leaves=30,
    ).map(lambda doc: json.dumps(doc).encode())  # NaN/Infinity go out as literals; integers of any size
    from cvpo.envs.catalogue import TASKS

    values = st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20), st.lists(st.floats(), max_size=3),
        st.dictionaries(st.text(max_size=20), st.integers(), max_size=3),
    )  # fmt: skip
    fields = [
        "seed",
        "cost_limit",
        "preset",
        "device",
        "hyperparams",
        "eval",
        "checkpoint_every_epochs",
        "labels",
        "time_limit_s",
        "max_attempts",
        "algorithm",
        "observations",
        "job_id",
        "checkpoint_id",
        "shield",
    ]
    spec_like = st.fixed_dictionaries(  # job specs (and promotions, /act bodies) one or two fields from valid
        {"env_id": st.sampled_from(sorted(TASKS)), "total_env_steps": st.integers(1, 20_000_000)},
        optional={f: values for f in fields},
    ).map(lambda doc: json.dumps(doc).encode())  # fmt: skip
    bodies = st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode), json_docs, spec_like)
    headers = {"Authorization": f"Bearer {ADMIN}", "content-type": "application/json"}
    for path in ("/jobs", "/policies", f"/policies/{ids['policies']['plain']}/act"):
        name = f"POST {path} (raw bodies)"
        _run_bodies(client, path, name, headers, bodies, examples, seed, tally)
        print(json.dumps({"operation": name, "requests": tally.requests[name]}), flush=True)


def _run_bodies(client: Any, path: str, name: str, headers: dict[str, str], bodies: Any, examples: int, seed: int,
                tally: Tally) -> None:  # fmt: skip
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed

    @hseed(seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies)
    def run(body: bytes) -> None:
        r = client.post(path, content=body, headers=headers)
        detail = {"body": body[:200].decode("utf-8", "replace"), "response": r.text[:300]}
        tally.record(name, r.status_code, r.headers.get("content-type", ""), detail)

    run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=200, help="Hypothesis examples per operation and mode (200)")
    parser.add_argument("--seed", type=int, default=0, help="Hypothesis seed (0)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/fuzz_long.json"))
    args = parser.parse_args()

    from fastapi.testclient import TestClient

    from api.app import create_app
    from core.settings import Settings

    logging.getLogger("cvpo").setLevel(logging.CRITICAL)  # 500s are counted here; tracebacks would flood
    load_before = machine_load()
    started = time.perf_counter()
    tally = Tally()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        port = free_port()
        redis = subprocess.Popen(redis_command(tmp, port), stdout=subprocess.DEVNULL)
        try:
            wait_for_redis(port, proc=redis)
            settings = Settings(
                data_dir=tmp / "data", redis_url=f"redis://127.0.0.1:{port}/0", api_token=ADMIN,
                reconcile_every_s=0.0, queue="fuzz", shield_hooks="slow=api.shield:speed_limiter",
                max_active_jobs_per_client=10**9, max_queued=10**9,
            )  # fmt: skip
            with TestClient(create_app(settings)) as client:
                ids = setup(client, tmp)
                fuzz_operations(client.app, ids, args.examples, args.seed, tally)
                fuzz_bodies(client, ids, args.examples * 4, args.seed, tally)
        finally:
            redis.send_signal(signal.SIGTERM)
            redis.wait(timeout=20)

    import hypothesis
    import schemathesis

    summary = {
        "requests_generated": sum(tally.requests.values()),
        "operations": len(tally.requests),
        "server_errors_found": tally.n_findings,
        "operations_without_invalid_requests": sorted(set(tally.unsatisfiable)),
        "goal_met (0 server errors)": tally.n_findings == 0,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary, indent=2))
    write_result(
        args.out,
        "fuzz_long",
        {
            "settings": vars(args) | {"out": str(args.out)},
            "summary": summary,
            "per_operation": {
                op: {"requests": n, "statuses": dict(sorted(tally.statuses[op].items()))}
                for op, n in sorted(tally.requests.items())
            },
            "findings": tally.findings,
        },
        load_before=load_before,
        load_after=machine_load(),
        schemathesis=schemathesis.__version__,
        hypothesis=hypothesis.__version__,
        argv=sys.argv[1:],
    )
    if tally.n_findings:
        sys.exit(1)


if __name__ == "__main__":
    main()
