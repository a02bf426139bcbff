"""What the store hands out and raises: job statuses, the record dataclasses and their row converters,
the errors a route maps to HTTP, ids, timestamps and page cursors."""

from __future__ import annotations

import base64
import secrets
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from core.store.schema import jobs

ACTIVE = ("queued", "starting", "running", "cancelling")
LEASED = ("starting", "running", "cancelling")
TERMINAL = ("succeeded", "failed", "cancelled")
STATUSES = ACTIVE + TERMINAL
FAILURE_REASONS = ("invalid_spec", "diverged", "oom", "timeout", "worker_lost", "internal")


class StoreError(RuntimeError):
    """Base of the store's errors a route maps to HTTP."""


class NotFoundError(StoreError):
    pass


class ConflictError(StoreError):
    pass


class CapExceededError(StoreError):
    """A client (429) or the whole service (503) is over its job cap."""

    def __init__(self, message: str, status: int, retry_after: int) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class IdempotencyMismatchError(StoreError):
    pass


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def rfc3339(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"s{seq}".encode()).decode().rstrip("=")


def decode_cursor(token: str | None) -> int | None:
    """Opaque page token → the last seq seen. Raises ValueError for a token we did not issue."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        if not raw.startswith("s"):
            raise ValueError
        seq = int(raw[1:])
        if not 0 <= seq < 2**63:  # the seq columns are 64-bit: a larger number is no token we issued
            raise ValueError
        return seq
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"page_token {token!r} is not one this service issued") from exc


@dataclass
class JobRecord:
    id: str
    client: str
    status: str
    attempt: int
    max_attempts: int
    env_id: str
    spec: dict[str, Any]
    config: dict[str, Any]
    labels: dict[str, str]
    time_limit_s: float
    created_at: float
    updated_at: float
    enqueued_at: float | None
    started_at: float | None
    finished_at: float | None
    lease_owner: str | None
    lease_until: float | None
    cancel_requested: bool
    requeue_requested: bool
    total_env_steps: int
    env_step: int
    epoch: int
    steps_per_s: float | None
    latest: dict[str, Any] | None
    best: dict[str, Any] | None
    policy_id: str | None
    failure: dict[str, Any] | None
    run_dir: str
    event_seq: int
    seq: int = 0
    promotion: dict[str, Any] | None = None
    phase: str | None = None
    disk_bytes: int | None = None
    disk_measured_at: float | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


@dataclass
class PolicyRecord:
    id: str
    client: str
    job_id: str | None
    checkpoint_id: str | None
    env_id: str
    path: str
    sha256: str
    shield: dict[str, Any] | None
    meta: dict[str, Any]
    created_at: str
    ready: bool
    seq: int = 0
    certificate: dict[str, Any] | None = None
    certified: bool | None = None
    override: dict[str, Any] | None = None
    meta_sha256: str | None = None


@dataclass
class EvaluationRecord:
    id: str
    policy_id: str
    client: str
    status: str
    params: dict[str, Any]
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    worker: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    seq: int = 0


@dataclass
class CheckpointRecord:
    id: str
    job_id: str
    attempt: int
    epoch: int
    env_step: int
    path: str
    artefact_path: str | None
    eval_return: float | None
    eval_cost: float | None
    feasible: bool | None
    created_at: float
    files_deleted_at: float | None = None


def _job(row: Any) -> JobRecord:
    return JobRecord(**{c: row._mapping[c] for c in JobRecord.__dataclass_fields__})


def _policy(row: Any) -> PolicyRecord:
    m = dict(row._mapping)
    m["created_at"] = rfc3339(m["created_at"])
    return PolicyRecord(**{c: m[c] for c in PolicyRecord.__dataclass_fields__})


def _evaluation(row: Any) -> EvaluationRecord:
    return EvaluationRecord(**{c: row._mapping[c] for c in EvaluationRecord.__dataclass_fields__})


def _checkpoint(row: Any) -> CheckpointRecord:
    return CheckpointRecord(**{c: row._mapping[c] for c in CheckpointRecord.__dataclass_fields__})


def _find_job(c: Connection, job_id: str, client: str | None, *, lock: bool = False) -> Any:
    """The job's row, filtered to ``client`` unless None (admins); NotFoundError otherwise. ``lock``
    (a write that decides on what it read) holds the row until commit on PostgreSQL (SQLite: no-op)."""
    q = sa.select(jobs).where(jobs.c.id == job_id)
    if client is not None:
        q = q.where(jobs.c.client == client)
    if lock:
        q = q.with_for_update()
    row = c.execute(q).first()
    if row is None:
        raise NotFoundError(f"no job {job_id!r}")
    return row
