"""The app factory and its lifespan: store, token bootstrap, policy cache, broker and reconciler loop.

``create_app(settings)`` builds a fresh app (tests make one per temp data dir); ``api.app:app`` is
not module-level on purpose, uvicorn is started with ``--factory`` by ``cvpo api``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_fastapi_instrumentator import Instrumentator

from api.act import PolicyCache
from api.aliasing import AliasResolver
from api.auth import TokenCache, bootstrap_admin_token
from api.errors import install_handlers
from api.hosts import LoopbackOnlyMiddleware, is_loopback
from api.middleware import LimitsMiddleware
from core.datadir import prepare_data_dir
from core.settings import Settings
from core.store import Store

log = logging.getLogger("cvpo.api")


def _make_queue(settings: Settings, store: Store):
    from core.celery_app import make_celery
    from core.queue import JobQueue

    return JobQueue(make_celery(settings), store, settings.queue)


async def _reconcile_forever(app: FastAPI) -> None:
    from core.reconciler import reconcile

    s: Settings = app.state.settings
    while True:
        await asyncio.sleep(s.reconcile_every_s)
        try:
            report = await asyncio.to_thread(reconcile, app.state.store, app.state.queue, s.outbox_grace_s)
            if any(report.values()):
                log.info("reconciler: %s", {k: v for k, v in report.items() if v})
        except Exception:
            log.exception("reconciler pass failed")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    # ``settings.host`` is the address the listening socket is bound to when ``cvpo api`` starts the
    # app (service.launcher.run_api binds first, then builds the app from getsockname()); an app
    # started some other way is still held to loopback per connection by LoopbackOnlyMiddleware.
    if not settings.auth and not is_loopback(settings.host):
        raise ValueError(f"CVPO_AUTH=off is only allowed when the API binds to a loopback address, not {settings.host}")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        prepare_data_dir(settings)
        store = Store(settings.resolved_database_url, settings.data_dir)
        app.state.store = store
        app.state.tokens = TokenCache(store)
        app.state.policy_cache = PolicyCache(settings)
        app.state.aliases = AliasResolver(store, settings.alias_ttl_s)
        app.state.queue = _make_queue(settings, store)
        if settings.auth:
            where, created = bootstrap_admin_token(settings, store)
            log.warning("API token: %s%s", where, " (newly generated)" if created else "")
        else:
            log.warning("authentication is OFF (CVPO_AUTH=off); loopback only")
        task = asyncio.create_task(_reconcile_forever(app)) if settings.reconcile_every_s > 0 else None
        # Everything imported and built so far lives as long as the process. Out of the cyclic GC's
        # reach, a full collection no longer walks its ~85 000 objects: that was a ~30 ms pause about
        # every second at thousands of requests/s, the p99 tail of /act under load (bench/overload.py).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            store.engine.dispose()

    app = FastAPI(
        title="CVPO safe-RL service",
        version="0.1.0",
        summary="Train CVPO policies on safety-gymnasium tasks over REST and serve them to controllers.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_handlers(app)

    from api.routes import act, aliases, dashboard, envs, evaluations, events, health, jobs, metrics, policies

    # /act first: routing stops at the first match, and /act is the hot path (api/routes/act.py).
    for module in (act, policies, aliases, health, envs, jobs, events, metrics, evaluations, dashboard):
        app.include_router(module.router)
    act_app = act.fast_router()

    registry = CollectorRegistry()
    app.state.prometheus_registry = registry
    Instrumentator(registry=registry, excluded_handlers=["/metrics", "/livez", "/readyz"]).instrument(app)
    app.add_middleware(
        LimitsMiddleware,
        body_limit=settings.body_limit,
        act_body_limit=settings.act_body_limit,
        max_inflight=settings.max_inflight,
        act_app=act_app,
    )
    if not settings.auth:  # outermost: nothing runs for a foreign Host or a non-loopback connection
        app.add_middleware(LoopbackOnlyMiddleware, allowed_hosts=settings.allowed_hosts)
    return app
