"""The store's schema and engine: every table, the engine factory (SQLite's ``BEGIN IMMEDIATE``,
PostgreSQL's NUL-free parameters), the additive migration, and the concurrency helpers every writer
shares (``_serialize``'s advisory locks, ``_upsert``, NaN-free JSON). Nothing here knows what a job is."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

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
    sa.Column("eval_return", sa.Float),  # "eval_reward" before December 2026 (RENAMED_COLUMNS)
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

# Aliases (issue #20): a client's stable name for one of its policies (``production``, ``arm-3``) that
# controllers act through, and every change of its target, newest last. ``head_seq`` is the event that
# made the current target (its ``parent_seq`` chain is the rollback stack: core/store/alias_store.py).
aliases = sa.Table(
    "aliases",
    metadata,
    sa.Column("seq", BigInt, primary_key=True, autoincrement=True),
    sa.Column("client", sa.String(64), nullable=False),
    sa.Column("name", sa.String(63), nullable=False),
    sa.Column("policy_id", sa.String(40), nullable=False),
    sa.Column("version", BigInt, nullable=False),
    sa.Column("head_seq", BigInt, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.UniqueConstraint("client", "name", name="uq_aliases_client_name"),
)

alias_events = sa.Table(
    "alias_events",
    metadata,
    sa.Column("seq", BigInt, primary_key=True, autoincrement=True),
    sa.Column("client", sa.String(64), nullable=False),
    sa.Column("alias", sa.String(63), nullable=False),
    sa.Column("action", sa.String(16), nullable=False),  # "set" or "rollback"
    sa.Column("from_policy", sa.String(40)),  # null when the alias was created
    sa.Column("to_policy", sa.String(40), nullable=False),
    sa.Column("version", BigInt, nullable=False),
    sa.Column("parent_seq", BigInt),  # the event a rollback from this one returns to; null: none
    sa.Column("actor", sa.String(64), nullable=False),  # the caller's client
    sa.Column("actor_token", sa.String(40)),  # and token id and name (null for the local admin)
    sa.Column("actor_name", sa.String(200)),
    sa.Column("reason", sa.String(1000)),
    sa.Column("certified", sa.Boolean, nullable=False),  # the target's certificate certified it
    sa.Column("override_reason", sa.String(1000)),  # an admin pointed it at an uncertified policy: why
    sa.Column("time", sa.Float, nullable=False),
    sa.Index("ix_alias_events_client_alias_seq", "client", "alias", "seq"),
)

kv = sa.Table(
    "kv",
    metadata,
    sa.Column("key", sa.String(100), primary_key=True),
    sa.Column("value", sa.JSON),
)


READ_ONLY = "cvpo_read_only"  # execution option of Store._read's connections: a deferred BEGIN

# PostgreSQL advisory lock keys ("cvpo" + a number): one per kind of check-then-insert, and the schema's.
LOCK_CREATE_JOB = 0x6376706F_0001
LOCK_TOKENS = 0x6376706F_0002
LOCK_SCHEMA = 0x6376706F_0003
LOCK_ALIASES = 0x6376706F_0004


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


# (table, old name) → new name: columns renamed since a store could have been created. Metric names
# follow cvpo/metrics.py ("return", not "reward").
RENAMED_COLUMNS = {("checkpoints", "eval_reward"): "eval_return"}


def _migrate(engine: Engine) -> list[str]:
    """Additive migration: ``create_all`` makes missing tables but never alters existing ones, so a
    store created before a nullable column existed gets it here (``ALTER TABLE … ADD COLUMN``), and
    a renamed column is renamed in place (``RENAME COLUMN``, values kept; SQLite ≥ 3.25, PostgreSQL).
    Safe to race: an API and a worker starting together may both try; the loser re-checks."""
    added = []
    for (table_name, old), new in RENAMED_COLUMNS.items():
        have = {c["name"] for c in sa.inspect(engine).get_columns(table_name)}
        if old not in have or new in have:
            continue
        try:
            with engine.begin() as c:
                c.exec_driver_sql(f"ALTER TABLE {table_name} RENAME COLUMN {old} TO {new}")
            added.append(f"{table_name}.{old} -> {new}")
        except sa.exc.SQLAlchemyError:
            if new not in {c["name"] for c in sa.inspect(engine).get_columns(table_name)}:
                raise
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
