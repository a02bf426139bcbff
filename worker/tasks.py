"""Celery tasks: thin adapters. Claim first (no torch yet), then hand the job to ``worker.runner``."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from celery.signals import worker_ready, worker_shutting_down

from core.celery_app import EVALUATE_TASK, RECONCILE_TASK, TRAIN_TASK, app
from core.settings import Settings
from core.store import JobRecord, NotFoundError, Store

log = logging.getLogger("cvpo.worker")

_store: Store | None = None

# The registry thread below talks to the store from the Celery main process, which forks a pool child
# for every job (worker_max_tasks_per_child=1). A fork while that thread is inside SQLite (or the
# driver) leaves the child a copy of a held mutex: its first store call then hangs, and the job it
# was sent never runs (seen as intermittent reliability-test timeouts). Forks therefore wait until
# the thread is out of the store: it holds this lock for every store call, and at-fork hooks take it.
_store_calls = threading.RLock()


def _fork_prepare() -> None:
    _store_calls.acquire()


def _fork_parent() -> None:
    _store_calls.release()


def _fork_child() -> None:
    global _store_calls
    _store_calls = threading.RLock()  # the child has no registry thread; a fresh, free lock


os.register_at_fork(before=_fork_prepare, after_in_parent=_fork_parent, after_in_child=_fork_child)


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


def worker_id(parent_pid: int) -> str:
    """The worker's record in the store: ``host:worker-pid``, the prefix of its jobs' lease owners."""
    return node_prefix(parent_pid)[:-1]


# Device nodes of GPUs torch can drive (NVIDIA, WSL's, ROCm's): without any, CUDA cannot be there and
# the probe need not load torch at all.
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg", "/dev/kfd")
_CUDA_PROBE = (
    "import json, torch\n"
    "n = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
    "print(json.dumps({'n': n, 'names': [torch.cuda.get_device_name(i) for i in range(n)]}))\n"
)


def probe_capabilities() -> dict[str, Any]:
    """What jobs this machine can run (issue #23 item 13). CUDA is probed in a subprocess: initialising it
    in the Celery parent would break every forked child (pytorch#40403)."""
    caps: dict[str, Any] = {"cpu": True, "cuda": False, "cuda_devices": 0, "host": socket.gethostname()}
    if not any(Path(p).exists() for p in GPU_DEVICE_NODES):
        return caps
    try:
        out = subprocess.run(
            [sys.executable, "-c", _CUDA_PROBE], capture_output=True, text=True, timeout=300, check=True
        )
        info = json.loads(out.stdout.strip().splitlines()[-1])
        caps.update(cuda=info["n"] > 0, cuda_devices=info["n"], cuda_names=info["names"])
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, IndexError) as exc:
        log.warning("could not probe for CUDA (registering as CPU only): %s", exc)
    return caps


class WorkerRegistry(threading.Thread):
    """This worker's record in the store (issue #23 items 12 and 13), kept by the Celery main process:
    registered with its queue and capabilities, renewed every CVPO_HEARTBEAT_S, marked stopped on a
    graceful shutdown. Its own store, disposed after every use, so forked children inherit no open
    SQLite connection."""

    def __init__(self, s: Settings, wid: str) -> None:
        super().__init__(name="worker-registry", daemon=True)
        self.settings, self.id = s, wid
        self.halt = threading.Event()
        self.store: Store | None = None

    def run(self) -> None:
        caps = probe_capabilities()
        registered = False
        while True:
            first = not registered
            try:
                with _store_calls:  # no fork while this thread is inside the store (see _store_calls)
                    try:
                        if self.store is None:
                            self.store = Store(self.settings.resolved_database_url, self.settings.data_dir)
                        if not registered or not self.store.worker_seen(self.id):
                            self.store.register_worker(self.id, self.settings.queue, caps)
                            registered = True
                    finally:
                        if self.store is not None:
                            self.store.engine.dispose()
                if first and registered:
                    log.info("worker %s registered on queue %s: %s", self.id, self.settings.queue, caps)
            except Exception:  # the store is down: the next beat retries
                log.exception("worker %s could not renew its registration", self.id)
            if self.halt.wait(self.settings.heartbeat_s):
                return

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=5)
        if self.store is not None:
            with _store_calls:
                self.store.worker_stopped(self.id)
                self.store.engine.dispose()


_registry: WorkerRegistry | None = None


@worker_ready.connect
def _register_worker(sender: Any = None, **_: Any) -> None:
    """The main process, once it consumes: announce this worker (the children never run this)."""
    global _registry
    if _registry is None:
        _registry = WorkerRegistry(settings(), worker_id(os.getpid()))
        _registry.start()


def cuda_available() -> bool:
    """Whether this worker can train on CUDA: its registered capabilities, or torch here when it has none."""
    try:
        record = store().get_worker(worker_id(os.getppid()))
    except Exception:
        record = None
    if record is not None:
        return bool((record.get("capabilities") or {}).get("cuda"))
    import torch  # the child imports it to train anyway

    return bool(torch.cuda.is_available())


@app.task(name=TRAIN_TASK)
def train(job_id: str, attempt: int) -> dict[str, Any]:
    s = settings()
    owner = f"{node_prefix(os.getppid())}{os.getpid()}"
    try:
        job: JobRecord | None = store().get_job(job_id)
    except NotFoundError:
        job = None
    if job is not None and job.status == "queued" and job.spec.get("device") == "cuda" and not cuda_available():
        # A CPU worker sharing the queue with CUDA ones: leave the job queued and unclaimed for one of
        # them (the reconciler sends it again after CVPO_OUTBOX_GRACE_S), never fail it here (issue #23).
        if store().hand_back(job_id, attempt):
            log.warning("job %s attempt %d asks for CUDA and this worker has none; handed back", job_id, attempt)
        return {"job_id": job_id, "attempt": attempt, "claimed": False, "handed_back": True}
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
    """SIGTERM: ask our running jobs to checkpoint and go back to the queue without spending an attempt;
    mark this worker stopped, so the API stops counting it at once."""
    if _registry is not None:
        try:
            _registry.stop()
        except Exception:
            log.exception("could not mark this worker stopped")
    try:
        n = store().request_requeue(node_prefix(os.getpid()))
        if n:
            log.warning("worker shutting down (%s): %d job(s) will checkpoint and requeue", sig, n)
    except Exception:  # shutdown must never fail on the store
        log.exception("could not flag running jobs for requeue")
