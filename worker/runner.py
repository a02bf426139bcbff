"""Run one claimed attempt of a job with the engine's Trainer: heartbeats, fencing, callbacks, outcome.

No training logic lives here: the trainer collects, updates, evaluates and checkpoints; this module
only connects its callbacks to the job store (service-design.md §3.3) and turns the way the loop
ended into the job's next state.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from core import retention
from core.queue import JobQueue
from core.settings import Settings
from core.store import CheckpointRecord, JobRecord, Store

log = logging.getLogger("cvpo.worker")

FENCED_EXIT = 75  # the lease went to another attempt: die without writing anything more


class DivergedError(RuntimeError):
    """A loss or statistic became NaN/Inf: retrying the same seed would diverge again."""


def _fenced(job_id: str, attempt: int) -> None:
    log.error("job %s attempt %d lost its lease; exiting without further writes", job_id, attempt)
    os._exit(FENCED_EXIT)


class Heartbeat(threading.Thread):
    """Renews the lease; asks the trainer to stop on cancel, requeue or the job's time limit."""

    def __init__(self, store: Store, settings: Settings, job: JobRecord, owner: str) -> None:
        super().__init__(name=f"heartbeat-{job.id}", daemon=True)
        self.store, self.settings, self.job, self.owner = store, settings, job, owner
        self.trainer: Any = None  # set once built: the lease is renewed while torch and the env load
        self.deadline = float("inf")  # the time limit counts training time, from attach()
        self.reason: str | None = None
        self.halt = threading.Event()
        self._last: tuple[float, int] | None = None  # (time, env steps) at the previous beat, for the rate

    def check(self, job: JobRecord | None) -> None:
        if job is None:
            _fenced(self.job.id, self.job.attempt)
            return
        if self.reason is None:
            if job.cancel_requested:
                self.reason = "cancel"
            elif job.requeue_requested:
                self.reason = "requeue"
            elif time.time() > self.deadline:
                self.reason = "timeout"
        if self.reason is not None and self.trainer is not None:
            self.trainer.request_stop()

    def attach(self, trainer: Any) -> None:
        self.deadline = time.time() + self.job.time_limit_s
        self.trainer = trainer
        if self.reason is not None:
            trainer.request_stop()

    def progress(self) -> dict[str, Any] | None:
        """Env steps, rate (since the previous beat) and phase of the attached trainer, between epochs."""
        trainer = self.trainer
        if trainer is None:
            return None
        now, step = time.monotonic(), int(trainer.env_steps)
        last = self._last
        self._last = (now, step)
        rate = None
        if last is not None and now > last[0] and step > last[1]:
            rate = (step - last[1]) / (now - last[0])
        return {"env_step": step, "env_steps_per_s": rate, "phase": getattr(trainer, "phase", None)}

    def run(self) -> None:
        while not self.halt.wait(self.settings.heartbeat_s):
            try:
                beat = self.store.heartbeat(
                    self.job.id, self.job.attempt, self.owner, self.settings.lease_ttl_s, self.progress()
                )
                self.check(beat)
            except Exception:  # a transient store error: the next beat retries before the lease runs out
                log.exception("heartbeat for %s failed", self.job.id)


def _check_finite(metrics: dict[str, Any]) -> None:
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise DivergedError(f"{key} became {value} at epoch {metrics.get('epoch')}")


def resumable(store: Store, job: JobRecord) -> list[CheckpointRecord]:
    """Registered checkpoints whose files retention has not deleted and that are complete on disk
    (``cvpo.checkpoint.list_checkpoints``: manifest present), oldest first."""
    from cvpo.checkpoint import list_checkpoints

    complete = {p.resolve() for p in list_checkpoints(Path(job.run_dir))}
    return [
        ck
        for ck in store.list_checkpoints(job.id)
        if ck.files_deleted_at is None and Path(ck.path).resolve() in complete
    ]


def _restore_newest(trainer: Any, ckpts: list[CheckpointRecord]) -> CheckpointRecord | None:
    """Restore the newest checkpoint that passes its sha256 check (an older one if the newest fails:
    ``load_checkpoint`` verifies before anything is unpacked, so a failed try changes nothing)."""
    from cvpo.checkpoint import CheckpointError

    for ck in reversed(ckpts):
        try:
            trainer.restore(Path(ck.path))
            return ck
        except CheckpointError:
            log.exception("checkpoint %s cannot be restored; trying an older one", ck.path)
    return None


def measure_disk(store: Store, job: JobRecord, attempt: int, owner: str) -> bool:
    """Cache the run directory's size in the store (GET /jobs/{id}, /metrics); False if fenced or the
    write failed (a gauge is not worth failing an epoch for: the next measurement retries)."""
    try:
        return store.record_disk_usage(job.id, attempt, owner, retention.dir_bytes(Path(job.run_dir)))
    except Exception:
        log.exception("job %s: recording its disk use failed", job.id)
        return False


def run_job(store: Store, queue: JobQueue, settings: Settings, job_id: str, attempt: int, owner: str) -> str:
    """Train the claimed attempt to its end. Returns the outcome (the job's new status)."""
    job = store.get_job(job_id)
    heartbeat = Heartbeat(store, settings, job, owner)
    heartbeat.start()
    try:
        return _run(store, queue, job, attempt, owner, heartbeat)
    finally:
        heartbeat.halt.set()
        heartbeat.join(timeout=5)


def _run(store: Store, queue: JobQueue, job: JobRecord, attempt: int, owner: str, heartbeat: Heartbeat) -> str:
    job_id = job.id

    def fail(reason: str, message: str) -> str:
        return _fail(store, job_id, attempt, owner, reason, message)

    try:
        from cvpo.config import ConfigError, config_from_dict
        from cvpo.trainer import Trainer

        config = config_from_dict(job.config)
        trainer = Trainer(config, Path(job.run_dir), quiet=True)
        candidates = resumable(store, job)
        resumed = _restore_newest(trainer, candidates)
    except (ConfigError, ValueError) as exc:
        return fail("invalid_spec", str(exc))
    except Exception as exc:
        return _internal(store, job_id, attempt, owner, "internal", exc)

    if not store.begin_attempt(job_id, attempt, owner, trainer.epoch):
        _fenced(job_id, attempt)
    if resumed is not None:
        store.log(job_id, f"attempt {attempt} resumes from {Path(resumed.path).name} (epoch {trainer.epoch})")
    elif candidates:
        store.log(job_id, f"attempt {attempt} starts over: no checkpoint passed its sha256 check", "warning")
    heartbeat.attach(trainer)
    settings = heartbeat.settings
    every = max(1, int(config.loop.checkpoint_every_epochs))

    def on_epoch_end(metrics: dict[str, Any]) -> None:
        _check_finite(metrics)
        heartbeat.check(store.record_epoch(job_id, attempt, owner, metrics))
        if trainer.epoch % every:  # no checkpoint follows this epoch: measure here instead
            measure_disk(store, job, attempt, owner)

    def on_checkpoint(path: Path, meta: dict[str, Any]) -> None:
        # A servable artefact next to every checkpoint, so promotion never needs torch (§2.3).
        artefact = trainer.write_policy(f"artefacts/{path.name}", meta.get("metrics"))
        if store.register_checkpoint(job_id, attempt, owner, path, artefact, meta.get("metrics")) is None:
            _fenced(job_id, attempt)
        # Retention (issue #23 item 11): the new checkpoint is registered, so older full checkpoints
        # can go. A disk error here costs disk, never the job; being fenced ends the attempt.
        try:
            kept = retention.apply(store, job_id, attempt, owner, Path(job.run_dir), settings.keep_checkpoints)
        except OSError:
            log.exception("job %s: checkpoint retention failed; retrying at the next checkpoint", job_id)
            kept = retention.RetentionResult()
        if kept is None:
            _fenced(job_id, attempt)
        measure_disk(store, job, attempt, owner)

    trainer.on_epoch_end.append(on_epoch_end)
    trainer.on_checkpoint.append(on_checkpoint)
    try:
        result = trainer.train()
    except DivergedError as exc:
        return fail("diverged", str(exc))
    except MemoryError as exc:
        return _internal(store, job_id, attempt, owner, "oom", exc)
    except Exception as exc:
        reason = "oom" if "out of memory" in str(exc).lower() else "internal"
        return _internal(store, job_id, attempt, owner, reason, exc)
    measure_disk(store, job, attempt, owner)  # with the run's final policy artefact

    if not result.stopped_early:
        return _succeed(store, heartbeat.settings, job, attempt, owner)
    reason = heartbeat.reason
    if reason == "cancel":
        store.finish(job_id, attempt, owner, "cancelled")
        return "cancelled"
    if reason == "requeue":
        if store.finish(job_id, attempt, owner, "queued"):
            queue.send(store.get_job(job_id))
        return "queued"
    if reason == "timeout":
        return fail("timeout", f"time limit of {job.time_limit_s:g} s reached; the last checkpoint is kept")
    return fail("internal", "the training loop stopped without a reason")


def _internal(store: Store, job_id: str, attempt: int, owner: str, reason: str, exc: BaseException) -> str:
    """Fail with a message that carries no exception text (paths, hosts, library internals): the full
    traceback goes to the worker's log only, under a reference the client's message names (issue #23)."""
    ref = f"{job_id} attempt {attempt}"
    log.error("job %s failed (%s) with an exception", ref, reason, exc_info=exc)
    what = "out of memory" if reason == "oom" else "internal error in the worker"
    return _fail(store, job_id, attempt, owner, reason, f"{what}; the worker's log has the details under '{ref}'")


def _fail(store: Store, job_id: str, attempt: int, owner: str, reason: str, message: str) -> str:
    log.error("job %s failed (%s): %s", job_id, reason, message)
    store.log(job_id, f"failed ({reason}): {message}", "error")
    store.finish(job_id, attempt, owner, "failed", failure={"reason": reason, "message": message[:2000]})
    return "failed"


def _succeed(store: Store, settings: Settings, job: JobRecord, attempt: int, owner: str) -> str:
    """Certify the best candidates and promote the best certified one, then succeed.

    The job succeeds either way (training did what was asked); with no certified candidate its
    ``policy_id`` stays null and ``promotion`` says why (issue #18). The heartbeat keeps the lease
    while the held-out episodes run.
    """
    from core.certification import auto_promote

    try:
        policy_id, promotion = auto_promote(store, store.get_job(job.id), settings)
    except Exception as exc:
        log.exception("job %s: promotion failed", job.id)
        policy_id, promotion = None, {"certified": False, "reason": f"promotion failed: {type(exc).__name__}: {exc}"}
    store.finish(job.id, attempt, owner, "succeeded", policy_id=policy_id, promotion=promotion)
    if policy_id is not None:
        store.log(job.id, f"succeeded; {promotion['source']} checkpoint certified and promoted to {policy_id}")
    else:
        store.log(job.id, f"succeeded without a policy: {promotion['reason']}"[:2000], "warning")
    return "succeeded"
