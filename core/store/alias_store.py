"""Aliases (issue #20): a client's stable name for one of its policies, and the history of its targets.

Controllers act through an alias (``production``, ``arm-3``) instead of a policy id, so a deployment
is one repoint and a misbehaving policy one rollback away from the previous one. Both are a single
transaction that moves the alias and appends its event together, so history never disagrees with the
target; writers of aliases queue on one lock (``LOCK_ALIASES`` on PostgreSQL, ``BEGIN IMMEDIATE`` on
SQLite), which is cheap because repoints are rare.

Rollback is an undo stack, not a toggle: every event keeps ``parent_seq``, the event whose target a
rollback from it returns to, and the alias keeps ``head_seq``, the event that made its current target.
A → B → C, rollback → B, rollback → A: a second rollback never returns to the policy the first one
left. The gate (only certified policies, unless an admin's override with a reason) is checked here,
inside the transaction, against the target's row; who may give an override is the API's decision.
Targets are always policies of the alias's own client, so an alias never crosses tenants.

The module is not named ``aliases`` because ``core.store`` re-exports the table of that name.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from core.store.base import StoreBase
from core.store.records import ConflictError, NotFoundError
from core.store.schema import LOCK_ALIASES, _serialize, alias_events, aliases, policies

ALIAS_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")  # lowercase: names are compared exactly


@dataclass
class AliasEventRecord:
    """One change of an alias's target: who, when, from, to, why, and whether the target was certified."""

    seq: int
    client: str
    alias: str
    action: str  # "set" or "rollback"
    from_policy: str | None
    to_policy: str
    version: int
    parent_seq: int | None
    actor: str
    actor_token: str | None
    actor_name: str | None
    reason: str | None
    certified: bool
    override_reason: str | None
    time: float


@dataclass
class AliasRecord:
    seq: int
    client: str
    name: str
    policy_id: str
    version: int  # 1 at creation, +1 per change of target
    created_at: float
    updated_at: float
    head: AliasEventRecord  # the event that made the current target
    can_roll_back: bool = False  # the head has a previous target to return to


@dataclass(frozen=True)
class Actor:
    """Who changes an alias, as its history records it."""

    client: str
    token_id: str | None = None
    token_name: str | None = None


class NotCertifiedError(ConflictError):
    """The target's certificate did not certify it (or it has none) and no override was given."""

    def __init__(self, policy_id: str, certificate: dict[str, Any] | None) -> None:
        why = "has no certificate" if certificate is None else "is not certified"
        super().__init__(f"policy {policy_id} {why}")
        self.policy_id = policy_id
        self.certificate = certificate


class NothingToRollBackError(ConflictError):
    """The alias has had one target only, or every earlier one was rolled back already."""


def _event(row: Any) -> AliasEventRecord:
    return AliasEventRecord(**{f: row._mapping[f] for f in AliasEventRecord.__dataclass_fields__})


_ALIAS_COLUMNS = [aliases.c[f] for f in ("seq", "client", "name", "policy_id", "version", "created_at", "updated_at")]
_HEAD_COLUMNS = [alias_events.c[f] for f in AliasEventRecord.__dataclass_fields__]


def _joined() -> sa.Select:
    """Aliases with their head event (labelled ``h_*``)."""
    heads = [col.label(f"h_{col.name}") for col in _HEAD_COLUMNS]
    return sa.select(*_ALIAS_COLUMNS, *heads).join(alias_events, alias_events.c.seq == aliases.c.head_seq)


def _alias(row: Any) -> AliasRecord:
    m = row._mapping
    head = AliasEventRecord(**{f: m[f"h_{f}"] for f in AliasEventRecord.__dataclass_fields__})
    base = {f: m[f] for f in ("seq", "client", "name", "policy_id", "version", "created_at", "updated_at")}
    return AliasRecord(**base, head=head, can_roll_back=head.parent_seq is not None)


class AliasStoreMixin(StoreBase):
    """Reading, repointing and rolling back aliases, and their history."""

    def get_alias(self, client: str, name: str) -> AliasRecord | None:
        with self._read() as c:
            row = c.execute(_joined().where(aliases.c.client == client, aliases.c.name == name)).first()
        return _alias(row) if row else None

    def resolve_alias(self, client: str, name: str) -> str | None:
        """The alias's target policy id, or None: the one read /act through an alias makes (api/aliasing.py)."""
        with self._read() as c:
            q = sa.select(aliases.c.policy_id).where(aliases.c.client == client, aliases.c.name == name)
            return c.execute(q).scalar()

    def list_aliases(
        self, client: str | None, page_size: int = 50, page_token: str | None = None
    ) -> tuple[list[AliasRecord], str | None]:
        """One client's aliases (all for None), newest first, by cursor."""
        return self._page(aliases, _alias, {"client": client}, page_size, page_token, query=_joined())

    def alias_history(
        self, client: str, name: str, page_size: int = 50, page_token: str | None = None
    ) -> tuple[list[AliasEventRecord], str | None]:
        """The alias's events, newest first."""
        return self._page(alias_events, _event, {"client": client, "alias": name}, page_size, page_token)

    def set_alias(
        self,
        client: str,
        name: str,
        policy_id: str,
        *,
        actor: Actor,
        reason: str | None = None,
        override_reason: str | None = None,
    ) -> tuple[AliasRecord, bool]:
        """Point ``client``'s alias ``name`` at ``policy_id`` (creating it), recording the event; returns
        (the alias, whether it changed). The current target again changes nothing (a retried PUT).
        NotFoundError: not a policy of this client; NotCertifiedError: uncertified and no override;
        ConflictError: the policy is marked not ready."""
        if not ALIAS_NAME.fullmatch(name):
            raise ValueError(f"alias name {name!r} does not match {ALIAS_NAME.pattern}")
        with self.tx() as c:
            _serialize(c, LOCK_ALIASES)
            current = c.execute(sa.select(aliases).where(aliases.c.client == client, aliases.c.name == name)).first()
            if current is not None and current.policy_id == policy_id:
                return self._reread(c, client, name), False
            certified = _check_target(c, client, policy_id, override_reason)
            self._move(
                c,
                current,
                client,
                name,
                action="set",
                to_policy=policy_id,
                parent_seq=None if current is None else current.head_seq,
                actor=actor,
                reason=reason,
                certified=certified,
                override_reason=override_reason,
            )
            return self._reread(c, client, name), True

    def rollback_alias(
        self,
        client: str,
        name: str,
        *,
        actor: Actor,
        reason: str | None = None,
        override_reason: str | None = None,
    ) -> AliasRecord:
        """Point the alias back at the target before its current one (the undo stack in the module
        docstring). NotFoundError: no such alias, or the earlier policy is gone; NothingToRollBackError;
        NotCertifiedError / ConflictError as for ``set_alias``."""
        with self.tx() as c:
            _serialize(c, LOCK_ALIASES)
            current = c.execute(sa.select(aliases).where(aliases.c.client == client, aliases.c.name == name)).first()
            if current is None:
                raise NotFoundError(f"no alias {name!r}")
            head = c.execute(sa.select(alias_events).where(alias_events.c.seq == current.head_seq)).one()
            if head.parent_seq is None:
                raise NothingToRollBackError(
                    f"alias {name!r} has no earlier target to roll back to (it points at {current.policy_id})"
                )
            back = c.execute(sa.select(alias_events).where(alias_events.c.seq == head.parent_seq)).one()
            certified = _check_target(c, client, back.to_policy, override_reason)
            self._move(
                c,
                current,
                client,
                name,
                action="rollback",
                to_policy=back.to_policy,
                parent_seq=back.parent_seq,
                actor=actor,
                reason=reason,
                certified=certified,
                override_reason=override_reason,
            )
            return self._reread(c, client, name)

    # ------------------------------------------------------------------ inside a transaction

    @staticmethod
    def _move(
        c: Connection,
        current: Any,
        client: str,
        name: str,
        *,
        action: str,
        to_policy: str,
        parent_seq: int | None,
        actor: Actor,
        reason: str | None,
        certified: bool,
        override_reason: str | None,
    ) -> None:
        """Append the event and move the alias to it, in the caller's transaction."""
        now = time.time()
        version = 1 if current is None else current.version + 1
        seq = c.execute(
            alias_events.insert().values(
                client=client,
                alias=name,
                action=action,
                from_policy=None if current is None else current.policy_id,
                to_policy=to_policy,
                version=version,
                parent_seq=parent_seq,
                actor=actor.client,
                actor_token=actor.token_id,
                actor_name=actor.token_name,
                reason=reason,
                certified=certified,
                override_reason=None if certified else override_reason,
                time=now,
            )
        ).inserted_primary_key[0]
        if current is None:
            c.execute(
                aliases.insert().values(
                    client=client,
                    name=name,
                    policy_id=to_policy,
                    version=version,
                    head_seq=seq,
                    created_at=now,
                    updated_at=now,
                )
            )
        else:
            c.execute(
                aliases.update()
                .where(aliases.c.seq == current.seq)
                .values(policy_id=to_policy, version=version, head_seq=seq, updated_at=now)
            )

    @staticmethod
    def _reread(c: Connection, client: str, name: str) -> AliasRecord:
        return _alias(c.execute(_joined().where(aliases.c.client == client, aliases.c.name == name)).one())


def _check_target(c: Connection, client: str, policy_id: str, override_reason: str | None) -> bool:
    """Whether the target is certified; raises when it may not be pointed at (see ``set_alias``)."""
    q = sa.select(policies.c.ready, policies.c.certified, policies.c.certificate).where(
        policies.c.id == policy_id, policies.c.client == client
    )
    row = c.execute(q).first()
    if row is None:
        raise NotFoundError(f"no policy {policy_id!r} of client {client!r}")
    if not row.ready:
        raise ConflictError(f"policy {policy_id} is marked not ready (it failed an integrity check)")
    certified = bool(row.certified)
    if not certified and override_reason is None:
        raise NotCertifiedError(policy_id, row.certificate)
    return certified
