"""Command line: serve, demo, mock, check-config, workspaces, keys, users, usage,
migrate, export-usage, import.

``--config PATH`` may come before the command or after it (or between a
group and its action: ``gateway keys --config F list``). Without it the
gateway looks at ``$GATEWAY_CONFIG``, then ``./gateway.toml``, and otherwise
uses its embedded default (SQLite in ./gateway.db, the bundled mock
upstream). A config path that does not exist is an error, never a fallback.

Only ``serve`` and ``check-config`` need the upstream secrets the file names;
the commands that only read or write the database load it without them.
``demo`` and ``mock`` read no config at all.

Adding a command: a ``cmd_*`` function ``(args, cfg) -> exit code``, and a
``command(...)`` call in ``build_parser`` (``group(...)`` for a new group of
actions such as ``keys``), saying what it needs (``Needs``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from . import __version__, cli_users, logs
from .cli_users import on_db
from .config import MOCK_UPSTREAM, Config, ConfigError, embedded_config, load_config
from .store import audit, catalog, queries
from .store.base import KeyLimits, Store, migrate_schema, run_on_store
from .store.schema import connect
from .store.tx import Tx

T = TypeVar("T")

CONFIG_HELP = "TOML config file (default: $GATEWAY_CONFIG, then ./gateway.toml, then the embedded default)"
MOCK_PORT = 8081


class Needs(Enum):
    """What a command needs loaded before it runs."""

    NOTHING = "nothing"  # reads no config (demo, mock): --config is refused
    DATABASE = "database"  # the config without upstream secrets (workspaces, keys, usage)
    SECRETS = "secrets"  # the full config, every secret set (serve, check-config)


class CliError(Exception):
    """A command cannot do what was asked; the message says why (exit 1)."""


Command = Callable[[argparse.Namespace, Config], int]


# ------------------------------------------------------------------ config


def config_path(args: argparse.Namespace) -> str | None:
    """The --config given (at any level), or None. Two different paths are
    an error rather than a silent choice."""
    given = [v for level in range(3) if (v := getattr(args, f"config_{level}", None))]
    if len({Path(p).resolve() for p in given}) > 1:
        raise ConfigError(f"--config given twice with different paths: {given[0]}, {given[1]}")
    return given[0] if given else None


def resolve_config(path: str | None, *, secrets: bool = True) -> Config:
    """The config file named, or found, or else the embedded default
    (``cfg.source`` is None)."""
    path = path or os.environ.get("GATEWAY_CONFIG")
    if path is None and Path("gateway.toml").exists():
        path = "gateway.toml"
    if path is None:
        return embedded_config()
    return load_config(path, secrets=secrets)


def _on_store(cfg: Config, fn: Callable[[Store], Awaitable[T]]) -> T:
    """``fn`` on the config's database through the Store."""
    return run_on_store(cfg.database, fn)


# ------------------------------------------------------------------ output


SPAN = re.compile(r"(\d+)([smhd])")
SPAN_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(value: str, *, future: bool = False) -> float:
    """ISO 8601 (UTC unless it says otherwise), or a span from now: 30m,
    24h, 7d back from now, or ahead of it when ``future``."""
    m = SPAN.fullmatch(value)
    if m:
        span = int(m[1]) * SPAN_SECONDS[m[2]]
        return time.time() + span if future else time.time() - span
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise CliError(f"cannot read time {value!r}: use ISO 8601 or 30m/24h/7d") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def dollars(value: float | None) -> str:
    """$0.000051, $1.50, $0.00: six decimals at most, two at least."""
    text = f"{value or 0.0:,.6f}".rstrip("0")
    whole, _, cents = text.partition(".")
    return f"${whole}.{cents.ljust(2, '0')}"


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


# ------------------------------------------------------------------ server commands


def _serve_until_signal(cfg: Config, *, bundled_mock: bool, on_ready: Any = None) -> int:
    """Run the server in this process (or under a supervisor for several
    workers) until SIGTERM / SIGINT."""
    from .server import ListenError, run, run_until_signal

    try:
        if cfg.server.workers > 1:
            from .supervisor import serve

            return serve(cfg, bundled_mock=bundled_mock)
        run(run_until_signal(cfg, bundled_mock=bundled_mock, on_ready=on_ready))
    except ListenError as e:  # the port is taken, ...
        print(f"error: {e.strerror}", file=sys.stderr)
        return 1
    return 0


def cmd_serve(args: argparse.Namespace, cfg: Config) -> int:
    flags = {name: getattr(args, name) for name in ("host", "port", "workers") if getattr(args, name) is not None}
    cfg = replace(cfg, server=replace(cfg.server, **flags))
    logs.configure(cfg.server.log_format)
    return _serve_until_signal(cfg, bundled_mock=cfg.source is None)


def cmd_demo(args: argparse.Namespace, cfg: Config) -> int:
    from .server import Running

    env_token = os.environ.get("GATEWAY_ADMIN_TOKEN")
    token = env_token or secrets.token_urlsafe(24)
    demo_cfg = embedded_config({"GATEWAY_ADMIN_TOKEN": token}, db_path=Path(args.db))
    demo_cfg = replace(demo_cfg, server=replace(demo_cfg.server, port=args.port))
    conn = connect(demo_cfg.database.path)
    try:
        ws = queries.find_workspace(conn, "demo")
    except queries.NotFoundError:
        ws = queries.create_workspace(conn, "demo")
    _, key = queries.create_key(conn, ws["id"], name="demo")
    conn.close()

    def ready(c: Config, gw: Running) -> None:
        mock = c.upstream(MOCK_UPSTREAM).base_url
        print(f"gateway demo on {gw.url} (mock upstream at {mock}, database {c.database.path})")
        print("try:")
        print(
            f"  curl -s {gw.url}/v1/chat/completions -H 'Authorization: Bearer {key}' "
            "-H 'Content-Type: application/json' "
            "-d '{\"model\":\"mock-gpt\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'"
        )
        print(f"console: {gw.url}/console/")
        if env_token:
            print("admin token: the value of $GATEWAY_ADMIN_TOKEN")
        else:
            print(f"admin token: {token}")
        print("press Ctrl-C to stop", flush=True)

    return _serve_until_signal(demo_cfg, bundled_mock=True, on_ready=ready)


def cmd_mock(args: argparse.Namespace, cfg: Config) -> int:
    from .mock.volcengine import MOCK_ACCESS_KEY, MOCK_SECRET_KEY
    from .server import ListenError, Running, run, run_mock

    def ready(mock: Running) -> None:
        base = f"http://{args.host}:{mock.port}"
        print(f"mock upstream on {base} (any API key is accepted)")
        print(f'  openai, anthropic upstreams:  base_url = "{base}/v1"')
        print(f'  ark upstream (video tasks):   base_url = "{base}/api/v3"')
        print(f'  volcengine upstream (assets): base_url = "{base}", '
              f"with VOLC_ACCESS_KEY={MOCK_ACCESS_KEY} VOLC_SECRET_KEY={MOCK_SECRET_KEY}")
        print("press Ctrl-C to stop", flush=True)

    try:
        run(run_mock(args.host, args.port, ready))
    except ListenError as e:
        print(f"error: {e.strerror}", file=sys.stderr)
        return 1
    return 0


def cmd_check_config(args: argparse.Namespace, cfg: Config) -> int:
    models = ", ".join(m.name for m in cfg.models)
    if cfg.source is None:
        print("no config file given or found: the embedded default is used")
        print(f"  database {cfg.database.path}; upstream {MOCK_UPSTREAM} (bundled); models {models}")
        return 0
    print(f"ok: {cfg.source}: {len(cfg.upstreams)} upstreams, {len(cfg.models)} models, {len(cfg.groups)} groups")
    print(f"  database {cfg.database.path}; models {models}")
    print("  admin API and console: " + ("on" if cfg.admin.token else f"off (${cfg.admin.token_env} is not set)"))
    return 0


# ------------------------------------------------------------------ database commands


def _check_group(cfg: Config, group: str | None) -> None:
    if group is not None and cfg.group(group) is None:
        raise CliError(f"unknown group {group!r}")


def cmd_workspaces_create(args: argparse.Namespace, cfg: Config) -> int:
    _check_group(cfg, args.group)

    async def run(tx: Tx) -> dict[str, Any]:
        ws = await catalog.create_workspace(tx, args.name, args.group)
        await audit.record(tx, cli_users.cli_actor(), "workspace.create", now=time.time(), target_type="workspace",
                           target_id=ws["id"], workspace_id=ws["id"], after=ws)
        return ws

    ws = on_db(cfg, run, write=True)
    print(f"created workspace {ws['name']} (id {ws['id']}, group {ws['default_group']})")
    return 0


def cmd_workspaces_list(args: argparse.Namespace, cfg: Config) -> int:
    rows = on_db(cfg, catalog.list_workspaces)
    _table(rows, ["id", "name", "default_group"])
    return 0


def cmd_keys_create(args: argparse.Namespace, cfg: Config) -> int:
    _check_group(cfg, args.group)
    expires_at = parse_time(args.expires, future=True) if args.expires else None
    if expires_at is not None and expires_at <= time.time():
        raise CliError(f"--expires {args.expires} is in the past: a key must expire in the future")
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    limits = KeyLimits(
        rpm=args.rpm, tpm=args.tpm, max_concurrency=args.concurrency, spend_limit=args.spend_limit,
        expires_at=expires_at,
    )

    async def run(tx: Tx) -> tuple[dict[str, Any], tuple[dict[str, Any], str]]:
        ws = await catalog.find_workspace(tx, args.workspace)
        row, plaintext = await catalog.create_key(tx, ws["id"], name=args.name or "", group=args.group,
                                                  models=models, limits=limits)
        await audit.record(tx, cli_users.cli_actor(), "key.create", now=time.time(), target_type="key",
                           target_id=row["id"], workspace_id=ws["id"], after=row)
        return ws, (row, plaintext)

    ws, (row, plaintext) = on_db(cfg, run, write=True)
    print(f"created key {row['id']} ({row['prefix']}...) in workspace {ws['name']}")
    print("the key is shown once; store it now:")
    print(plaintext)
    return 0


def key_status(key: dict[str, Any], now: float) -> str:
    if key["revoked_at"]:
        return "revoked"
    if key["expires_at"] is not None and key["expires_at"] <= now:
        return "expired"
    return "suspended" if key.get("user_suspended") else "active"


def cmd_keys_list(args: argparse.Namespace, cfg: Config) -> int:
    async def listing(tx: Tx) -> list[dict[str, Any]]:
        ws_id = (await catalog.find_workspace(tx, args.workspace))["id"] if args.workspace else None
        return await catalog.list_keys(tx, ws_id)

    rows = on_db(cfg, listing)
    now = time.time()
    for r in rows:
        expires = r["expires_at"]
        r["expires"] = datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%d %H:%M") if expires else ""
        r["status"] = key_status(r, now)
    _table(rows, ["id", "prefix", "workspace", "name", "group_name", "expires", "status"])
    return 0


def cmd_keys_revoke(args: argparse.Namespace, cfg: Config) -> int:
    async def run(tx: Tx) -> dict[str, Any]:
        before = await catalog.get_key(tx, args.id)
        row = await catalog.revoke_key(tx, args.id)
        if before["revoked_at"] is None:
            await audit.record(tx, cli_users.cli_actor(), "key.revoke", now=time.time(), target_type="key",
                               target_id=row["id"], workspace_id=row["workspace_id"], before=before, after=row)
        return row

    row = on_db(cfg, run, write=True)
    print(f"revoked key {row['id']} ({row['prefix']}...)")
    return 0


async def _usage_labels(store: Store, by: str) -> dict[Any, str]:
    """Names for the ids usage rows hold: keys as ``name (prefix...)``."""
    if by == "key":
        return {k["id"]: f"{k['name']} ({k['prefix']}...)" if k["name"] else f"{k['prefix']}..."
                for k in await store.run(catalog.list_keys)}
    if by == "workspace":
        return {w["id"]: w["name"] for w in await store.run(catalog.list_workspaces)}
    return {}


def cmd_usage(args: argparse.Namespace, cfg: Config) -> int:
    since = parse_time(args.since) if args.since else 0.0

    async def summary(s: Store) -> tuple[list[dict[str, Any]], dict[Any, str]]:
        return await s.usage_summary(since=since, by=args.by), await _usage_labels(s, args.by)

    rows, labels = _on_store(cfg, summary)
    for r in rows:
        value = r[args.by]
        r[args.by] = f"(no {args.by})" if value is None else labels.get(value, str(value))
        r["cost"] = dollars(r["cost"])
    _table(rows, [args.by, "requests", "errors", "input_tokens", "output_tokens", "cached_tokens", "video_tokens",
                  "cost"])
    return 0


def cmd_migrate(args: argparse.Namespace, cfg: Config) -> int:
    db = replace(cfg.database, url=args.url) if args.url else cfg.database
    before, after = asyncio.run(migrate_schema(db))
    where = "PostgreSQL" if db.url else str(db.path)
    print(f"{where}: schema version {after}" + (f" (was {before})" if before != after else " (up to date)"))
    return 0


def cmd_export_usage(args: argparse.Namespace, cfg: Config) -> int:
    from .store.postgres.transfer import export_lines

    since = parse_time(args.since) if args.since else None
    out = sys.stdout.buffer if args.out in (None, "-") else open(args.out, "wb")  # noqa: SIM115

    async def export(s: Store) -> int:
        n, last = 0, 0
        while rows := await s.usage_rows(after_id=last, limit=5000):
            last = rows[-1]["id"]
            keep = [r for r in rows if since is None or r["ts"] >= since]
            out.write(export_lines(keep))
            n += len(keep)
        return n

    try:
        n = _on_store(cfg, export)
    finally:
        if out is not sys.stdout.buffer:
            out.close()
    print(f"exported {n} usage rows", file=sys.stderr)
    return 0


def cmd_import(args: argparse.Namespace, cfg: Config) -> int:
    import asyncpg

    from .store.postgres.transfer import TransferError, import_export, import_sqlite, is_sqlite

    db = cfg.database
    if db.url is None:
        raise CliError("import writes into PostgreSQL: set [database] url in the config")
    source = Path(args.source)
    if not source.is_file():
        raise CliError(f"{source}: no such file")

    async def run() -> str:
        await migrate_schema(db)
        assert db.url is not None
        conn = await asyncpg.connect(db.url, timeout=10)
        try:
            if is_sqlite(source):
                counts = await import_sqlite(conn, source)
                return ", ".join(f"{n} {table}" for table, n in counts.items())
            return f"{await import_export(conn, source)} usage_events"
        finally:
            await conn.close()

    try:
        print(f"imported {asyncio.run(run())} from {source}")
    except TransferError as e:
        raise CliError(str(e)) from None
    return 0


# ------------------------------------------------------------------ parser


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _port(text: str) -> int:
    n = int(text)
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError("must be between 0 and 65535")
    return n


class Commands:
    """Adds commands and groups of actions to the parser, each with its own
    ``--config`` (the level in the dest keeps one level's default from
    overwriting another's value) and what it needs loaded."""

    def __init__(self, parser: argparse.ArgumentParser, level: int = 1) -> None:
        self.sub = parser.add_subparsers(dest=f"command_{level}", required=True, metavar="COMMAND")
        self.level = level

    def command(self, name: str, func: Command, help: str, needs: Needs = Needs.DATABASE) -> argparse.ArgumentParser:
        p = self.sub.add_parser(name, help=help, description=help)
        p.add_argument("--config", dest=f"config_{self.level}", metavar="PATH", help=CONFIG_HELP)
        p.set_defaults(func=func, needs=needs)
        return p

    def group(self, name: str, help: str) -> Commands:
        p = self.sub.add_parser(name, help=help, description=help)
        p.add_argument("--config", dest=f"config_{self.level}", metavar="PATH", help=CONFIG_HELP)
        return Commands(p, self.level + 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description="Self-hosted LLM API gateway.")
    p.add_argument("--version", action="version", version=f"gateway {__version__}")
    p.add_argument("--config", dest="config_0", metavar="PATH", help=CONFIG_HELP)
    top = Commands(p)

    s = top.command("serve", cmd_serve, "run the server", Needs.SECRETS)
    s.add_argument("--host", help="override server.host")
    s.add_argument("--port", type=_port, help="override server.port")
    s.add_argument("--workers", type=_positive, help="override server.workers")

    d = top.command("demo", cmd_demo, "run the embedded default with a fresh key; prints a curl line and the console",
                    Needs.NOTHING)
    d.add_argument("--port", type=_port, default=8080)
    d.add_argument("--db", default="gateway-demo.db", help="SQLite file (default gateway-demo.db)")

    m = top.command("mock", cmd_mock, "run the bundled mock upstream on its own (every protocol it speaks)",
                    Needs.NOTHING)
    m.add_argument("--host", default="127.0.0.1")
    m.add_argument("--port", type=_port, default=MOCK_PORT, help=f"default {MOCK_PORT}")

    top.command("check-config", cmd_check_config, "validate the config (and its secrets) and exit", Needs.SECRETS)

    w = top.group("workspaces", "create or list workspaces")
    wc = w.command("create", cmd_workspaces_create, "create a workspace")
    wc.add_argument("name")
    wc.add_argument("--group", default="default")
    w.command("list", cmd_workspaces_list, "list workspaces")

    k = top.group("keys", "create, list or revoke API keys")
    kc = k.command("create", cmd_keys_create, "create a key; prints it alone on the last line")
    kc.add_argument("--workspace", required=True)
    kc.add_argument("--name")
    kc.add_argument("--group")
    kc.add_argument("--models", help="comma-separated allow-list (globs allowed)")
    kc.add_argument("--rpm", type=int)
    kc.add_argument("--tpm", type=int)
    kc.add_argument("--concurrency", type=int)
    kc.add_argument("--spend-limit", type=float, help="monthly, USD")
    kc.add_argument("--expires", help="ISO 8601 time, or a span from now: 12h, 30d")
    kl = k.command("list", cmd_keys_list, "list keys (prefix only, never the key)")
    kl.add_argument("--workspace")
    kr = k.command("revoke", cmd_keys_revoke, "revoke a key")
    kr.add_argument("id", type=int)

    cli_users.add_commands(top.group("users", "console accounts: create, invite, list, disable, enable"))

    u = top.command("usage", cmd_usage, "usage summary")
    u.add_argument("--since", help="ISO 8601 time or 30m / 24h / 7d back")
    u.add_argument("--by", choices=sorted(queries.USAGE_GROUPS), default="model")

    g = top.command("migrate", cmd_migrate, "apply the schema to the configured database (or --url)")
    g.add_argument("--url", help="a postgresql:// URL instead of the config's database")
    e = top.command("export-usage", cmd_export_usage, "write usage rows as JSON lines")
    e.add_argument("--out", help="file to write (default: stdout)")
    e.add_argument("--since", help="ISO 8601 time or 30m / 24h / 7d back")
    i = top.command("import", cmd_import,
                    "copy an SQLite database (or an export-usage file) into the configured PostgreSQL")
    i.add_argument("source", help="gateway.db of an SQLite installation, or a file written by export-usage")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logs.configure("text")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        path = config_path(args)
        needs: Needs = args.needs
        if needs is Needs.NOTHING:
            if path is not None:
                parser.error(f"{args.command_1} reads no config file: drop --config "
                             f"(gateway serve --config {path} runs one)")
            cfg = embedded_config()
        else:
            cfg = resolve_config(path, secrets=needs is Needs.SECRETS)
        return int(args.func(args, cfg))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (CliError, queries.NotFoundError, queries.ConflictError) as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 1
