"""``GET /jobs/{id}/events``: a job's server-sent event stream (issue #23 item 4).

One store poller per job per API process fans new events out to every stream following that job
(``JobPoller``/``EventHub``); streams are capped per token and per process (``StreamSlot``, 429), end
after ``CVPO_STREAM_MAX_S`` (clients resume losslessly with ``Last-Event-ID``) and re-check their token.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import random
import time
import weakref
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse

from api.auth import owner_filter
from api.errors import Problem, json_safe, validation_problem
from api.routes import store_of
from api.routes.jobs import INT64_MAX, Reader
from core.settings import Settings
from core.store import TERMINAL, NotFoundError, Store, hash_token

router = APIRouter(tags=["jobs"])
log = logging.getLogger("cvpo.api")

SSE_KEEPALIVE_S = 15.0
SSE_POLL_S = 0.5  # one read of a job's new events per this, shared by all of the job's open streams
SSE_BUFFER = 2000  # recent events a job's poller keeps for its subscribers; one further behind reads the store
SSE_JOB_CHECK_EVERY = 10  # polls between reads of the job row (deleted? finished with its events pruned?)
SSE_RETRY_MS = 1000  # the reconnect delay a stream tells EventSource clients
STREAM_RETRY_AFTER_S = 5


class JobPoller:
    """The one reader of a job's new events in this process, however many streams follow the job
    (issue #23 item 4): every SSE_POLL_S it reads what came after the newest event it has, keeps the
    last SSE_BUFFER, and wakes its subscribers. It stops once nobody listens, or once the job is over
    (or deleted) and every event up to the job's last is read."""

    def __init__(self, store: Store, job_id: str) -> None:
        self.store, self.job_id = store, job_id
        self.seqs: list[int] = []  # ascending, parallel to ``events``
        self.events: list[dict[str, Any]] = []
        self.base = 0  # every event with seq > base is in ``events`` (or not written yet)
        self.seq = 0  # the newest seq read
        self.ready = False  # base/seq set by the first read
        self.done = False
        self.closing = False
        self.subscribers = 0
        self._changed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def wakeup(self) -> asyncio.Event:
        """The event the next change sets; take it before looking at the state, then wait on it."""
        return self._changed

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def after(self, cursor: int) -> list[dict[str, Any]]:
        """Buffered events with seq > cursor (the caller has cursor >= base)."""
        return self.events[bisect.bisect_right(self.seqs, cursor) :]

    async def run(self) -> None:
        polls, check_job = 0, True
        try:
            while self.subscribers > 0:
                try:
                    if not self.ready:
                        job = await asyncio.to_thread(self.store.get_job, self.job_id)
                        self.base = self.seq = job.event_seq  # subscribers read anything older themselves
                        self.ready = True
                        self._notify()
                    batch = await asyncio.to_thread(self.store.events_after, self.job_id, self.seq, 500)
                    if batch:
                        self.seqs.extend(ev["seq"] for ev in batch)
                        self.events.extend(batch)
                        self.seq = batch[-1]["seq"]
                        if len(self.events) > SSE_BUFFER:
                            cut = len(self.events) - SSE_BUFFER
                            self.base = self.seqs[cut - 1]
                            del self.events[:cut], self.seqs[:cut]
                        check_job = check_job or any(
                            ev["type"] == "status" and ev["data"].get("status") in TERMINAL for ev in batch
                        )
                        self._notify()
                        if len(batch) == 500:
                            continue  # more are waiting: read them now
                    polls += 1
                    if not batch and (check_job or polls % SSE_JOB_CHECK_EVERY == 0):
                        check_job = False
                        job = await asyncio.to_thread(self.store.get_job, self.job_id)
                        if job.terminal and job.event_seq <= self.seq:
                            self.done = True
                            return
                except NotFoundError:  # the job was deleted
                    self.done = True
                    return
                except Exception:  # a transient store error: the next poll retries
                    log.exception("event poller for %s failed", self.job_id)
                await asyncio.sleep(SSE_POLL_S)
        finally:
            self.closing = True
            self._notify()


class EventHub:
    """This API process's event streams: the caps (per token and in all) and one poller per job."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store, self.settings = store, settings
        self.pollers: dict[str, JobPoller] = {}
        self.open = 0
        self.open_by_token: dict[str, int] = {}

    def reserve(self, token_key: str) -> StreamSlot:
        """A slot for one more stream, or a 429 problem with Retry-After (the caps of issue #23 item 4)."""
        s = self.settings
        if self.open_by_token.get(token_key, 0) >= s.max_streams_per_token:
            detail = f"this token has {s.max_streams_per_token} event streams open (CVPO_MAX_STREAMS_PER_TOKEN)"
        elif self.open >= s.max_streams:
            detail = f"this API process has {s.max_streams} event streams open (CVPO_MAX_STREAMS)"
        else:
            self.open += 1
            self.open_by_token[token_key] = self.open_by_token.get(token_key, 0) + 1
            return StreamSlot(self, token_key)
        raise Problem(
            429,
            f"{detail}; close one, or poll GET /jobs/{{id}} instead",
            type="/problems/too-many-streams",
            headers={"Retry-After": str(STREAM_RETRY_AFTER_S)},
        )

    def subscribe(self, job_id: str) -> JobPoller:
        poller = self.pollers.get(job_id)
        if poller is None or poller.closing:
            poller = JobPoller(self.store, job_id)
            self.pollers[job_id] = poller
        poller.subscribers += 1
        if poller.task is None:
            poller.task = asyncio.create_task(self._run(poller), name=f"events-{job_id}")
        return poller

    async def _run(self, poller: JobPoller) -> None:
        try:
            await poller.run()
        finally:
            if self.pollers.get(poller.job_id) is poller:
                del self.pollers[poller.job_id]


class StreamSlot:
    """One open stream's place under the caps; released once, when the stream ends (or, for a response
    that never started streaming, when its generator is collected)."""

    def __init__(self, hub: EventHub, token_key: str) -> None:
        self.hub, self.token_key, self.released = hub, token_key, False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.hub.open -= 1
        left = self.hub.open_by_token.get(self.token_key, 1) - 1
        if left > 0:
            self.hub.open_by_token[self.token_key] = left
        else:
            self.hub.open_by_token.pop(self.token_key, None)


def event_hub(request: Request) -> EventHub:
    state = request.app.state
    hub = getattr(state, "event_hub", None)
    if hub is None or hub.store is not state.store:  # one per app (and per lifespan's store)
        hub = state.event_hub = EventHub(state.store, state.settings)
    return hub


def _bearer(request: Request) -> str | None:
    scheme, _, raw = (request.headers.get("authorization") or "").partition(" ")
    return raw.strip() if scheme.lower() == "bearer" and raw.strip() else None


def _sse(ev: dict[str, Any]) -> str:
    payload = orjson.dumps(json_safe({**ev["data"], "time": ev["time"]})).decode()
    return f"id: {ev['seq']}\nevent: {ev['type']}\ndata: {payload}\n\n"


@router.get(
    "/jobs/{job_id}/events",
    summary="Server-sent events: status, metrics, progress, checkpoint, attempt, log",
    description="Each event's id is its sequence number; a stream ends when the job has ended and every "
    "event is sent, after CVPO_STREAM_MAX_S, or when its token is revoked or expires: reconnect with the "
    "Last-Event-ID header to resume after the last event received (nothing is skipped or repeated). "
    "Open streams are capped per token and per API process (429 with Retry-After).",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, 404: {}, 422: {}, 429: {}},
)
async def job_events(
    request: Request,
    job_id: str,
    principal: Reader,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    store = store_of(request)
    owner = owner_filter(principal)
    try:
        await asyncio.to_thread(store.get_job, job_id, owner)
    except NotFoundError as exc:
        raise Problem(404, str(exc)) from exc
    try:
        start = int(last_event_id) if last_event_id else 0
        if not 0 <= start <= INT64_MAX:
            raise ValueError(last_event_id)
    except ValueError as exc:
        raise validation_problem(
            [{"loc": ["header", "Last-Event-ID"], "msg": "must be an integer in [0, 2^63 - 1]", "input": last_event_id}]
        ) from exc
    settings: Settings = request.app.state.settings
    raw_token = _bearer(request) if settings.auth else None
    hub = event_hub(request)
    slot = hub.reserve(hash_token(raw_token) if raw_token else f"client:{principal.client}")

    async def token_still_valid() -> bool:
        if raw_token is None:  # auth off, or a public path's anonymous reader
            return True
        found = await asyncio.to_thread(request.app.state.tokens.resolve, raw_token)
        return found is not None and found.allows("jobs:read")

    async def stream() -> AsyncIterator[str]:
        poller = hub.subscribe(job_id)
        try:
            cursor = start
            now = time.monotonic()
            deadline = now + settings.stream_max_s * random.uniform(0.9, 1.0)  # jitter: no reconnect herds
            next_auth = now + settings.stream_auth_check_s
            next_keepalive = now + SSE_KEEPALIVE_S
            yield f"retry: {SSE_RETRY_MS}\n\n"
            while True:
                changed = poller.wakeup()
                if not poller.ready:
                    batch = []
                elif cursor < poller.base:  # behind the poller: catch up from the store, this stream alone
                    batch = await asyncio.to_thread(store.events_after, job_id, cursor, 500)
                    if not batch:
                        cursor = poller.base  # nothing stored in between (pruned or deleted)
                else:
                    batch = poller.after(cursor)
                for ev in batch:
                    cursor = ev["seq"]
                    yield _sse(ev)
                if batch:
                    next_keepalive = time.monotonic() + SSE_KEEPALIVE_S
                    continue
                if poller.done and cursor >= poller.seq:
                    return  # the job is over and everything it wrote is sent
                if poller.closing:  # the poller ended (deleted job): follow a fresh one if the job lives
                    poller.subscribers -= 1
                    try:
                        await asyncio.to_thread(store.get_job, job_id, owner)
                    except NotFoundError:
                        poller = None
                        return
                    poller = hub.subscribe(job_id)
                    continue
                now = time.monotonic()
                if now >= deadline:
                    yield ": this stream's time is up; reconnect with Last-Event-ID to resume\n\n"
                    return
                if now >= next_auth:
                    if not await token_still_valid():
                        yield ": the token was revoked or expired\n\n"
                        return
                    next_auth = time.monotonic() + settings.stream_auth_check_s
                if now >= next_keepalive:
                    yield ": keep-alive\n\n"
                    next_keepalive = now + SSE_KEEPALIVE_S
                wait = max(min(deadline, next_auth, next_keepalive) - time.monotonic(), 0.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), timeout=wait)
        finally:
            if poller is not None:
                poller.subscribers -= 1
            slot.release()

    body = stream()
    weakref.finalize(body, slot.release)  # a response dropped before it streamed still frees its slot
    return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
