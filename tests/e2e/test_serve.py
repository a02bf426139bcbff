"""`cvpo serve` as a user runs it: one command starts Redis, a worker and the API; SIGTERM stops all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.launcher import free_port
from tests.conftest import ROOT, TINY_SPEC, wait_until


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def test_cvpo_serve_trains_a_job_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "CVPO_API_TOKEN", "DATABASE_URL")}
    env.update(
        {
            "CVPO_DATA_DIR": str(tmp_path / "data"),
            "CVPO_PORT": str(port),
            "CVPO_HEARTBEAT_S": "0.5",
            "CVPO_CERTIFY_EPISODES": "6",
            "CVPO_CERTIFY_STOCHASTIC_EPISODES": "1",
        }
    )
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - the child writes it until it exits
    serve = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=env, cwd=ROOT, stdout=log, stderr=log)
    try:
        base = f"http://127.0.0.1:{port}"

        def live() -> bool:
            try:
                return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(live, 60, "the API to be ready")
        banner = (tmp_path / "serve.log").read_text()
        token_file = tmp_path / "data" / "api_token"
        assert f"http://127.0.0.1:{port}" in banner and str(token_file) in banner
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        token = token_file.read_text().strip()
        assert token not in banner, "the token itself is never printed or logged"
        headers = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"{base}/jobs", timeout=5).status_code == 401
        job = httpx.post(f"{base}/jobs", json=TINY_SPEC, headers=headers, timeout=10).json()

        def done() -> dict | None:
            j = httpx.get(f"{base}/jobs/{job['id']}", headers=headers, timeout=5).json()
            return j if j["status"] in ("succeeded", "failed") else None

        final = wait_until(done, 180, "the job to finish", 0.5)
        assert final["status"] == "succeeded", final["failure"]
        children = [int(p) for p in Path(f"/proc/{serve.pid}/task/{serve.pid}/children").read_text().split()]
        assert len(children) == 3, "redis, worker and api"
    finally:
        serve.send_signal(signal.SIGTERM)
        code = serve.wait(timeout=120)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    time.sleep(0.5)
    assert not [pid for pid in children if _alive(pid)], "every child stopped"
