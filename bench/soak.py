"""Soak: /act at a steady rate for minutes while a training job runs on the same machine (issue #9).

Starts the real service (redis-server, one Celery worker, ``cvpo api``; loopback, random ports, no
CPU pinning: API, trainer and this client share the machine), submits a CVPO job on
SafetyPointCircle1-v0 with the task's preset and a budget it cannot finish (cancelled at the end),
waits until it trains, then drives ``POST /policies/{id}/act`` (B=1, a synthetic 2×256 policy with
SafetyPointGoal1 shapes, an act-only token) in an open loop at ``--rate`` req/s for ``--seconds``
after ``--warmup`` unmeasured seconds. Per ``--window`` seconds: req/s, p50/p99, errors and the API
process's RSS (VmRSS). Goal: no error responses and RSS growth from the end of the warm-up to the
end under 5 %. JSON plus a PNG (latency and RSS over time).

    .venv/bin/python bench/soak.py [--seconds 600] [--rate 50] [--window 10] [--warmup 30]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.live import LiveService, act_request, open_loop, rss_mib, summarise
from bench.results_io import machine_load, write_result

# The circle preset (2x256 nets, K=32) with shorter epochs, so progress shows every ~1000 steps.
JOB = {
    "env_id": "SafetyPointCircle1-v0",
    "total_env_steps": 5_000_000,
    "seed": 0,
    "eval": {"episodes": 1},
    "hyperparams": {"steps_per_epoch": 1000},
}


class RssSampler(threading.Thread):
    """VmRSS of one process every ``period_s`` (perf_counter time, MiB), off the client's event loop."""

    def __init__(self, pid: int, period_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.period_s = pid, period_s
        self.points: list[tuple[float, float]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.points.append((time.perf_counter(), rss_mib(self.pid)))
            self.stop_event.wait(self.period_s)


def job_state(svc: LiveService, job_id: str) -> dict[str, Any]:
    status, job = svc.call("GET", f"/jobs/{job_id}")
    if status != 200:
        raise RuntimeError(f"GET /jobs/{job_id}: {status} {job}")
    return {"status": job["status"], "env_step": job["progress"]["env_step"], "epoch": job["progress"]["epoch"]}


def windows(samples: list[Any], rss: list[tuple[float, float]], start: float, seconds: float, width: float
            ) -> list[dict[str, Any]]:  # fmt: skip
    out = []
    for k in range(int(np.ceil(seconds / width))):
        lo, hi = start + k * width, start + min((k + 1) * width, seconds)
        inside = [s for s in samples if lo <= s.due < hi]
        lat = np.array([s.latency for s in inside]) * 1e3
        in_rss = [m for t, m in rss if lo <= t < hi + 0.5]
        out.append(
            {
                "t_s": round(hi - start, 1),
                "requests": len(inside),
                "req_per_s": len(inside) / (hi - lo),
                "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
                "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
                "max_ms": float(lat.max()) if lat.size else None,
                "errors": sum(1 for s in inside if s.status != 200),
                "rss_mib": in_rss[-1] if in_rss else None,
            }
        )
    return out


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t_s"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(t, [r["p50_ms"] for r in rows], label="p50")
    top.plot(t, [r["p99_ms"] for r in rows], label="p99")
    top.set_ylabel("/act latency (ms)")
    top.set_ylim(bottom=0)
    top.legend()
    top.set_title(title)
    bottom.plot(t, [r["rss_mib"] for r in rows], color="tab:green")
    bottom.set_ylabel("API RSS (MiB)")
    bottom.set_xlabel("seconds since the end of the warm-up")
    lo = min(r["rss_mib"] for r in rows if r["rss_mib"])
    bottom.set_ylim(lo * 0.95, lo * 1.10)  # a ±5 % band shows growth at the scale of the goal
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0, help="measured seconds (600)")
    parser.add_argument("--rate", type=float, default=50.0, help="/act requests per second (50)")
    parser.add_argument("--window", type=float, default=10.0, help="seconds per reported window (10)")
    parser.add_argument("--warmup", type=float, default=30.0, help="unmeasured seconds first (30)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    args = parser.parse_args()

    load_before = machine_load()
    with tempfile.TemporaryDirectory() as tmp:
        svc = LiveService(Path(tmp) / "data", {"CVPO_RECONCILE_EVERY_S": "30"}, worker=True).start()
        try:
            status, job = svc.call("POST", "/jobs", body=JOB)
            if status != 202:
                raise RuntimeError(f"POST /jobs: {status} {job}")
            job_id = job["id"]
            deadline = time.monotonic() + 120
            while (state := job_state(svc, job_id))["status"] != "running":
                if time.monotonic() > deadline or state["status"] in ("failed", "cancelled", "succeeded"):
                    raise RuntimeError(f"the job never started training: {state}")
                time.sleep(1)
            print(f"job {job_id} is running: {state}", flush=True)
            request = act_request(svc.policy_id, svc.controller_token)
            open_loop(svc.port, request, args.rate, args.warmup, max_conns=4)
            job_start = job_state(svc, job_id)
            sampler = RssSampler(svc.api_pid)
            sampler.start()
            samples = open_loop(svc.port, request, args.rate, args.seconds, max_conns=4)
            sampler.stop_event.set()
            sampler.join()
            job_end = job_state(svc, job_id)
            cancel = svc.call("POST", f"/jobs/{job_id}/cancel")[0]
        finally:
            svc.stop()

    start = min(s.due for s in samples)
    rows = windows(samples, sampler.points, start, args.seconds, args.window)
    for row in rows:
        print(json.dumps(row), flush=True)
    rss_start, rss_end = sampler.points[0][1], sampler.points[-1][1]
    total = summarise(samples, args.seconds)
    summary = {
        "req_per_s": total["req_per_s"],
        "requests": total["requests"],
        "errors": total["errors"],
        "statuses": total["statuses"],
        "p50_ms": total["p50_ms"],
        "p99_ms": total["p99_ms"],
        "max_ms": total["max_ms"],
        "first_window_p50_p99_ms": [rows[0]["p50_ms"], rows[0]["p99_ms"]],
        "last_window_p50_p99_ms": [rows[-1]["p50_ms"], rows[-1]["p99_ms"]],
        "rss_start_mib": rss_start,
        "rss_end_mib": rss_end,
        "rss_max_mib": max(m for _, m in sampler.points),
        "rss_growth_pct": 100 * (rss_end - rss_start) / rss_start,
        "goals_met (0 errors, RSS growth < 5 %)": total["errors"] == 0 and rss_end < 1.05 * rss_start,
        "job_env_steps_during_soak": job_end["env_step"] - job_start["env_step"],
        "job_state_at_end": job_end["status"],
        "job_cancel_status": cancel,
    }
    print(json.dumps(summary, indent=2))
    title = f"/act B=1 at {args.rate:g} req/s for {args.seconds:g} s beside a training job (CVPO, PointCircle1)"
    plot(rows, args.out.with_suffix(".png"), title)
    write_result(
        args.out,
        "soak",
        {
            "settings": vars(args) | {"out": str(args.out)},
            "job": JOB | {"preset": "the task's (circle)", "note": "cancelled at the end; never meant to finish"},
            "policy": "synthetic 2x256 artefact (obs 60 -> act 2), act-only token, as bench/act_latency.py",
            "client": "open loop, at most 4 keep-alive connections, latency from due time; not pinned",
            "summary": summary,
            "windows": rows,
            "rss_points_mib": [round(m, 2) for _, m in sampler.points],
        },
        cpus=len(os.sched_getaffinity(0)),
        load_before=load_before,
        load_after=machine_load(),
        argv=sys.argv[1:],
    )


if __name__ == "__main__":
    main()
