"""``gateway users create|invite|list|disable|enable``: console accounts from
the command line (the first admin is made here). Every change is audited as
``cli (<login name>)``.

Passwords never come from the command line (other users could read them in
the process list): ``create`` asks twice on a terminal, or reads one line
from standard input with ``--password-stdin``.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .config import Config
from .passwords import HASHER
from .store import audit, catalog, queries, users
from .store.audit import Actor
from .store.base import run_on_store
from .store.tx import Body, Tx

if TYPE_CHECKING:
    from .cli import Commands

MIN_PASSWORD = 10
Action = Callable[[argparse.Namespace, Config], None]
T = TypeVar("T")


def cli_actor() -> Actor:
    """The CLI's name in the audit log: ``cli (<login name>)``."""
    try:
        who = getpass.getuser()
    except (KeyError, OSError):
        who = str(os.getuid())
    return Actor(f"cli ({who})")


def _email(value: str) -> str:
    e = value.strip().lower()
    if "@" not in e or len(e) > 254 or any(c.isspace() or ord(c) < 32 for c in e):
        raise SystemExit(f"error: not an email address: {value!r}")
    return e


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise SystemExit("error: the passwords differ")
    else:
        raise SystemExit("error: no terminal to ask for a password: use --password-stdin")
    if not MIN_PASSWORD <= len(password) <= 1024:
        raise SystemExit(f"error: the password must be {MIN_PASSWORD} to 1024 characters")
    return password


def _base_url(args: argparse.Namespace, cfg: Config) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    if cfg.console.public_url:
        return cfg.console.public_url.rstrip("/")
    host = cfg.server.host
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{cfg.server.port}"


def _workspace_role(args: argparse.Namespace) -> tuple[str | None, str]:
    """The workspace named (None: none) and the role to give there."""
    if args.admin:
        if args.workspace:
            raise SystemExit("error: --admin takes no --workspace (an admin sees every workspace)")
        return None, "admin"
    if not args.workspace:
        raise SystemExit("error: --workspace is required (or --admin)")
    return args.workspace, args.role


async def _workspace_id(tx: Tx, name: str | None) -> int | None:
    return None if name is None else int((await catalog.find_workspace(tx, name))["id"])


def create(args: argparse.Namespace, cfg: Config) -> None:
    email = _email(args.email)
    ws_name, role = _workspace_role(args) if (args.admin or args.workspace) else (None, "")
    hashed = HASHER.hash(_password(args))
    now = time.time()

    async def run(tx: Tx) -> dict[str, Any]:
        ws_id = await _workspace_id(tx, ws_name)
        u = await users.create_user(tx, email, now=now, name=args.name or "", password_hash=hashed,
                                    is_admin=role == "admin")
        if ws_id is not None:
            await users.set_membership(tx, u["id"], ws_id, role, now)
        await audit.record(tx, cli_actor(), "user.create", now=now, target_type="user", target_id=u["id"],
                           workspace_id=ws_id, after={**u, "role": role or None})
        return u

    u = on_db(cfg, run, write=True)
    where = "admin" if role == "admin" else f"{role} of {args.workspace}" if ws_name else "no workspace yet"
    print(f"created user {u['id']} {email} ({where})")


def invite(args: argparse.Namespace, cfg: Config) -> None:
    email = _email(args.email)
    ws_name, role = _workspace_role(args)
    hours = cfg.console.invitation_hours
    now = time.time()

    async def run(tx: Tx) -> tuple[dict[str, Any], str]:
        ws_id = await _workspace_id(tx, ws_name)
        inv, token = await users.create_invitation(tx, email, workspace_id=ws_id, role=role, invited_by=None,
                                                   now=now, ttl_s=hours * 3600)
        await audit.record(tx, cli_actor(), "invitation.create", now=now, target_type="invitation",
                           target_id=inv["id"], workspace_id=ws_id, after=inv)
        return inv, token

    inv, token = on_db(cfg, run, write=True)
    print(f"invitation {inv['id']} for {email} ({role}{' of ' + args.workspace if ws_name else ''}), "
          f"valid {hours:g} hours; the link works once:")
    print(f"{_base_url(args, cfg)}/console/#invite={token}")


def list_users(args: argparse.Namespace, cfg: Config) -> None:
    rows = on_db(cfg, users.list_users)
    if not rows:
        print("(none)")
        return
    table = [("id", "email", "name", "admin", "status", "workspaces")]
    for u in rows:
        ws = ", ".join(f"{m['workspace']}:{m['role']}" for m in u["workspaces"])
        table.append((str(u["id"]), u["email"], u["name"], "yes" if u["is_admin"] else "", u["status"], ws))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _set_disabled(disabled: bool) -> Action:
    def action(args: argparse.Namespace, cfg: Config) -> None:
        email = _email(args.email)
        now = time.time()

        async def run(tx: Tx) -> None:
            u = await users.find_user(tx, email)
            if u is None:
                raise queries.NotFoundError(f"user {email!r} not found")
            after = await users.update_user(tx, u["id"], now=now, disabled=disabled)
            await audit.record(tx, cli_actor(), "user.disable" if disabled else "user.enable", now=now,
                               target_type="user", target_id=u["id"], before=u, after=after)

        on_db(cfg, run, write=True)
        if disabled:
            print(f"disabled {email}: signed out everywhere; their keys stop working until enabled again")
        else:
            print(f"enabled {email}")

    return action


def on_db(cfg: Config, body: Body[T], *, write: bool = False) -> T:
    """``body`` on the configured store, SQLite or PostgreSQL (gateway.store.tx);
    with ``write``, one transaction: a change and its audit row together."""
    return run_on_store(cfg.database, lambda store: store.run(body, write=write))


def _command(action: Action) -> Callable[[argparse.Namespace, Config], int]:
    def run(args: argparse.Namespace, cfg: Config) -> int:
        action(args, cfg)
        return 0

    return run


def add_commands(group: Commands) -> None:
    """The actions of the ``users`` group (see gateway.cli.Commands)."""
    c = group.command("create", _command(create), "create a user with a password (asked, or --password-stdin)")
    c.add_argument("email")
    c.add_argument("--name")
    c.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    i = group.command("invite", _command(invite), "print a one-time invitation link")
    i.add_argument("email")
    i.add_argument("--url", help="the gateway's address as users reach it (default: console.public_url, "
                                 "else server.host:port)")
    for p in (c, i):
        p.add_argument("--admin", action="store_true", help="an admin (every workspace)")
        p.add_argument("--workspace", help="workspace to join")
        p.add_argument("--role", choices=users.ROLES, default="member")
    group.command("list", _command(list_users), "list users, their status and workspaces")
    for name, action in (("disable", _set_disabled(True)), ("enable", _set_disabled(False))):
        group.command(name, _command(action), f"{name} a user (disabling signs them out and suspends their keys)"
                      ).add_argument("email")
