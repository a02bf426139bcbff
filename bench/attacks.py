"""/act availability under attack, beside a training job (issue #23 items 1, 2, 3 and 5).

Starts the real service on loopback (redis-server, one Celery worker training a CVPO job on
PointCircle1, ``cvpo api`` with ``CVPO_MAX_INFLIGHT=2``, the setting README gives for a control loop
on two cores) and, per attack, measures a valid controller's ``/act`` (B=1) twice: for ``--seconds``
with nothing else going on (the baseline, taken right before the attack, as this host is shared),
then for ``--seconds`` while an attacker process runs:

- ``slow_bodies_no_token``: 16 connections announce a 100 kB ``POST /jobs`` body without a token and
  send a byte a second, reconnecting 0.1 s after the server closes one (issue #23 item 1).
- ``slow_bodies_with_token``: the same with the admin token (an insider or a leaked token).
- ``idle_sockets``: 4 client addresses (127.0.0.2-5) each keep up to 300 connections open that never
  send a byte, reopening any the server closes a second later (item 2; 1 200 > ``CVPO_MAX_CONNECTIONS`` = 1000).
- ``invalid_token_flood``: 8 connections send ``POST /act`` with a new random token each time, as
  fast as the server answers, reconnecting when it closes (item 3).
- ``event_stream_flood`` (only when named in ``--attacks``): 64 clients follow the training job's
  event stream with the admin token, reopening any stream the server ends or refuses a second later.

The controller sends at ``--rate`` per second, open loop over at most 4 keep-alive connections
(latency from the moment each request was due, bench/live.py), and every 0.25 s one more request on
a new connection (what a controller that reconnects meets). The goal per attack: the p99 of the
answered keep-alive ``/act`` requests within 2× the baseline's, and the job's lease never lost
(sampled from the store every 0.5 s with ``CVPO_LEASE_TTL_S=10``, ``CVPO_HEARTBEAT_S=2`` and the
reconciler every 5 s: a lost lease would also show as a second attempt). Statuses other than 200
(503s of the in-flight cap, refused connections) are reported beside, for both kinds of request.

    .venv/bin/python bench/attacks.py [--seconds 20] [--rate 50] [--out bench/results/attacks.json]
    .venv/bin/python bench/attacks.py --attacks event_stream_flood --out bench/results/attacks_streams.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import asyncio
import json
import multiprocessing as mp
import secrets
import socket
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.act_latency import _request, _response_size, read_response
from bench.live import ADMIN_TOKEN, LiveService, act_request, cpu_seconds, open_loop, summarise
from bench.results_io import machine_load, write_result

JOB = {
    "env_id": "SafetyPointCircle1-v0",
    "total_env_steps": 5_000_000,
    "seed": 0,
    "eval": {"episodes": 1},
    "hyperparams": {"steps_per_epoch": 1000},
}
API_ENV = {
    "CVPO_MAX_INFLIGHT": "2",
    "CVPO_RECONCILE_EVERY_S": "5",
    "CVPO_LEASE_TTL_S": "10",
    "CVPO_HEARTBEAT_S": "2",
}
ATTACKS = ("slow_bodies_no_token", "slow_bodies_with_token", "idle_sockets", "invalid_token_flood")
EXTRA_ATTACKS = ("event_stream_flood",)  # run on request (--attacks); streams are issue #23 item 4's


# ------------------------------------------------------------------------------------- attackers


async def _read_until_closed(reader: asyncio.StreamReader, stats: dict[str, int]) -> None:
    """Count the status of what the server answers, until it closes the connection."""
    data = b""
    while True:
        try:
            chunk = await reader.read(65536)
        except (ConnectionError, OSError):
            stats["reset"] += 1
            return
        if not chunk:
            if data[:5] == b"HTTP/":
                key = data[9:12].decode()
                stats[key] = stats.get(key, 0) + 1
            stats["closed_by_server"] += 1
            return
        data += chunk


async def _slow_bodies(port: int, token: str | None, stop: Any, stats: dict[str, int], conns: int = 16) -> None:
    head = ["POST /jobs HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", "Content-Length: 100000"]
    if token:
        head.append(f"Authorization: Bearer {token}")
    request = ("\r\n".join(head) + "\r\n\r\n").encode()

    async def one() -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                stats["connect_failed"] += 1
                await asyncio.sleep(0.1)
                continue
            stats["connections"] += 1
            writer.write(request)
            done = asyncio.ensure_future(_read_until_closed(reader, stats))
            while not done.done() and not stop.is_set():
                try:
                    writer.write(b" ")
                    await writer.drain()
                except (ConnectionError, OSError):
                    break
                await asyncio.wait([done], timeout=1.0)
            done.cancel()
            writer.close()
            await asyncio.sleep(0.1)

    await asyncio.gather(*(one() for _ in range(conns)))


HELD = [0]  # connections the attacker holds open now (idle_sockets)


async def _idle_sockets(
    port: int, stop: Any, stats: dict[str, int], addresses: int = 4, per_address: int = 300
) -> None:
    async def one(source: str) -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
            except OSError:
                stats["connect_failed"] += 1
                await asyncio.sleep(0.1)
                continue
            stats["connections"] += 1
            HELD[0] += 1
            done = asyncio.ensure_future(_read_until_closed(reader, stats))
            while not done.done() and not stop.is_set():
                await asyncio.wait([done], timeout=0.5)
            HELD[0] -= 1
            done.cancel()
            writer.close()
            await asyncio.sleep(1.0)  # refused or timed out: try again a second later

    sources = [f"127.0.0.{2 + i}" for i in range(addresses)]
    await asyncio.gather(*(one(s) for s in sources for _ in range(per_address)))


async def _invalid_token_flood(port: int, policy_path: str, stop: Any, stats: dict[str, int], conns: int = 8) -> None:
    body = json.dumps({"observations": [[0.0] * 60]}).encode()

    async def one() -> None:
        writer = None
        reader: asyncio.StreamReader | None = None
        while not stop.is_set():
            if writer is None or reader is None or reader.at_eof():
                if writer is not None:
                    writer.close()
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    stats["connect_failed"] += 1
                    await asyncio.sleep(0.05)
                    writer = None
                    continue
                stats["connections"] += 1
            writer.write(_request("POST", policy_path, secrets.token_urlsafe(32), body))
            buf = bytearray()
            try:
                while (size := _response_size(buf)) is None or len(buf) < size[1]:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    buf += chunk
            except (ConnectionError, OSError):
                size = None
            if size is None:
                stats["no_answer"] += 1
                writer.close()
                writer = None
                continue
            key = str(size[0])
            stats[key] = stats.get(key, 0) + 1
            stats["requests"] += 1
            if b"connection: close" in bytes(buf[: size[1]]).lower():
                writer.close()
                writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(one() for _ in range(conns)))


async def _event_stream_flood(
    port: int, token: str, job_id: str, stop: Any, stats: dict[str, int], conns: int = 64
) -> None:
    """``conns`` clients follow the training job's event stream with a valid token, reopening any the
    server ends or refuses a second later."""
    request = _request("GET", f"/jobs/{job_id}/events", token).replace(
        b"\r\n\r\n", b"\r\nAccept: text/event-stream\r\n\r\n"
    )

    async def one() -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                stats["connect_failed"] += 1
                await asyncio.sleep(1.0)
                continue
            stats["connections"] += 1
            writer.write(request)
            HELD[0] += 1
            head = b""
            try:
                while b"\r\n\r\n" not in head and not stop.is_set():
                    chunk = await asyncio.wait_for(reader.read(4096), 10.0)
                    if not chunk:
                        break
                    head += chunk
                if head[:5] == b"HTTP/":
                    key = head[9:12].decode()
                    stats[key] = stats.get(key, 0) + 1
                while not stop.is_set():  # read the stream until the server ends it
                    try:
                        chunk = await asyncio.wait_for(reader.read(65536), 1.0)
                    except TimeoutError:
                        continue
                    if not chunk:
                        stats["closed_by_server"] += 1
                        break
            except (TimeoutError, ConnectionError, OSError):
                stats["reset"] += 1
            HELD[0] -= 1
            writer.close()
            await asyncio.sleep(1.0)

    await asyncio.gather(*(one() for _ in range(conns)))


def _attacker(name: str, port: int, admin_token: str, policy_id: str, stop: Any, out: Any, job_id: str = "") -> None:
    """The attacker process: runs ``name`` until ``stop`` is set, then puts its counters on ``out``."""
    stats: dict[str, int] = {"connections": 0, "connect_failed": 0, "closed_by_server": 0, "reset": 0}
    stats |= {"requests": 0, "no_answer": 0}
    t0 = time.monotonic()

    async def main() -> None:
        if name == "slow_bodies_no_token":
            attack = _slow_bodies(port, None, stop, stats)
        elif name == "slow_bodies_with_token":
            attack = _slow_bodies(port, admin_token, stop, stats)
        elif name == "idle_sockets":
            attack = _idle_sockets(port, stop, stats)
        elif name == "event_stream_flood":
            attack = _event_stream_flood(port, admin_token, job_id, stop, stats)
        else:
            attack = _invalid_token_flood(port, f"/policies/{policy_id}/act", stop, stats)
        task = asyncio.ensure_future(attack)
        while not stop.is_set():
            await asyncio.sleep(0.2)
        stats["held_at_stop"] = HELD[0]
        await asyncio.wait([task], timeout=5)
        task.cancel()

    asyncio.run(main())
    stats["seconds"] = round(time.monotonic() - t0, 1)
    out.put({k: v for k, v in stats.items() if v})


# ------------------------------------------------------------------------------------- measuring


class FreshConnections(threading.Thread):
    """One ``/act`` on a new connection every ``period_s``: (status, ms) each; status 0 if refused."""

    def __init__(self, port: int, request: bytes, period_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.port, self.request, self.period_s = port, request, period_s
        self.results: list[tuple[int, float]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.period_s):
            t0 = time.perf_counter()
            status = 0
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                    sock.sendall(self.request.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n", 1))
                    size, _ = read_response(sock)
                    status = size[0] if size is not None else 0
            except OSError:
                status = 0
            self.results.append((status, (time.perf_counter() - t0) * 1e3))

    def summary(self) -> dict[str, Any]:
        ok = [ms for s, ms in self.results if s == 200]
        statuses: dict[str, int] = {}
        for s, _ in self.results:
            statuses[str(s)] = statuses.get(str(s), 0) + 1
        return {
            "requests": len(self.results),
            "statuses": statuses,
            "ok_p50_ms": float(np.percentile(ok, 50)) if ok else None,
            "ok_p99_ms": float(np.percentile(ok, 99)) if ok else None,
        }


class LeaseWatch(threading.Thread):
    """The job's lease margin (lease_until - now), attempt and status from the store every 0.5 s."""

    def __init__(self, db: Path, job_id: str) -> None:
        super().__init__(daemon=True)
        self.db, self.job_id = db, job_id
        self.points: list[tuple[float, int, str]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        try:
            while not self.stop_event.wait(0.5):
                row = conn.execute(
                    "SELECT lease_until, attempt, status FROM jobs WHERE id = ?", (self.job_id,)
                ).fetchone()
                if row is not None:
                    margin = (row[0] - time.time()) if row[0] is not None else float("-inf")
                    self.points.append((margin, int(row[1]), str(row[2])))
        finally:
            conn.close()

    def summary(self) -> dict[str, Any]:
        margins = [m for m, _, _ in self.points]
        return {
            "samples": len(self.points),
            "min_lease_margin_s": round(min(margins), 2) if margins else None,
            "attempts_seen": sorted({a for _, a, _ in self.points}),
            "statuses_seen": sorted({s for _, _, s in self.points}),
            "lease_lost": bool(margins) and (min(margins) < 0 or len({a for _, a, _ in self.points}) > 1),
        }


def measure(svc: LiveService, request: bytes, rate: float, seconds: float) -> dict[str, Any]:
    fresh = FreshConnections(svc.port, request)
    cpu0 = cpu_seconds(svc.api_pid)
    fresh.start()
    samples = open_loop(svc.port, request, rate, seconds, max_conns=4)
    fresh.stop_event.set()
    fresh.join()
    row = summarise(samples, seconds)
    row = {k: row[k] for k in ("requests", "statuses", "errors", "ok_p50_ms", "ok_p99_ms", "ok_max_ms", "p99_ms")}
    row["api_cpu_share"] = round((cpu_seconds(svc.api_pid) - cpu0) / seconds, 3)
    row["new_connection"] = fresh.summary()
    return row


SERVED_GOAL = 0.95  # share of the controller's keep-alive /act answered 200 under attack


def attack_summary(row: dict[str, Any]) -> dict[str, Any]:
    """The figures of one attack against its baseline, and whether it met the goal: the answered
    keep-alive /act p99 within 2x the baseline's and at least 95 % of those requests answered 200."""
    base, hit = row["baseline"], row["attacked"]
    ratio = hit["ok_p99_ms"] / base["ok_p99_ms"] if hit["ok_p99_ms"] else None  # None: no /act answered 200
    served = hit["statuses"].get("200", 0) / max(hit["requests"], 1)
    return {
        "baseline_p99_ms": round(base["ok_p99_ms"], 2),
        "attacked_p99_ms": round(hit["ok_p99_ms"], 2) if hit["ok_p99_ms"] else None,
        "ratio": round(ratio, 2) if ratio is not None else None,
        "attacked_served_share": round(served, 3),
        "baseline_statuses": base["statuses"],
        "attacked_statuses": hit["statuses"],
        "new_connection_baseline_statuses": base["new_connection"]["statuses"],
        "new_connection_attacked_statuses": hit["new_connection"]["statuses"],
        "new_connection_baseline_p99_ms": base["new_connection"]["ok_p99_ms"],
        "new_connection_attacked_p99_ms": hit["new_connection"]["ok_p99_ms"],
        "goal_met": ratio is not None and ratio <= 2.0 and served >= SERVED_GOAL,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per baseline and per attack (20)")
    parser.add_argument("--rate", type=float, default=50.0, help="controller /act requests per second (50)")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma-separated, of {ATTACKS + EXTRA_ATTACKS}")
    parser.add_argument("--out", type=Path, default=Path("bench/results/attacks.json"))
    parser.add_argument("--resummarise", type=Path, help="recompute the summary of a result file in place, no run")
    args = parser.parse_args()
    if args.resummarise:
        result = json.loads(args.resummarise.read_text())
        for row in result["attacks"].values():  # figures of an earlier version of this summary
            for key in [k for k in row if k not in ("baseline", "attacked", "attacker")]:
                del row[key]
        result["summary"] = {name: attack_summary(r) for name, r in result["attacks"].items()}
        args.resummarise.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["summary"], indent=2))
        return
    attacks = [a for a in args.attacks.split(",") if a]
    unknown = set(attacks) - set(ATTACKS + EXTRA_ATTACKS)
    if unknown:
        parser.error(f"unknown attacks {sorted(unknown)}")

    load_before = machine_load()
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        svc = LiveService(Path(tmp) / "data", dict(API_ENV), worker=True).start()
        try:
            status, job = svc.call("POST", "/jobs", body=JOB)
            if status != 202:
                raise RuntimeError(f"POST /jobs: {status} {job}")
            job_id = job["id"]
            deadline = time.monotonic() + 180
            while (state := svc.call("GET", f"/jobs/{job_id}")[1])["status"] != "running":
                if time.monotonic() > deadline or state["status"] in ("failed", "cancelled", "succeeded"):
                    raise RuntimeError(f"the job never started training: {state['status']}")
                time.sleep(1)
            request = act_request(svc.policy_id, svc.controller_token)
            watch = LeaseWatch(svc.data_dir / "cvpo.db", job_id)
            watch.start()
            measure(svc, request, args.rate, 5)  # warm-up: policy loaded, connections open
            ctx = mp.get_context("fork")
            for name in attacks:
                print(f"{name}: baseline", flush=True)
                baseline = measure(svc, request, args.rate, args.seconds)
                stop, out = ctx.Event(), ctx.Queue()
                proc = ctx.Process(
                    target=_attacker, args=(name, svc.port, ADMIN_TOKEN, svc.policy_id, stop, out, job_id)
                )
                proc.start()
                time.sleep(3)  # the attack reaches its steady state
                print(f"{name}: under attack", flush=True)
                attacked = measure(svc, request, args.rate, args.seconds)
                stop.set()
                attacker = out.get(timeout=60)
                proc.join(timeout=30)
                rows[name] = {"baseline": baseline, "attacked": attacked, "attacker": attacker}
                print(json.dumps({name: rows[name]}, indent=1), flush=True)
                time.sleep(2)  # the attacker's leftovers close
            watch.stop_event.set()
            watch.join()
            job_end = svc.call("GET", f"/jobs/{job_id}")[1]
            svc.call("POST", f"/jobs/{job_id}/cancel")
        finally:
            svc.stop()

    lease = watch.summary() | {"attempt_at_end": job_end["attempt"], "status_at_end": job_end["status"]}
    summary = {name: attack_summary(r) for name, r in rows.items()}
    print(json.dumps({"summary": summary, "lease": lease}, indent=2))
    write_result(
        args.out,
        "attacks",
        {
            "settings": vars(args) | {"out": str(args.out), "api_env": API_ENV},
            "job": JOB,
            "policy": "synthetic 2x256 artefact (obs 60 -> act 2), act-only token, as bench/act_latency.py",
            "client": f"open loop at {args.rate:g}/s over <= 4 keep-alive connections (latency from due time) "
            "plus one /act on a new connection every 0.25 s; not pinned",
            "summary": summary,
            "lease": lease,
            "attacks": rows,
        },
        cpus=len(os.sched_getaffinity(0)),
        load_before=load_before,
        load_after=machine_load(),
        argv=sys.argv[1:],
    )


if __name__ == "__main__":
    main()
