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

One module per aggregate (issue #19), composed here into the facade ``Store``:

- ``schema``: tables, the engine, the migration, advisory locks and upserts;
- ``records``: statuses, the record dataclasses, errors, ids, timestamps, cursors;
- ``submission``: creating, reading, listing and deleting jobs; the reconciler's reads;
- ``state_machine``: ``TRANSITIONS``, the lease and fencing, every worker write;
- ``history``: events, logs and metric history;
- ``artefacts``: checkpoints, disk usage, policy registration, evaluations;
- ``auth_tokens``: tokens, ``Principal`` and ``SCOPES``;
- ``registry``: the worker registry and the ``kv`` table;
- ``alias_store``: aliases, their history, repoint and rollback (issue #20).

Promotion (pick → verify → copy → register) is core/promotion.py's; the store only registers. Every
name is importable from ``core.store`` as it was before the split (module names differ from the table
names ``jobs``, ``events``, ``tokens``, ``workers`` and ``aliases`` so that ``from core.store import jobs``
is a table).
"""

from __future__ import annotations

from core.store.alias_store import (
    ALIAS_NAME,
    Actor,
    AliasEventRecord,
    AliasRecord,
    AliasStoreMixin,
    NotCertifiedError,
    NothingToRollBackError,
)
from core.store.artefacts import ArtefactsMixin
from core.store.auth_tokens import ALIAS_SCOPE_PREFIX, SCOPES, Principal, TokensMixin, hash_token, valid_scope
from core.store.history import EVENTS_KEPT, HistoryMixin
from core.store.records import (
    ACTIVE,
    FAILURE_REASONS,
    LEASED,
    STATUSES,
    TERMINAL,
    CapExceededError,
    CheckpointRecord,
    ConflictError,
    EvaluationRecord,
    IdempotencyMismatchError,
    JobRecord,
    NotFoundError,
    PolicyRecord,
    StoreError,
    _checkpoint,
    _encode_cursor,
    _evaluation,
    _find_job,
    _job,
    _policy,
    decode_cursor,
    new_id,
    rfc3339,
)
from core.store.registry import WORKERS_KEPT_S, RegistryMixin
from core.store.schema import (
    EVAL_STATUSES,
    LOCK_ALIASES,
    LOCK_CREATE_JOB,
    LOCK_SCHEMA,
    LOCK_TOKENS,
    READ_ONLY,
    BigInt,
    _finite_json,
    _migrate,
    _nul_free_params,
    _nulled,
    _schema_lock,
    _serialize,
    _upsert,
    alias_events,
    aliases,
    checkpoints,
    evaluations,
    events,
    idempotency,
    jobs,
    kv,
    make_engine,
    metadata,
    metric_points,
    policies,
    tokens,
    workers,
)
from core.store.state_machine import TRANSITIONS, StateMachineMixin, _owned_by
from core.store.submission import IDEMPOTENCY_TTL_S, SubmissionMixin


class Store(
    SubmissionMixin, StateMachineMixin, HistoryMixin, ArtefactsMixin, TokensMixin, RegistryMixin, AliasStoreMixin
):
    """All reads and writes of jobs, metrics, checkpoints, policies, aliases, events, keys and tokens."""


__all__ = [
    "ACTIVE",
    "ALIAS_NAME",
    "ALIAS_SCOPE_PREFIX",
    "EVAL_STATUSES",
    "EVENTS_KEPT",
    "FAILURE_REASONS",
    "IDEMPOTENCY_TTL_S",
    "LEASED",
    "LOCK_ALIASES",
    "LOCK_CREATE_JOB",
    "LOCK_SCHEMA",
    "LOCK_TOKENS",
    "READ_ONLY",
    "SCOPES",
    "STATUSES",
    "TERMINAL",
    "TRANSITIONS",
    "WORKERS_KEPT_S",
    "Actor",
    "AliasEventRecord",
    "AliasRecord",
    "BigInt",
    "CapExceededError",
    "CheckpointRecord",
    "ConflictError",
    "EvaluationRecord",
    "IdempotencyMismatchError",
    "JobRecord",
    "NotCertifiedError",
    "NotFoundError",
    "NothingToRollBackError",
    "PolicyRecord",
    "Principal",
    "Store",
    "StoreError",
    "_checkpoint",
    "_encode_cursor",
    "_evaluation",
    "_find_job",
    "_finite_json",
    "_job",
    "_migrate",
    "_nul_free_params",
    "_nulled",
    "_owned_by",
    "_policy",
    "_schema_lock",
    "_serialize",
    "_upsert",
    "alias_events",
    "aliases",
    "checkpoints",
    "decode_cursor",
    "evaluations",
    "events",
    "hash_token",
    "idempotency",
    "jobs",
    "kv",
    "make_engine",
    "metadata",
    "metric_points",
    "new_id",
    "policies",
    "rfc3339",
    "tokens",
    "valid_scope",
    "workers",
]
