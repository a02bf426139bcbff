"""The ``cvpo`` command line. Subcommands import what they need lazily so ``--help`` is instant."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

from cvpo.envs.catalogue import TaskInfo, UnknownTaskError, get_task, list_tasks


class CliError(Exception):
    """An error meant for a CLI user: printed as one line, exit status 2, no traceback."""


def _fmt_bound(values: tuple[float, ...]) -> str:
    unique = sorted(set(values))
    return f"{unique[0]:g}" if len(unique) == 1 else "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _envs_table(tasks: Sequence[TaskInfo]) -> str:
    header = ("id", "family", "obs", "act", "act low", "act high", "episode", "cost limit")
    rows = [
        (t.id, t.family, str(t.obs_dim), str(t.act_dim), _fmt_bound(t.act_low), _fmt_bound(t.act_high),
         str(t.max_episode_steps), f"{t.cost_limit:g}")
        for t in tasks
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def _check_task(task: TaskInfo, steps: int = 5) -> dict[str, object]:
    """Build, reset and step one task; compare its live spaces with the catalogue."""
    import numpy as np

    from cvpo import envs

    start = time.perf_counter()
    with envs.make(task.id, seed=0) as env:
        obs, _ = env.reset()
        problems = []
        if obs.shape != (task.obs_dim,):
            problems.append(f"obs shape {obs.shape} != ({task.obs_dim},)")
        if env.act_dim != task.act_dim:
            problems.append(f"act dim {env.act_dim} != {task.act_dim}")
        if not np.allclose(env.act_low, task.act_low) or not np.allclose(env.act_high, task.act_high):
            problems.append("action bounds differ from the catalogue")
        if env.max_episode_steps != task.max_episode_steps:
            problems.append(f"episode length {env.max_episode_steps} != {task.max_episode_steps}")
        for _ in range(steps):
            out = env.step(np.zeros(task.act_dim))
            if len(out) != 6:
                problems.append("step did not return six values")
                break
    return {"id": task.id, "ok": not problems, "problems": problems,
            "seconds": round(time.perf_counter() - start, 3)}


def cmd_envs(args: argparse.Namespace) -> int:
    tasks = [get_task(args.id)] if args.id else list_tasks()
    if args.check:
        results = []
        for task in tasks:
            try:
                results.append(_check_task(task))
            except Exception as exc:  # a task that fails to build is reported, not a traceback
                results.append({"id": task.id, "ok": False, "problems": [str(exc)], "seconds": None})
            if not args.json:
                r = results[-1]
                status = "ok" if r["ok"] else "FAILED: " + "; ".join(map(str, r["problems"]))
                print(f"{r['id']:<32} {status}  ({r['seconds']} s)", flush=True)
        if args.json:
            print(json.dumps(results, indent=2))
        bad = [r["id"] for r in results if not r["ok"]]
        if bad:
            raise CliError(f"{len(bad)} task(s) failed the check: {', '.join(map(str, bad))}")
        if not args.json:
            print(f"environment check passed: {len(results)} tasks build and step on this machine")
        return 0
    if args.json:
        print(json.dumps([t.to_dict() for t in tasks], indent=2))
    else:
        print(_envs_table(tasks))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvpo", description="CVPO safe-RL train-and-serve service.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("envs", help="list the supported safety-gymnasium tasks",
                       description="List supported tasks with observation/action shapes, action "
                       "bounds, episode length and default cost limit.")
    p.add_argument("id", nargs="?", help="show one task only")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--check", action="store_true",
                   help="build, reset and step each task on this machine and compare with the catalogue")
    p.set_defaults(func=cmd_envs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (CliError, UnknownTaskError, ValueError, TypeError) as exc:
        print(f"cvpo {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cvpo {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # never a raw traceback for a user; CVPO_DEBUG=1 shows it
        if os.environ.get("CVPO_DEBUG"):
            raise
        print(f"cvpo {args.command}: internal error: {type(exc).__name__}: {exc} "
              "(set CVPO_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
