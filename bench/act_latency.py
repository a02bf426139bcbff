"""/act latency and throughput beside a trivial GET, plus in-process forward time (service-design.md §2.5, §5.6).

Serves a synthetic 2×256 artefact with SafetyPointGoal1 shapes (obs 60 → act 2, normaliser on) from
one uvicorn worker started as a subprocess on loopback (pinned to CPU 0 where there are ≥ 2), and
drives it from this process (pinned to CPU 1) with a minimal HTTP/1.1 keep-alive client over raw
sockets: blocking at concurrency 1, asyncio at higher concurrency. Cases: ``GET /livez`` and
``POST /policies/{id}/act`` with B=1 and B=64, and B=1 with ``"return": ["cost_to_go"]``
(``act_B1_ctg``: the artefact carries a 2×256 cost critic, as trained policies do), at c=1 and c=16,
each for a fixed time after a warm-up. Reports p50/p99 latency, req/s, obs/s and each ``/act``
case's ratio to ``/livez`` at the same concurrency (the §5.6 gate: B=1 ≥ 0.6× the trivial GET's
req/s, p99 < 5 ms at c=1). Part two times the policy forward pass in-process: the numpy runtime,
ONNX Runtime (one thread) and the whole ``parse_act_request`` + ``act`` hot path, each also with
the cost critic. Writes JSON; compare ratios within one run.

    .venv/bin/python bench/act_latency.py [--seconds 6] [--out bench/results/act_latency.json]
"""

from __future__ import annotations

import os

# One BLAS thread, as for one uvicorn worker on one vCPU (§2.5); must precede the numpy import.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.results_io import write_result
from service.launcher import free_port

ROOT = Path(__file__).resolve().parents[1]


OBS_DIM, ACT_DIM, HIDDEN = 60, 2, (256, 256)
ADMIN_TOKEN = "bench-admin-token-not-secret"


# ------------------------------------------------------------------------------------- HTTP client


def _request(method: str, path: str, token: str | None, body: bytes = b"") -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if token:
        head.append(f"Authorization: Bearer {token}")
    if method == "POST":
        head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _response_size(buf: bytes | bytearray) -> tuple[int, int] | None:
    """(status, total bytes) once headers are complete, else None. Responses carry Content-Length."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).lower()
    k = head.find(b"content-length:")
    length = 0
    if k >= 0:
        eol = head.find(b"\r\n", k)
        length = int(head[k + 15 : eol if eol >= 0 else len(head)])
    return int(head[9:12]), end + 4 + length


def read_response(sock: socket.socket) -> tuple[tuple[int, int] | None, bytearray]:
    """One response from a blocking socket, read until its Content-Length or until the peer closes:
    ((status, total bytes) or None if the headers never completed, the bytes read)."""
    buf = bytearray()
    while (size := _response_size(buf)) is None or len(buf) < size[1]:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return size, buf


def drive_blocking(port: int, request: bytes, seconds: float, warmup: float) -> dict[str, Any]:
    """Concurrency 1: one keep-alive connection, send → wait → send (closed loop, like wrk -c1)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from = start + warmup
    stop = measure_from + seconds
    buf = bytearray()
    while True:
        t0 = time.perf_counter()
        if t0 >= stop:
            break
        sock.sendall(request)
        while True:
            size = _response_size(buf)
            if size is not None and len(buf) >= size[1]:
                break
            chunk = sock.recv(262144)
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        status, n = size
        del buf[:n]
        t1 = time.perf_counter()
        if t0 >= measure_from:
            latencies.append(t1 - t0)
            errors += status != 200
    sock.close()
    return _summary(latencies, errors, seconds)


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        size = _response_size(self.buf)
        if size is not None and len(self.buf) >= size[1] and self.waiter is not None:
            del self.buf[: size[1]]
            self.waiter.set_result(size[0])

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("server closed the connection"))


async def _drive_async(port: int, request: bytes, seconds: float, warmup: float, concurrency: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from, stop = start + warmup, start + warmup + seconds

    async def worker() -> None:
        nonlocal errors
        transport, conn = await loop.create_connection(_Conn, "127.0.0.1", port)
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            t0 = time.perf_counter()
            if t0 >= stop:
                break
            conn.waiter = loop.create_future()
            transport.write(request)
            status = await conn.waiter
            if t0 >= measure_from:
                latencies.append(time.perf_counter() - t0)
                errors += status != 200
        transport.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return _summary(latencies, errors, seconds)


def drive(port: int, request: bytes, seconds: float, warmup: float, concurrency: int) -> dict[str, Any]:
    if concurrency == 1:
        return drive_blocking(port, request, seconds, warmup)
    return asyncio.run(_drive_async(port, request, seconds, warmup, concurrency))


def _summary(latencies: list[float], errors: int, seconds: float) -> dict[str, Any]:
    lat = np.asarray(latencies) * 1e3
    return {
        "requests": len(latencies),
        "non_200": errors,
        "req_per_s": len(latencies) / seconds,
        "p50_ms": float(np.percentile(lat, 50)),
        "p90_ms": float(np.percentile(lat, 90)),
        "p99_ms": float(np.percentile(lat, 99)),
        "max_ms": float(lat.max()),
    }


# ------------------------------------------------------------------------------------- server


def setup_policy(data_dir: Path) -> tuple[str, str, Path]:
    """A synthetic artefact registered to an act-only controller token: (policy id, token, path)."""
    from bench.synthetic import write_random_artefact
    from core.promotion import create_policy_from_artefact
    from core.store import Store

    artefact = write_random_artefact(
        data_dir / "policies" / "synthetic",
        obs_dim=OBS_DIM,
        act_dim=ACT_DIM,
        hidden=HIDDEN,
        head_scale=40.0,
        cost_critic=1,
        critic_hidden=HIDDEN,
    )
    store = Store(f"sqlite:///{data_dir / 'cvpo.db'}", data_dir)
    token_id, token = store.create_token("bench-controller", ["policies:act"])
    policy = create_policy_from_artefact(store, artefact, client=token_id)
    store.engine.dispose()
    return policy.id, token, artefact


VARIANTS = ("as_built", "policies_first", "policies_first_no_instrumentator")


def variant_app() -> Any:
    """uvicorn factory: ``create_app()`` as built, or with a proposed change to it applied, so one run
    shows what each would buy (``CVPO_BENCH_VARIANT``). Routing and the Prometheus instrumentator
    both scan routes in order, first match wins; the policies router is included last."""
    from api.app import create_app

    app = create_app()
    variant = os.environ.get("CVPO_BENCH_VARIANT", "as_built")
    if variant.startswith("policies_first"):
        routes = app.router.routes

        def serves_act(route: Any) -> bool:
            contexts = getattr(route, "effective_route_contexts", None)
            return callable(contexts) and any(str(getattr(c, "path", "")).endswith("/act") for c in contexts())

        first = [r for r in routes if serves_act(r)]
        routes[:] = first + [r for r in routes if not serves_act(r)]
        getattr(app.router, "_mark_routes_changed", lambda: None)()
    if variant == "policies_first_no_instrumentator":
        app.user_middleware = [m for m in app.user_middleware if "Instrumentator" not in m.cls.__name__]
    return app


def start_server(data_dir: Path, port: int, cpu: int | None, variant: str = "as_built") -> subprocess.Popen:
    env = dict(os.environ)
    env.update(
        {
            "CVPO_DATA_DIR": str(data_dir),
            "CVPO_API_TOKEN": ADMIN_TOKEN,
            "CVPO_RECONCILE_EVERY_S": "0",
            "REDIS_URL": "redis://127.0.0.1:9/0",  # /act and /livez never touch the broker
            "PYTHONPATH": str(ROOT),
            "CVPO_BENCH_VARIANT": variant,
        }
    )
    # Same settings as `cvpo api` (service/launcher.py run_api) but with warning-level logs, which
    # also turns off uvicorn's per-request access log line.
    cmd = [
        sys.executable, "-m", "uvicorn", "bench.act_latency:variant_app", "--factory", "--host", "127.0.0.1",
        "--port", str(port), "--workers", "1", "--log-level", "warning", "--limit-concurrency", "256",
    ]  # fmt: skip
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(_request("GET", "/livez", None))
                if s.recv(1024).startswith(b"HTTP/1.1 200"):
                    return proc
        except OSError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited with {proc.returncode}")
    proc.kill()
    raise RuntimeError("the API did not come up within 60 s")


# ------------------------------------------------------------------------------------- in-process


def _timeit(fn: Any, repeats: int) -> dict[str, float]:
    for _ in range(min(50, repeats)):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    us = np.asarray(times) * 1e6
    return {"p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99))}


def forward_times(artefact: Path) -> list[dict[str, Any]]:
    import onnxruntime as ort

    from api.act import act, parse_act_request
    from cvpo.artefact import load_policy
    from cvpo.onnx_export import export_onnx

    runtime = load_policy(artefact)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(export_onnx(artefact), opts, providers=["CPUExecutionProvider"])
    sess_ctg = ort.InferenceSession(export_onnx(artefact, cost_head=True), opts, providers=["CPUExecutionProvider"])
    rows = []
    keys = ("numpy_runtime", "numpy_cost_to_go", "onnxruntime", "onnxruntime_cost_head", "parse_and_act")
    keys += ("parse_and_act_cost_to_go",)
    for b in (1, 64, 1024):
        obs = np.random.default_rng(b).normal(0, 2, (b, OBS_DIM))
        obs32 = obs.astype(np.float32)
        body = json.dumps({"observations": obs.tolist()}).encode()
        body_ctg = json.dumps({"observations": obs.tolist(), "return": ["cost_to_go"]}).encode()
        raw = runtime.raw_action(obs)
        repeats = 3000 if b == 1 else (1000 if b == 64 else 100)
        row = {
            "B": b,
            "numpy_runtime": _timeit(lambda o=obs: runtime.act(o), repeats),
            "numpy_cost_to_go": _timeit(lambda o=obs, a=raw: runtime.cost_to_go(o, a), repeats),
            "onnxruntime": _timeit(lambda o=obs32: sess.run(None, {"observations": o}), repeats),
            "onnxruntime_cost_head": _timeit(lambda o=obs32: sess_ctg.run(None, {"observations": o}), repeats),
            "parse_and_act": _timeit(
                lambda body=body: act(runtime, parse_act_request(body, OBS_DIM, 1024), None, "pol_bench"), repeats
            ),
            "parse_and_act_cost_to_go": _timeit(
                lambda body=body_ctg: act(runtime, parse_act_request(body, OBS_DIM, 1024), None, "pol_bench"), repeats
            ),
        }
        for key in keys:
            row[key]["per_obs_us"] = row[key]["p50_us"] / b
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# ------------------------------------------------------------------------------------- main


def run_cases(
    data_dir: Path, port: int, server_cpu: int | None, variant: str, cases: list[tuple[str, int]],
    requests: dict[str, bytes], seconds: float, warmup: float,
) -> list[dict[str, Any]]:  # fmt: skip
    """Start one server, run (case, concurrency) pairs in order; /act rows get a ratio to the last /livez row."""
    server = start_server(data_dir, port, server_cpu, variant)
    rows: list[dict[str, Any]] = []
    try:
        drive(port, requests["act_B1"], 0.5, 0.0, 1)  # loads the policy into the server's cache
        base: dict[int, float] = {}
        for name, concurrency in cases:
            row = {"variant": variant, "case": name, "concurrency": concurrency}
            row.update(drive(port, requests[name], seconds, warmup, concurrency))
            if name == "livez":
                base[concurrency] = row["req_per_s"]
            else:
                row["batch"] = 1 if name.startswith("act_B1") else 64
                row["return"] = ["cost_to_go"] if name.endswith("_ctg") else []
                row["obs_per_s"] = row["req_per_s"] * row["batch"]
                row["req_per_s_ratio_to_livez"] = row["req_per_s"] / base[concurrency]
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return rows


def _http_stack() -> str:
    import importlib.util

    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio loop"
    return f"{http} + {loop}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per HTTP case (5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each case (1)")
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also serve the app with the policies router moved first / the instrumentator removed (both are "
        "now built in, so these only confirm they cost nothing)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/act_latency.json"))
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, client_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
    full = [(case, c) for c in (1, 16) for case in ("livez", "act_B1", "act_B1_ctg", "act_B64")]
    short = [("livez", 1), ("act_B1", 1), ("livez", 16), ("act_B1", 16)]
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        policy_id, token, artefact = setup_policy(data_dir)
        if client_cpu is not None:
            os.sched_setaffinity(0, {client_cpu})
        obs = np.random.default_rng(0).normal(0, 2, (64, OBS_DIM))
        act_path = f"/policies/{policy_id}/act"
        b1 = {"observations": obs[:1].tolist()}
        requests = {
            "livez": _request("GET", "/livez", None),
            "act_B1": _request("POST", act_path, token, json.dumps({"observations": obs[:1].tolist()}).encode()),
            "act_B64": _request("POST", act_path, token, json.dumps({"observations": obs.tolist()}).encode()),
            "act_B1_ctg": _request("POST", act_path, token, json.dumps({**b1, "return": ["cost_to_go"]}).encode()),
        }
        http = []
        for variant in VARIANTS if args.variants else VARIANTS[:1]:
            cases = full if variant == "as_built" else short
            http += run_cases(data_dir, free_port(), server_cpu, variant, cases, requests, args.seconds, args.warmup)
        if client_cpu is not None:
            os.sched_setaffinity(0, set(cpus))
        forward = forward_times(artefact)

    b1c1 = next(r for r in http if r["case"] == "act_B1" and r["concurrency"] == 1)
    ctg = next(r for r in http if r["case"] == "act_B1_ctg" and r["concurrency"] == 1 and r["variant"] == "as_built")
    gate = {
        "act_B1_c1_ratio_to_livez": b1c1["req_per_s_ratio_to_livez"],
        "ratio_ok (>= 0.6)": b1c1["req_per_s_ratio_to_livez"] >= 0.6,
        "act_B1_c1_p99_ms": b1c1["p99_ms"],
        "p99_ok (< 5 ms)": b1c1["p99_ms"] < 5.0,
    }
    cost_to_go = {  # what "return": ["cost_to_go"] adds to a B=1 request at c=1 (same server, same run)
        "act_B1_c1_p50_ms": b1c1["p50_ms"],
        "act_B1_ctg_c1_p50_ms": ctg["p50_ms"],
        "act_B1_c1_p99_ms": b1c1["p99_ms"],
        "act_B1_ctg_c1_p99_ms": ctg["p99_ms"],
        "p50_added_ms": ctg["p50_ms"] - b1c1["p50_ms"],
        "req_per_s_ratio_ctg_to_plain": ctg["req_per_s"] / b1c1["req_per_s"],
    }
    import onnxruntime
    import uvicorn

    write_result(
        args.out,
        "act_latency",
        {
            "model": {
                "obs_dim": OBS_DIM,
                "act_dim": ACT_DIM,
                "hidden": list(HIDDEN),
                "normalizer": True,
                "cost_critic": {"members": 1, "hidden": list(HIDDEN)},
            },
            "server": f"uvicorn, 1 worker, {_http_stack()}, log level warning",
            "client": "raw-socket HTTP/1.1 keep-alive, closed loop; blocking at c=1, asyncio at c=16",
            "variants": {
                "as_built": "api.app:create_app() unchanged",
                "policies_first": "policies router included before the others (routing is first-match)",
                "policies_first_no_instrumentator": "and without prometheus-fastapi-instrumentator",
            },
            "seconds_per_case": args.seconds,
            "http": http,
            "gate_as_built": gate,
            "cost_to_go_B1_c1": cost_to_go,
            "forward": forward,
        },
        cpus=len(cpus),
        loadavg_1min_before_after=[load_before, os.getloadavg()[0]],  # > 0.5 means other work shared the CPUs
        server_cpu=server_cpu,
        client_cpu=client_cpu,
        numpy=np.__version__,
        onnxruntime=onnxruntime.__version__,
        uvicorn=uvicorn.__version__,
    )


if __name__ == "__main__":
    main()
