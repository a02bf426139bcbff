"""Process orchestration for ``cvpo serve | api | worker`` (the CLI's composition root).

``serve`` runs the whole service on one machine: Redis (persistent: AOF ``everysec``,
``noeviction``, loopback only; service-design.md §3.6) unless ``REDIS_URL`` is set, one Celery
worker and the API, as child processes that get the same environment. SIGTERM/Ctrl-C stops the
API, then the worker (warm shutdown: running jobs checkpoint and requeue), then Redis.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from core.datadir import prepare_data_dir, private_dir
from core.settings import Settings

STOP_GRACE_S = 120.0


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


def redis_command(data_dir: Path, port: int) -> list[str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise ServiceError("redis-server is not installed (apt-get install redis-server), or set REDIS_URL")
    redis_dir = private_dir(data_dir / "redis")
    return [
        exe,
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


def wait_for_redis(port: int, timeout_s: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"redis-server exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
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
    serves (a name such as ``localhost`` resolved, 0.0.0.0 seen as what it is)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
            0
        ]
    except socket.gaierror as exc:
        raise ServiceError(f"cannot resolve the bind address {host!r}: {exc}") from exc
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise ServiceError(f"cannot bind {host}:{port} ({exc.strerror}); set CVPO_PORT or --port") from exc
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


def serve(settings: Settings) -> int:
    """Start Redis (unless REDIS_URL is set), one worker and the API; stop them all on SIGTERM/SIGINT."""
    prepare_data_dir(settings)
    if not port_is_free(settings.host, settings.port):
        raise ServiceError(f"port {settings.port} on {settings.host} is in use; set CVPO_PORT")
    env = dict(os.environ)
    env["CVPO_DATA_DIR"] = str(settings.data_dir.resolve())
    env["CVPO_HOST"], env["CVPO_PORT"] = settings.host, str(settings.port)  # --host/--port reach the API
    children: list[tuple[str, subprocess.Popen]] = []
    if "REDIS_URL" not in os.environ:
        port = 6379 if port_is_free("127.0.0.1", 6379) else free_port()
        redis = subprocess.Popen(redis_command(settings.data_dir, port), stdout=subprocess.DEVNULL)
        children.append(("redis", redis))
        wait_for_redis(port, proc=redis)
        env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    cli = [sys.executable, "-m", "service.cli"]
    worker = subprocess.Popen([*cli, "worker"], env=env)
    children.append(("worker", worker))
    api = subprocess.Popen([*cli, "api", "--host", settings.host, "--port", str(settings.port)], env=env)
    children.append(("api", api))

    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    token_where = "CVPO_API_TOKEN" if settings.api_token else str((settings.data_dir / "api_token").resolve())
    print(
        f"cvpo serve: API on http://{settings.host}:{settings.port} (docs at /docs); "
        f"broker {env['REDIS_URL']}; data in {settings.data_dir.resolve()}; API token in {token_where}",
        flush=True,
    )
    try:
        while not stopping:
            for name, proc in children:
                if proc.poll() is not None:
                    print(f"cvpo serve: {name} exited with status {proc.returncode}; stopping", file=sys.stderr)
                    stopping = True
            time.sleep(0.2)
    finally:
        for name, proc in reversed(children):  # API first, then the worker, Redis last
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=STOP_GRACE_S if name == "worker" else 20)
                except subprocess.TimeoutExpired:
                    print(f"cvpo serve: {name} did not stop in time; killing it", file=sys.stderr)
                    proc.kill()
                    proc.wait()
    return 0
