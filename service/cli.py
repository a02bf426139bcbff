"""The ``cvpo`` command: the engine's subcommands (``cvpo.cli``: envs, train, eval) plus the service's
(serve, api, worker, tokens). This is the composition root, so it is the one place that reaches into
``core`` and the launcher; ``cvpo`` itself stays a library that imports nothing of the service."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from cvpo.cli import CliError, build_parser
from cvpo.cli import main as engine_main


def add_service_commands(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add serve, api, worker and tokens to the engine's parser."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, helptext in (
        ("serve", "run the whole service here: Redis (unless REDIS_URL), one worker and the API"),
        ("api", "run only the REST API (uvicorn, one process)"),
        ("worker", "run only a Celery training worker (one job at a time; CUDA when present)"),
    ):
        p = sub.add_parser(
            name,
            help=helptext,
            description=f"{helptext[0].upper()}{helptext[1:]}. Configured by environment variables: "
            "CVPO_API_TOKEN, CVPO_HOST, CVPO_PORT, CVPO_DATA_DIR, REDIS_URL, DATABASE_URL and the others "
            "listed in README's Configuration table.",
        )
        if name != "worker":
            p.add_argument("--host", help="bind address (default CVPO_HOST or 127.0.0.1)")
            p.add_argument("--port", type=int, help="port (default CVPO_PORT or 8000)")
        p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
        p.set_defaults(func=cmd_service, service=name)

    p = sub.add_parser(
        "tokens",
        help="create, list and revoke API tokens",
        description="Manage API tokens in the job store (CVPO_DATA_DIR / DATABASE_URL). A new token is "
        "printed once; only its SHA-256 is stored. Scopes: jobs:read jobs:write policies:read "
        "policies:act aliases:write metrics:read admin, and alias:NAME (POST /aliases/NAME/act of the "
        "client's alias NAME, nothing else). A controller gets policies:act, or alias:NAME only.",
    )
    tsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = tsub.add_parser("create", help="create a token and print it once")
    t.add_argument("--name", required=True, help="who or what uses it, e.g. 'arm-controller-3'")
    t.add_argument(
        "--scopes", required=True, help="comma-separated scopes, e.g. policies:read,policies:act or alias:production"
    )
    t.add_argument(
        "--client",
        help="the client whose jobs and policies the token sees (default: a new client of its own); "
        "'admin' shares the bootstrap token's",
    )
    t.add_argument(
        "--expires-in",
        type=parse_duration,
        metavar="DURATION",
        help="make the token stop working after this long, like a revoked one: seconds, or a number "
        "with s, m, h or d (e.g. 90m, 12h, 30d); default: never. API processes may accept it for up "
        "to their token cache's few seconds past the expiry",
    )
    tsub.add_parser("list", help="list tokens (ids, names, scopes; never the secrets)")
    t = tsub.add_parser("revoke", help="delete a token; API processes stop accepting it within 5 s")
    t.add_argument("token_id")
    p.set_defaults(func=cmd_tokens)
    return parser


def parse_duration(text: str) -> float:
    """'3600', '90m', '12h', '30d' → seconds (> 0, at most 100 years): argparse's type for --expires-in."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    raw = text.strip().lower()
    scale = units.get(raw[-1:])
    number = raw[:-1] if scale is not None else raw
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use seconds or a number with s, m, h or d (e.g. 30d)") from None
    if not 0 < seconds <= 100 * 365 * 86400:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"{text!r}: the duration must be positive and at most 100 years")
    return seconds


def cmd_tokens(args: argparse.Namespace) -> int:
    from core.settings import Settings
    from core.store import Store, rfc3339

    settings = Settings.from_env()
    store = Store(settings.resolved_database_url, settings.data_dir)
    if args.action == "create":
        scopes = [x.strip() for x in args.scopes.split(",") if x.strip()]
        expires_at = time.time() + args.expires_in if args.expires_in is not None else None
        try:
            token_id, raw = store.create_token(args.name, scopes, args.client, expires_at=expires_at)
        except ValueError as exc:
            raise CliError(str(exc)) from exc
        print(f"{token_id} {raw}")
        if expires_at is not None:
            print(f"expires {rfc3339(expires_at)}", file=sys.stderr)
        print("store the token now: it is not shown again", file=sys.stderr)
    elif args.action == "list":
        for t in store.list_tokens():
            expiry = "expired" if t["expired"] else f"expires {t['expires_at']}" if t["expires_at"] else "no expiry"
            print(
                f"{t['id']}  {t['name']:<24}  {t['client']:<22}  {','.join(t['scopes']):<40}  {t['created_at']}  "
                f"{expiry}"
            )
    elif not store.revoke_token(args.token_id):
        raise CliError(f"no token {args.token_id!r} (see `cvpo tokens list`)")
    return 0


def cmd_service(args: argparse.Namespace) -> int:
    from core.settings import Settings
    from service import launcher

    changes = {k: v for k, v in (("host", getattr(args, "host", None)), ("port", getattr(args, "port", None))) if v}
    settings = Settings.from_env().with_(**changes)
    try:
        if args.service == "serve":
            return launcher.serve(settings)
        if args.service == "api":
            return launcher.run_api(settings, args.log_level)
        return launcher.run_worker(settings, args.log_level.upper())
    except launcher.ServiceError as exc:
        raise CliError(str(exc)) from exc


def main(argv: Sequence[str] | None = None) -> int:
    return engine_main(argv, add_service_commands(build_parser()))


if __name__ == "__main__":
    sys.exit(main())
