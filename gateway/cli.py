"""``pura`` command line: keys, migrations, the gateway, local stand-in providers, a dev stack.

    pura keys create --label alice --daily-budget-usd 5 --rate-limit 30
    pura keys list | pura keys revoke <id-or-prefix> | pura keys set-limits <id> --rate-limit 60
    pura migrate
    pura settlements replay [FILE] [--dry-run]   # settle the dead-lettered settlements
    pura serve --config routing.toml --port 8600
    pura provider --port 8611 --model stand-in-small --latency-ms 50 --failure-rate 0.1
    pura devstack            # the three default stand-ins + the gateway, prints a key

The database comes from ``--database-url`` or ``PURA_DATABASE_URL`` (default
``sqlite:///.pura/gateway.db``).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import signal
import sys
import threading
import time
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import BinaryIO, Literal

from gateway.accounting.db import migrate, open_database
from gateway.accounting.money import format_usd, usd_to_micros
from gateway.accounting.settlement import Replay, default_dead_letter_path, replay_dead_letters
from gateway.accounting.store import Store, now_ms
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


def cmd_settlements(args: argparse.Namespace) -> int:
    """``settlements replay``: see :func:`_replay_file`. The file defaults to the one the
    gateway writes for the same settings (``PURA_SETTLEMENT_DEAD_LETTER``, else next to the
    SQLite file). A dry run neither migrates nor writes anything."""
    settings = GatewaySettings()
    db = open_database(args.database_url or settings.database_url)
    try:
        if not args.dry_run:
            migrate(db)
        store = Store(db)
        path = Path(args.file or settings.settlement_dead_letter or default_dead_letter_path(store))
        return _replay_file(store, path, args.dry_run, settings.reservation_ttl_s)
    finally:
        db.close_sync()


def _replay_file(store: Store, path: Path, dry_run: bool, reservation_ttl_s: int) -> int:
    """Replay the dead-letter file ``path``; exit status 1 if a line is kept (failed or
    malformed), else 0.

    The scheme, so that a crash at any point loses no line and bills nothing twice:

    1. Claim: ``path`` is hard-linked to ``path.replaying``, then unlinked (the link refuses to
       replace an existing file). The gateway opens the file for each append, so its next
       dead letter starts a new ``path``; one that opened it just before lands in the claimed
       file, which is read again to its end before it is archived.
    2. Sweep, as the gateway's sweeper does: release the reservations older than
       ``reservation_ttl_s``, such as the lease of the stopped gateway that dead-lettered the
       lines, which still holds their budget (a replay bills what fits beside what is held).
       Then replay each line (:func:`replay_dead_letters`): a committed line is in the database
       for good, and replaying it again reports it as already settled and changes nothing.
    3. Keep: the lines that failed or are malformed are appended to ``path`` (synced to disk),
       except those already there, so the next replay takes them up with any new dead letters.
    4. Archive: ``path.replaying`` is renamed ``path.replayed-<UTC time>``, a record of what was
       replayed (kept lines included); nothing is ever deleted.

    If ``path.replaying`` exists, an earlier replay was interrupted: it is replayed first (a
    lock tells it from a replay still running), and ``path`` is left for the next run.
    A dry run reads ``path.replaying`` if it exists, else ``path``, and writes nothing."""
    work = path.with_name(path.name + ".replaying")
    if dry_run:
        source = work if work.exists() else path
        if not source.exists():
            print(f"no dead-letter file at {path}")
            return 0
        numbered = _numbered(source.read_bytes())
        results = asyncio.run(replay_dead_letters(store, numbered.items(), dry_run=True))
        return _report(source, results, dry_run=True)
    resumed = work.exists()
    claimed = _claim(path, work)
    if claimed is None:
        print(f"no dead-letter file at {path}")
        return 0
    if claimed == "busy":
        print(f"another replay of {path} is running ({work} is locked)", file=sys.stderr)
        return 1
    with claimed as f:
        if resumed:
            print(f"resuming an interrupted replay: {work}"
                  + (f" ({path} waits for the next run)" if path.exists() else ""))
        try:
            released = asyncio.run(store.release_stale(reservation_ttl_s * 1000))
        except Exception as exc:  # (the replay then finds out, line by line)
            print(f"releasing stale reservations failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        else:
            if released:
                print(f"released {released} reservation(s) older than PURA_RESERVATION_TTL_S"
                      f" ({reservation_ttl_s} s), as the sweeper does")
        results: list[Replay] = []
        lines: dict[int, bytes] = {}
        read = 0  # lines read so far
        partial = b""  # a line whose end has not been read yet (a gateway append in progress)
        while True:
            data = f.read()  # to the end, again: an append that raced the claim
            if not data:
                # what is left has no newline: a write cut short (reported malformed and kept)
                data, partial = partial, b""
                if not data:
                    break
            else:
                data = partial + data
                end = data.rfind(b"\n") + 1
                data, partial = data[:end], data[end:]
            numbered = _numbered(data, first=read + 1)
            read += len(data.splitlines())
            lines.update(numbered)
            results += asyncio.run(replay_dead_letters(store, numbered.items()))
        kept = [lines[r.line_no] for r in results if r.status in ("failed", "malformed")]
        _append_new(path, kept)
        archive = _archive(path, work)
    status = _report(archive, results, dry_run=False)
    if kept:
        print(f"kept {len(kept)} line(s) for another replay in {path}")
    return status


def _claim(path: Path, work: Path) -> BinaryIO | Literal["busy"] | None:
    """The claimed file, opened and locked (see :func:`_replay_file`); "busy" if another
    replay holds it; None if there is nothing to replay."""
    while True:
        if not work.exists():
            try:
                os.link(path, work)
            except FileNotFoundError:
                return None
            except FileExistsError:
                continue  # another replay claimed it meanwhile: its lock tells
        try:
            f = work.open("rb")
        except FileNotFoundError:
            continue  # archived by a replay that just ended: claim afresh
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            return "busy"
        try:
            current = os.stat(work)
        except FileNotFoundError:
            current = None
        if current is None or not os.path.samestat(os.fstat(f.fileno()), current):
            f.close()  # archived between the open and the lock
            continue
        # Unlinked only now (also when a replay was interrupted between its link and unlink):
        # from here on the gateway's appends go to a new file.
        try:
            if os.path.samefile(path, work):
                os.unlink(path)
        except FileNotFoundError:
            pass
        return f


def _numbered(data: bytes, first: int = 1) -> dict[int, bytes]:
    """The lines by number; blank ones are skipped but numbered. A last line without its
    newline counts: a write cut short is reported as malformed, not dropped."""
    return {first + i: line for i, line in enumerate(data.splitlines()) if line.strip()}


def _append_new(path: Path, lines: list[bytes]) -> None:
    """Append ``lines`` to ``path`` (synced), but not those already there: a replay resumed
    after a crash between its append and its archive keeps each line once."""
    there = set(path.read_bytes().splitlines()) if path.exists() else set()
    new = [line for line in dict.fromkeys(lines) if line not in there]
    if not new:
        return
    with path.open("ab") as out:
        out.write(b"".join(line + b"\n" for line in new))
        out.flush()
        os.fsync(out.fileno())


def _archive(path: Path, work: Path) -> Path:
    """Rename the replayed file ``path.replayed-<UTC time>``, never over an earlier one."""
    ms = now_ms()
    while True:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"
        archive = path.with_name(f"{path.name}.replayed-{stamp}")
        if not archive.exists():
            os.rename(work, archive)
            return archive
        ms += 1


_LABELS = {"replayed": "replayed", "settled": "already settled", "failed": "failed", "malformed": "malformed"}


def _report(source: Path, results: list[Replay], dry_run: bool) -> int:
    """A line per dead letter, then the counts; 1 if a line is kept (failed or malformed)."""
    labels = {**_LABELS, "replayed": "to replay"} if dry_run else _LABELS
    print(f"{'line':>5}  {'result':<15}  {'request id':<30}  {'cost USD':>10}  {'billed USD':>10}  note")
    for r in results:
        cost = "" if r.cost_micros is None else format_usd(r.cost_micros)
        billed = "" if r.billed_micros is None else format_usd(r.billed_micros)
        print(f"{r.line_no:>5}  {labels[r.status]:<15}  {r.request_id or '-':<30}  {cost:>10}  {billed:>10}"
              f"  {r.detail}".rstrip())
    counts = {status: sum(r.status == status for r in results) for status in _LABELS}
    total = sum(r.billed_micros or 0 for r in results)
    print(
        f"{source}: {', '.join(f'{labels[s]} {n}' for s, n in counts.items())}"
        + ("" if dry_run else f"; billed {format_usd(total)} USD")
        + ("  (dry run: nothing written)" if dry_run else "")
    )
    return 1 if counts["failed"] or counts["malformed"] else 0


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

    settlements = sub.add_parser("settlements", help="dead-lettered settlements")
    settlements_sub = settlements.add_subparsers(dest="settlements_cmd", required=True)
    replay = settlements_sub.add_parser(
        "replay", help="settle the dead-lettered settlements; keep what still fails"
    )
    replay.add_argument(
        "file", nargs="?",
        help="dead-letter file (default: PURA_SETTLEMENT_DEAD_LETTER, else next to the SQLite file)",
    )
    replay.add_argument("--dry-run", action="store_true", help="only check and report; write nothing")
    settlements.set_defaults(func=cmd_settlements)

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
