"""The job store: the single source of truth shared by the API, the worker and the reconciler.

SQLAlchemy Core over SQLite (WAL, ``BEGIN IMMEDIATE`` so concurrent writers queue instead of
failing) or PostgreSQL (psycopg 3). PostgreSQL runs READ COMMITTED, where nothing queues writers:
there a check-then-insert (the job caps, idempotency keys, tokens) holds a transaction-scoped
advisory lock (``_serialize``), a read-then-write of a job locks its row (``FOR UPDATE``), upserts are
``INSERT … ON CONFLICT`` and schema creation takes a session lock.
Every job state change is a compare-and-set on ``(status, attempt)``
through ``transition`` and is allowed only if it appears in ``TRANSITIONS`` (service-design.md
§1.5); every worker write carries the attempt and the lease owner, so a stale attempt can never
write (fencing, §3.3). Redis holds no state that is not also here.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

ACTIVE = ("queued", "starting", "running", "cancelling")
LEASED = ("starting", "running", "cancelling")
TERMINAL = ("succeeded", "failed", "cancelled")
STATUSES = ACTIVE + TERMINAL
FAILURE_REASONS = ("invalid_spec", "diverged", "oom", "timeout", "worker_lost", "internal")

# The job state machine (service-design.md §1.5): the only moves ``transition`` performs.
TRANSITIONS: frozenset[tuple[str, str]] = frozenset(
    {
        ("queued", "starting"),
        ("queued", "cancelled"),
        ("starting", "running"),
        ("starting", "queued"),
        ("running", "queued"),
        ("starting", "failed"),
        ("running", "failed"),
        ("running", "succeeded"),
        ("starting", "cancelling"),
        ("running", "cancelling"),
        ("cancelling", "cancelled"),
        ("cancelling", "succeeded"),
        ("cancelling", "failed"),
    }
)

SCOPES = ("jobs:read", "jobs:write", "policies:read", "policies:act", "metrics:read", "admin")

metadata = sa.MetaData()

# 64-bit where a client's number is compared (page cursors, after_seq, after_step: up to 2**63 - 1) or a
# count grows without bound. PostgreSQL's INTEGER is 32-bit and SQLAlchemy binds a compared number as
# ``::INTEGER``, so a larger one was a 500; SQLite keeps INTEGER (64-bit there, and the rowid alias).
BigInt = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("seq", BigInt, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(40), nullable=False, unique=True),
    sa.Column("client", sa.String(64), nullable=False, index=True),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("attempt", sa.Integer, nullable=False, default=1),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("env_id", sa.String(80), nullable=False, index=True),
    sa.Column("spec", sa.JSON, nullable=False),
    sa.Column("config", sa.JSON, nullable=False),
    sa.Column("labels", sa.JSON, nullable=False),
    sa.Column("time_limit_s", sa.Float, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("enqueued_at", sa.Float),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Column("lease_owner", sa.String(200)),
    sa.Column("lease_until", sa.Float),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("requeue_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("total_env_steps", sa.Integer, nullable=False),
    sa.Column("env_step", BigInt, nullable=False, default=0),
    sa.Column("epoch", sa.Integer, nullable=False, default=0),
    sa.Column("steps_per_s", sa.Float),
    sa.Column("latest", sa.JSON),
    sa.Column("best", sa.JSON),
    sa.Column("policy_id", sa.String(40)),
    sa.Column("failure", sa.JSON),
    sa.Column("run_dir", sa.String(1000), nullable=False),
    sa.Column("event_seq", BigInt, nullable=False, default=0),
    # Added with certified policies (issue #18): how automatic promotion went (candidates tried,
    # their certificates, the chosen one or why none). Nullable: ``_migrate`` adds it to old stores.
    sa.Column("promotion", sa.JSON),
    # Added with in-epoch progress (issue #23): "training" or "evaluating", carried by the heartbeat.
    sa.Column("phase", sa.String(16)),
    # Added with checkpoint retention (issue #23 item 11): bytes of the run directory, measured by the
    # worker after each epoch and checkpoint (GET /jobs/{id} and /metrics read it, never the disk).
    sa.Column("disk_bytes", sa.BigInteger),
    sa.Column("disk_measured_at", sa.Float),
)

metric_points = sa.Table(
    "metric_points",
    metadata,
    sa.Column("job_id", sa.String(40), primary_key=True),
    sa.Column("epoch", sa.Integer, primary_key=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("env_step", BigInt, nullable=False),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("values", sa.JSON, nullable=False),
)

checkpoints = sa.Table(
    "checkpoints",
    metadata,
    sa.Column("seq", BigInt, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(40), nullable=False, unique=True),
    sa.Column("job_id", sa.String(40), nullable=False, index=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("epoch", sa.Integer, nullable=False),
    sa.Column("env_step", BigInt, nullable=False),
    sa.Column("path", sa.String(1000), nullable=False),
    sa.Column("artefact_path", sa.String(1000)),
    sa.Column("eval_reward", sa.Float),
    sa.Column("eval_cost", sa.Float),
    sa.Column("feasible", sa.Boolean),
    sa.Column("created_at", sa.Float, nullable=False),
    # Checkpoint retention (issue #23 item 11): when the full checkpoint's files were deleted (its
    # artefact stays); null while they exist. Nothing resumes from a checkpoint with this set.
    sa.Column("files_deleted_at", sa.Float),
)

policies = sa.Table(
    "policies",
    metadata,
    sa.Column("seq", BigInt, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(40), nullable=False, unique=True),
    sa.Column("client", sa.String(64), nullable=False, index=True),
    sa.Column("job_id", sa.String(40), index=True),
    sa.Column("checkpoint_id", sa.String(40)),
    sa.Column("env_id", sa.String(80), nullable=False),
    sa.Column("path", sa.String(1000), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("shield", sa.JSON),
    sa.Column("meta", sa.JSON, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("ready", sa.Boolean, nullable=False, default=True),
    # Certified policies (issue #18): the certificate (cvpo.certify.Certificate.to_dict()), whether it
    # certified, and for an admin's override of an uncertified checkpoint {"reason", "actor", "at"}.
    # Nullable: policies registered before certificates existed have none (served as not certified).
    sa.Column("certificate", sa.JSON),
    sa.Column("certified", sa.Boolean),
    sa.Column("override", sa.JSON),
    # Policy integrity (issue #23 item 10): sha256 of policy.json as promoted (``sha256`` covers the
    # weights only). Null for policies registered before it existed: those are checked on weights.
    sa.Column("meta_sha256", sa.String(64)),
)

# On-demand evaluations of a policy (POST /policies/{id}/evaluations), run by a worker.
EVAL_STATUSES = ("queued", "running", "succeeded", "failed")
evaluations = sa.Table(
    "evaluations",
    metadata,
    sa.Column("seq", BigInt, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(40), nullable=False, unique=True),
    sa.Column("policy_id", sa.String(40), nullable=False, index=True),
    sa.Column("client", sa.String(64), nullable=False, index=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("params", sa.JSON, nullable=False),
    sa.Column("result", sa.JSON),
    sa.Column("error", sa.JSON),
    sa.Column("worker", sa.String(200)),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("job_id", sa.String(40), primary_key=True),
    sa.Column("seq", BigInt, primary_key=True),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Column("time", sa.Float, nullable=False),
)

idempotency = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("client", sa.String(64), primary_key=True),
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("body_sha256", sa.String(64), nullable=False),
    sa.Column("job_id", sa.String(40), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

tokens = sa.Table(
    "tokens",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("name", sa.String(200), nullable=False),
    # The client owning the jobs and policies this token creates and sees; several tokens (a
    # trainer's, a controller's act-only one) can share a client.
    sa.Column("client", sa.String(64), nullable=False),
    sa.Column("scopes", sa.JSON, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    # Optional expiry (issue #23 item 9): past it the token is refused like a revoked one. Nullable:
    # ``_migrate`` adds it to old stores, whose tokens never expire.
    sa.Column("expires_at", sa.Float),
)

# Workers announce themselves here (issue #23 items 12 and 13): the API reads who is alive on which
# queue and what each can run (``capabilities``: {"cuda": bool, "cuda_devices": int, ...}). The Celery
# worker's main process registers at start, renews ``seen_at`` every CVPO_HEARTBEAT_S and sets
# ``stopped_at`` on a graceful stop; a killed one just stops being seen.
workers = sa.Table(
    "workers",
    metadata,
    sa.Column("id", sa.String(200), primary_key=True),  # host:pid, the prefix of its jobs' lease owners
    sa.Column("queue", sa.String(200), nullable=False, index=True),
    sa.Column("capabilities", sa.JSON, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("seen_at", sa.Float, nullable=False),
    sa.Column("stopped_at", sa.Float),
)

kv = sa.Table(
    "kv",
    metadata,
    sa.Column("key", sa.String(100), primary_key=True),
    sa.Column("value", sa.JSON),
)

EVENTS_KEPT = 10_000
WORKERS_KEPT_S = 7 * 24 * 3600  # worker records unseen this long are dropped
IDEMPOTENCY_TTL_S = 24 * 3600


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


def hash_token(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


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
    eval_reward: float | None
    eval_cost: float | None
    feasible: bool | None
    created_at: float
    files_deleted_at: float | None = None


@dataclass
class Principal:
    """Who is calling: the client owning jobs and policies, and the token's scopes."""

    client: str
    scopes: frozenset[str] = field(default_factory=frozenset)

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def allows(self, scope: str) -> bool:
        return self.admin or scope in self.scopes


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


def _owned_by(job_id: str, attempt: int, owner: str) -> Any:
    """The fencing condition of every worker write: this attempt, this lease owner, still live."""
    return sa.and_(
        jobs.c.id == job_id, jobs.c.attempt == attempt, jobs.c.lease_owner == owner, jobs.c.status.in_(LEASED)
    )


READ_ONLY = "cvpo_read_only"  # execution option of Store._read's connections: a deferred BEGIN

# PostgreSQL advisory lock keys ("cvpo" + a number): one per kind of check-then-insert, and the schema's.
LOCK_CREATE_JOB = 0x6376706F_0001
LOCK_TOKENS = 0x6376706F_0002
LOCK_SCHEMA = 0x6376706F_0003


def _serialize(c: Connection, key: int) -> None:
    """Make this transaction's check-then-insert atomic: on PostgreSQL take a transaction-scoped advisory
    lock first, so a concurrent one waits and then sees our committed row (READ COMMITTED reads a new
    snapshot per statement); without it two requests both pass a count and both insert. SQLite needs
    nothing: ``BEGIN IMMEDIATE`` already makes every writer take its turn."""
    if c.dialect.name == "postgresql":
        c.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))


def _upsert(c: Connection, table: sa.Table, values: dict[str, Any], update: dict[str, Any]) -> None:
    """Insert ``values``, or on a primary-key conflict set ``update``: one statement, so two writers of a
    new key cannot both find no row and both insert (the second would fail on PostgreSQL)."""
    if c.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    keys = [col.name for col in table.primary_key.columns]
    c.execute(insert(table).values(**values).on_conflict_do_update(index_elements=keys, set_=update))


def _finite_json(value: Any) -> str:
    """PostgreSQL's ``json`` refuses NaN and ±Infinity (SQLite stores them): they become null, which is
    also how the API's JSON answers show them."""
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        return json.dumps(_nulled(value), allow_nan=False)


def _nulled(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nulled(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nulled(v) for v in value]
    return value


@contextmanager
def _schema_lock(engine: Engine) -> Iterator[None]:
    """One process at a time creates and migrates the schema on PostgreSQL: an API and a worker starting
    together would otherwise collide in ``CREATE TABLE`` on the catalogue's unique indexes. SQLite's
    ``BEGIN IMMEDIATE`` serialises it already."""
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as c:
        c.execute(sa.select(sa.func.pg_advisory_lock(LOCK_SCHEMA)))
        c.commit()
        try:
            yield
        finally:
            c.execute(sa.select(sa.func.pg_advisory_unlock(LOCK_SCHEMA)))
            c.commit()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            # IMMEDIATE takes the write lock up front: a read-then-write CAS never fails with
            # SQLITE_BUSY_SNAPSHOT, it waits its turn (busy_timeout) instead. Reads (Store._read)
            # open a deferred transaction: under WAL they take no lock, so token lookups and GETs
            # never queue behind the worker's heartbeats and epoch writes (issue #23 item 3).
            read_only = conn.get_execution_options().get(READ_ONLY, False)
            conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    engine = sa.create_engine(url, pool_pre_ping=True, json_serializer=_finite_json)
    if engine.dialect.name == "postgresql":
        sa.event.listen(engine, "before_cursor_execute", _nul_free_params, retval=True)
    return engine


def _nul_free_params(
    _conn: Any, _cursor: Any, statement: str, params: Any, _context: Any, _many: bool
) -> tuple[str, Any]:
    """PostgreSQL text cannot hold NUL (SQLite's can): a NUL in a bound string (an id or filter from a URL,
    ``/jobs/job_%00``) was a DataError, a 500. It becomes U+FFFD, so such a lookup finds nothing (404, as
    on SQLite) and such a value is stored instead of failing. JSON columns arrive escaped, untouched."""

    def clean(p: Any) -> Any:
        if isinstance(p, dict):
            return {k: v.replace("\x00", "\ufffd") if isinstance(v, str) and "\x00" in v else v for k, v in p.items()}
        return p

    return statement, [clean(p) for p in params] if isinstance(params, list) else clean(params)


def _migrate(engine: Engine) -> list[str]:
    """Additive migration: ``create_all`` makes missing tables but never alters existing ones, so a
    store created before a nullable column existed gets it here (``ALTER TABLE … ADD COLUMN``).
    Safe to race: an API and a worker starting together may both try; the loser re-checks."""
    added = []
    for table in metadata.sorted_tables:
        have = {c["name"] for c in sa.inspect(engine).get_columns(table.name)}
        for col in table.columns:
            if col.name in have:
                continue
            if not col.nullable:
                raise RuntimeError(f"cannot add NOT NULL column {table.name}.{col.name} to an existing store")
            ddl = f"ALTER TABLE {table.name} ADD COLUMN {col.name} {col.type.compile(engine.dialect)}"
            try:
                with engine.begin() as c:
                    c.exec_driver_sql(ddl)
                added.append(f"{table.name}.{col.name}")
            except sa.exc.SQLAlchemyError:
                if col.name not in {c["name"] for c in sa.inspect(engine).get_columns(table.name)}:
                    raise
    return added


class Store:
    """All reads and writes of jobs, metrics, checkpoints, policies, events, keys and tokens."""

    def __init__(self, url: str, data_dir: Path) -> None:
        self.url = url
        self.data_dir = Path(data_dir)
        self.engine = make_engine(url)
        with _schema_lock(self.engine):
            metadata.create_all(self.engine)
            self.migrated = _migrate(self.engine)
        self._reader = self.engine.execution_options(**{READ_ONLY: True})  # same pool, deferred BEGIN

    def _read(self) -> Connection:
        """A connection for reads only (its transaction is never committed): deferred, lock-free on SQLite."""
        return self._reader.connect()

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    def ping(self) -> bool:
        try:
            with self._read() as conn:
                conn.execute(sa.text("SELECT 1"))
            return True
        except sa.exc.SQLAlchemyError:
            return False

    # ------------------------------------------------------------------ tokens

    def ensure_token(
        self, raw: str, name: str, scopes: Iterable[str], client: str | None = None, expires_at: float | None = None
    ) -> str:
        """Register a token (idempotent); returns its id. Only the SHA-256 is stored. ``expires_at``
        (epoch seconds) applies to a new token; None never expires."""
        digest = hash_token(raw)
        with self.tx() as c:
            _serialize(c, LOCK_TOKENS)  # two processes registering the same token: one inserts, one finds it
            row = c.execute(sa.select(tokens.c.id).where(tokens.c.sha256 == digest)).first()
            if row:
                c.execute(tokens.update().where(tokens.c.id == row.id).values(scopes=sorted(scopes)))
                return row.id
            tid = new_id("tok")
            c.execute(
                tokens.insert().values(
                    id=tid,
                    sha256=digest,
                    name=name,
                    client=client or tid,
                    scopes=sorted(scopes),
                    created_at=time.time(),
                    expires_at=expires_at,
                )
            )
            return tid

    def replace_bootstrap_token(self, raw: str, name: str, previous_names: Iterable[str], client: str) -> str:
        """Register the admin bootstrap token and revoke every earlier one (tokens named in
        ``previous_names`` with another digest): rotating CVPO_API_TOKEN must not leave the old one valid."""
        digest = hash_token(raw)
        with self.tx() as c:
            c.execute(tokens.delete().where(tokens.c.name.in_(list(previous_names)), tokens.c.sha256 != digest))
        return self.ensure_token(raw, name, ["admin"], client=client)

    def create_token(
        self, name: str, scopes: Iterable[str], client: str | None = None, expires_at: float | None = None
    ) -> tuple[str, str]:
        """A new random token; ``client`` defaults to the token's own id (a client of its own).
        ``expires_at`` (epoch seconds, in the future) makes it stop working then, like a revoked one."""
        if expires_at is not None and not (math.isfinite(expires_at) and expires_at > time.time()):
            raise ValueError("the expiry must be a finite time in the future")
        scopes = list(scopes)
        unknown = set(scopes) - set(SCOPES)
        if unknown or not scopes:
            raise ValueError(f"unknown or no scopes {sorted(unknown)}; valid: {list(SCOPES)}")
        if client is not None and not client.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"client {client!r}: use letters, digits, '-' and '_'")
        # PostgreSQL enforces VARCHAR lengths (SQLite does not): too long is a clear error, not a DataError.
        for what, value, column in (("name", name, tokens.c.name), ("client", client, tokens.c.client)):
            if value is not None and not 0 < len(value) <= column.type.length:
                raise ValueError(f"the {what} must be 1 to {column.type.length} characters")
        raw = secrets.token_urlsafe(32)
        return self.ensure_token(raw, name, scopes, client, expires_at), raw

    def list_tokens(self) -> list[dict[str, Any]]:
        with self._read() as c:
            rows = c.execute(sa.select(tokens).order_by(tokens.c.created_at)).all()
        now = time.time()
        return [
            {
                "id": r.id,
                "name": r.name,
                "client": r.client,
                "scopes": r.scopes,
                "created_at": rfc3339(r.created_at),
                "expires_at": rfc3339(r.expires_at),
                "expired": r.expires_at is not None and r.expires_at <= now,
            }
            for r in rows
        ]

    def revoke_token(self, token_id: str) -> bool:
        with self.tx() as c:
            return c.execute(tokens.delete().where(tokens.c.id == token_id)).rowcount == 1

    def lookup_token(self, digest: str) -> Principal | None:
        with self._read() as c:
            # An expired token is no principal, exactly like a revoked one (issue #23 item 9). The API's
            # token cache (api/auth.py) may keep an earlier hit for its short TTL past the expiry.
            unexpired = sa.or_(tokens.c.expires_at.is_(None), tokens.c.expires_at > time.time())
            row = c.execute(sa.select(tokens).where(tokens.c.sha256 == digest, unexpired)).first()
        return Principal(row.client, frozenset(row.scopes)) if row else None

    # ------------------------------------------------------------------ events

    def _event(self, c: Connection, job_id: str, type_: str, data: dict[str, Any]) -> int:
        seq = c.execute(
            jobs.update().where(jobs.c.id == job_id).values(event_seq=jobs.c.event_seq + 1).returning(jobs.c.event_seq)
        ).scalar_one()
        c.execute(events.insert().values(job_id=job_id, seq=seq, type=type_, data=data, time=time.time()))
        if seq % 1000 == 0:
            c.execute(events.delete().where(events.c.job_id == job_id, events.c.seq <= seq - EVENTS_KEPT))
        return seq

    def log(self, job_id: str, message: str, level: str = "info") -> None:
        with self.tx() as c:
            self._event(c, job_id, "log", {"level": level, "message": message})

    def events_after(
        self, job_id: str, after_seq: int, limit: int = 500, types: Iterable[str] | None = None
    ) -> list[dict]:
        q = sa.select(events).where(events.c.job_id == job_id, events.c.seq > after_seq)
        if types:
            q = q.where(events.c.type.in_(list(types)))
        with self._read() as c:
            rows = c.execute(q.order_by(events.c.seq).limit(limit)).all()
        return [{"seq": r.seq, "type": r.type, "data": r.data, "time": rfc3339(r.time)} for r in rows]

    # ------------------------------------------------------------------ jobs: create and read

    def create_job(
        self,
        *,
        client: str,
        spec: dict[str, Any],
        config: dict[str, Any],
        max_attempts: int,
        time_limit_s: float,
        labels: dict[str, str],
        idempotency_key: str | None = None,
        body_sha256: str | None = None,
        max_active_per_client: int = 8,
        max_queued: int = 256,
    ) -> tuple[JobRecord, bool]:
        """Insert a queued job (outbox: ``enqueued_at`` stays null until sent). Returns (job, replayed)."""
        now = time.time()
        with self.tx() as c:
            # The key lookup and both cap counts decide the insert: concurrent submissions take turns.
            _serialize(c, LOCK_CREATE_JOB)
            if idempotency_key is not None:
                c.execute(idempotency.delete().where(idempotency.c.created_at < now - IDEMPOTENCY_TTL_S))
                prior = c.execute(
                    sa.select(idempotency).where(idempotency.c.client == client, idempotency.c.key == idempotency_key)
                ).first()
                if prior is not None:
                    if prior.body_sha256 != body_sha256:
                        raise IdempotencyMismatchError(
                            f"Idempotency-Key {idempotency_key!r} was used with a different body"
                        )
                    row = c.execute(sa.select(jobs).where(jobs.c.id == prior.job_id)).first()
                    if row is not None:
                        return _job(row), True
            active = c.execute(
                sa.select(sa.func.count()).where(jobs.c.client == client, jobs.c.status.in_(ACTIVE))
            ).scalar_one()
            if active >= max_active_per_client:
                raise CapExceededError(f"client has {active} unfinished jobs (cap {max_active_per_client})", 429, 30)
            queued = c.execute(sa.select(sa.func.count()).where(jobs.c.status == "queued")).scalar_one()
            if queued >= max_queued:
                raise CapExceededError(f"{queued} jobs are queued (cap {max_queued}); try later", 503, 30)
            job_id = new_id("job")
            run_dir = self.data_dir / "jobs" / job_id
            c.execute(
                jobs.insert().values(
                    id=job_id,
                    client=client,
                    status="queued",
                    attempt=1,
                    max_attempts=max_attempts,
                    env_id=spec["env_id"],
                    spec=spec,
                    config=config,
                    labels=labels,
                    time_limit_s=time_limit_s,
                    created_at=now,
                    updated_at=now,
                    cancel_requested=False,
                    requeue_requested=False,
                    total_env_steps=int(spec["total_env_steps"]),
                    env_step=0,
                    epoch=0,
                    run_dir=str(run_dir),
                    event_seq=0,
                )
            )
            self._event(c, job_id, "status", {"status": "queued", "attempt": 1})
            if idempotency_key is not None:
                c.execute(
                    idempotency.insert().values(
                        client=client, key=idempotency_key, body_sha256=body_sha256, job_id=job_id, created_at=now
                    )
                )
            return _job(c.execute(sa.select(jobs).where(jobs.c.id == job_id)).one()), False

    def idempotent_job_id(self, client: str, key: str) -> str | None:
        """The job an unexpired ``Idempotency-Key`` of this client created, if any (its replay answers it)."""
        with self._read() as c:
            return c.execute(
                sa.select(idempotency.c.job_id).where(
                    idempotency.c.client == client,
                    idempotency.c.key == key,
                    idempotency.c.created_at >= time.time() - IDEMPOTENCY_TTL_S,
                )
            ).scalar_one_or_none()

    def get_job(self, job_id: str, client: str | None = None) -> JobRecord:
        """The job, or NotFoundError (also for another client's job: no existence leak)."""
        with self._read() as c:
            return _job(_find_job(c, job_id, client))

    def list_jobs(
        self,
        *,
        client: str | None,
        status: str | None = None,
        env_id: str | None = None,
        page_size: int = 50,
        page_token: str | None = None,
    ) -> tuple[list[JobRecord], str | None]:
        """Newest first, cursor-paged."""
        return self._page(jobs, _job, {"client": client, "status": status, "env_id": env_id}, page_size, page_token)

    def jobs_by_status(self) -> dict[str, int]:
        with self._read() as c:
            rows = c.execute(sa.select(jobs.c.status, sa.func.count()).group_by(jobs.c.status)).all()
        counts = dict.fromkeys(STATUSES, 0)
        counts.update({r[0]: r[1] for r in rows})
        return counts

    def oldest_heartbeat_age(self) -> float | None:
        """``now - min(lease_until)`` over live jobs (add the TTL for the age of the stalest renewal)."""
        with self._read() as c:
            row = c.execute(
                sa.select(sa.func.min(jobs.c.lease_until)).where(jobs.c.status.in_(LEASED))
            ).scalar_one_or_none()
        return None if row is None else time.time() - row

    def delete_job(self, job_id: str, client: str | None) -> None:
        with self.tx() as c:
            row = _find_job(c, job_id, client, lock=True)
            if row.status not in TERMINAL:
                raise ConflictError(f"job {job_id} is {row.status}; cancel it first")
            for table in (metric_points, checkpoints, events):
                c.execute(table.delete().where(table.c.job_id == job_id))
            c.execute(jobs.delete().where(jobs.c.id == job_id))
        # Policies promoted from it live on in their own directories; the run directory goes.
        shutil.rmtree(row.run_dir, ignore_errors=True)

    # ------------------------------------------------------------------ the state machine

    def _transition(
        self,
        c: Connection,
        job_id: str,
        from_statuses: Iterable[str],
        to: str,
        *,
        attempt: int | None = None,
        owner: str | None = None,
        values: dict[str, Any] | None = None,
        event: dict[str, Any] | None = None,
    ) -> bool:
        froms = [s for s in from_statuses if (s, to) in TRANSITIONS]
        if not froms:
            raise ValueError(f"no transition to {to!r} from {list(from_statuses)}")
        now = time.time()
        vals = {"status": to, "updated_at": now, **(values or {})}
        if to in TERMINAL:
            vals.setdefault("finished_at", now)
            vals.setdefault("lease_owner", None)
            vals.setdefault("lease_until", None)
        q = jobs.update().where(jobs.c.id == job_id, jobs.c.status.in_(froms))
        if attempt is not None:
            q = q.where(jobs.c.attempt == attempt)
        if owner is not None:
            q = q.where(jobs.c.lease_owner == owner)
        if c.execute(q.values(**vals)).rowcount != 1:
            return False
        self._event(c, job_id, "status", {"status": to, **(event or {})})
        return True

    def transition(self, job_id: str, from_statuses: Iterable[str], to: str, **kw: Any) -> bool:
        with self.tx() as c:
            return self._transition(c, job_id, list(from_statuses), to, **kw)

    def mark_enqueued(self, job_id: str, attempt: int) -> None:
        with self.tx() as c:
            c.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.attempt == attempt, jobs.c.status == "queued")
                .values(enqueued_at=time.time())
            )

    def claim(self, job_id: str, attempt: int, owner: str, ttl_s: float) -> bool:
        """queued → starting for exactly this attempt; every duplicate message fails here (§3.3)."""
        now = time.time()
        with self.tx() as c:
            return self._transition(
                c,
                job_id,
                ["queued"],
                "starting",
                attempt=attempt,
                values={
                    "lease_owner": owner,
                    "lease_until": now + ttl_s,
                    "started_at": now,
                    "requeue_requested": False,
                },
                event={"attempt": attempt, "worker": owner},
            )

    def heartbeat(
        self, job_id: str, attempt: int, owner: str, ttl_s: float, progress: dict[str, Any] | None = None
    ) -> JobRecord | None:
        """Renew the lease; None means we lost it and must stop without writing (fencing).

        ``progress`` ({"env_step", "env_steps_per_s", "phase"}) moves the job's progress between epoch
        ends (env_step never goes back) and becomes a ``progress`` event for the job's stream.
        """
        values: dict[str, Any] = {"lease_until": time.time() + ttl_s}
        if progress is not None:
            step = int(progress["env_step"])
            values["env_step"] = sa.case((jobs.c.env_step < step, step), else_=jobs.c.env_step)
            values["phase"] = progress.get("phase")
            if progress.get("env_steps_per_s") is not None:
                values["steps_per_s"] = float(progress["env_steps_per_s"])
        with self.tx() as c:
            n = c.execute(jobs.update().where(_owned_by(job_id, attempt, owner)).values(**values)).rowcount
            if n != 1:
                return None
            if progress is not None:
                self._event(c, job_id, "progress", dict(progress))
            return _job(c.execute(sa.select(jobs).where(jobs.c.id == job_id)).one())

    def _owned(self, c: Connection, job_id: str, attempt: int, owner: str) -> Any:
        """The job's row if this attempt still owns it, locked until commit on PostgreSQL: the writes that
        follow must not race a requeue or a cancel that changes it in between (SQLite: BEGIN IMMEDIATE)."""
        return c.execute(sa.select(jobs).where(_owned_by(job_id, attempt, owner)).with_for_update()).first()

    def begin_attempt(self, job_id: str, attempt: int, owner: str, resumed_epoch: int) -> bool:
        """starting → running; drops metric points a lost attempt wrote after our checkpoint."""
        with self.tx() as c:
            if self._owned(c, job_id, attempt, owner) is None:
                return False
            c.execute(
                metric_points.delete().where(metric_points.c.job_id == job_id, metric_points.c.epoch >= resumed_epoch)
            )
            c.execute(jobs.update().where(jobs.c.id == job_id).values(epoch=resumed_epoch, updated_at=time.time()))
            if resumed_epoch > 0:
                self._event(c, job_id, "attempt", {"attempt": attempt, "resumed_from_epoch": resumed_epoch})
            job = c.execute(sa.select(jobs.c.status).where(jobs.c.id == job_id)).scalar_one()
            if job == "starting":
                return self._transition(c, job_id, ["starting"], "running", attempt=attempt, owner=owner)
            return True  # already cancelling: the loop will stop at its first epoch end

    def record_epoch(self, job_id: str, attempt: int, owner: str, metrics: dict[str, Any]) -> JobRecord | None:
        """Metric point and the job's ``latest``/progress in one transaction (§1.4); None if fenced."""
        now = time.time()
        with self.tx() as c:
            if self._owned(c, job_id, attempt, owner) is None:
                return None
            epoch = int(metrics["epoch"])
            c.execute(metric_points.delete().where(metric_points.c.job_id == job_id, metric_points.c.epoch >= epoch))
            c.execute(
                metric_points.insert().values(
                    job_id=job_id,
                    epoch=epoch,
                    attempt=attempt,
                    env_step=int(metrics["env_steps"]),
                    time=now,
                    values=metrics,
                )
            )
            latest = latest_view(metrics)
            best = metrics.get("best")
            c.execute(
                jobs.update()
                .where(jobs.c.id == job_id)
                .values(
                    env_step=int(metrics["env_steps"]),
                    epoch=epoch + 1,
                    steps_per_s=metrics.get("env_steps_per_s"),
                    latest=latest,
                    best=best,
                    updated_at=now,
                )
            )
            self._event(c, job_id, "metrics", {"epoch": epoch, "env_step": int(metrics["env_steps"]), **latest})
            return _job(c.execute(sa.select(jobs).where(jobs.c.id == job_id)).one())

    def register_checkpoint(
        self, job_id: str, attempt: int, owner: str, path: Path, artefact_path: Path | None, metrics: dict | None
    ) -> str | None:
        """Record a checkpoint written by the current attempt; None if fenced."""
        m = metrics or {}
        with self.tx() as c:
            row = self._owned(c, job_id, attempt, owner)
            if row is None:
                return None
            ckpt_id = new_id("ckpt")
            c.execute(
                checkpoints.insert().values(
                    id=ckpt_id,
                    job_id=job_id,
                    attempt=attempt,
                    epoch=int(m.get("epoch", row.epoch - 1)),
                    env_step=int(m.get("env_steps", row.env_step)),
                    path=str(path),
                    artefact_path=str(artefact_path) if artefact_path else None,
                    eval_reward=m.get("eval_return"),
                    eval_cost=m.get("eval_cost"),
                    feasible=m.get("feasible"),
                    created_at=time.time(),
                )
            )
            self._event(c, job_id, "checkpoint", {"checkpoint_id": ckpt_id, "env_step": int(m.get("env_steps", 0))})
            return ckpt_id

    def finish(
        self,
        job_id: str,
        attempt: int,
        owner: str,
        to: str,
        *,
        failure: dict[str, str] | None = None,
        policy_id: str | None = None,
        promotion: dict[str, Any] | None = None,
    ) -> bool:
        """End this attempt in a terminal state (or back to ``queued`` for a graceful shutdown)."""
        values: dict[str, Any] = {}
        if failure is not None:
            values["failure"] = failure
        if policy_id is not None:
            values["policy_id"] = policy_id
        if promotion is not None:
            values["promotion"] = promotion
        if to == "queued":
            values.update({"lease_owner": None, "lease_until": None, "enqueued_at": None, "requeue_requested": False})
        froms = {
            "succeeded": ["running", "cancelling"],
            "failed": LEASED,
            "cancelled": ["cancelling"],
            "queued": LEASED,
        }
        with self.tx() as c:
            return self._transition(
                c, job_id, froms[to], to, attempt=attempt, owner=owner, values=values, event={"failure": failure}
            )

    def request_cancel(self, job_id: str, client: str | None) -> str:
        """Queued → cancelled now; live → cancelling (the loop stops within an epoch). Returns the status."""
        with self.tx() as c:
            row = _find_job(c, job_id, client, lock=True)
            if row.status in ("cancelling", "cancelled"):
                return row.status  # repeat cancel is idempotent
            if row.status in TERMINAL:
                raise ConflictError(f"job {job_id} already {row.status}")
            if row.status == "queued":
                self._transition(c, job_id, ["queued"], "cancelled", attempt=row.attempt)
                return "cancelled"
            c.execute(jobs.update().where(jobs.c.id == job_id).values(cancel_requested=True))
            self._transition(c, job_id, [row.status], "cancelling", attempt=row.attempt)
            return "cancelling"

    def request_requeue(self, owner_prefix: str) -> int:
        """Ask every job leased by a shutting-down worker to checkpoint and go back to the queue."""
        with self.tx() as c:
            return c.execute(
                jobs.update()
                .where(jobs.c.status.in_(("starting", "running")), jobs.c.lease_owner.like(f"{owner_prefix}%"))
                .values(requeue_requested=True)
            ).rowcount

    # ------------------------------------------------------------------ workers and the queue (issue #23 items 12, 13)

    def register_worker(self, worker_id: str, queue: str, capabilities: dict[str, Any]) -> None:
        """Announce a worker and what it can run (``{"cuda": bool, ...}``), so the API can refuse a job no
        live worker could run and tell a queued job whether anyone is there to take it. An upsert:
        a restarted worker with the same id is live again. Records unseen for a week are dropped."""
        now = time.time()
        values = {"queue": queue, "capabilities": capabilities, "seen_at": now, "stopped_at": None}
        with self.tx() as c:
            c.execute(workers.delete().where(workers.c.seen_at < now - WORKERS_KEPT_S))
            _upsert(c, workers, {"id": worker_id, "started_at": now, **values}, values)

    def worker_seen(self, worker_id: str) -> bool:
        """Renew a live worker's ``seen_at``; False when it has no record (dropped): register again."""
        with self.tx() as c:
            return (
                c.execute(
                    workers.update()
                    .where(workers.c.id == worker_id, workers.c.stopped_at.is_(None))
                    .values(seen_at=time.time())
                ).rowcount
                == 1
            )

    def worker_stopped(self, worker_id: str) -> None:
        """A graceful stop: the worker is no longer live at once (a killed one ages out instead)."""
        now = time.time()
        with self.tx() as c:
            c.execute(workers.update().where(workers.c.id == worker_id).values(seen_at=now, stopped_at=now))

    def get_worker(self, worker_id: str) -> dict[str, Any] | None:
        with self._read() as c:
            row = c.execute(sa.select(workers).where(workers.c.id == worker_id)).first()
        return dict(row._mapping) if row else None

    def live_workers(self, queue: str, stale_after_s: float, now: float | None = None) -> list[dict[str, Any]]:
        """Workers consuming ``queue`` that renewed their record within ``stale_after_s`` and did not stop."""
        now = time.time() if now is None else now
        with self._read() as c:
            rows = c.execute(
                sa.select(workers).where(
                    workers.c.queue == queue, workers.c.stopped_at.is_(None), workers.c.seen_at >= now - stale_after_s
                )
            ).all()
        return [dict(r._mapping) for r in rows]

    def worker_summary(self, queue: str, stale_after_s: float, now: float | None = None) -> dict[str, Any]:
        """Who is there to run ``queue``'s jobs: live workers, how many have CUDA, when any worker was last
        seen and, when none is live, for how long (None: a live one, or none ever registered). Cheap
        enough for a probe: ``/readyz`` may show it next to ``GET /jobs/{id}``'s ``queue`` block."""
        now = time.time() if now is None else now
        with self._read() as c:
            rows = c.execute(sa.select(workers).where(workers.c.queue == queue)).all()
        live = [r for r in rows if r.stopped_at is None and r.seen_at >= now - stale_after_s]
        last_seen = max((r.seen_at for r in rows), default=None)
        return {
            "queue": queue,
            "workers": len(live),
            "cuda_workers": sum(1 for r in live if (r.capabilities or {}).get("cuda")),
            "workers_seen_at": rfc3339(last_seen),
            "no_worker_for_s": None if live or last_seen is None else round(max(now - last_seen, 0.0), 3),
            "ever_seen": last_seen is not None,
        }

    def queue_position(self, job: JobRecord) -> dict[str, int] | None:
        """Where a queued job stands: jobs are taken in the order they were handed to the broker
        (``enqueued_at``), those still in the outbox after them by creation. None unless queued."""
        if job.status != "queued":
            return None
        queued = jobs.c.status == "queued"
        if job.enqueued_at is None:
            before = sa.or_(jobs.c.enqueued_at.is_not(None), jobs.c.seq < job.seq)
        else:
            before = sa.and_(
                jobs.c.enqueued_at.is_not(None),
                sa.or_(
                    jobs.c.enqueued_at < job.enqueued_at,
                    sa.and_(jobs.c.enqueued_at == job.enqueued_at, jobs.c.seq < job.seq),
                ),
            )
        with self._read() as c:
            ahead = c.execute(sa.select(sa.func.count()).where(queued, before, jobs.c.id != job.id)).scalar_one()
            running = c.execute(sa.select(sa.func.count()).where(jobs.c.status.in_(LEASED))).scalar_one()
        return {"position": ahead + 1, "ahead": ahead, "running": running}

    def hand_back(self, job_id: str, attempt: int) -> bool:
        """A worker that cannot run this queued attempt (no CUDA) leaves it unclaimed and back in the outbox:
        the reconciler sends it again after CVPO_OUTBOX_GRACE_S, for a worker that can."""
        with self.tx() as c:
            return (
                c.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id, jobs.c.attempt == attempt, jobs.c.status == "queued")
                    .values(enqueued_at=None, updated_at=time.time())
                ).rowcount
                == 1
            )

    # ------------------------------------------------------------------ reconciler queries

    def expired_leases(self, now: float) -> list[JobRecord]:
        with self._read() as c:
            rows = c.execute(sa.select(jobs).where(jobs.c.status.in_(LEASED), jobs.c.lease_until < now)).all()
        return [_job(r) for r in rows]

    def requeue_lost(self, job: JobRecord) -> bool:
        """A lost attempt: back to queued with ``attempt + 1`` (CAS on the attempt we saw)."""
        with self.tx() as c:
            return self._transition(
                c,
                job.id,
                [job.status],
                "queued",
                attempt=job.attempt,
                values={
                    "attempt": job.attempt + 1,
                    "lease_owner": None,
                    "lease_until": None,
                    "enqueued_at": None,
                },
                event={"attempt": job.attempt + 1, "reason": "worker_lost"},
            )

    def unsent(self, created_before: float) -> list[JobRecord]:
        """Queued jobs whose message was never handed to the broker (the outbox)."""
        with self._read() as c:
            rows = c.execute(
                sa.select(jobs).where(
                    jobs.c.status == "queued", jobs.c.enqueued_at.is_(None), jobs.c.updated_at <= created_before
                )
            ).all()
        return [_job(r) for r in rows]

    def queued_jobs(self) -> list[JobRecord]:
        with self._read() as c:
            rows = c.execute(sa.select(jobs).where(jobs.c.status == "queued")).all()
        return [_job(r) for r in rows]

    def get_kv(self, key: str) -> Any:
        with self._read() as c:
            return c.execute(sa.select(kv.c.value).where(kv.c.key == key)).scalar_one_or_none()

    def set_kv(self, key: str, value: Any) -> None:
        with self.tx() as c:  # API processes' reconcilers may write the same key at once
            _upsert(c, kv, {"key": key, "value": value}, {"value": value})

    # ------------------------------------------------------------------ metrics and checkpoints

    def metric_history(self, job_id: str, after_step: int | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        q = sa.select(metric_points).where(metric_points.c.job_id == job_id)
        if after_step is not None:
            q = q.where(metric_points.c.env_step > after_step)
        with self._read() as c:
            rows = c.execute(q.order_by(metric_points.c.epoch).limit(limit)).all()
        return [
            {
                "env_step": r.env_step,
                "epoch": r.epoch,
                "attempt": r.attempt,
                "time": rfc3339(r.time),
                "values": r.values,
            }
            for r in rows
        ]

    def list_checkpoints(self, job_id: str) -> list[CheckpointRecord]:
        with self._read() as c:
            rows = c.execute(
                sa.select(checkpoints).where(checkpoints.c.job_id == job_id).order_by(checkpoints.c.seq)
            ).all()
        return [_checkpoint(r) for r in rows]

    def retire_checkpoints(
        self, job_id: str, attempt: int, owner: str, ids: Iterable[str]
    ) -> list[CheckpointRecord] | None:
        """Mark these checkpoints' files deleted (retention, issue #23 item 11) before the worker deletes
        them, so no row that resume trusts ever points at a half-deleted directory; promoted ones are
        skipped. Returns the rows marked now; None if fenced."""
        wanted = list(ids)
        with self.tx() as c:
            if self._owned(c, job_id, attempt, owner) is None:
                return None
            if not wanted:
                return []
            promoted = sa.select(policies.c.checkpoint_id).where(
                policies.c.job_id == job_id, policies.c.checkpoint_id.is_not(None)
            )
            which = sa.and_(
                checkpoints.c.job_id == job_id,
                checkpoints.c.id.in_(wanted),
                checkpoints.c.files_deleted_at.is_(None),
                checkpoints.c.id.not_in(promoted),
            )
            rows = c.execute(sa.select(checkpoints).where(which).order_by(checkpoints.c.seq)).all()
            if rows:
                ids_now = [r.id for r in rows]
                c.execute(
                    checkpoints.update().where(checkpoints.c.id.in_(ids_now)).values(files_deleted_at=time.time())
                )
        return [_checkpoint(r) for r in rows]

    def promoted_checkpoint_ids(self, job_id: str) -> set[str]:
        """Checkpoints of this job that a policy was promoted from (retention keeps their files)."""
        with self._read() as c:
            q = sa.select(policies.c.checkpoint_id).where(
                policies.c.job_id == job_id, policies.c.checkpoint_id.is_not(None)
            )
            return set(c.execute(q).scalars())

    def record_disk_usage(self, job_id: str, attempt: int, owner: str, nbytes: int) -> bool:
        """The run directory's size as the worker measured it (fenced: a lost attempt writes nothing)."""
        with self.tx() as c:
            if self._owned(c, job_id, attempt, owner) is None:
                return False
            c.execute(
                jobs.update().where(jobs.c.id == job_id).values(disk_bytes=int(nbytes), disk_measured_at=time.time())
            )
            return True

    def disk_usage(self, client: str | None = None) -> dict[str, int]:
        """{job id: run directory bytes} of the jobs a worker measured (one client's, or all for None)."""
        q = sa.select(jobs.c.id, jobs.c.disk_bytes).where(jobs.c.disk_bytes.is_not(None))
        if client is not None:
            q = q.where(jobs.c.client == client)
        with self._read() as c:
            return {r.id: int(r.disk_bytes) for r in c.execute(q)}

    # ------------------------------------------------------------------ policies

    def resolve_artefact(self, job: JobRecord, source: str) -> tuple[str | None, Path]:
        """(checkpoint id or None for "best"/"served", artefact directory) of a promotion source; NotFoundError.

        "served" is the policy the finished run hands out as ``policy/`` (with ``loop.select =
        "validated"`` the epoch its validation layouts chose, docs/safety-margin.md).
        """
        ckpt_id: str | None = None
        if source in ("best", "served"):
            artefact = Path(job.run_dir) / ("best_policy" if source == "best" else "policy")
        else:
            ckpts = [ck for ck in self.list_checkpoints(job.id) if ck.artefact_path]
            if source == "final":
                if not ckpts:
                    raise NotFoundError(f"job {job.id} has no checkpoint yet")
                chosen = ckpts[-1]
            else:
                found = [ck for ck in ckpts if ck.id == source]
                if not found:
                    raise NotFoundError(f"job {job.id} has no checkpoint {source!r}")
                chosen = found[0]
            ckpt_id, artefact = chosen.id, Path(chosen.artefact_path or "")
        if not (artefact / "policy.json").is_file():
            raise NotFoundError(f"job {job.id} has no {source!r} policy artefact yet")
        return ckpt_id, artefact

    def promote(
        self,
        *,
        job: JobRecord,
        source: str,
        client: str,
        shield: dict[str, Any] | None = None,
        validate_shield: Any = None,
        certificate: dict[str, Any] | None = None,
        override: dict[str, Any] | None = None,
    ) -> PolicyRecord:
        """Copy an artefact into an immutable policy directory and register it with its certificate.

        ``source`` is ``"best"`` (the best-feasible artefact), ``"served"`` (the run's ``policy/``),
        ``"final"`` (the newest checkpoint's) or a checkpoint id. ``validate_shield(spec, meta)``
        returns the normalised spec or raises.
        ``certificate`` is the artefact's (``Certificate.to_dict()``); the policy is ``certified``
        exactly when it says so. ``override`` ({"reason", "actor"}) records an admin's promotion of
        an uncertified checkpoint. The gate itself is the caller's (worker, API route).
        """
        from cvpo.artefact import ArtefactError, load_policy  # numpy only

        ckpt_id, artefact = self.resolve_artefact(job, source)
        try:
            runtime = load_policy(artefact)
        except ArtefactError as exc:
            raise ConflictError(f"artefact for {source!r} is unusable: {exc}") from exc
        if shield is not None and validate_shield is not None:
            shield = validate_shield(shield, runtime.meta)  # may normalise ({"type": "none"} → None)
        policy_id = new_id("pol")
        dest = self.data_dir / "policies" / policy_id
        tmp = dest.with_name(f".tmp-{policy_id}")
        shutil.copytree(artefact, tmp)
        tmp.rename(dest)
        raw_meta = (dest / "policy.json").read_bytes()
        meta = json.loads(raw_meta)
        if certificate is not None and certificate.get("artefact_sha256") != meta["weights_sha256"]:
            shutil.rmtree(dest, ignore_errors=True)
            raise ConflictError(f"the certificate is for another artefact than {source!r}'s")
        if certificate is not None:
            (dest / "certificate.json").write_text(json.dumps(certificate, indent=2) + "\n")
        certified = bool(certificate and certificate.get("certified"))
        # An override only means something for a checkpoint that did not certify.
        override = {**override, "at": rfc3339(time.time())} if override is not None and not certified else None
        now = time.time()
        with self.tx() as c:
            c.execute(
                policies.insert().values(
                    id=policy_id,
                    client=client,
                    job_id=job.id,
                    checkpoint_id=ckpt_id,
                    env_id=meta["env_id"],
                    path=str(dest),
                    sha256=meta["weights_sha256"],
                    shield=shield,
                    meta=meta,
                    created_at=now,
                    ready=True,
                    certificate=certificate,
                    certified=certified if certificate is not None else None,
                    override=override,
                    meta_sha256=hashlib.sha256(raw_meta).hexdigest(),  # policy.json as promoted (item 10)
                )
            )
            row = c.execute(sa.select(policies).where(policies.c.id == policy_id)).one()
        return _policy(row)

    def create_policy_from_artefact(
        self,
        artefact: Path,
        client: str,
        shield: dict[str, Any] | None = None,
        job_id: str | None = None,
        certificate: dict[str, Any] | None = None,
    ) -> PolicyRecord:
        """Register an artefact directory that already lies in its final place (tests, benchmarks)."""
        raw_meta = (Path(artefact) / "policy.json").read_bytes()
        meta = json.loads(raw_meta)
        policy_id = new_id("pol")
        with self.tx() as c:
            c.execute(
                policies.insert().values(
                    id=policy_id,
                    client=client,
                    job_id=job_id,
                    checkpoint_id=None,
                    env_id=meta["env_id"],
                    path=str(artefact),
                    sha256=meta["weights_sha256"],
                    shield=shield,
                    meta=meta,
                    created_at=time.time(),
                    ready=True,
                    certificate=certificate,
                    certified=None if certificate is None else bool(certificate.get("certified")),
                    meta_sha256=hashlib.sha256(raw_meta).hexdigest(),
                )
            )
            return _policy(c.execute(sa.select(policies).where(policies.c.id == policy_id)).one())

    def get_policy(self, policy_id: str) -> PolicyRecord | None:
        with self._read() as c:
            row = c.execute(sa.select(policies).where(policies.c.id == policy_id)).first()
        return _policy(row) if row else None

    def set_policy_ready(self, policy_id: str, ready: bool) -> None:
        with self.tx() as c:
            c.execute(policies.update().where(policies.c.id == policy_id).values(ready=ready))

    def policy_ids(self, client: str) -> set[str]:
        """The ids of one client's policies (for filtering what a tenant may see)."""
        with self._read() as c:
            return set(c.execute(sa.select(policies.c.id).where(policies.c.client == client)).scalars())

    def list_policies(
        self,
        *,
        client: str | None,
        env_id: str | None = None,
        job_id: str | None = None,
        page_size: int = 50,
        page_token: str | None = None,
    ) -> tuple[list[PolicyRecord], str | None]:
        filters = {"client": client, "env_id": env_id, "job_id": job_id}
        return self._page(policies, _policy, filters, page_size, page_token)

    # ------------------------------------------------------------------ evaluations

    def create_evaluation(self, policy_id: str, client: str, params: dict[str, Any]) -> EvaluationRecord:
        eval_id = new_id("eval")
        with self.tx() as c:
            c.execute(
                evaluations.insert().values(
                    id=eval_id,
                    policy_id=policy_id,
                    client=client,
                    status="queued",
                    params=params,
                    created_at=time.time(),
                )
            )
            return _evaluation(c.execute(sa.select(evaluations).where(evaluations.c.id == eval_id)).one())

    def get_evaluation(self, eval_id: str, policy_id: str | None = None) -> EvaluationRecord | None:
        q = sa.select(evaluations).where(evaluations.c.id == eval_id)
        if policy_id is not None:
            q = q.where(evaluations.c.policy_id == policy_id)
        with self._read() as c:
            row = c.execute(q).first()
        return _evaluation(row) if row else None

    def list_evaluations(
        self, policy_id: str, page_size: int = 50, page_token: str | None = None
    ) -> tuple[list[EvaluationRecord], str | None]:
        return self._page(evaluations, _evaluation, {"policy_id": policy_id}, page_size, page_token)

    def claim_evaluation(self, eval_id: str, worker: str) -> bool:
        """queued → running, once: a redelivered message finds it taken."""
        with self.tx() as c:
            return (
                c.execute(
                    evaluations.update()
                    .where(evaluations.c.id == eval_id, evaluations.c.status == "queued")
                    .values(status="running", worker=worker, started_at=time.time())
                ).rowcount
                == 1
            )

    def finish_evaluation(
        self, eval_id: str, *, result: dict[str, Any] | None = None, error: dict[str, Any] | None = None
    ) -> None:
        with self.tx() as c:
            c.execute(
                evaluations.update()
                .where(evaluations.c.id == eval_id, evaluations.c.status == "running")
                .values(
                    status="failed" if error is not None else "succeeded",
                    result=result,
                    error=error,
                    finished_at=time.time(),
                )
            )

    def _page(
        self, table: sa.Table, convert: Any, filters: dict[str, Any], page_size: int, page_token: str | None
    ) -> tuple[list[Any], str | None]:
        """Newest first by ``seq``; equality filters skip None; the token is the last seq returned."""
        q = sa.select(table)
        for column, value in filters.items():
            if value is not None:
                q = q.where(table.c[column] == value)
        cursor = decode_cursor(page_token)
        if cursor is not None:
            q = q.where(table.c.seq < cursor)
        with self._read() as c:
            rows = c.execute(q.order_by(table.c.seq.desc()).limit(page_size + 1)).all()
        items = [convert(r) for r in rows[:page_size]]
        return items, (_encode_cursor(items[-1].seq) if len(rows) > page_size and items else None)


def latest_view(metrics: dict[str, Any]) -> dict[str, Any]:
    """The job resource's ``latest`` block from one epoch's engine metrics (service-design.md §1.3)."""
    limits = metrics.get("cost_limits") or []
    lams = metrics.get("cost_multipliers") or []
    means = [metrics[f"cost_multiplier_{i}"] for i in range(len(lams)) if f"cost_multiplier_{i}" in metrics]
    return {
        "epoch": metrics.get("epoch"),
        "train_reward": metrics.get("train_return"),
        "train_cost": metrics.get("train_cost"),
        "eval_reward": metrics.get("eval_return"),
        "eval_cost": metrics.get("eval_cost"),
        "cost_limit": limits[0] if limits else None,
        "cost_limits": limits,
        "feasible": metrics.get("feasible"),
        "lagrange_multiplier": lams[0] if lams else None,  # after the epoch's last E-step
        "lagrange_multipliers": lams,
        # The E-step solves λ per minibatch, so its last value often sits at a dual bound; the mean
        # over the epoch's updates is the one to watch.
        "lagrange_multiplier_mean": means[0] if means else None,
        "lagrange_multipliers_mean": means,
        "temperature": metrics.get("temperature_last"),
        # Trust signals (issue "Safe by default"): the constraint binds the sampled policy, the service
        # serves the mean one; these say how far apart they are and how well the cost critic predicts.
        "eval_reward_stochastic": metrics.get("eval_return_stochastic"),
        "eval_cost_stochastic": metrics.get("eval_cost_stochastic"),
        "policy_std": metrics.get("policy_std"),
        "margin": metrics.get("margin"),
        "effective_cost_limits": metrics.get("effective_cost_limits") or [],
        "probe_cost": metrics.get("probe_cost"),
        "critic_cost_predicted": metrics.get("critic_cost_predicted"),
        "critic_cost_realised": metrics.get("critic_cost_realised"),
        "lambda_at_floor_share": metrics.get("lambda_at_floor_0"),
        "lambda_at_cap_share": metrics.get("lambda_at_cap_0"),
        "estep_kl_max": metrics.get("estep_kl_max"),
        # loop.select = "validated" (docs/safety-margin.md): this epoch's validation numbers, the epoch
        # chosen so far, and on the last epoch the chosen policy's evaluation numbers.
        "validation_reward": metrics.get("validation_return"),
        "validation_cost": metrics.get("validation_cost"),
        "validation_cost_bound": metrics.get("validation_cost_bound"),
        "selected_epoch": (metrics.get("selected") or {}).get("epoch"),
        "served_epoch": metrics.get("served_epoch"),
        "served_eval_reward": metrics.get("served_eval_return"),
        "served_eval_cost": metrics.get("served_eval_cost"),
    }
