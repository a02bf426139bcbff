"""The one way benchmarks write their JSON results (with time and machine facts)."""

from __future__ import annotations

import json
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
