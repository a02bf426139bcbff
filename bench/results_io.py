"""The one way benchmarks write their JSON results (with time and machine facts)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any


def write_result(out: Path, benchmark: str, payload: dict[str, Any], **machine: Any) -> None:
    result = {
        "benchmark": benchmark,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            **machine,
        },
        **payload,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def machine_load() -> dict[str, Any]:
    """Load averages and the kernel's CPU pressure (share of time runnable tasks waited for a CPU):
    benches on a shared host record them around each measurement so a busy machine shows."""
    out: dict[str, Any] = {"loadavg": [round(x, 2) for x in os.getloadavg()]}
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        out["cpu_pressure_some"] = {k: float(v) for k, v in (f.split("=") for f in line.split()[1:4])}
    except (OSError, IndexError, ValueError):
        pass
    return out
