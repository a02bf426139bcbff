"""Speed must not cost learning: the fast engine against the plain serial one, same budget and seeds.

"plain" is the engine as it was before the throughput work (``--baseline-rev``, default 45fbe64:
torch per-step inference, full-covariance M-step algebra, L-BFGS-B-only dual, batched-matmul critics,
single-tensor Adam), extracted with ``git archive`` into a temporary folder and run from there;
"fast" is this checkout's engine with its defaults. Both train SafetyPointCircle1-v0 with cost limit
25 and the FSRL-like config of bench/vs_fsrl.py for ``--budget`` env steps per seed, then evaluate
the final policy deterministically on ``--eval-episodes`` fixed layouts. The JSON holds every run,
per-arm means with 95 % t confidence intervals, and whether the fast arm's mean return and cost lie
inside the plain arm's intervals. Runs go ``--jobs`` at a time with 1 torch thread each; finished runs
are kept in the output file and skipped when the script is run again with the same settings.

    .venv/bin/python bench/learning_equivalence.py [--budget 40000] [--seeds 0 1 2 3 4] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

TASK = "SafetyPointCircle1-v0"
CHILD = """
import json, sys, tempfile, time
from pathlib import Path
from cvpo.config import resolve_config
from cvpo.trainer import Trainer
import cvpo
assert cvpo.__file__.startswith(sys.argv[1]), cvpo.__file__
cfg = resolve_config(json.loads(sys.argv[2]))
with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    result = Trainer(cfg, Path(tmp), quiet=True).train()
    wall = time.perf_counter() - t0
m = result.last_metrics
print(json.dumps({"eval_return": m["eval_return"], "eval_cost": m["eval_cost"], "train_return": m["train_return"],
                  "train_cost": m["train_cost"], "cost_multiplier": m["cost_multipliers"][0], "wall_s": wall,
                  "env_steps": result.env_steps, "env_steps_per_s": result.env_steps / wall}))
"""


def run_config(seed: int, budget: int, eval_episodes: int) -> dict[str, Any]:
    from bench.vs_fsrl import ours_config

    cfg = ours_config(TASK, seed, warmup=budget, window=0, threads=1)
    cfg["loop"].update(eval_episodes=eval_episodes, update_every=500)
    return cfg


def extract_baseline(rev: str, into: Path) -> Path:
    archive = into / "baseline.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "archive", rev, "cvpo"], cwd=ROOT, check=True, stdout=f)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "src", filter="data")
    return into / "src"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=40_000, help="env steps per run (40000)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--baseline-rev", default="45fbe64", help="commit of the plain serial engine")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/learning_equivalence.json")
    args = parser.parse_args()

    from bench.results_io import write_result
    from bench.stats import mean_ci

    done: list[dict[str, Any]] = []
    if args.out.exists():
        previous = json.loads(args.out.read_text())
        if previous.get("budget") == args.budget and previous.get("baseline_rev") == args.baseline_rev:
            done = [r for r in previous.get("runs", []) if r["seed"] in args.seeds]
    runs = list(done)
    todo = [
        (arm, seed)
        for seed in args.seeds
        for arm in ("plain", "fast")
        if not any(r["arm"] == arm and r["seed"] == seed for r in done)
    ]

    def summarise() -> dict[str, Any]:
        summary: dict[str, Any] = {}
        for arm in ("plain", "fast"):
            rows = [r for r in runs if r["arm"] == arm]
            if len(rows) >= 2:
                summary[arm] = {
                    "eval_return": mean_ci([r["eval_return"] for r in rows]),
                    "eval_cost": mean_ci([r["eval_cost"] for r in rows]),
                    "env_steps_per_s": mean_ci([r["env_steps_per_s"] for r in rows]),
                }
        if "plain" in summary and "fast" in summary:
            for key in ("eval_return", "eval_cost"):
                p, f = summary["plain"][key], summary["fast"][key]
                summary[f"fast_{key}_mean_inside_plain_ci95"] = p["ci95_low"] <= f["mean"] <= p["ci95_high"]
        return summary

    def save() -> None:
        write_result(
            args.out,
            "learning_equivalence",
            {
                "task": TASK,
                "cost_limit": 25.0,
                "budget": args.budget,
                "seeds": args.seeds,
                "eval_episodes": args.eval_episodes,
                "baseline_rev": args.baseline_rev,
                "config": run_config(0, args.budget, args.eval_episodes),
                "summary": summarise(),
                "runs": sorted(runs, key=lambda r: (r["arm"], r["seed"])),
            },
            jobs=args.jobs,
            torch_threads=1,
            cpus=os.cpu_count(),
            loadavg_at_end=[round(x, 2) for x in os.getloadavg()],
        )

    with tempfile.TemporaryDirectory() as tmp:
        baseline_src = extract_baseline(args.baseline_rev, Path(tmp))

        def one(arm: str, seed: int) -> dict[str, Any]:
            src = baseline_src if arm == "plain" else ROOT
            cfg = run_config(seed, args.budget, args.eval_episodes)
            load_before = [round(x, 2) for x in os.getloadavg()]
            out = subprocess.run(
                [sys.executable, "-W", "ignore", "-c", CHILD, str(src), json.dumps(cfg)],
                capture_output=True,
                text=True,
                cwd=tmp,
                env={**os.environ, "PYTHONPATH": str(src)},  # the engine checkout under test comes first
                timeout=7200,
            )
            if out.returncode != 0:
                raise RuntimeError(f"{arm} seed {seed} failed:\n{out.stderr[-3000:]}")
            row = {
                "arm": arm,
                "seed": seed,
                **json.loads(out.stdout.strip().splitlines()[-1]),
                "loadavg_before": load_before,
                "finished": time.strftime("%H:%M:%S"),
            }
            print(json.dumps(row), flush=True)
            return row

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for row in pool.map(lambda job: one(*job), todo):
                runs.append(row)
                save()
    save()
    print(json.dumps(summarise(), indent=2))


if __name__ == "__main__":
    main()
