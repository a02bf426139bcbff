"""What a job leaves behind, as rows: its checkpoints (read; retention's fenced writes are the state
machine's), run-directory sizes, the policies registered from it, and on-demand evaluations of a policy.
Picking, verifying and copying an artefact into a policy directory is core/promotion.py's; the store
only registers the result (``register_policy``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from core.store.base import StoreBase
from core.store.records import (
    CheckpointRecord,
    EvaluationRecord,
    PolicyRecord,
    _checkpoint,
    _evaluation,
    _policy,
    new_id,
)
from core.store.schema import checkpoints, evaluations, jobs, policies


class ArtefactsMixin(StoreBase):
    """Checkpoints, disk usage, policies and evaluations."""

    def list_checkpoints(self, job_id: str) -> list[CheckpointRecord]:
        with self._read() as c:
            rows = c.execute(
                sa.select(checkpoints).where(checkpoints.c.job_id == job_id).order_by(checkpoints.c.seq)
            ).all()
        return [_checkpoint(r) for r in rows]

    def promoted_checkpoint_ids(self, job_id: str) -> set[str]:
        """Checkpoints of this job that a policy was promoted from (retention keeps their files)."""
        with self._read() as c:
            q = sa.select(policies.c.checkpoint_id).where(
                policies.c.job_id == job_id, policies.c.checkpoint_id.is_not(None)
            )
            return set(c.execute(q).scalars())

    def disk_usage(self, client: str | None = None) -> dict[str, int]:
        """{job id: run directory bytes} of the jobs a worker measured (one client's, or all for None)."""
        q = sa.select(jobs.c.id, jobs.c.disk_bytes).where(jobs.c.disk_bytes.is_not(None))
        if client is not None:
            q = q.where(jobs.c.client == client)
        with self._read() as c:
            return {r.id: int(r.disk_bytes) for r in c.execute(q)}

    # ------------------------------------------------------------------ policies

    def register_policy(
        self,
        *,
        policy_id: str,
        client: str,
        path: Path,
        meta: dict[str, Any],
        meta_sha256: str,
        job_id: str | None = None,
        checkpoint_id: str | None = None,
        shield: dict[str, Any] | None = None,
        certificate: dict[str, Any] | None = None,
        override: dict[str, Any] | None = None,
    ) -> PolicyRecord:
        """Register a policy directory that already lies at ``path`` (core/promotion.py puts it there).
        ``meta`` is its policy.json and ``meta_sha256`` that file's hash as promoted (issue #23 item 10);
        the policy is ``certified`` exactly when ``certificate`` says so (None without one)."""
        with self.tx() as c:
            c.execute(
                policies.insert().values(
                    id=policy_id,
                    client=client,
                    job_id=job_id,
                    checkpoint_id=checkpoint_id,
                    env_id=meta["env_id"],
                    path=str(path),
                    sha256=meta["weights_sha256"],
                    shield=shield,
                    meta=meta,
                    created_at=time.time(),
                    ready=True,
                    certificate=certificate,
                    certified=None if certificate is None else bool(certificate.get("certified")),
                    override=override,
                    meta_sha256=meta_sha256,
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
