"""Celery tasks: thin adapters. Claim first (no torch yet), then hand the job to ``worker.runner``."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from celery.signals import worker_shutting_down

from core.celery_app import EVALUATE_TASK, RECONCILE_TASK, TRAIN_TASK, app
from core.settings import Settings
from core.store import Store

log = logging.getLogger("cvpo.worker")

_store: Store | None = None


def settings() -> Settings:
    return app.conf.cvpo_settings


def store() -> Store:
    global _store
    if _store is None:
        s = settings()
        _store = Store(s.resolved_database_url, s.data_dir)
    return _store


def node_prefix(parent_pid: int) -> str:
    """Lease owners are ``host:worker-pid:child-pid``; a shutting-down worker matches its own jobs."""
    return f"{socket.gethostname()}:{parent_pid}:"


@app.task(name=TRAIN_TASK)
def train(job_id: str, attempt: int) -> dict[str, Any]:
    s = settings()
    owner = f"{node_prefix(os.getppid())}{os.getpid()}"
    if not store().claim(job_id, attempt, owner, s.lease_ttl_s):
        # A duplicate (redelivery, reconciler re-send, requeue after a kill): someone else owns it.
        log.info("job %s attempt %d not claimable; dropping this message", job_id, attempt)
        return {"job_id": job_id, "attempt": attempt, "claimed": False}
    from core.queue import JobQueue
    from worker.runner import run_job  # imports torch: only inside the forked child

    outcome = run_job(store(), JobQueue(app, store(), s.queue), s, job_id, attempt, owner)
    return {"job_id": job_id, "attempt": attempt, "claimed": True, "outcome": outcome}


@app.task(name=EVALUATE_TASK)
def evaluate(eval_id: str) -> dict[str, Any]:
    """Run one on-demand evaluation of a policy: ``cvpo.certify`` on its artefact, result into the store."""
    owner = f"{node_prefix(os.getppid())}{os.getpid()}"
    st = store()
    if not st.claim_evaluation(eval_id, owner):
        log.info("evaluation %s not claimable; dropping this message", eval_id)
        return {"eval_id": eval_id, "claimed": False}
    from core.certification import certify, policy_signals

    ev = st.get_evaluation(eval_id)
    policy = st.get_policy(ev.policy_id) if ev is not None else None
    if ev is None or policy is None:
        st.finish_evaluation(eval_id, error={"reason": "not_found", "message": "the policy no longer exists"})
        return {"eval_id": eval_id, "claimed": True, "status": "failed"}
    p = ev.params
    try:
        result = certify(
            policy.path,
            p,
            cost_signals=policy_signals(policy, st),
            cost_limits=p.get("cost_limits"),
            env_id=p.get("env_id"),
        )
    except ValueError as exc:
        st.finish_evaluation(eval_id, error={"reason": "invalid", "message": str(exc)[:2000]})
        return {"eval_id": eval_id, "claimed": True, "status": "failed"}
    except Exception as exc:
        log.exception("evaluation %s crashed", eval_id)
        st.finish_evaluation(eval_id, error={"reason": "internal", "message": f"{type(exc).__name__}: {exc}"[:2000]})
        return {"eval_id": eval_id, "claimed": True, "status": "failed"}
    st.finish_evaluation(eval_id, result=result)
    return {"eval_id": eval_id, "claimed": True, "status": "succeeded"}


@app.task(name=RECONCILE_TASK)
def reconcile_task() -> dict[str, Any]:
    from core.queue import JobQueue
    from core.reconciler import reconcile

    s = settings()
    return reconcile(store(), JobQueue(app, store(), s.queue), s.outbox_grace_s)


@worker_shutting_down.connect
def _requeue_on_shutdown(sig: str = "", how: str = "", exitcode: int = 0, **_: Any) -> None:
    """SIGTERM: ask our running jobs to checkpoint and go back to the queue without spending an attempt."""
    try:
        n = store().request_requeue(node_prefix(os.getpid()))
        if n:
            log.warning("worker shutting down (%s): %d job(s) will checkpoint and requeue", sig, n)
    except Exception:  # shutdown must never fail on the store
        log.exception("could not flag running jobs for requeue")
