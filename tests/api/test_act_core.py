"""/act without HTTP: parsing properties (service-design.md §5.5), acting, shields, the policy cache."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

import api.act as act_module
from api.act import (
    NON_FINITE_TYPE,
    ActRequest,
    CorruptPolicyError,
    PolicyCache,
    PolicyNotReadyError,
    act,
    parse_act_request,
)
from api.errors import Problem
from api.shield import (
    ShieldConfigError,
    ShieldOutputError,
    ShieldSpecError,
    build_shield,
    load_hooks,
    validate_shield_spec,
)
from bench.synthetic import write_random_artefact
from cvpo.artefact import PolicyRuntime, load_policy

OBS, ACT, MAX_BATCH = 6, 2, 32
LOW, HIGH = [-0.5, -2.0], [1.5, 0.25]

finite = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-(2**63), 2**63 - 1),
)


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("artefacts")
    return {
        "normalised": write_random_artefact(root / "normalised", obs_dim=OBS, act_low=LOW, act_high=HIGH),
        "raw": write_random_artefact(root / "raw", obs_dim=OBS, normalizer=False, seed=1),
    }


@pytest.fixture(scope="module")
def runtime(artefacts: dict[str, Path]) -> PolicyRuntime:
    return load_policy(artefacts["normalised"])


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def encode(rows: Any, **fields: Any) -> bytes:
    return json.dumps({"observations": rows, **fields}).encode()


def problem(body: bytes, obs_dim: int = OBS, max_batch: int = MAX_BATCH) -> Problem:
    with pytest.raises(Problem) as info:
        parse_act_request(body, obs_dim, max_batch)
    return info.value


def run(runtime: PolicyRuntime, body: bytes, shield: Any = None, policy_id: str = "pol_test") -> dict[str, Any]:
    return orjson.loads(act(runtime, parse_act_request(body, OBS, MAX_BATCH), shield, policy_id))


batches = st.integers(1, MAX_BATCH).flatmap(
    lambda b: st.lists(st.lists(finite, min_size=OBS, max_size=OBS), min_size=b, max_size=b)
)


# ------------------------------------------------------------------------------------ happy paths


@settings(max_examples=150, deadline=None)
@given(rows=batches, deterministic=st.sampled_from([None, True]), request_id=st.sampled_from([None, "c-913", "true"]))
def test_any_finite_batch_gives_actions_inside_the_box(
    runtime: PolicyRuntime, rows: list[list[float]], deterministic: bool | None, request_id: str | None
) -> None:
    fields = {"request_id": request_id} | ({} if deterministic is None else {"deterministic": deterministic})
    req = parse_act_request(encode(rows, **fields), OBS, MAX_BATCH)
    expected_obs = np.array([[float(x) for x in row] for row in rows])
    assert req.observations.dtype == np.float64 and np.array_equal(req.observations, expected_obs)
    out = orjson.loads(act(runtime, req, None, "pol_box"))
    actions = np.array(out["actions"])
    assert actions.shape == (len(rows), ACT)
    assert np.all(actions >= LOW) and np.all(actions <= HIGH)
    assert len(out["clipped"]) == len(rows) and all(type(c) is bool for c in out["clipped"])
    with np.errstate(over="ignore"):  # ±1.7e308 overflows (x - mean) / std to ±inf, then clips to ±5
        expected, clipped = runtime.act(expected_obs)
    assert np.array_equal(actions, expected) and out["clipped"] == clipped.tolist()
    assert out["deterministic"] is True and out["request_id"] == request_id and "shield" not in out
    assert out["policy_id"] == "pol_box" and out["artefact_sha256"] == runtime.meta["weights_sha256"]


@settings(max_examples=60, deadline=None)
@given(rows=batches, seed=st.integers(0, 2**63 - 1))
def test_deterministic_and_seeded_answers_repeat_exactly(runtime: PolicyRuntime, rows: list, seed: int) -> None:
    det = encode(rows)
    assert run(runtime, det) == run(runtime, det)
    stochastic = encode(rows, deterministic=False, seed=seed)
    first = run(runtime, stochastic)
    assert first == run(runtime, stochastic) and first["deterministic"] is False
    other = run(runtime, encode(rows, deterministic=False, seed=(seed + 1) % 2**63))
    assert np.all(np.array(first["actions"]) >= LOW) and np.all(np.array(first["actions"]) <= HIGH)
    # A different seed moves at least one unclipped action (σ > 0), unless all of them sit on the Box.
    if not np.all(np.isin(np.array(first["actions"]), LOW + HIGH)):
        assert first["actions"] != other["actions"]


def test_unseeded_samples_differ_and_default_is_the_mean(runtime: PolicyRuntime) -> None:
    rows = [[0.1 * j for j in range(OBS)]] * 4
    a = run(runtime, encode(rows, deterministic=False))["actions"]
    b = run(runtime, encode(rows, deterministic=False))["actions"]
    assert a != b
    assert run(runtime, encode(rows))["actions"] == runtime.act(np.array(rows))[0].tolist()


@settings(max_examples=60, deadline=None)
@given(rows=batches)
def test_a_batch_equals_its_rows_sent_singly(runtime: PolicyRuntime, rows: list) -> None:
    batch = run(runtime, encode(rows))
    for i, row in enumerate(rows):
        nested, flat = run(runtime, encode([row])), run(runtime, encode(row))
        assert nested == flat, "a flat observation is a batch of one"
        assert parse_act_request(encode(row), OBS, MAX_BATCH).single
        # BLAS picks kernels by batch shape, so sums may differ in the last bit (≈1e-16), never more.
        np.testing.assert_allclose(nested["actions"][0], batch["actions"][i], rtol=0, atol=1e-12)
        assert nested["clipped"][0] == batch["clipped"][i]


# ------------------------------------------------------------------------------------ bad inputs

BAD = {
    "NaN": NON_FINITE_TYPE,
    "Infinity": NON_FINITE_TYPE,
    "-Infinity": NON_FINITE_TYPE,
    "1e309": NON_FINITE_TYPE,
    "-1e400": NON_FINITE_TYPE,
    "1" + "0" * 400: NON_FINITE_TYPE,
    '"nan"': "/problems/validation",
    '"1.5"': "/problems/validation",
    "true": "/problems/validation",
    "false": "/problems/validation",
    "null": "/problems/validation",
    "[1.0]": "/problems/validation",
    "{}": "/problems/validation",
}


@settings(max_examples=200, deadline=None)
@given(
    rows=batches,
    data=st.data(),
    literal=st.sampled_from(sorted(BAD)),
    deterministic=st.sampled_from([None, True, False]),
    single=st.booleans(),
)
def test_any_bad_element_is_a_422_at_the_culprit(
    rows: list, data: st.DataObject, literal: str, deterministic: bool | None, single: bool
) -> None:
    if single:
        rows = rows[:1]
    i = data.draw(st.integers(0, len(rows) - 1))
    j = data.draw(st.integers(0, OBS - 1))
    rows[i][j] = "__BAD__"
    fields = {} if deterministic is None else {"deterministic": deterministic}
    body = encode(rows[0] if single else rows, **fields).replace(b'"__BAD__"', literal.encode())
    p = problem(body)
    assert p.status == 422 and p.type == BAD[literal]
    assert p.errors[0]["loc"] == (["body", "observations", j] if single else ["body", "observations", i, j])
    where = f"observations[{j}]" if single else f"observations[{i}][{j}]"
    assert p.detail.startswith(where)


@settings(max_examples=100, deadline=None)
@given(rows=batches, data=st.data())
def test_ragged_or_wrong_width_rows_are_a_422_at_the_row(rows: list, data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(rows) - 1))
    width = data.draw(st.integers(0, OBS + 3).filter(lambda n: n != OBS))
    rows[i] = rows[i][:width] + [0.5] * max(0, width - OBS)
    p = problem(encode(rows))
    assert p.status == 422 and p.errors[0]["loc"] == ["body", "observations", i]
    assert f"has {width} values" in p.detail and f"[B, {OBS}]" in p.detail


def test_shape_errors_name_expected_and_actual() -> None:
    p = problem(encode([0.0] * (OBS + 1)))
    assert p.errors[0]["loc"] == ["body", "observations"] and f"expected {OBS}" in p.errors[0]["msg"]
    p = problem(encode([[0.0] * OBS, 3.0]))
    assert p.errors[0]["loc"] == ["body", "observations", 1] and "not a list" in p.detail
    p = problem(encode([]))
    assert p.status == 422 and p.errors[0]["loc"] == ["body", "observations"] and "empty" in p.detail
    p = problem(encode([[[0.0] * OBS]]))
    assert p.errors[0]["loc"] == ["body", "observations", 0]
    assert problem(encode("[1, 2]")).errors[0]["loc"] == ["body", "observations"]


def test_several_culprits_are_listed_first_one_in_detail() -> None:
    rows = [[0.0] * OBS for _ in range(3)]
    body = encode(rows).replace(b"0.0", b"NaN")
    p = problem(body)
    assert len(p.errors) == act_module.MAX_ERRORS and p.errors[0]["loc"] == ["body", "observations", 0, 0]
    assert p.detail == "observations[0][0] is NaN"


def test_oversize_batch_is_413_even_when_rows_are_bad() -> None:
    assert problem(encode([[0.0] * OBS] * (MAX_BATCH + 1))).status == 413
    assert problem(encode([["x"]] * (MAX_BATCH + 1))).status == 413
    assert parse_act_request(encode([[0.0] * OBS] * MAX_BATCH), OBS, MAX_BATCH).observations.shape == (MAX_BATCH, OBS)


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"deterministic": "yes"}, "deterministic"),
        ({"deterministic": 1}, "deterministic"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"request_id": 5}, "request_id"),
        ({"request_id": "x" * 129}, "request_id"),
        ({"observation": [0.0] * OBS}, "observation"),
        ({"extra": 1}, "extra"),
    ],
)
def test_other_fields_are_checked(fields: dict[str, Any], loc: str) -> None:
    p = problem(encode([[0.0] * OBS], **fields))
    assert p.status == 422 and p.errors[0]["loc"] == ["body", loc]


def test_lenient_only_bodies() -> None:
    assert problem(b'{"observations": [[0, 0, 0, 0, 0, 0]], "seed": NaN}').errors[0]["loc"] == ["body", "seed"]
    lone_surrogate = b'{"observations": [[0, 0, 0, 0, 0, 0]], "request_id": "\\ud800"}'
    assert problem(lone_surrogate).errors[0]["loc"] == ["body", "request_id"]
    # Integers beyond 64 bits are still numbers (Python's parser reads them; float64 holds 1e20).
    big = parse_act_request(b'{"observations": [[100000000000000000000, 0, 0, 0, 0, 0]]}', OBS, MAX_BATCH)
    assert big.observations[0, 0] == 1e20
    assert problem(b"[NaN]").errors[0]["loc"] == ["body"]
    assert problem(b'{"observations": [[0, 0, 0, 0, 0, 0]]}', obs_dim=5).status == 422
    assert "did you mean" in problem(encode([0.0] * OBS).replace(b"observations", b"observation")).detail
    assert problem(b"{}").errors[0]["loc"] == ["body", "observations"]


@settings(max_examples=300, deadline=None)
@given(body=st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode), st.from_regex(rb"\{.*\}")))
def test_any_bytes_are_parsed_or_refused_with_400_or_422(body: bytes) -> None:
    """Never anything but ActRequest, 400 (not JSON even to a lenient parser) or 422."""
    try:
        json.loads(body.decode("utf-8"))
        lenient_ok = True
    except (ValueError, RecursionError):
        lenient_ok = False
    try:
        req = parse_act_request(body, OBS, MAX_BATCH)
    except Problem as p:
        assert p.status == (422 if lenient_ok else 400)
    else:
        assert isinstance(req, ActRequest) and lenient_ok


def test_garbage_is_400() -> None:
    utf16 = '{"observations": [[0, 0, 0, 0, 0, true]]}'.encode("utf-16")  # Python's json would read it
    for body in (b"", b"{", b"observations=1", b"\xff\xfe", b'{"observations": [1,]}', utf16):
        assert problem(body).status == 400


# ------------------------------------------------------------------------------------ acting


def test_metrics_count_batches_clipping_and_drift(runtime: PolicyRuntime) -> None:
    pid = "pol_metrics"
    obs = runtime.norm_mean + runtime.norm_std * np.random.default_rng(3).normal(0, 8, (16, OBS))
    n, before = sample("act_batch_size_count"), sample("act_clipped_total", {"policy_id": pid})
    drift_before = sample("act_obs_clipped_total", {"policy_id": pid})
    out = run(runtime, encode(obs.tolist()), policy_id=pid)
    assert sample("act_batch_size_count") == n + 1
    assert sample("act_clipped_total", {"policy_id": pid}) == before + sum(out["clipped"]) > before
    far = np.any(np.abs(obs - runtime.norm_mean) > 5 * runtime.norm_std, axis=1).sum()
    assert far > 0 and sample("act_obs_clipped_total", {"policy_id": pid}) == drift_before + far


def test_non_finite_output_is_a_corrupt_policy(artefacts: dict[str, Path]) -> None:
    broken = load_policy(artefacts["normalised"])
    broken.mean_b = np.full(ACT, np.nan)
    before = sample("act_corrupt_outputs_total", {"policy_id": "pol_broken"})
    with pytest.raises(CorruptPolicyError):
        act(broken, parse_act_request(encode([[0.0] * OBS]), OBS, MAX_BATCH), None, "pol_broken")
    assert sample("act_corrupt_outputs_total", {"policy_id": "pol_broken"}) == before + 1


def test_overflow_without_a_normaliser_is_the_requests_fault(artefacts: dict[str, Path]) -> None:
    raw = load_policy(artefacts["raw"])
    w, b = raw.trunk[0]
    raw.trunk[0] = (w * 1e10, b)
    huge = encode([[1e300 * (-1) ** j for j in range(OBS)]])
    with pytest.raises(Problem) as info:
        act(raw, parse_act_request(huge, OBS, MAX_BATCH), None, "pol_raw")
    assert info.value.status == 422 and info.value.errors[0]["loc"] == ["body", "observations"]


# ------------------------------------------------------------------------------------ shields


def test_box_shield_tightens_reports_logs_and_counts(runtime: PolicyRuntime, caplog: pytest.LogCaptureFixture) -> None:
    spec = {"type": "box", "low": [-0.5, -1.5], "high": [1.0, 0.25]}
    shield = build_shield(spec, runtime.meta)
    pid = "pol_shielded"
    obs = np.random.default_rng(4).normal(0, 3, (32, OBS))
    before = sample("act_shield_interventions_total", {"policy_id": pid})
    with caplog.at_level(logging.INFO, logger="cvpo.shield"):
        out = run(runtime, encode(obs.tolist()), shield, pid)
    actions, nominal = np.array(out["actions"]), runtime.act(obs)[0]
    assert np.array_equal(actions, np.clip(nominal, spec["low"], spec["high"]))
    applied = out["shield"]["applied"]
    assert applied == np.any(actions != nominal, axis=1).tolist() and 0 < sum(applied) < len(applied)
    assert [r is not None for r in out["shield"]["reasons"]] == applied
    assert sample("act_shield_interventions_total", {"policy_id": pid}) == before + sum(applied)
    logged = [r for r in caplog.records if r.name == "cvpo.shield"]
    assert len(logged) == sum(applied) and "nominal=" in logged[0].getMessage() and pid in logged[0].getMessage()


def shifting_hook(raw_obs: np.ndarray, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """Moves every action far outside the Box and claims it changed nothing."""
    return action + 100.0, np.zeros(len(action), dtype=bool), [None] * len(action)


def wrong_shape_hook(raw_obs: np.ndarray, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    return action[:, :1], np.zeros(len(action), dtype=bool), [None] * len(action)


HOOKS = (
    "slow=api.shield:speed_limiter, shift=tests.api.test_act_core:shifting_hook,"
    "bad=tests.api.test_act_core:wrong_shape_hook"
)


def test_hooks_from_the_env_string(runtime: PolicyRuntime, artefacts: dict[str, Path]) -> None:
    hooks = load_hooks(HOOKS)
    assert sorted(hooks) == ["bad", "shift", "slow"] and load_hooks("") == {} and load_hooks(" , ") == {}
    obs = np.random.default_rng(5).normal(0, 3, (16, OBS))
    symmetric = load_policy(artefacts["raw"])  # Box [-1, 1]²: some actions are slow already
    out = run(symmetric, encode(obs.tolist()), build_shield({"type": "hook", "name": "slow"}, symmetric.meta, HOOKS))
    nominal = symmetric.act(obs)[0]
    applied = np.linalg.norm(nominal, axis=1) > 0.5
    assert out["shield"]["applied"] == applied.tolist() and 0 < applied.sum() < len(applied)
    assert np.all(np.linalg.norm(out["actions"], axis=1) <= 0.5 + 1e-12)
    assert all(r.startswith("speed limit 0.5") for r, a in zip(out["shield"]["reasons"], applied, strict=True) if a)

    shifted = run(runtime, encode(obs.tolist()), build_shield({"type": "hook", "name": "shift"}, runtime.meta, hooks))
    assert np.array_equal(np.array(shifted["actions"]), np.tile(HIGH, (16, 1))), "clipped to the env Box again"
    assert all(shifted["shield"]["applied"]) and all("changed the action" in r for r in shifted["shield"]["reasons"])

    with pytest.raises(ShieldOutputError, match="shapes"):
        run(runtime, encode(obs.tolist()), build_shield({"type": "hook", "name": "bad"}, runtime.meta, hooks))


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("noequals", "expected name=module.path:function"),
        ("x=api.shield", "expected name=module.path:function"),
        ("bad name=api.shield:speed_limiter", "expected name"),
        ("x=no_such_module_xyz:f", "cannot import"),
        ("x=api.shield:does_not_exist", "cannot import"),
        ("x=api.shield:log.name", "not callable"),
        ("x=api.shield:speed_limiter,x=api.shield:speed_limiter", "twice"),
    ],
)
def test_bad_hook_config_is_refused(value: str, match: str) -> None:
    with pytest.raises(ShieldConfigError, match=match):
        load_hooks(value)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"type": "box", "low": [-0.5], "high": [0.5, 0.2]}, "list of 2 numbers"),
        ({"type": "box", "low": [float("nan"), 0.0], "high": [0.5, 0.2]}, "finite"),
        ({"type": "box", "low": [-0.5, 0.0], "high": [-0.6, 0.2]}, "above"),
        ({"type": "box", "low": [-0.6, 0.0], "high": [0.5, 0.2]}, "inside the action Box"),
        ({"type": "box", "low": [-0.5, 0.0], "high": [0.5, 0.3]}, "inside the action Box"),
        ({"type": "box", "low": [True, 0.0], "high": [0.5, 0.2]}, "must be a number"),
        ({"type": "box", "low": [-0.5, 0.0], "high": [0.5, 0.2], "x": 1}, "unknown field"),
        ({"type": "magic"}, "one of none, box, hook"),
        ({"type": "hook", "name": "unconfigured"}, "not a hook"),
        ({"type": "hook", "name": "os:system"}, "not a hook"),
        (["box"], "object"),
    ],
)
def test_bad_shield_specs_are_refused(runtime: PolicyRuntime, spec: Any, match: str) -> None:
    with pytest.raises(ShieldSpecError, match=match):
        validate_shield_spec(spec, runtime.meta, "slow=api.shield:speed_limiter")


def test_good_specs_normalise(runtime: PolicyRuntime) -> None:
    assert validate_shield_spec({"type": "none"}, runtime.meta) is None and build_shield(None, runtime.meta) is None
    box = validate_shield_spec({"type": "box", "low": [-0.5, -2], "high": [1.5, 0]}, runtime.meta)
    assert box == {"type": "box", "low": [-0.5, -2.0], "high": [1.5, 0.0]}


# ------------------------------------------------------------------------------------ policy cache


@pytest.fixture
def load_count(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    calls: list[Path] = []
    real = act_module.load_policy

    def counting(path: Path) -> PolicyRuntime:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(act_module, "load_policy", counting)
    yield calls


def test_cache_loads_once_across_threads(artefacts: dict[str, Path], load_count: list[Path]) -> None:
    cache = PolicyCache(SimpleNamespace(shield_hooks=HOOKS))
    assert sorted(cache.hooks) == ["bad", "shift", "slow"] and cache.lookup("pol_a") is None
    barrier = threading.Barrier(8)

    def get(_: int) -> Any:
        barrier.wait()
        return cache.get("pol_a", artefacts["normalised"], {"type": "hook", "name": "slow"}, client="c1")

    with ThreadPoolExecutor(8) as pool:
        entries = list(pool.map(get, range(8)))
    assert len(load_count) == 1 and all(e is entries[0] for e in entries)
    assert cache.lookup("pol_a") is entries[0] and entries[0].client == "c1" and entries[0].shield is not None
    assert not cache.is_loading("pol_a")


def test_cache_refuses_tampered_mismatched_and_marked_policies(tmp_path: Path, artefacts: dict[str, Path]) -> None:
    cache = PolicyCache()
    tampered = write_random_artefact(tmp_path / "tampered")
    data = bytearray((tampered / "policy.safetensors").read_bytes())
    data[-1] ^= 0x01
    (tampered / "policy.safetensors").write_bytes(bytes(data))
    for _ in range(2):
        with pytest.raises(PolicyNotReadyError, match="sha256"):
            cache.get("pol_t", tampered, None)
    assert "sha256" in (cache.not_ready_reason("pol_t") or "")

    with pytest.raises(PolicyNotReadyError, match="registered"):
        cache.get("pol_m", artefacts["normalised"], None, sha256="0" * 64)

    sha = load_policy(artefacts["normalised"]).meta["weights_sha256"]
    assert cache.get("pol_ok", artefacts["normalised"], None, sha256=sha).shield is None
    cache.mark_not_ready("pol_ok", "non-finite output")
    assert cache.lookup("pol_ok") is None
    with pytest.raises(PolicyNotReadyError, match="non-finite output"):
        cache.get("pol_ok", artefacts["normalised"], None)


def test_cache_refuses_a_hook_this_server_lacks_without_marking(artefacts: dict[str, Path]) -> None:
    cache = PolicyCache()
    with pytest.raises(ShieldSpecError, match="not a hook"):
        cache.get("pol_h", artefacts["normalised"], {"type": "hook", "name": "slow"})
    assert cache.not_ready_reason("pol_h") is None
