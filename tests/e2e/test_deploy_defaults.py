"""Deployment defaults (issue #23 items 6 and 8): CVPO_AUTH=off is held to the address the API is really
bound to, ``cvpo serve --host/--port`` reach the API process, a Host allowlist while auth is off (DNS
rebinding), a private data dir and store, and containers that do not run as root."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml
from fastapi.testclient import TestClient

from core.settings import Settings
from service.launcher import free_port
from tests.conftest import ROOT, wait_until

NO_BROKER = "redis://127.0.0.1:9/0"  # nothing listens: these checks never reach the broker


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    drop = ("REDIS_URL", "CVPO_API_TOKEN", "DATABASE_URL", "CVPO_HOST", "CVPO_PORT", "CVPO_AUTH")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update({"CVPO_DATA_DIR": str(tmp / "data"), "PYTHONUNBUFFERED": "1", **extra})
    return env


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code < 500
    except httpx.HTTPError:
        return False


def _stop(proc: subprocess.Popen, timeout_s: float = 120) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(timeout=10)
    return proc.returncode


# ----------------------------------------------------------------------------------------- item 6


def test_cvpo_api_refuses_auth_off_on_the_address_it_binds(tmp_path: Path) -> None:
    """``cvpo api --host 0.0.0.0`` with CVPO_AUTH=off: the app used to check CVPO_HOST (unset, so
    127.0.0.1) while uvicorn bound the flag's 0.0.0.0, and served every interface unauthenticated."""
    port = free_port()
    env = _env(tmp_path, CVPO_AUTH="off", REDIS_URL=NO_BROKER, CVPO_RECONCILE_EVERY_S="0")
    cmd = [sys.executable, "-m", "service.cli", "api", "--host", "0.0.0.0", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while proc.poll() is None and time.monotonic() < deadline:
            assert not _answers(f"http://127.0.0.1:{port}/livez"), "the API served 0.0.0.0 without authentication"
            time.sleep(0.2)
        assert proc.poll() is not None, "cvpo api neither served nor exited within 90 s"
        out = proc.stdout.read() if proc.stdout else ""
        assert proc.returncode != 0, out
        assert "CVPO_AUTH=off" in out and "loopback" in out and "0.0.0.0" in out, out
    finally:
        _stop(proc)


def test_cvpo_serve_host_and_port_reach_the_api(tmp_path: Path) -> None:
    """``cvpo serve --host 127.0.0.2 --port P`` (CVPO_AUTH=off, a loopback alias): the API child used
    to bind CVPO_HOST/CVPO_PORT's defaults (127.0.0.1:8000) instead. Also checks, on the real process
    tree, the private data dir and store (item 8) and the Host allowlist through uvicorn."""
    port = free_port()
    log_path = tmp_path / "serve.log"
    log = open(log_path, "w")  # noqa: SIM115 - the child writes it until it exits
    cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.2", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=_env(tmp_path, CVPO_AUTH="off"), cwd=ROOT, stdout=log, stderr=log)
    try:
        base = f"http://127.0.0.2:{port}"
        wait_until(lambda: proc.poll() is not None or _answers(f"{base}/readyz"), 90, "the API on 127.0.0.2")
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert httpx.get(f"{base}/jobs", timeout=5).status_code == 200, "auth is off on loopback"
        assert not _answers(f"http://127.0.0.1:{port}/livez"), "bound to the flag's address only"
        rebound = httpx.get(f"{base}/jobs", headers={"Host": f"attacker.example:{port}"}, timeout=5)
        assert rebound.status_code == 421 and rebound.headers["content-type"] == "application/problem+json"
        data = tmp_path / "data"
        assert oct(data.stat().st_mode & 0o777) == "0o700"
        assert oct((data / "cvpo.db").stat().st_mode & 0o777) == "0o600"
        assert oct((data / "redis").stat().st_mode & 0o777) == "0o700"
    finally:
        code = _stop(proc)
        log.close()
    assert code == 0, log_path.read_text()[-3000:]


# ----------------------------------------------------------------------------------------- item 8


def _app_settings(tmp: Path, **changes: object) -> Settings:
    base = Settings(data_dir=tmp / "data", redis_url=NO_BROKER, api_token="deploy-tests-token", reconcile_every_s=0.0)
    return base.with_(**changes)


def test_data_dir_and_store_are_created_private(tmp_path: Path) -> None:
    from api.app import create_app

    with TestClient(create_app(_app_settings(tmp_path))) as client:
        assert client.get("/livez").status_code == 200
    data = tmp_path / "data"
    assert oct(data.stat().st_mode & 0o777) == "0o700", "the data dir holds tokens and every job's spec"
    assert oct((data / "cvpo.db").stat().st_mode & 0o777) == "0o600"
    for side in data.glob("cvpo.db-*"):
        assert oct(side.stat().st_mode & 0o777) == "0o600", side

    loose = tmp_path / "old"  # a data dir an older version created with the default umask
    (loose / "data").mkdir(parents=True, mode=0o755)
    (loose / "data").chmod(0o755)
    with TestClient(create_app(_app_settings(loose))) as client:
        assert client.get("/livez").status_code == 200
    assert oct((loose / "data").stat().st_mode & 0o777) == "0o700", "tightened on start"


def test_auth_off_serves_loopback_host_names_only(tmp_path: Path) -> None:
    """DNS rebinding: a page on attacker.example re-pointed at 127.0.0.1 reaches a loopback API whose
    browser requests carry ``Host: attacker.example``; with auth off they must not be served."""
    from api.app import create_app

    app = create_app(_app_settings(tmp_path, auth=False))
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST", "127.0.0.1"):
            assert client.get("/jobs", headers={"Host": host}).status_code == 200, host
        for host in ("attacker.example", "attacker.example:8000", "localhost.attacker.example", "10.0.0.5"):
            r = client.get("/jobs", headers={"Host": host})
            assert r.status_code == 421, (host, r.status_code)
            assert r.headers["content-type"] == "application/problem+json"
            assert "CVPO_ALLOWED_HOSTS" in r.json()["detail"]
        assert client.post("/jobs", json={}, headers={"Host": "attacker.example"}).status_code == 421
    with TestClient(create_app(_app_settings(tmp_path, auth=False, allowed_hosts=frozenset({"robot.lan"})))) as c:
        c.base_url = httpx.URL("http://127.0.0.1:8000")
        assert c.get("/livez", headers={"Host": "robot.lan:8000"}).status_code == 200
        assert c.get("/livez", headers={"Host": "attacker.example"}).status_code == 421
    with TestClient(create_app(_app_settings(tmp_path, auth=False))) as client:
        # TestClient's connection arrives at "testserver": not a loopback address
        assert client.get("/livez", headers={"Host": "localhost"}).status_code == 403
    with TestClient(create_app(_app_settings(tmp_path)), base_url="http://127.0.0.1") as client:
        assert client.get("/livez", headers={"Host": "attacker.example"}).status_code == 200, "auth on: no list"


def test_allowed_hosts_setting_parses() -> None:
    assert Settings.from_env({}).allowed_hosts == frozenset({"localhost", "127.0.0.1", "::1"})
    env = {"CVPO_ALLOWED_HOSTS": " Robot.LAN , localhost,"}
    assert Settings.from_env(env).allowed_hosts == frozenset({"robot.lan", "localhost"})


def test_containers_do_not_run_as_root() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert users, "the image sets a USER"
    assert users[-1].split(":")[0] not in ("root", "0"), users
    assert re.search(r"useradd .*--uid\s+(\d+)", dockerfile), "the user exists in the image"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        user = str(service.get("user", ""))
        assert user and user.split(":")[0] not in ("root", "0"), f"{name} runs as {user or 'the image default'}"
    redis_cmd = " ".join(compose["services"]["redis"]["command"])
    assert "--requirepass" in redis_cmd, "the broker wants a password"
    for name in ("api", "worker"):
        assert re.match(r"redis://:\$\{REDIS_PASSWORD", compose["services"][name]["environment"]["REDIS_URL"])


def test_cvpo_serve_refuses_auth_off_off_loopback_before_starting_anything(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "0.0.0.0", "--port", str(free_port())]
    env = _env(tmp_path, CVPO_AUTH="off")
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "CVPO_AUTH=off" in done.stderr and "0.0.0.0" in done.stderr
    assert not (tmp_path / "data" / "redis").exists(), "nothing was started"
