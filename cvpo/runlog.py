"""A run's per-epoch log: metrics.jsonl (the record), metrics.csv (scalars) and TensorBoard.

The trainer hands each epoch's metrics dict to :meth:`RunLog.append`; nothing here re-reads
metrics.jsonl per epoch. On resume :meth:`RunLog.open` drops lines written after the checkpoint
being resumed (their epoch comes again), so the files match an uninterrupted run.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


class RunLog:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.rows: list[dict[str, Any]] = []  # metrics.jsonl's rows, kept for the CSV rewrite
        self._tb: Any = None

    @property
    def jsonl(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def open(self, next_epoch: int) -> None:
        """Start (or resume) logging: keep rows of epochs before ``next_epoch``, open TensorBoard."""
        from torch.utils.tensorboard import SummaryWriter

        if self.jsonl.exists():
            lines = [line for line in self.jsonl.read_text().splitlines() if line]
            keep = [line for line in lines if json.loads(line)["epoch"] < next_epoch]
            self.jsonl.write_text("".join(line + "\n" for line in keep))
            self.rows = [json.loads(line) for line in keep]
        else:
            self.rows = []
        self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def append(self, metrics: dict[str, Any]) -> None:
        """One epoch: a jsonl line, the CSV rewritten from memory (its columns follow the newest row)."""
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        self.rows.append(json.loads(json.dumps(metrics)))
        scalar_keys = [k for k in self.rows[-1] if not isinstance(self.rows[-1][k], list | dict)]
        with open(self.run_dir / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=scalar_keys, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
        if self._tb is not None:
            step = metrics["env_steps"]
            for k in scalar_keys:
                v = metrics.get(k)
                if isinstance(v, int | float) and not isinstance(v, bool) and k not in ("epoch", "env_steps"):
                    self._tb.add_scalar(k, v, step)
            for i, lam in enumerate(metrics.get("cost_multipliers") or []):
                self._tb.add_scalar(f"cost_multiplier/{i}", lam, step)
            self._tb.flush()

    def last(self) -> dict[str, Any] | None:
        """The newest row on disk (for a run that finishes without a new epoch in this process)."""
        if not self.jsonl.exists():
            return None
        lines = [line for line in self.jsonl.read_text().splitlines() if line]
        return json.loads(lines[-1]) if lines else None

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
