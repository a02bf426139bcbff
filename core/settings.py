"""Service configuration, read from environment variables once (README "Configuration" lists them all).

One frozen dataclass shared by the API, the worker and ``cvpo serve`` so every process agrees on
the data directory, the database, the broker and the reliability timings.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

MiB = 1024 * 1024


class SettingsError(ValueError):
    """An environment variable with a value the service cannot use."""


def _num(env: Mapping[str, str], name: str, default: float, cast: type = float, minimum: float | None = None) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = cast(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r} is not a {cast.__name__}") from exc
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name}={raw!r} must be ≥ {minimum}")
    return value


@dataclass(frozen=True)
class Settings:
    """Every knob of the service, with its env var in the comment. Defaults suit one machine."""

    data_dir: Path = Path("./cvpo-data")  # CVPO_DATA_DIR: job runs, checkpoints, policies, SQLite file, token
    database_url: str = ""  # DATABASE_URL: SQLAlchemy URL; default sqlite:///<data_dir>/cvpo.db
    redis_url: str = "redis://127.0.0.1:6379/0"  # REDIS_URL: the broker (cvpo serve starts one if unset)
    api_token: str | None = None  # CVPO_API_TOKEN: admin token; generated into <data_dir>/api_token if unset
    host: str = "127.0.0.1"  # CVPO_HOST: API bind address (localhost by default)
    port: int = 8000  # CVPO_PORT
    auth: bool = True  # CVPO_AUTH=off disables auth (only allowed on a loopback host)
    queue: str = "cvpo"  # CVPO_QUEUE: Celery queue for training jobs (e.g. "gpu" / "cpu" deployments)
    lease_ttl_s: float = 60.0  # CVPO_LEASE_TTL_S: a job whose lease is older is presumed lost
    heartbeat_s: float = 15.0  # CVPO_HEARTBEAT_S: lease renewal and cancel-flag poll period
    reconcile_every_s: float = 30.0  # CVPO_RECONCILE_EVERY_S: reconciler period in the API process (0 = off)
    outbox_grace_s: float = 30.0  # CVPO_OUTBOX_GRACE_S: a queued job unsent this long is sent again
    max_active_jobs_per_client: int = 8  # CVPO_MAX_ACTIVE_JOBS: non-terminal jobs per client (then 429)
    max_queued: int = 256  # CVPO_MAX_QUEUED: queued jobs overall (then 503)
    max_batch: int = 1024  # CVPO_MAX_BATCH: observations per /act request (then 413)
    act_body_limit: int = 8 * MiB  # CVPO_ACT_BODY_LIMIT: bytes per /act body (then 413)
    body_limit: int = 1 * MiB  # CVPO_BODY_LIMIT: bytes per body on other routes (then 413)
    max_inflight: int = 128  # CVPO_MAX_INFLIGHT: concurrent requests per API process (then 503)
    max_connections: int = 1000  # CVPO_MAX_CONNECTIONS: open client connections per API process (then 503)
    shield_hooks: str = ""  # CVPO_SHIELD_HOOKS: "name=module:function,..." projection hooks for shields
    # Certified policies (README "Serving policies"): held-out episodes per certificate (a job's spec
    # ``certify.episodes`` overrides it), the cap on sampled-action episodes (reported, not
    # certified: a third of the episodes, at most this), and how many of a finished job's best
    # checkpoints by its own eval metrics are certified besides the best-feasible and final ones.
    certify_episodes: int = 30  # CVPO_CERTIFY_EPISODES
    certify_stochastic_episodes: int = 10  # CVPO_CERTIFY_STOCHASTIC_EPISODES
    certify_candidates: int = 3  # CVPO_CERTIFY_CANDIDATES
    visibility_timeout_s: int = 49 * 3600  # longest job (48 h cap) + 1 h (service-design.md §3.2)
    # CVPO_PUBLIC_PATHS: routes readable without a token (health probes always are; /openapi.json
    # and /docs are public too: the schema holds no data).
    public_paths: frozenset[str] = field(default_factory=lambda: frozenset({"/livez", "/readyz"}))
    # Slow and idle clients (issue #23 items 1 and 2): a request's headers must be in within
    # header_timeout_s of its connection opening (or of the previous response), its body within
    # body_timeout_s (then 408); one client address holds at most max_connections_per_peer
    # connections (0 = no cap; set 0 behind a reverse proxy, where every client has its address).
    header_timeout_s: float = 10.0  # CVPO_HEADER_TIMEOUT_S
    body_timeout_s: float = 30.0  # CVPO_BODY_TIMEOUT_S
    max_connections_per_peer: int = 100  # CVPO_MAX_CONNECTIONS_PER_PEER
    # Job event streams (issue #23 item 4): open streams per token and per API process (then 429 +
    # Retry-After), a stream's lifetime (then it ends and the client resumes with Last-Event-ID), and
    # how often an open stream re-checks its token (a revoked or expired one ends it).
    max_streams: int = 512  # CVPO_MAX_STREAMS
    max_streams_per_token: int = 16  # CVPO_MAX_STREAMS_PER_TOKEN
    stream_max_s: float = 300.0  # CVPO_STREAM_MAX_S
    stream_auth_check_s: float = 10.0  # CVPO_STREAM_AUTH_CHECK_S

    # Deployment hardening (issue #23 items 7, 8 and 15). CVPO_ALLOWED_HOSTS: Host headers served
    # while CVPO_AUTH=off (against DNS rebinding; "*" = any). CVPO_CELERY_REMOTE_CONTROL=on: workers
    # answer Celery's broadcast commands (off: nobody with broker access can shut them down or
    # inspect them). CVPO_RESTART_BACKOFF_MAX_S: cvpo serve restarts a dead child after 1 s,
    # doubling per quick death up to this.
    allowed_hosts: frozenset[str] = frozenset({"localhost", "127.0.0.1", "::1"})  # CVPO_ALLOWED_HOSTS
    celery_remote_control: bool = False  # CVPO_CELERY_REMOTE_CONTROL
    restart_backoff_max_s: float = 30.0  # CVPO_RESTART_BACKOFF_MAX_S
    # Disk (issue #23 item 11): full checkpoints (each holds the replay buffer) kept per job besides
    # the best one and any promoted one (older ones are deleted, their small policy artefacts stay),
    # and the projected peak footprint a job spec may have (0 = no quota; refused at submission).
    keep_checkpoints: int = 2  # CVPO_KEEP_CHECKPOINTS
    job_disk_quota_bytes: int = 16 * 1024 * MiB  # CVPO_JOB_DISK_QUOTA_BYTES (16 GiB; suffixes K/M/G/T)
    # Aliases (issue #20): an API process reuses an alias's target read from the store for this long, so
    # /act through an alias rarely reads the store; another process may answer with the old target for
    # up to this long after a repoint (0: read the store on every request).
    alias_ttl_s: float = 1.0  # CVPO_ALIAS_TTL_S

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'cvpo.db').resolve()}"

    @property
    def token_file(self) -> Path:
        return self.data_dir / "api_token"

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        d = cls()
        auth_raw = env.get("CVPO_AUTH", "on").strip().lower()
        if auth_raw not in ("on", "off", "1", "0", "true", "false"):
            raise SettingsError(f"CVPO_AUTH={auth_raw!r}: use on or off")
        public = set(d.public_paths)
        for p in filter(None, (s.strip() for s in env.get("CVPO_PUBLIC_PATHS", "").split(","))):
            public.add(p)
        return cls(
            data_dir=Path(env.get("CVPO_DATA_DIR") or d.data_dir),
            database_url=env.get("DATABASE_URL", ""),
            redis_url=env.get("REDIS_URL") or d.redis_url,
            api_token=env.get("CVPO_API_TOKEN") or None,
            host=env.get("CVPO_HOST") or d.host,
            port=int(_num(env, "CVPO_PORT", d.port, int, 1)),
            auth=auth_raw in ("on", "1", "true"),
            queue=env.get("CVPO_QUEUE") or d.queue,
            lease_ttl_s=_num(env, "CVPO_LEASE_TTL_S", d.lease_ttl_s, float, 1),
            heartbeat_s=_num(env, "CVPO_HEARTBEAT_S", d.heartbeat_s, float, 0.1),
            reconcile_every_s=_num(env, "CVPO_RECONCILE_EVERY_S", d.reconcile_every_s, float, 0),
            outbox_grace_s=_num(env, "CVPO_OUTBOX_GRACE_S", d.outbox_grace_s, float, 0),
            max_active_jobs_per_client=int(_num(env, "CVPO_MAX_ACTIVE_JOBS", d.max_active_jobs_per_client, int, 1)),
            max_queued=int(_num(env, "CVPO_MAX_QUEUED", d.max_queued, int, 1)),
            max_batch=int(_num(env, "CVPO_MAX_BATCH", d.max_batch, int, 1)),
            act_body_limit=int(_num(env, "CVPO_ACT_BODY_LIMIT", d.act_body_limit, int, 1024)),
            body_limit=int(_num(env, "CVPO_BODY_LIMIT", d.body_limit, int, 1024)),
            max_inflight=int(_num(env, "CVPO_MAX_INFLIGHT", d.max_inflight, int, 1)),
            max_connections=int(_num(env, "CVPO_MAX_CONNECTIONS", d.max_connections, int, 1)),
            shield_hooks=env.get("CVPO_SHIELD_HOOKS", ""),
            certify_episodes=int(_num(env, "CVPO_CERTIFY_EPISODES", d.certify_episodes, int, 2)),
            certify_stochastic_episodes=int(
                _num(env, "CVPO_CERTIFY_STOCHASTIC_EPISODES", d.certify_stochastic_episodes, int, 0)
            ),
            certify_candidates=int(_num(env, "CVPO_CERTIFY_CANDIDATES", d.certify_candidates, int, 0)),
            public_paths=frozenset(public),
            header_timeout_s=_num(env, "CVPO_HEADER_TIMEOUT_S", d.header_timeout_s, float, 0.1),
            body_timeout_s=_num(env, "CVPO_BODY_TIMEOUT_S", d.body_timeout_s, float, 0.1),
            max_connections_per_peer=int(
                _num(env, "CVPO_MAX_CONNECTIONS_PER_PEER", d.max_connections_per_peer, int, 0)
            ),
            max_streams=int(_num(env, "CVPO_MAX_STREAMS", d.max_streams, int, 1)),
            max_streams_per_token=int(_num(env, "CVPO_MAX_STREAMS_PER_TOKEN", d.max_streams_per_token, int, 1)),
            stream_max_s=_num(env, "CVPO_STREAM_MAX_S", d.stream_max_s, float, 0.5),
            stream_auth_check_s=_num(env, "CVPO_STREAM_AUTH_CHECK_S", d.stream_auth_check_s, float, 0.1),
            allowed_hosts=frozenset(
                h.strip().lower() for h in env.get("CVPO_ALLOWED_HOSTS", "").split(",") if h.strip()
            )
            or d.allowed_hosts,
            celery_remote_control=env.get("CVPO_CELERY_REMOTE_CONTROL", "off").strip().lower() in ("on", "1", "true"),
            restart_backoff_max_s=_num(env, "CVPO_RESTART_BACKOFF_MAX_S", d.restart_backoff_max_s, float, 1),
            keep_checkpoints=int(_num(env, "CVPO_KEEP_CHECKPOINTS", d.keep_checkpoints, int, 1)),
            job_disk_quota_bytes=_bytes(env, "CVPO_JOB_DISK_QUOTA_BYTES", d.job_disk_quota_bytes),
            alias_ttl_s=_num(env, "CVPO_ALIAS_TTL_S", d.alias_ttl_s, float, 0),
        )


_BYTE_UNITS = {"": 1, "K": 1024, "M": MiB, "G": 1024 * MiB, "T": 1024 * 1024 * MiB}


def _bytes(env: Mapping[str, str], name: str, default: int) -> int:
    """A byte count: an integer, optionally with a binary suffix (``20G``, ``512M``, ``1.5T``, ``GiB``)."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    text = raw.upper().removesuffix("IB").removesuffix("B")
    unit = text[-1:] if text[-1:] in _BYTE_UNITS else ""
    try:
        value = float(text[: len(text) - len(unit)]) * _BYTE_UNITS[unit]
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r} is not a byte count (e.g. 17179869184, 16G, 512M)") from exc
    if not value >= 0 or value == float("inf"):
        raise SettingsError(f"{name}={raw!r} must be ≥ 0")
    return int(value)
