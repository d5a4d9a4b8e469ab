"""``pura`` command line: keys, migrations, the gateway, local stand-in providers, a dev stack.

    pura keys create --label alice --daily-budget-usd 5 --rate-limit 30
    pura keys list | pura keys revoke <id-or-prefix> | pura keys set-limits <id> --rate-limit 60
    pura migrate
    pura serve --config routing.toml --port 8600
    pura provider --port 8611 --model stand-in-small --latency-ms 50 --failure-rate 0.1
    pura devstack            # the three default stand-ins + the gateway, prints a key

The database comes from ``--database-url`` or ``PURA_DATABASE_URL`` (default
``sqlite:///.pura/gateway.db``).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from decimal import Decimal, InvalidOperation

from gateway.accounting.db import migrate, open_database
from gateway.accounting.money import format_usd, usd_to_micros
from gateway.accounting.store import Store
from gateway.config import GatewaySettings


def _usd(value: str) -> Decimal:
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a decimal amount: {value!r}") from None
    if amount < 0:
        raise argparse.ArgumentTypeError("amount must be >= 0")
    return amount


def _store(args: argparse.Namespace) -> Store:
    url = args.database_url or GatewaySettings().database_url
    db = open_database(url)
    migrate(db)
    return Store(db)


def cmd_keys(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        if args.keys_cmd == "create":
            raw, info = store.create_key_sync(
                args.label, usd_to_micros(args.daily_budget_usd), args.rate_limit, args.admin
            )
            print(raw)
            print(
                f"id={info.id} prefix={info.prefix} daily_budget_usd={format_usd(info.daily_budget_micros)}"
                f" rate_limit_per_min={info.rate_limit_per_min} admin={info.is_admin}",
                file=sys.stderr,
            )
            print("Store this key now: only its hash is kept.", file=sys.stderr)
        elif args.keys_cmd == "list":
            for k in store.list_keys_sync():
                state = "revoked" if k.revoked_ms else "active"
                print(
                    f"{k.id}\t{k.prefix}\t{state}\tbudget_usd={format_usd(k.daily_budget_micros)}"
                    f"\trpm={k.rate_limit_per_min}\tadmin={int(k.is_admin)}\t{k.label}"
                )
        elif args.keys_cmd == "revoke":
            revoked = store.revoke_key_sync(args.key)
            if len(revoked) != 1:
                print(
                    "no active key matches" if not revoked else "prefix is ambiguous; use the id",
                    file=sys.stderr,
                )
                return 1
            print(f"revoked {revoked[0].id} ({revoked[0].prefix})")
        elif args.keys_cmd == "set-limits":
            budget = None if args.daily_budget_usd is None else usd_to_micros(args.daily_budget_usd)
            changed = store.set_limits_sync(args.key, budget, args.rate_limit)
            if not changed:
                print("no key matches", file=sys.stderr)
                return 1
            print(f"updated {changed} key(s)")
    finally:
        store.db.close_sync()
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    url = args.database_url or GatewaySettings().database_url
    db = open_database(url)
    try:
        applied = migrate(db)
    finally:
        db.close_sync()
    print(f"applied migrations: {applied or 'none (up to date)'}")
    return 0


def _uvicorn_run(app: object, host: str, port: int, log_level: str) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level.lower(), access_log=False,
                loop="auto", http="auto", timeout_graceful_shutdown=10)


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.app import create_app

    overrides = {}
    if args.config:
        overrides["config"] = args.config
    if args.database_url:
        overrides["database_url"] = args.database_url
    settings = GatewaySettings(**overrides)
    host = args.host or settings.host
    port = args.port or settings.port
    _uvicorn_run(create_app(settings), host, port, "warning")
    return 0


def cmd_provider(args: argparse.Namespace) -> int:
    from gateway.upstreams.local_provider import LocalProviderApp, StandInBehaviour

    behaviour = StandInBehaviour(
        models=args.model or ["stand-in-small"],
        latency_ms=args.latency_ms,
        chunk_delay_ms=args.chunk_delay_ms,
        quality=args.quality,
        refusal_rate=args.refusal_rate,
        failure_rate=args.failure_rate,
        malformed_rate=args.malformed_rate,
        cut_stream_rate=args.cut_stream_rate,
        hang_rate=args.hang_rate,
        report_usage=not args.no_usage,
        api_key=args.api_key,
    )
    print(f"LOCAL STAND-IN provider (not a model) on http://{args.host}:{args.port}/v1 "
          f"serving {behaviour.models}", file=sys.stderr)
    _uvicorn_run(LocalProviderApp(behaviour), args.host, args.port, "warning")
    return 0


def cmd_devstack(args: argparse.Namespace) -> int:
    from gateway.devstack import default_ports, default_stand_ins, start_local_stack

    stack = start_local_stack(
        stand_ins=default_stand_ins(),
        database_url=args.database_url or GatewaySettings().database_url,
        gateway_port=args.port,
        provider_ports=default_ports(),
        log_requests=True,
    )
    print(f"Pura gateway      {stack.base_url}")
    for name, provider in stack.providers.items():
        print(f"LOCAL STAND-IN    {name:<8} {provider.base_url}  (deterministic text, not a model)")
    print(f"API key           {stack.api_key}")
    print("Ctrl-C stops everything.")
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    stack.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pura", description="Pura gateway tools")
    parser.add_argument("--database-url", help="overrides PURA_DATABASE_URL")
    sub = parser.add_subparsers(dest="cmd", required=True)

    keys = sub.add_parser("keys", help="create, list, revoke API keys")
    keys_sub = keys.add_subparsers(dest="keys_cmd", required=True)
    create = keys_sub.add_parser("create", help="create a key (printed once)")
    create.add_argument("--label", default="")
    create.add_argument("--daily-budget-usd", type=_usd, default=Decimal("10"))
    create.add_argument("--rate-limit", type=int, default=30, help="requests per minute")
    create.add_argument("--admin", action="store_true", help="may read scope=all reports")
    keys_sub.add_parser("list", help="list keys (never the secret)")
    revoke = keys_sub.add_parser("revoke", help="revoke by id or prefix")
    revoke.add_argument("key")
    limits = keys_sub.add_parser("set-limits", help="change budget / rate limit")
    limits.add_argument("key")
    limits.add_argument("--daily-budget-usd", type=_usd)
    limits.add_argument("--rate-limit", type=int)
    keys.set_defaults(func=cmd_keys)

    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=cmd_migrate)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="routing TOML (default: embedded local stand-ins)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(func=cmd_serve)

    provider = sub.add_parser("provider", help="run a LOCAL STAND-IN OpenAI-compatible provider")
    provider.add_argument("--host", default="127.0.0.1")
    provider.add_argument("--port", type=int, required=True)
    provider.add_argument("--model", action="append", help="model name (repeatable)")
    provider.add_argument("--latency-ms", type=float, default=0.0)
    provider.add_argument("--chunk-delay-ms", type=float, default=0.0)
    provider.add_argument("--quality", type=float, default=1.0)
    provider.add_argument("--refusal-rate", type=float, default=0.0)
    provider.add_argument("--failure-rate", type=float, default=0.0)
    provider.add_argument("--malformed-rate", type=float, default=0.0)
    provider.add_argument("--cut-stream-rate", type=float, default=0.0)
    provider.add_argument("--hang-rate", type=float, default=0.0)
    provider.add_argument("--no-usage", action="store_true", help="omit usage from answers")
    provider.add_argument("--api-key", help="require this bearer key")
    provider.set_defaults(func=cmd_provider)

    devstack = sub.add_parser("devstack", help="default stand-ins + gateway, prints a key")
    devstack.add_argument("--port", type=int, default=8600)
    devstack.set_defaults(func=cmd_devstack)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
