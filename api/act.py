"""The ``POST /policies/{id}/act`` hot path as plain functions (service-design.md §2.1, §2.2).

Over 400 lines on purpose: parsing, the forward pass, the answer and the per-process policy cache are
one latency-critical path, and keeping them in one module keeps every hop on it visible.

The route stays thin: ``parse_act_request`` turns raw bytes into a float64 batch or raises a
``Problem``; ``act`` runs the artefact's numpy runtime, clips to the Box, applies the shield and
returns orjson bytes. No pydantic on this path (≈0.15 ms per 60 floats, §2.5): orjson plus a few
vectorised numpy checks, with a slow element-by-element scan only to locate a culprit for a 4xx.

Body (keys other than these five are a 422)::

    {"observations": [[...], ...] | [...], "deterministic": true, "seed": null, "request_id": null,
     "return": ["cost_to_go"]}

``observations`` is a batch of rows, or one flat row (``single``). The response always carries
``actions`` as a list of rows, so clients parse one shape whatever they sent. ``return`` asks for
extra outputs: ``"cost_to_go"`` adds ``cost_to_go`` (B rows of m numbers), the policy's cost
critics' Q_c(s, a) per constraint for the action it produced (a 422 for a policy without critics).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from prometheus_client import Counter, Histogram

from api.errors import Problem
from api.shield import Shield, ShieldHook, build_shield, load_hooks
from cvpo.artefact import META_FILE, ArtefactError, PolicyRuntime, load_policy
from cvpo.envs.wrappers import scale_action

if TYPE_CHECKING:  # the store's record type only; /act's module needs nothing of the store at run time
    from core.store import PolicyRecord

log = logging.getLogger("cvpo.api")

ALLOWED_KEYS = frozenset({"observations", "deterministic", "seed", "request_id", "return"})
RETURNABLE = ("cost_to_go",)  # extra outputs a request may ask for in "return"
MAX_RETURN = 8
MAX_REQUEST_ID = 128
MAX_SEED = 2**63
MAX_ERRORS = 10  # culprits listed in one 422; the first is the one ``detail`` names
NON_FINITE_TYPE = "/problems/non-finite-value"

ACT_BATCH_SIZE = Histogram(
    "act_batch_size", "Observations per /act request", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
)
ACT_CLIPPED = Counter("act_clipped_total", "Actions clipped to the action Box, by policy", ["policy_id"])
ACT_OBS_CLIPPED = Counter(
    "act_obs_clipped_total", "Observations beyond the frozen normaliser's clip (input drift), by policy", ["policy_id"]
)
ACT_CORRUPT = Counter("act_corrupt_outputs_total", "Non-finite policy outputs (corrupt artefact)", ["policy_id"])


class CorruptPolicyError(RuntimeError):
    """The policy produced a non-finite action from finite, bounded input: the artefact is broken."""


class PolicyNotReadyError(RuntimeError):
    """The policy was marked not ready (failed a load check or produced a non-finite output)."""


@dataclass(slots=True)
class ActRequest:
    observations: np.ndarray  # (B, obs_dim) float64, finite
    deterministic: bool = True
    seed: int | None = None
    request_id: str | None = None
    single: bool = False  # one flat observation was sent (only changes error locations)
    cost_to_go: bool = False  # "return": ["cost_to_go"]


# ---------------------------------------------------------------------------------------- parsing


def _fmt_loc(loc: list[Any]) -> str:
    """["body", "observations", 3, 17] → "observations[3][17]"; ["body", "seed"] → "seed"."""
    parts = loc[1:]
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if k else str(p)) for k, p in enumerate(parts))


def _echo(value: Any) -> Any:
    """A short, JSON-safe echo of an offending input (containers are named, not dumped)."""
    if isinstance(value, str):
        return value[:64]
    if value is None or isinstance(value, bool | int | float):
        return value
    return f"<{type(value).__name__}>"


def _invalid(loc: list[Any], msg: str, detail: str | None = None, **input_: Any) -> Problem:
    err: dict[str, Any] = {"loc": ["body", *loc], "msg": msg}
    if "input" in input_:
        err["input"] = _echo(input_["input"])
    return Problem(422, detail or f"{_fmt_loc(err['loc'])}: {msg}", errors=[err])


def _lenient(body: bytes) -> Any:
    """orjson refused the body: if Python's json accepts it, the refusal was NaN/Infinity literals,
    an overflowing number (1e309), a lone surrogate or a >64-bit integer; validation then names the
    culprit (422). Anything else, UTF-16 and other non-UTF-8 bodies included (RFC 8259 §8.1), is 400."""
    try:
        return json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise Problem(400, "request body is not valid JSON") from exc


def _non_finite_name(x: float) -> str:
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def _scan(rows: list[Any], single: bool, obs_dim: int, max_batch: int) -> Problem | None:
    """Element by element, the culprits of a batch the fast path refused (None if there are none)."""
    errors: list[dict[str, Any]] = []
    details: list[str] = []
    kinds: list[str] = []
    shape = f"expected shape [B, {obs_dim}] with 1 ≤ B ≤ {max_batch}" if not single else f"expected {obs_dim} numbers"

    def add(loc: list[Any], msg: str, detail: str, kind: str = "shape", **input_: Any) -> None:
        err: dict[str, Any] = {"loc": ["body", "observations", *loc], "msg": msg}
        if "input" in input_:
            err["input"] = _echo(input_["input"])
        errors.append(err)
        details.append(detail)
        kinds.append(kind)

    for i, row in enumerate(rows):
        base: list[Any] = [] if single else [i]
        name = _fmt_loc(["body", "observations", *base])
        if type(row) is not list:
            add(base, "must be a list of numbers", f"{name} is not a list of numbers; {shape}", input=row)
        elif len(row) != obs_dim:
            add(base, f"expected {obs_dim} values, got {len(row)}", f"{name} has {len(row)} values; {shape}")
        else:
            for j, x in enumerate(row):
                t = type(x)
                where = _fmt_loc(["body", "observations", *base, j])
                if t is float:
                    if not math.isfinite(x):
                        add([*base, j], "must be finite", f"{where} is {_non_finite_name(x)}", "finite", input=x)
                elif t is int:
                    try:
                        float(x)
                    except OverflowError:
                        add([*base, j], "must be finite", f"{where} overflows to Infinity", "finite", input=str(x)[:32])
                elif t is bool:
                    add([*base, j], "must be a number, not a boolean", f"{where} is a boolean", input=x)
                else:
                    add([*base, j], "must be a number", f"{where} is a {type(x).__name__}, not a number", input=x)
                if len(errors) >= MAX_ERRORS:
                    break
        if len(errors) >= MAX_ERRORS:
            break
    if not errors:
        return None
    if kinds[0] == "finite":
        return Problem(422, details[0], type=NON_FINITE_TYPE, title="Non-finite observation", errors=errors)
    return Problem(422, details[0], errors=errors)


def _bool_literals(body: bytes) -> int:
    """An upper bound on the JSON booleans in ``body``, found with memchr-speed single-byte searches
    (``bytes.count(b"true")`` is ~40x slower on a 64-row body). Number syntax has neither ``u`` nor
    ``a``, so the loops only visit keys, short strings and literals."""
    n = 0
    for probe, literal, back in ((b"u", b"true", 2), (b"a", b"false", 1)):
        k = body.find(probe)
        while k != -1:
            n += body[k - back : k - back + len(literal)] == literal
            k = body.find(probe, k + 1)
    return n


def _observations(value: Any, obs_dim: int, max_batch: int, body: bytes, known_bools: int) -> tuple[np.ndarray, bool]:
    if type(value) is not list:
        raise _invalid(["observations"], "must be a list of observations (or one observation)", input=value)
    if not value:
        raise _invalid(
            ["observations"], "must hold at least one observation", "observations is empty; send 1 or more rows"
        )
    single = type(value[0]) is not list
    rows = [value] if single else value
    if len(rows) > max_batch:
        raise Problem(413, f"batch of {len(rows)} observations is over this server's max_batch of {max_batch}")
    # Fast path: one C-level conversion. numpy quietly turns strings, None and nested lists into
    # other dtypes/shapes (caught below) and booleans mixed with numbers into 1.0/0.0. Every boolean
    # in the document is a literal ``true``/``false`` in the UTF-8 body (orjson reads only UTF-8), so
    # if the body holds no more of those than the top-level fields account for, no observation is one.
    arr: np.ndarray | None
    try:
        arr = np.array(rows)
    except (ValueError, TypeError, OverflowError):
        arr = None
    ok = (
        arr is not None
        and arr.ndim == 2
        and arr.shape[1] == obs_dim
        and arr.dtype.kind in "fiu"
        and _bool_literals(body) <= known_bools
    )
    if ok:
        assert arr is not None
        if arr.dtype != np.float64:
            arr = arr.astype(np.float64)
        ok = bool(np.isfinite(arr).all())
    if not ok:
        problem = _scan(rows, single, obs_dim, max_batch)
        if problem is not None:
            raise problem
        # Only exotic-but-valid input gets here (integers beyond 64 bits from the lenient parser).
        arr = np.array([[float(x) for x in row] for row in rows], dtype=np.float64)
    assert arr is not None
    return arr, single


def parse_act_request(body: bytes, obs_dim: int, max_batch: int) -> ActRequest:
    """Raw body → ``ActRequest``, or a ``Problem``: 400 not JSON, 413 batch over ``max_batch``,
    422 with ``errors[0].loc`` at the first culprit (shape, type, non-finite, unknown key)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = _lenient(body)
    if type(doc) is not dict:
        raise Problem(
            422,
            "the body must be a JSON object with an 'observations' list",
            errors=[{"loc": ["body"], "msg": "must be an object", "input": _echo(doc)}],
        )
    if len(doc.keys() - ALLOWED_KEYS):
        key = sorted(doc.keys() - ALLOWED_KEYS)[0]
        hint = " (did you mean 'observations'?)" if key == "observation" else ""
        raise _invalid([key], "unknown field", f"unknown field {key!r}{hint}; allowed: {sorted(ALLOWED_KEYS)}")
    if "observations" not in doc:
        raise _invalid(["observations"], "field required")
    deterministic = doc.get("deterministic", True)
    if type(deterministic) is not bool:
        raise _invalid(["deterministic"], "must be true or false", input=deterministic)
    seed = doc.get("seed")
    if seed is not None and (type(seed) is not int or not 0 <= seed < MAX_SEED):
        raise _invalid(["seed"], "must be null or an integer in [0, 2**63)", input=seed)
    request_id = doc.get("request_id")
    if request_id is not None:
        if type(request_id) is not str or len(request_id) > MAX_REQUEST_ID:
            raise _invalid(["request_id"], f"must be null or a string of at most {MAX_REQUEST_ID} characters")
        try:
            request_id.encode("utf-8")  # a lone surrogate (accepted by the lenient parser) cannot be echoed
        except UnicodeEncodeError:
            raise _invalid(["request_id"], "must be valid Unicode text") from None
    cost_to_go = "return" in doc and _returns(doc["return"])
    known_bools = 1 if "deterministic" in doc else 0
    observations, single = _observations(doc["observations"], obs_dim, max_batch, body, known_bools)
    return ActRequest(observations, deterministic, seed, request_id, single, cost_to_go)


def _returns(value: Any) -> bool:
    """``"return"``: a list of names from ``RETURNABLE`` (True when it asks for cost_to_go)."""
    if type(value) is not list or len(value) > MAX_RETURN:
        raise _invalid(["return"], f"must be a list of at most {MAX_RETURN} of {list(RETURNABLE)}", input=value)
    for i, name in enumerate(value):
        if name not in RETURNABLE or type(name) is not str:
            raise _invalid(
                ["return", i],
                f"unknown output; allowed: {list(RETURNABLE)}",
                f"return[{i}]: {_echo(name)!r} is not an output /act can return; allowed: {list(RETURNABLE)}",
                input=name,
            )
    return "cost_to_go" in value


# ------------------------------------------------------------------------------------------ acting


def act(
    runtime: PolicyRuntime, req: ActRequest, shield: Shield | None, policy_id: str, alias: str | None = None
) -> bytes:
    """Run the policy on a parsed request and return the response body (orjson bytes); ``alias``, when
    the request came through one, is echoed beside ``policy_id``.

    Order (§2.2): normalise → forward (mean or seeded sample) → clip to [-1, 1] → map to
    [low, high] → shield → refuse anything non-finite. Raises ``CorruptPolicyError`` when the
    artefact itself must be broken, and a 422 ``Problem`` when un-normalised input overflowed.
    """
    obs = req.observations
    if req.cost_to_go and runtime.cost_critic is None:
        raise _invalid(
            ["return"],
            "this policy has no cost critic",
            f"policy {policy_id} cannot return cost_to_go: its artefact carries no cost critic "
            "(it was exported before critics were included, or without them)",
        )
    ACT_BATCH_SIZE.observe(obs.shape[0])
    rng = None if req.deterministic else np.random.default_rng(req.seed)
    with np.errstate(over="ignore", invalid="ignore"):  # huge raw inputs are clipped or refused below
        raw = runtime.raw_action(obs, req.deterministic, rng)
        # Drift: rows with a feature beyond the frozen normaliser's clip (service-design.md §2.6).
        far = (
            None
            if runtime.norm_mean is None
            else np.abs(obs - runtime.norm_mean) > runtime.norm_clip * runtime.norm_std
        )
    if not np.isfinite(raw).all():
        if runtime.norm_mean is None:
            # Without a normaliser a client's 1e300 can overflow finite weights; that is the
            # request's fault, and must not let one client take the policy down for everyone.
            raise _invalid(["observations"], "too large for this policy: its forward pass overflowed")
        ACT_CORRUPT.labels(policy_id).inc()
        raise CorruptPolicyError(f"policy {policy_id} produced a non-finite action from normalised input")
    cost_to_go = None
    if req.cost_to_go or (shield is not None and shield.wants_cost_to_go):
        cost_to_go = _cost_to_go(runtime, obs, raw, policy_id)
    actions, clipped = scale_action(raw, runtime.low, runtime.high)
    n_clipped = int(np.count_nonzero(clipped))
    if n_clipped:
        ACT_CLIPPED.labels(policy_id).inc(n_clipped)
    if far is not None and far.any():
        ACT_OBS_CLIPPED.labels(policy_id).inc(int(np.count_nonzero(far.any(axis=1))))
    out: dict[str, Any] = {
        "policy_id": policy_id,
        "artefact_sha256": runtime.meta["weights_sha256"],
        "request_id": req.request_id,
        "deterministic": req.deterministic,
    }
    if alias is not None:
        out["alias"] = alias
    if shield is not None:
        actions, applied, reasons = shield.apply(policy_id, obs, actions, cost_to_go)
    out["actions"], out["clipped"] = actions, clipped
    if req.cost_to_go:
        out["cost_to_go"] = cost_to_go
    if shield is not None:
        out["shield"] = {"applied": applied, "reasons": reasons}
        if not np.isfinite(actions).all():  # finite raw actions stay finite through clip and map
            ACT_CORRUPT.labels(policy_id).inc()
            raise CorruptPolicyError(f"policy {policy_id}'s shield produced a non-finite action")
    return orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY)


def _cost_to_go(runtime: PolicyRuntime, obs: np.ndarray, raw: np.ndarray, policy_id: str) -> np.ndarray:
    """Q_c(s, a) (B, m) of the policy's raw actions; non-finite output is handled like the actor's."""
    with np.errstate(over="ignore", invalid="ignore"):
        q = runtime.cost_to_go(obs, raw)
    if not np.isfinite(q).all():
        if runtime.norm_mean is None:
            raise _invalid(["observations"], "too large for this policy: its cost critic overflowed")
        ACT_CORRUPT.labels(policy_id).inc()
        raise CorruptPolicyError(f"policy {policy_id}'s cost critic produced a non-finite value")
    return q


# ------------------------------------------------------------------------------------------ cache


@dataclass(frozen=True, slots=True)
class LoadedPolicy:
    """What ``/act`` needs without touching the store: the runtime, its shield and its owner."""

    policy_id: str
    runtime: PolicyRuntime
    shield: Shield | None
    client: str | None = None
    macs_per_row: int = 0  # multiply-adds of one forward pass: sizes the inline-or-threadpool choice
    critic_macs_per_row: int = 0  # and of the cost critics, for requests that return cost_to_go
    # The ``X-Policy-Certified`` header every /act answer carries, built once (policies are immutable).
    certified_header: tuple[bytes, bytes] = (b"x-policy-certified", b"false")
    id_header: tuple[bytes, bytes] = (b"x-policy-id", b"")  # X-Policy-Id: the policy that answered

    def __post_init__(self) -> None:
        object.__setattr__(self, "id_header", (b"x-policy-id", self.policy_id.encode("latin-1")))


CERTIFIED_HEADERS = {True: (b"x-policy-certified", b"true"), False: (b"x-policy-certified", b"false")}


def _macs_per_row(runtime: PolicyRuntime) -> int:
    return sum(w.size for w, _ in runtime.trunk) + runtime.mean_w.size + runtime.cov_w.size


def _critic_macs_per_row(runtime: PolicyRuntime) -> int:
    return sum(w.size for w, _ in runtime.cost_critic or [])


def check_meta_sha256(path: str | Path, meta_sha256: str | None) -> None:
    """``policy.json`` against the sha256 the store recorded at promotion (issue #23 item 10): the
    weights' own hash lives inside policy.json, so an edited action box, mean bound or normaliser
    clip would pass every other check. ``None`` (a policy registered before the hash existed): no check."""
    if meta_sha256 is None:
        return
    try:
        raw = (Path(path) / META_FILE).read_bytes()
    except OSError as exc:
        raise ArtefactError(f"{META_FILE} is unreadable: {exc.strerror or exc}") from exc
    if hashlib.sha256(raw).hexdigest() != meta_sha256:
        raise ArtefactError(f"{META_FILE} differs from the one registered at promotion (sha256 mismatch)")


def _check_weights_finite(runtime: PolicyRuntime) -> None:
    arrays = [a for pair in runtime.trunk for a in pair] + [runtime.mean_w, runtime.mean_b]
    arrays += [a for pair in runtime.cost_critic or [] for a in pair]
    if runtime.norm_mean is not None:
        arrays += [runtime.norm_mean, runtime.norm_std]
    if not all(np.isfinite(a).all() for a in arrays):
        raise ArtefactError("the artefact holds non-finite weights or normaliser statistics")


class PolicyCache:
    """Policies loaded once per process by id (weights and policy.json sha256-checked), shared by threads.

    Reads on the hot path are a lock-free dict lookup; loads take a per-policy lock so concurrent
    first requests load once. A policy marked not ready stays out until the process restarts.
    """

    def __init__(self, settings: Any = None, hooks: dict[str, ShieldHook] | None = None) -> None:
        raw = getattr(settings, "shield_hooks", "") if settings is not None else ""
        self.hooks: dict[str, ShieldHook] = dict(hooks) if hooks is not None else load_hooks(raw)
        self._entries: dict[str, LoadedPolicy] = {}
        self._not_ready: dict[str, str] = {}
        self._loading: set[str] = set()
        self._load_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def lookup(self, policy_id: str) -> LoadedPolicy | None:
        """The loaded policy, or None (never loads: safe to call on the event loop)."""
        return self._entries.get(policy_id)

    def is_loading(self, policy_id: str) -> bool:
        return policy_id in self._loading

    def not_ready_reason(self, policy_id: str) -> str | None:
        return self._not_ready.get(policy_id)

    def get_record(self, policy: PolicyRecord) -> LoadedPolicy:
        """:meth:`get` for a policy as the store records it (its path, shield, hashes, owner)."""
        return self.get(
            policy.id,
            policy.path,
            policy.shield,
            sha256=policy.sha256,
            client=policy.client,
            certified=bool(policy.certified),
            meta_sha256=policy.meta_sha256,
        )

    def get(
        self,
        policy_id: str,
        path: str | Path,
        shield_spec: dict[str, Any] | None,
        *,
        sha256: str | None = None,
        client: str | None = None,
        certified: bool = False,
        meta_sha256: str | None = None,
    ) -> LoadedPolicy:
        """Load (once) and return a policy. Raises ``PolicyNotReadyError`` for a policy marked not
        ready or failing its checks (tampered weights or policy.json, non-finite weights),
        ``ShieldSpecError`` when its shield names a hook this server does not configure."""
        entry = self._entries.get(policy_id)
        if entry is not None:
            return entry
        with self._lock:
            lock = self._load_locks.setdefault(policy_id, threading.Lock())
            self._loading.add(policy_id)
        try:
            with lock:
                entry = self._entries.get(policy_id)
                if entry is not None:
                    return entry
                if policy_id in self._not_ready:
                    raise PolicyNotReadyError(self._not_ready[policy_id])
                try:
                    check_meta_sha256(path, meta_sha256)
                    runtime = load_policy(Path(path))
                    if sha256 is not None and runtime.meta.get("weights_sha256") != sha256:
                        raise ArtefactError("the weights' sha256 differs from the one registered at promotion")
                    _check_weights_finite(runtime)
                except ArtefactError as exc:
                    self.mark_not_ready(policy_id, str(exc))
                    raise PolicyNotReadyError(str(exc)) from exc
                shield = build_shield(shield_spec, runtime.meta, self.hooks)
                critic_macs = _critic_macs_per_row(runtime)
                entry = LoadedPolicy(
                    policy_id,
                    runtime,
                    shield,
                    client,
                    _macs_per_row(runtime) + (critic_macs if shield is not None and shield.wants_cost_to_go else 0),
                    critic_macs,
                    CERTIFIED_HEADERS[bool(certified)],
                )
                self._entries[policy_id] = entry
                log.info("loaded policy %s from %s", policy_id, path)
                return entry
        finally:
            with self._lock:
                self._loading.discard(policy_id)

    def mark_not_ready(self, policy_id: str, reason: str = "marked not ready") -> None:
        with self._lock:
            self._entries.pop(policy_id, None)
            self._not_ready[policy_id] = reason
        log.error("policy %s marked not ready: %s", policy_id, reason)
