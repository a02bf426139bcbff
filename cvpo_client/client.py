"""``Client``: the service's REST API as Python calls (README, "Python client").

Only the standard library and NumPy, so a robot's controller or a notebook can depend on it without
torch or the service's own dependencies. Every method is one or a few HTTP requests on one keep-alive
connection (``cvpo_client._http``); list methods follow the API's pagination to the end.
"""

from __future__ import annotations

import json
import os
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, TypeVar, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cvpo_client._http import Connection
from cvpo_client._version import __version__
from cvpo_client.errors import Busy, WaitTimeout, error_for
from cvpo_client.models import ActResult, Alias, AliasEvent, Checkpoint, Evaluation, Job, Policy

DEFAULT_URL = "http://127.0.0.1:8000"
PAGE_SIZE = 100  # the API's largest page for jobs, policies and evaluations
METRICS_PAGE = 10_000  # the API's largest metrics page
T = TypeVar("T")


def _quote(segment: str) -> str:
    """An id as one path segment: a slash or ``?`` inside it must not name another route."""
    return urllib.parse.quote(segment, safe="")


class Client:
    """A client of one CVPO service.

    ``base_url`` defaults to ``$CVPO_API_URL`` or ``http://127.0.0.1:8000``; ``token`` to
    ``$CVPO_API_TOKEN`` (None and no variable: requests go without one, for ``CVPO_AUTH=off``).
    ``timeout`` bounds each socket operation, in seconds. Use as a context manager, or call
    ``close()``, to release the connection. Requests from several threads are serialised on the one
    connection; give each thread its own ``Client`` to send in parallel.
    """

    def __init__(self, base_url: str | None = None, token: str | None = None, timeout: float = 30.0) -> None:
        self.base_url = base_url or os.environ.get("CVPO_API_URL") or DEFAULT_URL
        self.token = token if token is not None else os.environ.get("CVPO_API_TOKEN") or None
        self.timeout = timeout
        self._http = Connection(self.base_url, timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def __repr__(self) -> str:
        return f"Client({self.base_url!r})"  # never the token

    # ------------------------------------------------------------------------------ plumbing

    def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
        retry_safe: bool | None = None,
    ) -> tuple[Any, dict[str, str]]:
        """One request: (parsed JSON or None, lower-case response headers), or a ``CvpoAPIError``.
        Public so that routes this client has no method for are still one call away."""
        if query:
            pairs = {k: v for k, v in query.items() if v is not None}
            if pairs:
                path = f"{path}?{urllib.parse.urlencode(pairs)}"
        head = {"Accept": "application/json", "User-Agent": f"cvpo-client/{__version__}"}
        if self.token:
            head["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
            head["Content-Type"] = "application/json"
        head.update(headers or {})
        safe = method in ("GET", "HEAD", "PUT", "DELETE") if retry_safe is None else retry_safe
        resp = self._http.request(method, path, data, head, retry_safe=safe)
        if not 200 <= resp.status < 300:
            raise error_for(resp.status, resp.reason, resp.headers, resp.data)
        return (json.loads(resp.data) if resp.data else None), resp.headers

    def _get(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, query=query)[0]

    def _pages(self, path: str, **query: Any) -> list[dict[str, Any]]:
        """Every item of a paged listing (``items`` + ``next_page_token``)."""
        items: list[dict[str, Any]] = []
        token = None
        while True:
            page = self._get(path, page_size=PAGE_SIZE, page_token=token, **query)
            items.extend(page["items"])
            token = page.get("next_page_token")
            if not token:
                return items

    @staticmethod
    def _wait(
        fetch: Callable[[], T],
        key: Callable[[T], object],
        done: Callable[[T], bool],
        describe: Callable[[T], str],
        timeout: float | None,
        poll_s: float,
        on_progress: Callable[[T], None] | None,
    ) -> T:
        """Poll ``fetch`` until ``done``; ``on_progress`` sees every state whose ``key`` changed, the
        first and the last included. A 429/503 while polling waits its Retry-After and goes on."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last_key: object = object()
        last: T | None = None
        while True:
            try:
                last = fetch()
            except Busy as exc:
                pause = exc.retry_after if exc.retry_after is not None else poll_s
            else:
                if on_progress is not None and key(last) != last_key:
                    on_progress(last)
                last_key = key(last)
                if done(last):
                    return last
                pause = poll_s
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    state = describe(last) if last is not None else "never answered (busy)"
                    raise WaitTimeout(f"still not finished after {timeout:g} s: {state}", last)
                pause = min(pause, left)
            time.sleep(pause)

    # ------------------------------------------------------------------------------ jobs

    def submit(
        self,
        env_id: str,
        total_env_steps: int,
        hyperparams: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        **spec: Any,
    ) -> Job:
        """``POST /jobs``: start a training job. ``spec`` takes the job spec's other fields (``seed``,
        ``cost_limit``, ``preset``, ``device``, ``eval``, ``certify``, ``checkpoint_every_epochs``,
        ``time_limit_s``, ``max_attempts``, ``labels``). Without an ``idempotency_key`` one is drawn,
        so a resend after a dropped connection can never start the job twice."""
        body: dict[str, Any] = {"env_id": env_id, "total_env_steps": total_env_steps, **spec}
        if hyperparams is not None:
            body["hyperparams"] = hyperparams
        key = idempotency_key or f"cvpo-client-{uuid.uuid4().hex}"
        doc, _ = self.request("POST", "/jobs", body=body, headers={"Idempotency-Key": key}, retry_safe=True)
        return Job.from_dict(doc)

    def job(self, job_id: str) -> Job:
        return Job.from_dict(self._get(f"/jobs/{_quote(job_id)}"))

    def jobs(self, status: str | None = None, env_id: str | None = None) -> list[Job]:
        """This client's jobs, newest first (every page)."""
        return [Job.from_dict(d) for d in self._pages("/jobs", status=status, env_id=env_id)]

    def cancel(self, job_id: str) -> Job:
        """Cancel a job: a queued one ends at once, a running one checkpoints and ends (``cancelling``
        until then). A 409 ``Conflict`` if it has already ended."""
        doc, _ = self.request("POST", f"/jobs/{_quote(job_id)}/cancel", retry_safe=True)
        return Job.from_dict(doc)

    def delete_job(self, job_id: str) -> None:
        """Delete an ended job and its run directory (its policies stay)."""
        self.request("DELETE", f"/jobs/{_quote(job_id)}")

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        poll_s: float = 2.0,
        on_progress: Callable[[Job], None] | None = None,
    ) -> Job:
        """Poll the job until it has ended and return it (whatever the outcome: check ``status``).
        ``on_progress(job)`` is called whenever its status, env_step or epoch changed. Past ``timeout``
        seconds: ``WaitTimeout`` (its ``last`` is the job as last seen; the job keeps running)."""
        return self._wait(
            lambda: self.job(job_id),
            lambda j: (j.status, j.env_step, j.epoch),
            lambda j: j.done,
            lambda j: f"job {j.id} is {j.status} at env_step {j.env_step}/{j.total_env_steps}",
            timeout,
            poll_s,
            on_progress,
        )

    def metrics(self, job_id: str, keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """The per-epoch metric history, oldest first, as rows ``{"epoch", "env_step", **values}``
        (e.g. ``eval_return``, ``eval_cost``; all keys, or only ``keys``), every page."""
        rows: list[dict[str, Any]] = []
        after = None
        joined = ",".join(keys) if keys else None
        while True:
            page = self._get(f"/jobs/{_quote(job_id)}/metrics", keys=joined, after_step=after, limit=METRICS_PAGE)
            for p in page["points"]:
                row: dict[str, Any] = {"epoch": p["epoch"], "env_step": p["env_step"]}
                row.update((k, v) for k, v in (p.get("values") or {}).items() if k not in row)
                rows.append(row)
            after = page.get("next_after_step")
            if after is None:
                return rows

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        return [Checkpoint.from_dict(d) for d in self._get(f"/jobs/{_quote(job_id)}/checkpoints")["items"]]

    # ------------------------------------------------------------------------------ policies

    def promote(
        self,
        job_id: str,
        checkpoint_id: str | None = None,
        *,
        shield: dict[str, Any] | None = None,
        override_reason: str | None = None,
    ) -> Policy:
        """``POST /policies``: make a checkpoint of a job an immutable policy if it certifies.
        ``checkpoint_id``: a ``ckpt_…`` id, ``"best"`` (the default), ``"final"`` or ``"served"``;
        ``shield`` as in README "Shields". Not certified: a 409 ``Conflict`` whose ``body`` has the
        ``certificate``, unless an admin token gives ``override_reason``. Not resent after a dropped
        connection (it would make a second policy)."""
        body: dict[str, Any] = {"job_id": job_id}
        if checkpoint_id is not None:
            body["checkpoint_id"] = checkpoint_id
        if shield is not None:
            body["shield"] = shield
        if override_reason is not None:
            body["override"] = {"reason": override_reason}
        doc, _ = self.request("POST", "/policies", body=body, retry_safe=False)
        return Policy.from_dict(doc)

    def policy(self, policy_id: str) -> Policy:
        return Policy.from_dict(self._get(f"/policies/{_quote(policy_id)}"))

    def policies(self, env_id: str | None = None, job_id: str | None = None) -> list[Policy]:
        """This client's policies, newest first (every page)."""
        return [Policy.from_dict(d) for d in self._pages("/policies", env_id=env_id, job_id=job_id)]

    @overload
    def act(
        self,
        policy_id: str,
        obs: ArrayLike,
        deterministic: bool = True,
        *,
        seed: int | None = None,
        request_id: str | None = None,
        returns: None = None,
        full: Literal[False] = False,
    ) -> NDArray[np.float64]: ...

    @overload
    def act(
        self,
        policy_id: str,
        obs: ArrayLike,
        deterministic: bool = True,
        *,
        seed: int | None = None,
        request_id: str | None = None,
        returns: Sequence[str],
        full: bool = False,
    ) -> ActResult: ...

    @overload
    def act(
        self,
        policy_id: str,
        obs: ArrayLike,
        deterministic: bool = True,
        *,
        seed: int | None = None,
        request_id: str | None = None,
        returns: Sequence[str] | None = None,
        full: Literal[True],
    ) -> ActResult: ...

    def act(
        self,
        policy_id: str,
        obs: ArrayLike,
        deterministic: bool = True,
        *,
        seed: int | None = None,
        request_id: str | None = None,
        returns: Sequence[str] | None = None,
        full: bool = False,
    ) -> NDArray[np.float64] | ActResult:
        """``POST /policies/{id}/act``: actions for raw observations, inside the policy's action Box.

        ``obs``: one observation (1-D, obs_dim numbers) → a 1-D action array; a batch (2-D, B × obs_dim)
        → a B × act_dim array; float64 either way. ``deterministic=False`` samples (``seed`` repeats a
        sample). ``returns=["cost_to_go"]`` (policies with cost critics) or ``full=True`` gives an
        ``ActResult`` instead: actions plus ``clipped``, ``cost_to_go``, ``shield`` and the certified
        header. A wrong width or a non-finite number is an ``InvalidRequest`` naming the row and column."""
        return self._act(f"/policies/{_quote(policy_id)}/act", obs, deterministic, seed, request_id, returns, full)

    def _act(
        self,
        path: str,
        obs: ArrayLike,
        deterministic: bool,
        seed: int | None,
        request_id: str | None,
        returns: Sequence[str] | None,
        full: bool,
    ) -> NDArray[np.float64] | ActResult:
        arr = np.asarray(obs, dtype=np.float64)
        if arr.ndim not in (1, 2):
            raise ValueError(f"obs must be one observation (1-D) or a batch (2-D), got shape {arr.shape}")
        body: dict[str, Any] = {"observations": arr.tolist(), "deterministic": deterministic}
        if seed is not None:
            body["seed"] = seed
        if request_id is not None:
            body["request_id"] = request_id
        if returns is not None:
            body["return"] = list(returns)
        doc, headers = self.request("POST", path, body=body, retry_safe=True)
        actions = np.asarray(doc["actions"], dtype=np.float64)
        if not full and returns is None:
            return actions[0] if arr.ndim == 1 else actions
        clipped = np.asarray(doc.get("clipped") or [False] * len(actions), dtype=np.bool_)
        ctg = doc.get("cost_to_go")
        cost_to_go = None if ctg is None else np.asarray(ctg, dtype=np.float64)
        if arr.ndim == 1:
            actions, clipped = actions[0], clipped[0]
            cost_to_go = None if cost_to_go is None else cost_to_go[0]
        certified = headers.get("x-policy-certified")
        return ActResult(
            actions=actions,
            clipped=np.asarray(clipped, dtype=np.bool_),
            cost_to_go=cost_to_go,
            shield=doc.get("shield"),
            policy_id=doc.get("policy_id") or headers.get("x-policy-id", ""),
            artefact_sha256=doc.get("artefact_sha256", ""),
            request_id=doc.get("request_id"),
            deterministic=bool(doc.get("deterministic", deterministic)),
            certified=None if certified is None else certified == "true",
            alias=doc.get("alias"),
            raw=doc,
        )

    # ------------------------------------------------------------------------------ aliases

    def set_alias(
        self,
        name: str,
        policy_id: str,
        *,
        reason: str | None = None,
        override_reason: str | None = None,
        client: str | None = None,
    ) -> Alias:
        """``PUT /aliases/{name}``: point the alias at a policy, creating it. Only certified policies,
        unless an admin token gives ``override_reason`` (else a 409 ``Conflict`` with the certificate).
        ``reason`` goes into the alias's history; ``client`` (admins only) names another client's alias.
        Pointing it at its current target again changes nothing, so a resend is harmless."""
        body: dict[str, Any] = {"policy_id": policy_id}
        if reason is not None:
            body["reason"] = reason
        if override_reason is not None:
            body["override"] = {"reason": override_reason}
        doc, _ = self.request("PUT", f"/aliases/{_quote(name)}", query={"client": client}, body=body)
        return Alias.from_dict(doc)

    def alias(self, name: str, client: str | None = None) -> Alias:
        return Alias.from_dict(self._get(f"/aliases/{_quote(name)}", client=client))

    def aliases(self) -> list[Alias]:
        """This client's aliases (an admin's token: every client's), newest first (every page)."""
        return [Alias.from_dict(d) for d in self._pages("/aliases")]

    def alias_history(self, name: str, client: str | None = None) -> list[AliasEvent]:
        """Every change of the alias's target, newest first (every page)."""
        return [AliasEvent.from_dict(d) for d in self._pages(f"/aliases/{_quote(name)}/history", client=client)]

    def rollback_alias(
        self,
        name: str,
        *,
        reason: str | None = None,
        override_reason: str | None = None,
        client: str | None = None,
    ) -> Alias:
        """``POST /aliases/{name}/rollback``: back to the previous target (A → B → C, rollback → B,
        rollback → A); a 409 ``Conflict`` when there is none. Not resent after a dropped connection
        (a second rollback would go one step further)."""
        body: dict[str, Any] = {}
        if reason is not None:
            body["reason"] = reason
        if override_reason is not None:
            body["override"] = {"reason": override_reason}
        doc, _ = self.request(
            "POST", f"/aliases/{_quote(name)}/rollback", query={"client": client}, body=body, retry_safe=False
        )
        return Alias.from_dict(doc)

    @overload
    def act_alias(
        self,
        name: str,
        obs: ArrayLike,
        deterministic: bool = True,
        *,
        seed: int | None = None,
        request_id: str | None = None,
        returns: None = None,
        full: Literal[False] = False,
    ) -> NDArray[np.float64]: ...

    @overload
    def act_alias(
        self,
        name: str,
        obs: ArrayLike,
        deterministic: bool = True,
        *,
        seed: int | None = None,
        request_id: str | None = None,
        returns: Sequence[str],
        full: bool = False,
    ) -> ActResult: ...

    @overload
    def act_alias(
        self,
        name: str,
        obs: ArrayLike,
        deterministic: bool = True,
        *,
        seed: int | None = None,
        request_id: str | None = None,
        returns: Sequence[str] | None = None,
        full: Literal[True],
    ) -> ActResult: ...

    def act_alias(
        self,
        name: str,
        obs: ArrayLike,
        deterministic: bool = True,
        *,
        seed: int | None = None,
        request_id: str | None = None,
        returns: Sequence[str] | None = None,
        full: bool = False,
    ) -> NDArray[np.float64] | ActResult:
        """``POST /aliases/{name}/act``: ``act`` on whatever policy the alias points at now (the token
        needs ``policies:act`` or ``alias:<name>``). ``full=True``: the ``ActResult``'s ``policy_id``
        names the policy that answered."""
        return self._act(f"/aliases/{_quote(name)}/act", obs, deterministic, seed, request_id, returns, full)

    # ------------------------------------------------------------------------------ evaluations

    def evaluate(
        self,
        policy_id: str,
        *,
        episodes: int | None = None,
        stochastic_episodes: int | None = None,
        seed_base: int | None = None,
        cost_limits: float | Iterable[float] | None = None,
        env_id: str | None = None,
        confidence: float | None = None,
    ) -> Evaluation:
        """``POST /policies/{id}/evaluations``: queue a held-out evaluation on a worker (unset
        parameters take the server's defaults). Poll it with ``wait_evaluation``. Not resent after a
        dropped connection (it would queue a second one)."""
        if cost_limits is not None and not isinstance(cost_limits, int | float):
            cost_limits = [float(c) for c in cost_limits]
        body: dict[str, Any] = {
            "episodes": episodes,
            "stochastic_episodes": stochastic_episodes,
            "seed_base": seed_base,
            "cost_limits": cost_limits,
            "env_id": env_id,
            "confidence": confidence,
        }
        body = {k: v for k, v in body.items() if v is not None}
        doc, _ = self.request("POST", f"/policies/{_quote(policy_id)}/evaluations", body=body, retry_safe=False)
        return Evaluation.from_dict(doc)

    def evaluation(self, policy_id: str, evaluation_id: str) -> Evaluation:
        return Evaluation.from_dict(self._get(f"/policies/{_quote(policy_id)}/evaluations/{_quote(evaluation_id)}"))

    def evaluations(self, policy_id: str) -> list[Evaluation]:
        """A policy's evaluations, newest first (every page)."""
        return [Evaluation.from_dict(d) for d in self._pages(f"/policies/{_quote(policy_id)}/evaluations")]

    def wait_evaluation(
        self,
        policy_id: str,
        evaluation_id: str,
        timeout: float | None = None,
        poll_s: float = 2.0,
        on_progress: Callable[[Evaluation], None] | None = None,
    ) -> Evaluation:
        """Like ``wait`` for an evaluation: returns it once ``succeeded`` or ``failed``."""
        return self._wait(
            lambda: self.evaluation(policy_id, evaluation_id),
            lambda e: e.status,
            lambda e: e.done,
            lambda e: f"evaluation {e.id} of {e.policy_id} is {e.status}",
            timeout,
            poll_s,
            on_progress,
        )
