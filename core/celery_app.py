"""The Celery application: settings chosen for long, crash-prone, GPU-holding jobs (service-design.md §3.2).

Importing this module must not import torch or the engine's trainer: workers fork children after
import, and CUDA initialised in the parent breaks every child (pytorch#40403). The task module
imports torch inside the task body only.
"""

from __future__ import annotations

from celery import Celery

from core.settings import Settings

TRAIN_TASK = "cvpo.train"
RECONCILE_TASK = "cvpo.reconcile"
EVALUATE_TASK = "cvpo.evaluate"  # on-demand policy evaluations (POST /policies/{id}/evaluations)


def make_celery(settings: Settings) -> Celery:
    app = Celery("cvpo", broker=settings.redis_url, include=["worker.tasks"])
    transport = {"visibility_timeout": settings.visibility_timeout_s}
    app.conf.update(
        task_acks_late=True,  # early ack loses the job if the child dies
        task_reject_on_worker_lost=True,  # a SIGKILLed child's message goes back to the queue
        worker_prefetch_multiplier=1,  # never park a job behind a long one
        worker_max_tasks_per_child=1,  # a fresh child per job returns host and GPU memory
        worker_concurrency=1,  # one job per device
        broker_transport_options=transport,
        visibility_timeout=settings.visibility_timeout_s,
        task_serializer="json",
        accept_content=["json"],  # never pickle on the broker
        result_serializer="json",
        task_ignore_result=True,  # the job store is the truth, not a result backend
        result_backend=None,
        task_default_queue=settings.queue,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        # Remote control (inspect, shutdown, pool_restart, rate_limit… broadcast over the broker) lets
        # anyone who reaches Redis stop or reconfigure every worker; nothing here uses it, so it is off
        # unless CVPO_CELERY_REMOTE_CONTROL=on (issue #23 item 7).
        worker_enable_remote_control=settings.celery_remote_control,
        task_send_sent_event=False,
        beat_schedule={
            "reconcile": {"task": RECONCILE_TASK, "schedule": max(settings.reconcile_every_s, 1.0)},
        },
    )
    app.conf.cvpo_settings = settings
    return app


app = make_celery(Settings.from_env())
