"""Process orchestration for ``cvpo serve | api | worker`` (the CLI's composition root).

``serve`` runs the whole service on one machine: Redis (persistent: AOF ``everysec``,
``noeviction``, loopback only, a generated password; service-design.md §3.6) unless ``REDIS_URL`` is
set, one Celery worker and the API, as child processes that get the same environment. A child that
dies is restarted with backoff (Redis from its AOF; the API keeps answering ``/act`` meanwhile, and
the reconciler re-sends what the broker lost). SIGTERM/Ctrl-C stops the API, then the worker (warm
shutdown: running jobs checkpoint and requeue), then Redis.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from core.datadir import prepare_data_dir, private_dir
from core.settings import Settings

STOP_GRACE_S = 120.0
RESTART_BACKOFF_S = 1.0  # first restart delay of a dead child; doubles per quick death (CVPO_RESTART_BACKOFF_MAX_S)
STABLE_AFTER_S = 60.0  # a child that ran this long before dying starts its backoff again from the first delay
REDIS_PASSWORD_FILE = "redis_password"  # noqa: S105 - the file name, not a password


class ServiceError(RuntimeError):
    """The service cannot start as configured (missing redis-server, port in use, …)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def redis_password(data_dir: Path) -> str:
    """The password of the Redis ``cvpo serve`` starts: generated on first start into
    ``<data_dir>/redis_password`` (0600, like the API token), reused after, never printed."""
    path = data_dir / REDIS_PASSWORD_FILE
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing
    password = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password


def redacted(url: str) -> str:
    """A broker URL fit for logs: any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def redis_command(data_dir: Path, port: int, password: str | None = None) -> list[str]:
    """redis-server's command line. A password goes into a 0600 config file in the private Redis
    dir, not onto the command line, which every local user can read in ``ps``."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise ServiceError("redis-server is not installed (apt-get install redis-server), or set REDIS_URL")
    redis_dir = private_dir(data_dir / "redis")
    config: list[str] = []
    if password is not None:
        conf = redis_dir / "redis.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"requirepass {password}\n")
        config = [str(conf.resolve())]
    return [
        exe,
        *config,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--protected-mode", "yes",
        "--dir", str(redis_dir.resolve()),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--maxmemory-policy", "noeviction",
        "--daemonize", "no",
        "--logfile", "",
    ]  # fmt: skip


def wait_for_redis(
    port: int, timeout_s: float = 20.0, proc: subprocess.Popen | None = None, password: str | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    hello = (f"AUTH {password}\r\n" if password else "").encode() + b"PING\r\n"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"redis-server exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(hello)
                reply = b""
                while reply.count(b"\r\n") < (2 if password else 1):  # AUTH's +OK (or an error), then PING's
                    chunk = s.recv(64)
                    if not chunk:
                        break
                    reply += chunk
                if b"+PONG" in reply:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise ServiceError(f"redis-server did not answer on 127.0.0.1:{port} within {timeout_s:.0f} s")


def worker_argv(settings: Settings, loglevel: str = "INFO") -> list[str]:
    return [
        "worker",
        "-Q", settings.queue,
        "-c", "1",
        "-P", "prefork",
        "-n", f"cvpo-{os.getpid()}@%h",
        "--without-gossip",
        "--without-mingle",
        f"--loglevel={loglevel}",
    ]  # fmt: skip


def run_worker(settings: Settings, loglevel: str = "INFO") -> int:
    """Run one Celery worker in this process (blocks). CUDA is picked per job inside the child."""
    from core.celery_app import app  # built from the same environment as ``settings``

    prepare_data_dir(settings)

    app.worker_main(worker_argv(settings, loglevel))
    return 0


def bind_socket(host: str, port: int) -> socket.socket:
    """The API's listening socket, bound here so the app is built knowing the address it really
    serves (a name such as ``localhost`` resolved, 0.0.0.0 seen as what it is). IPv6 when the host
    has a colon, as uvicorn decides."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ServiceError(f"cannot bind {host}:{port} ({exc.strerror or exc}); set CVPO_PORT or --port") from exc
    sock.set_inheritable(True)
    return sock


def run_api(settings: Settings, loglevel: str = "info") -> int:
    """Bind, build the app from the bound address (CVPO_AUTH=off is refused off loopback), serve."""
    import uvicorn

    from api.app import create_app
    from api.shedding import shedding_protocol

    prepare_data_dir(settings)
    sock = bind_socket(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    try:
        app = create_app(settings.with_(host=host, port=port))
    except ValueError as exc:
        sock.close()
        raise ServiceError(str(exc)) from exc
    config = uvicorn.Config(
        app,
        workers=1,
        # Over-cap /act requests and connections past the limit are answered before the app. No
        # uvicorn limit_concurrency: it counts idle keep-alive connections too, and past it answered
        # every request with a bare 503 (no Retry-After, connection closed).
        http=shedding_protocol(settings.max_inflight, settings.max_connections),
        log_level=loglevel,
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
    return 0 if server.started else 3  # uvicorn's own exit status for a failed startup


@dataclass
class Child:
    """One process ``cvpo serve`` supervises, with its restart backoff."""

    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    stdout: int | None = None
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    quick_deaths: int = 0  # deaths in a row, each within STABLE_AFTER_S of its start
    restart_at: float | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self) -> subprocess.Popen:
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self.stdout)
        self.started_at = time.monotonic()
        self.restart_at = None
        return self.proc

    def schedule_restart(self, now: float, backoff_max_s: float) -> float:
        """Restart 1 s after a death, doubling while it keeps dying young (a crash loop does not spin)."""
        self.quick_deaths = self.quick_deaths + 1 if now - self.started_at < STABLE_AFTER_S else 1
        delay = min(backoff_max_s, RESTART_BACKOFF_S * 2 ** (self.quick_deaths - 1))
        self.proc, self.restart_at = None, now + delay
        return delay


CONFIG_ERROR = 2  # the ``cvpo`` command's status for a refused configuration: restarting cannot help


def serve(settings: Settings) -> int:
    """Start Redis (unless REDIS_URL is set), one worker and the API; restart any that dies, with
    backoff, until SIGTERM/SIGINT, then stop them all (API, worker, Redis).

    A SIGKILLed Redis used to stop the API and the worker too: nothing was lost, but every controller
    lost ``/act`` until a person restarted the service. Now Redis comes back from its AOF on the same
    port and password while the API keeps serving, the worker reconnects, and the reconciler re-sends
    whatever queued job the broker lost; a dead worker's running job loses its lease and resumes from
    its checkpoint as the next attempt on the restarted worker.
    """
    from api.hosts import is_loopback

    if not settings.auth and not is_loopback(settings.host):
        raise ServiceError(f"CVPO_AUTH=off is only allowed on a loopback address, not {settings.host}")
    prepare_data_dir(settings)
    if not port_is_free(settings.host, settings.port):
        raise ServiceError(f"port {settings.port} on {settings.host} is in use; set CVPO_PORT")
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    env = dict(os.environ)
    env["CVPO_DATA_DIR"] = str(settings.data_dir.resolve())
    env["CVPO_HOST"], env["CVPO_PORT"] = settings.host, str(settings.port)  # --host/--port reach the API
    children: list[Child] = []
    password_where = ""
    if "REDIS_URL" not in os.environ:
        port = 6379 if port_is_free("127.0.0.1", 6379) else free_port()
        password = redis_password(settings.data_dir)
        redis = Child("redis", redis_command(settings.data_dir, port, password), stdout=subprocess.DEVNULL)
        children.append(redis)
        wait_for_redis(port, proc=redis.start(), password=password)
        env["REDIS_URL"] = f"redis://:{password}@127.0.0.1:{port}/0"
        password_where = f" (password in {(settings.data_dir / REDIS_PASSWORD_FILE).resolve()})"
    cli = [sys.executable, "-m", "service.cli"]
    children.append(Child("worker", [*cli, "worker"], env))
    children.append(Child("api", [*cli, "api", "--host", settings.host, "--port", str(settings.port)], env))
    for child in children[-2:]:
        child.start()
    token_where = "CVPO_API_TOKEN" if settings.api_token else str((settings.data_dir / "api_token").resolve())
    print(
        f"cvpo serve: API on http://{settings.host}:{settings.port} (docs at /docs); "
        f"broker {redacted(env['REDIS_URL'])}{password_where}; data in {settings.data_dir.resolve()}; "
        f"API token in {token_where}",
        flush=True,
    )
    status = 0
    try:
        while not stopping:
            now = time.monotonic()
            for child in children:
                if stopping:  # Ctrl-C reaches the children too (one process group): their exits are no deaths
                    break
                if child.proc is not None and child.proc.poll() is not None:
                    code = child.proc.returncode
                    if code == CONFIG_ERROR:
                        print(f"cvpo serve: {child.name} refused its configuration; stopping", file=sys.stderr)
                        stopping, status = True, 1
                        break
                    delay = child.schedule_restart(now, settings.restart_backoff_max_s)
                    print(
                        f"cvpo serve: {child.name} exited with status {code}; restarting it in {delay:.0f} s",
                        file=sys.stderr,
                        flush=True,
                    )
                elif child.proc is None and child.restart_at is not None and now >= child.restart_at:
                    try:
                        pid = child.start().pid
                    except OSError as exc:
                        delay = child.schedule_restart(now, settings.restart_backoff_max_s)
                        print(
                            f"cvpo serve: {child.name} failed to start ({exc}); again in {delay:.0f} s", file=sys.stderr
                        )
                        continue
                    child.restarts.append(time.time())
                    print(f"cvpo serve: {child.name} restarted (pid {pid})", file=sys.stderr, flush=True)
            time.sleep(0.2)
    finally:
        for child in reversed(children):  # API first, then the worker, Redis last
            proc = child.proc
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_GRACE_S if child.name == "worker" else 20)
                except subprocess.TimeoutExpired:
                    print(f"cvpo serve: {child.name} did not stop in time; killing it", file=sys.stderr)
                    proc.kill()
                    proc.wait()
    return status
