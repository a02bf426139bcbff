"""Which policy an alias names, per API process (issue #20): ``/act`` through an alias must not read the
store on every request, and must never be answered by a half-loaded policy.

``AliasResolver.resolve`` answers from memory for ``ttl_s`` (CVPO_ALIAS_TTL_S) after the store read
that produced the answer *started*, so the policy a request is served by was the alias's target at
some moment no earlier than ``ttl_s`` before the request began: that is the bound on how long another
API process may keep answering with the old target after a repoint (0 reads the store every time,
and the target is then one the alias had during the request). A process that repoints or rolls back
an alias itself (``put``) answers with the new target at once. Expired entries are re-read by one
store read per alias, shared by every request waiting for it (with 0, each request reads on its own),
on a thread: never on the event loop.

A request resolves once, then serves entirely from the ``LoadedPolicy`` the per-process policy cache
holds (api/act.py), which only ever holds fully-loaded, checked policies. A repoint therefore swaps
which loaded policy later requests pick, and a request in flight finishes on the one it picked. A
target not loaded here yet is loaded once (``load_once``) while its first requests wait for it,
rather than answering 503 "loading" as a direct ``/policies/{id}/act`` does: a repoint is not an
outage.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from api.act import LoadedPolicy
from core.store import Store

MAX_CACHED = 10_000  # (client, name) pairs kept; past it the cache starts again (unknown names count too)


class AliasResolver:
    """(client, alias name) → target policy id (None: no such alias), cached for ``ttl_s`` seconds."""

    def __init__(self, store: Store, ttl_s: float) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self._hits: dict[tuple[str, str], tuple[str | None, float]] = {}
        self._generation: dict[tuple[str, str], int] = {}  # bumped by put: an older read must not land
        self._pending: dict[tuple[str, str], asyncio.Future[str | None]] = {}
        self._loads: dict[str, asyncio.Future[LoadedPolicy]] = {}

    def cached(self, client: str, name: str) -> tuple[bool, str | None]:
        """(whether memory answers now, the target). Safe and cheap on the event loop."""
        hit = self._hits.get((client, name))
        if hit is not None and hit[1] > time.monotonic():
            return True, hit[0]
        return False, None

    async def resolve(self, client: str, name: str) -> str | None:
        known, policy_id = self.cached(client, name)
        if known:
            return policy_id
        loop = asyncio.get_running_loop()
        if self.ttl_s <= 0:  # a read of its own: one already under way may have started before this request
            return await loop.run_in_executor(None, self.store.resolve_alias, client, name)
        key = (client, name)
        future = self._pending.get(key)
        if future is None:
            started, generation = time.monotonic(), self._generation.get(key, 0)
            future = loop.run_in_executor(None, self._read, key, started, generation)
            self._pending[key] = future
            future.add_done_callback(lambda _f: self._pending.pop(key, None))
        return await asyncio.shield(future)

    def _read(self, key: tuple[str, str], started: float, generation: int) -> str | None:
        policy_id = self.store.resolve_alias(*key)
        if self.ttl_s > 0 and self._generation.get(key, 0) == generation:
            self._remember(key, policy_id, started)
        return policy_id

    def put(self, client: str, name: str, policy_id: str) -> None:
        """This process changed the alias: answer with the new target from now on."""
        key = (client, name)
        self._generation[key] = self._generation.get(key, 0) + 1
        self._remember(key, policy_id, time.monotonic())

    def _remember(self, key: tuple[str, str], policy_id: str | None, read_at: float) -> None:
        if len(self._hits) >= MAX_CACHED:
            self._hits.clear()
        if self.ttl_s > 0:
            self._hits[key] = (policy_id, read_at + self.ttl_s)

    async def load_once(self, policy_id: str, load: Callable[[], Awaitable[LoadedPolicy]]) -> LoadedPolicy:
        """``load()`` once per policy however many requests wait for it; its error reaches them all."""
        future = self._loads.get(policy_id)
        if future is None:
            future = asyncio.ensure_future(load())
            self._loads[policy_id] = future
            future.add_done_callback(lambda _f: self._loads.pop(policy_id, None))
        return await asyncio.shield(future)
