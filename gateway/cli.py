"""Command line: serve, demo, workspaces, keys, usage, check-config.

Every command takes ``--config PATH``. Without it the gateway looks at
``$GATEWAY_CONFIG``, then ``./gateway.toml``, and otherwise uses its embedded
default (SQLite in ./gateway.db, the bundled mock upstream).
"""

from __future__ import annotations

import argparse
import os
import re
import sqlite3
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import logs
from .config import Config, ConfigError, load_config
from .server import ListenError, Running, embedded_config, run, run_until_signal
from .store import queries
from .store.schema import connect


def resolve_config(path: str | None) -> Config | None:
    """The config file named, or found, or None for the embedded default."""
    path = path or os.environ.get("GATEWAY_CONFIG")
    if path is None and Path("gateway.toml").exists():
        path = "gateway.toml"
    return None if path is None else load_config(path)


def _db(cfg: Config | None) -> sqlite3.Connection:
    return connect(cfg.database.path if cfg else Path("gateway.db").resolve())


def _parse_time(value: str) -> float:
    """ISO 8601, or a relative span back from now: 30m, 24h, 7d."""
    m = re.fullmatch(r"(\d+)([smhd])", value)
    if m:
        return time.time() - int(m[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise SystemExit(f"error: cannot read time {value!r}: use ISO 8601 or 30m/24h/7d") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def cmd_serve(args: argparse.Namespace, cfg: Config | None) -> int:
    if cfg is not None and args.port is not None:
        cfg = replace(cfg, server=replace(cfg.server, port=args.port))
    if cfg is not None and args.workers is not None:
        cfg = replace(cfg, server=replace(cfg.server, workers=args.workers))
    if cfg is not None:
        logs.configure(cfg.server.log_format)
    if cfg is not None and cfg.server.workers > 1:
        from .supervisor import serve

        return serve(cfg)
    run(run_until_signal(cfg))
    return 0


def cmd_demo(args: argparse.Namespace, cfg: Config | None) -> int:
    from .server import start_mock

    async def demo() -> None:
        mock = await start_mock()
        demo_cfg = embedded_config(mock.url + "/v1", env={}, db_path=Path(args.db))
        demo_cfg = replace(demo_cfg, server=replace(demo_cfg.server, port=args.port))
        conn = connect(demo_cfg.database.path)
        try:
            ws = queries.find_workspace(conn, "demo")
        except queries.NotFoundError:
            ws = queries.create_workspace(conn, "demo")
        _, key = queries.create_key(conn, ws["id"], name="demo")
        conn.close()

        def ready(c: Config, gw: Running) -> None:
            print(f"gateway demo on {gw.url} (mock upstream at {mock.url}, database {c.database.path})")
            print("try:")
            print(
                f"  curl -s {gw.url}/v1/chat/completions -H 'Authorization: Bearer {key}' "
                "-H 'Content-Type: application/json' "
                "-d '{\"model\":\"mock-gpt\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'"
            )
            print("press Ctrl-C to stop", flush=True)

        try:
            await run_until_signal(demo_cfg, on_ready=ready)
        finally:
            await mock.runner.cleanup()

    run(demo())
    return 0


def cmd_check_config(args: argparse.Namespace, cfg: Config | None) -> int:
    if cfg is None:
        print("no config file given or found: the embedded default would be used")
        return 0
    print(f"ok: {cfg.source}: {len(cfg.upstreams)} upstreams, {len(cfg.models)} models, {len(cfg.groups)} groups")
    return 0


def cmd_workspaces(args: argparse.Namespace, cfg: Config | None) -> int:
    conn = _db(cfg)
    if args.action == "create":
        if cfg is not None and cfg.group(args.group) is None:
            raise SystemExit(f"error: unknown group {args.group!r}")
        ws = queries.create_workspace(conn, args.name, args.group)
        print(f"created workspace {ws['name']} (id {ws['id']}, group {ws['default_group']})")
    else:
        _table(queries.list_workspaces(conn), ["id", "name", "default_group"])
    return 0


def cmd_keys(args: argparse.Namespace, cfg: Config | None) -> int:
    conn = _db(cfg)
    if args.action == "create":
        ws = queries.find_workspace(conn, args.workspace)
        if cfg is not None and args.group is not None and cfg.group(args.group) is None:
            raise SystemExit(f"error: unknown group {args.group!r}")
        models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
        limits = queries.KeyLimits(
            rpm=args.rpm, tpm=args.tpm, max_concurrency=args.concurrency, spend_limit=args.spend_limit,
            expires_at=_parse_time(args.expires) if args.expires else None,
        )
        row, plaintext = queries.create_key(
            conn, ws["id"], name=args.name or "", group=args.group, models=models, limits=limits
        )
        print(f"created key {row['id']} ({row['prefix']}...) in workspace {ws['name']}")
        print("the key is shown once; store it now:")
        print(plaintext)
    elif args.action == "list":
        ws_id = queries.find_workspace(conn, args.workspace)["id"] if args.workspace else None
        rows = queries.list_keys(conn, ws_id)
        for r in rows:
            r["status"] = "revoked" if r["revoked_at"] else "active"
        _table(rows, ["id", "prefix", "workspace", "name", "group_name", "status"])
    else:
        row = queries.revoke_key(conn, args.id)
        print(f"revoked key {row['id']} ({row['prefix']}...)")
    return 0


def cmd_usage(args: argparse.Namespace, cfg: Config | None) -> int:
    conn = _db(cfg)
    since = _parse_time(args.since) if args.since else 0.0
    rows = queries.usage_summary(conn, since=since, by=args.by)
    _table(rows, [args.by, "requests", "errors", "input_tokens", "output_tokens", "cached_tokens", "cost"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="TOML config file (default: $GATEWAY_CONFIG, ./gateway.toml, embedded)")
    p = argparse.ArgumentParser(prog="gateway", description="Self-hosted LLM API gateway.", parents=[common])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", parents=[common], help="run the server")
    s.add_argument("--port", type=int, help="override server.port")
    s.add_argument("--workers", type=int, help="override server.workers")
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", parents=[common], help="run with the bundled mock upstream and a fresh key")
    d.add_argument("--port", type=int, default=8080)
    d.add_argument("--db", default="gateway-demo.db", help="SQLite file (default gateway-demo.db)")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("check-config", parents=[common], help="validate the config and exit")
    c.set_defaults(func=cmd_check_config)

    w = sub.add_parser("workspaces", parents=[common], help="create or list workspaces")
    wsub = w.add_subparsers(dest="action", required=True)
    wc = wsub.add_parser("create", parents=[common])
    wc.add_argument("name")
    wc.add_argument("--group", default="default")
    wsub.add_parser("list", parents=[common])
    w.set_defaults(func=cmd_workspaces)

    k = sub.add_parser("keys", parents=[common], help="create, list or revoke API keys")
    ksub = k.add_subparsers(dest="action", required=True)
    kc = ksub.add_parser("create", parents=[common])
    kc.add_argument("--workspace", required=True)
    kc.add_argument("--name")
    kc.add_argument("--group")
    kc.add_argument("--models", help="comma-separated allow-list (globs allowed)")
    kc.add_argument("--rpm", type=int)
    kc.add_argument("--tpm", type=int)
    kc.add_argument("--concurrency", type=int)
    kc.add_argument("--spend-limit", type=float)
    kc.add_argument("--expires", help="ISO 8601 time")
    kl = ksub.add_parser("list", parents=[common])
    kl.add_argument("--workspace")
    kr = ksub.add_parser("revoke", parents=[common])
    kr.add_argument("id", type=int)
    k.set_defaults(func=cmd_keys)

    u = sub.add_parser("usage", parents=[common], help="usage summary")
    u.add_argument("--since", help="ISO 8601 time or 30m / 24h / 7d")
    u.add_argument("--by", choices=sorted(queries.USAGE_GROUPS), default="model")
    u.set_defaults(func=cmd_usage)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logs.configure("text")
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve_config(args.config)
        return int(args.func(args, cfg))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (queries.NotFoundError, queries.ConflictError) as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 1
    except ListenError as e:  # serve or demo: the port is taken, ...
        print(f"error: {e.strerror}", file=sys.stderr)
        return 1
