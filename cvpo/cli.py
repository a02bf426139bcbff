"""The ``cvpo`` command line. Subcommands import what they need lazily so ``--help`` is instant."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cvpo.certify import CERT_SEED_BASE, Certificate  # numpy only; scipy and the simulator load lazily
from cvpo.envs.catalogue import TaskInfo, UnknownTaskError, get_task, list_tasks


class CliError(Exception):
    """An error meant for a CLI user: printed as one line, exit status 2, no traceback."""


def _fmt_bound(values: tuple[float, ...]) -> str:
    unique = sorted(set(values))
    return f"{unique[0]:g}" if len(unique) == 1 else "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _envs_table(tasks: Sequence[TaskInfo]) -> str:
    header = ("id", "family", "obs", "act", "act low", "act high", "episode", "cost limit")
    rows = [
        (
            t.id,
            t.family,
            str(t.obs_dim),
            str(t.act_dim),
            _fmt_bound(t.act_low),
            _fmt_bound(t.act_high),
            str(t.max_episode_steps),
            f"{t.cost_limit:g}",
        )
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
    return {
        "id": task.id,
        "ok": not problems,
        "problems": problems,
        "seconds": round(time.perf_counter() - start, 3),
    }


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


def _train_overrides(args: argparse.Namespace) -> dict[str, object]:
    """Settings layers in the documented order: --config file < flags < each --set."""
    from cvpo.config import build_overrides, parse_assignment

    layers: list[dict[str, object]] = []
    if args.config:
        import tomllib

        try:
            layers.append(tomllib.loads(Path(args.config).read_text()))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise CliError(f"cannot read config file {args.config}: {exc}") from exc
    flags = {
        key: value
        for key, value in (
            ("env_id", args.env),
            ("total_env_steps", args.total_env_steps),
            ("seed", args.seed),
            ("device", args.device),
        )
        if value is not None
    }
    if args.cost_limit:
        flags["constraints"] = {"cost_limits": args.cost_limit}
    layers.append(flags)
    layers += [parse_assignment(text) for text in args.set or []]
    return build_overrides(*layers)


def cmd_train(args: argparse.Namespace) -> int:
    import signal

    from cvpo.checkpoint import list_checkpoints
    from cvpo.config import resolve_config
    from cvpo.trainer import Trainer

    if args.resume:
        run_dir = Path(args.resume)
        if not list_checkpoints(run_dir):
            raise CliError(f"{run_dir}: no checkpoint to resume from")
        trainer = Trainer.resume(run_dir, quiet=args.quiet)
    else:
        if not args.env or not args.out:
            raise CliError("give --env and --out (or --resume RUN_DIR)")
        run_dir = Path(args.out)
        if list_checkpoints(run_dir):
            raise CliError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or pick another --out")
        config = resolve_config(_train_overrides(args), preset=args.preset)
        trainer = Trainer(config, run_dir, quiet=args.quiet)

    def on_sigint(signum: int, frame: object) -> None:
        print("\nstopping after this episode and writing a checkpoint (Ctrl-C again to abort)", file=sys.stderr)
        trainer.request_stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGTERM, lambda s, f: trainer.request_stop())
    result = trainer.train()
    m = result.last_metrics or {}
    print(
        f"{'stopped' if result.stopped_early else 'finished'}: {result.env_steps} env steps, "
        f"{result.epochs} epochs; "
        f"eval return {m.get('eval_return')}, eval cost {m.get('eval_cost')}; run dir {result.run_dir}"
    )
    if result.stopped_early:
        print(f"resume with: cvpo train --resume {result.run_dir}")
    return 0


def _parse_limits(values: Sequence[str] | None) -> list[float | None] | None:
    """``--cost-limit`` values, repeated and/or comma-separated; inf/none = unconstrained."""
    if not values:
        return None
    limits: list[float | None] = []
    for item in (x.strip() for v in values for x in v.split(",")):
        if item.lower() in ("inf", "none"):
            limits.append(None)
            continue
        try:
            limit = float(item)
        except ValueError:
            raise CliError(f"--cost-limit: {item!r} is not a number (or inf)") from None
        if not limit >= 0:
            raise CliError(f"--cost-limit: {item} must be ≥ 0")
        limits.append(limit)
    return limits


def _fmt_certificate(cert: Certificate) -> str:
    pct = f"{cert.confidence:.0%}"
    head = (
        cert.env_id
        if cert.env_id == cert.artefact_env_id
        else f"{cert.env_id} (policy trained on {cert.artefact_env_id})"
    )
    lines = [
        f"{head}: {cert.episodes} deterministic episodes on seeds {cert.seeds['base']}+0..{cert.episodes - 1}, "
        f"{cert.stochastic_episodes} sampled-action episodes",
        f"return {cert.return_mean:.2f} ({pct} CI {cert.return_ci[0]:.2f} .. {cert.return_ci[1]:.2f})"
        + (f"; sampled policy {cert.stochastic_return_mean:.2f}" if cert.stochastic_return_mean is not None else ""),
    ]
    for c in cert.constraints:
        limit = "none" if c.limit is None else f"{c.limit:g}"
        s_mean = "n/a" if c.stochastic_cost_mean is None else f"{c.stochastic_cost_mean:.2f}"
        lines.append(
            f"cost[{c.signal}]: mean {c.cost_mean:.2f}, {pct} upper bound {c.cost_upper_bound:.2f}, limit {limit}, "
            f"{c.within_limit_share:.0%} of episodes within it; sampled policy mean {s_mean}"
            f"  -> {'ok' if c.certified else 'EXCEEDS'}"
        )
    lines.append(f"{'CERTIFIED' if cert.certified else 'NOT CERTIFIED'} (upper bound: {cert.interval})")
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    from cvpo.certify import certify_policy

    path = Path(args.path)
    if (path / "policy").is_dir() and not (path / "policy.json").is_file():
        path = path / ("best_policy" if args.best else "policy")
    if not (path / "policy.json").is_file():
        raise CliError(f"{args.path}: no policy artefact (expected policy.json in it or in its policy/ folder)")
    cert = certify_policy(
        path,
        episodes=args.episodes,
        seed_base=args.seed_base,
        cost_limits=_parse_limits(args.cost_limit),
        stochastic_episodes=args.stochastic_episodes,
        env_id=args.env,
        confidence=args.confidence,
    )
    if args.json:
        print(json.dumps(cert.to_dict(), indent=2))
    else:
        print(_fmt_certificate(cert))
        if args.verbose:
            for i, (r, c) in enumerate(zip(cert.returns, cert.costs, strict=True)):
                print(f"  episode {i}: return {r:.2f} cost {', '.join(f'{x:.2f}' for x in c)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The engine's commands (envs, train, eval); ``service.cli`` adds serve, api, worker and tokens."""
    parser = argparse.ArgumentParser(prog="cvpo", description="CVPO safe-RL train-and-serve service.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "envs",
        help="list the supported safety-gymnasium tasks",
        description="List supported tasks with observation/action shapes, action "
        "bounds, episode length and default cost limit.",
    )
    p.add_argument("id", nargs="?", help="show one task only")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--check",
        action="store_true",
        help="build, reset and step each task on this machine and compare with the catalogue",
    )
    p.set_defaults(func=cmd_envs)

    p = sub.add_parser(
        "train",
        help="train a CVPO policy",
        description="Train CVPO on a task. Settings resolve as defaults < the task's preset "
        "< --config file < flags < --set. Writes metrics.jsonl/.csv, TensorBoard events, "
        "checkpoints and a policy artefact into --out. Ctrl-C stops after a checkpoint.",
    )
    p.add_argument("--env", help="task id (see `cvpo envs`)")
    p.add_argument("--total-env-steps", type=int, help="env-step budget (default 100000)")
    p.add_argument("--seed", type=int, help="run seed (default 0)")
    p.add_argument(
        "--cost-limit",
        type=float,
        action="append",
        help="episodic cost limit; repeat for several constraints (default 25; inf = none)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto: CUDA when present")
    p.add_argument("--preset", help="preset name (default: picked from the task id; 'none' for none)")
    p.add_argument("--config", help="TOML file of settings (same keys as the TrainConfig sections)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set algo.num_samples=64 (repeatable)",
    )
    p.add_argument("--out", help="run directory to create")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval",
        help="evaluate and certify a policy artefact on held-out layouts",
        description="Run deterministic (mean-action) episodes of a policy artefact on held-out layouts "
        "(reset seeds SEED_BASE+i, disjoint from training-time evaluation) plus sampled-action ones, and "
        "certify it: CERTIFIED when every constraint's one-sided upper confidence bound on expected "
        "episode cost is within its limit. PATH is a run directory (uses its policy/) or an artefact "
        "directory.",
    )
    p.add_argument("path", metavar="PATH")
    p.add_argument("--episodes", type=int, default=30, help="deterministic episodes (default 30; at least 2)")
    p.add_argument(
        "--seed-base",
        "--seed",
        dest="seed_base",
        type=int,
        default=CERT_SEED_BASE,
        help=f"reset seed of the first episode; episode i uses SEED_BASE+i (default {CERT_SEED_BASE})",
    )
    p.add_argument(
        "--cost-limit",
        action="append",
        metavar="LIMIT",
        help="episodic cost limit per constraint, repeated or comma-separated (inf = none; default: the "
        "artefact's limits; one value applies to every constraint)",
    )
    p.add_argument("--env", help="certify on a variant task with the same spaces (default: the artefact's task)")
    p.add_argument(
        "--stochastic-episodes", type=int, default=10, help="sampled-action episodes, reported only (default 10)"
    )
    p.add_argument("--confidence", type=float, default=0.95, help="confidence of the bounds (default 0.95)")
    p.add_argument("--best", action="store_true", help="use the run's best feasible policy instead of the final")
    p.add_argument("--json", action="store_true", help="print the certificate as JSON")
    p.add_argument("--verbose", "-v", action="store_true", help="also list every episode")
    p.set_defaults(func=cmd_eval)

    return parser


def main(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Run one subcommand; ``parser`` lets the service's command (``service.cli``) add its own."""
    parser = parser or build_parser()
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
        print(
            f"cvpo {args.command}: internal error: {type(exc).__name__}: {exc} (set CVPO_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
