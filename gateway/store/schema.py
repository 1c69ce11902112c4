"""Schema, versioned: MIGRATIONS[i] takes the database from version i to i+1.

Applied by both the server (aiosqlite) and the CLI (sqlite3) through the same
statements; ``PRAGMA user_version`` holds the current version. Append only:
never edit a migration that has shipped.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import aiosqlite

from .rollup import MIGRATION as ROLLUP_MIGRATION

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO meta (name, value) VALUES ('keys_generation', 0);

    CREATE TABLE workspaces (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        default_group TEXT NOT NULL DEFAULT 'default',
        allowed_models TEXT,               -- JSON array or NULL (no narrowing)
        monthly_spend_limit REAL,
        monthly_token_limit INTEGER,
        created_at REAL NOT NULL
    );

    CREATE TABLE api_keys (
        id INTEGER PRIMARY KEY,
        workspace_id INTEGER NOT NULL REFERENCES workspaces(id),
        name TEXT NOT NULL DEFAULT '',
        prefix TEXT NOT NULL,
        key_hash TEXT NOT NULL UNIQUE,      -- hex SHA-256 of the plaintext
        group_name TEXT,                    -- NULL: the workspace's default group
        allowed_models TEXT,                -- JSON array or NULL
        rpm INTEGER,
        tpm INTEGER,
        max_concurrency INTEGER,
        spend_limit REAL,
        expires_at REAL,
        revoked_at REAL,
        created_at REAL NOT NULL
    );

    -- Any change to keys or workspaces bumps a counter that every worker
    -- polls, so a revocation made by any process reaches all key caches.
    CREATE TRIGGER api_keys_ins AFTER INSERT ON api_keys BEGIN
        UPDATE meta SET value = value + 1 WHERE name = 'keys_generation'; END;
    CREATE TRIGGER api_keys_upd AFTER UPDATE ON api_keys BEGIN
        UPDATE meta SET value = value + 1 WHERE name = 'keys_generation'; END;
    CREATE TRIGGER api_keys_del AFTER DELETE ON api_keys BEGIN
        UPDATE meta SET value = value + 1 WHERE name = 'keys_generation'; END;
    CREATE TRIGGER workspaces_ins AFTER INSERT ON workspaces BEGIN
        UPDATE meta SET value = value + 1 WHERE name = 'keys_generation'; END;
    CREATE TRIGGER workspaces_upd AFTER UPDATE ON workspaces BEGIN
        UPDATE meta SET value = value + 1 WHERE name = 'keys_generation'; END;

    CREATE TABLE usage_events (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,                   -- unix seconds, request start
        request_id TEXT NOT NULL,
        workspace_id INTEGER,
        key_id INTEGER,
        endpoint TEXT NOT NULL,
        model TEXT,
        upstream TEXT,
        status INTEGER NOT NULL,
        stream INTEGER NOT NULL DEFAULT 0,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        cached_tokens INTEGER NOT NULL DEFAULT 0,
        reasoning_tokens INTEGER NOT NULL DEFAULT 0,
        images INTEGER NOT NULL DEFAULT 0,
        video_tokens INTEGER NOT NULL DEFAULT 0,
        cost REAL NOT NULL DEFAULT 0,
        latency_ms REAL NOT NULL,
        ttfb_ms REAL,
        upstream_ms REAL,
        overhead_ms REAL,
        bytes_in INTEGER NOT NULL DEFAULT 0,
        bytes_out INTEGER NOT NULL DEFAULT 0,
        error_type TEXT
    );
    CREATE INDEX usage_ts ON usage_events (ts);
    CREATE INDEX usage_ws_ts ON usage_events (workspace_id, ts);
    CREATE INDEX usage_key_ts ON usage_events (key_id, ts);
    """,
    # Video tasks and material assets (gateway/tasks). The upstream's task id
    # and upstream name never leave the database; ``billed`` flips once, in
    # the same transaction that writes the billing usage row.
    """
    CREATE TABLE video_tasks (
        id TEXT PRIMARY KEY,                -- public id
        workspace_id INTEGER NOT NULL,
        key_id INTEGER NOT NULL,
        model TEXT NOT NULL,                -- public model name
        upstream TEXT NOT NULL,
        upstream_model TEXT NOT NULL,
        upstream_task_id TEXT NOT NULL,
        status TEXT NOT NULL,               -- queued|running|succeeded|failed|cancelled
        ratio REAL NOT NULL DEFAULT 1.0,    -- the creating key's group ratio
        video TEXT,                         -- JSON {url, duration, resolution, ratio}
        usage TEXT,                         -- JSON {video_tokens, completion_tokens, total_tokens}
        error TEXT,                         -- JSON {code, message}
        billed INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        next_poll_at REAL,                  -- NULL once finished
        attempts INTEGER NOT NULL DEFAULT 0,
        UNIQUE (upstream, upstream_task_id)
    );
    CREATE INDEX video_tasks_due ON video_tasks (next_poll_at) WHERE next_poll_at IS NOT NULL;

    CREATE TABLE asset_groups (
        id TEXT NOT NULL,                   -- the upstream's group id, shown as is
        upstream TEXT NOT NULL,
        workspace_id INTEGER NOT NULL,
        platform TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (upstream, id)
    );
    CREATE TABLE assets (
        id TEXT NOT NULL,                   -- the upstream's asset id, shown as is
        upstream TEXT NOT NULL,
        workspace_id INTEGER NOT NULL,
        platform TEXT NOT NULL,
        group_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (upstream, id)
    );
    CREATE INDEX assets_id ON assets (id);
    """,
    ROLLUP_MIGRATION,
    # Usage spool files (gateway.store.spool): how far each file has been
    # written to usage_events, updated in the same transaction as the rows.
    # usage_events.writer: which process's usage writer inserted a row (a
    # random id per process; NULL for rows recovered from a spool), so each
    # worker can add the other workers' spend to its quotas (gateway.limits).
    """
    CREATE TABLE usage_spool (name TEXT PRIMARY KEY, offset INTEGER NOT NULL);
    ALTER TABLE usage_events ADD COLUMN writer INTEGER;
    """,
    # Prompt-cache writes, priced apart from plain input (price.cache_write,
    # price.cache_write_1h); both are part of input_tokens.
    """
    ALTER TABLE usage_events ADD COLUMN cache_write_tokens INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage_events ADD COLUMN cache_write_1h_tokens INTEGER NOT NULL DEFAULT 0;
    """,
    # Who owns an upstream task is keyed by the provider account it lives
    # in, not by the upstream entry that reached it: two entries may reach
    # one account. ``account`` is the upstream's account name (its
    # ``account`` setting, else its name), ``endpoint`` its normalised
    # base_url; a task id is unique within either, so no second row (and
    # no second bill) can be made for one upstream task through another
    # entry. Rows written before this migration get both from the config
    # when the task store opens (gateway.store.tasks.TaskStore.backfill).
    """
    ALTER TABLE video_tasks ADD COLUMN account TEXT;
    ALTER TABLE video_tasks ADD COLUMN endpoint TEXT;
    CREATE UNIQUE INDEX video_tasks_account_task ON video_tasks (account, upstream_task_id);
    CREATE UNIQUE INDEX video_tasks_endpoint_task ON video_tasks (endpoint, upstream_task_id);
    """,
    # A video task is recorded before the upstream is asked to start it
    # (status 'creating', no upstream id yet) and gets its upstream id right
    # after, so a task that exists upstream always has a row to be polled
    # and billed through (gateway.tasks.service). Hence upstream_task_id may
    # be NULL now: SQLite cannot drop NOT NULL in place, so the table is
    # rebuilt. ``idempotency_key`` (the client's Idempotency-Key, unique per
    # workspace) and ``request_hash`` (SHA-256 of the create body) let a
    # retried create return the task it made instead of making another.
    """
    CREATE TABLE video_tasks_new (
        id TEXT PRIMARY KEY,
        workspace_id INTEGER NOT NULL,
        key_id INTEGER NOT NULL,
        model TEXT NOT NULL,
        upstream TEXT NOT NULL,
        upstream_model TEXT NOT NULL,
        upstream_task_id TEXT,              -- NULL while status = 'creating'
        status TEXT NOT NULL,               -- creating|queued|running|succeeded|failed|cancelled
        ratio REAL NOT NULL DEFAULT 1.0,
        video TEXT,
        usage TEXT,
        error TEXT,
        billed INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        next_poll_at REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        account TEXT,
        endpoint TEXT,
        idempotency_key TEXT,
        request_hash TEXT
    );
    INSERT INTO video_tasks_new (id, workspace_id, key_id, model, upstream, upstream_model, upstream_task_id,
        status, ratio, video, usage, error, billed, created_at, updated_at, next_poll_at, attempts, account, endpoint)
    SELECT id, workspace_id, key_id, model, upstream, upstream_model, upstream_task_id, status, ratio, video,
        usage, error, billed, created_at, updated_at, next_poll_at, attempts, account, endpoint FROM video_tasks;
    DROP TABLE video_tasks;
    ALTER TABLE video_tasks_new RENAME TO video_tasks;
    CREATE INDEX video_tasks_due ON video_tasks (next_poll_at) WHERE next_poll_at IS NOT NULL;
    CREATE UNIQUE INDEX video_tasks_upstream_task ON video_tasks (upstream, upstream_task_id);
    CREATE UNIQUE INDEX video_tasks_account_task ON video_tasks (account, upstream_task_id);
    CREATE UNIQUE INDEX video_tasks_endpoint_task ON video_tasks (endpoint, upstream_task_id);
    CREATE UNIQUE INDEX video_tasks_idempotency ON video_tasks (workspace_id, idempotency_key);
    """,
    # Console accounts (gateway.store.users) and the audit log
    # (gateway.store.audit). Passwords are argon2id hashes; session ids and
    # invitation tokens are stored as SHA-256 hashes only, like API keys.
    # api_keys.user_id: the user who created the key (NULL: operator token
    # or CLI); a disabled user's keys are left out of the key cache, so the
    # users trigger bumps the key generation.
    """
    CREATE TABLE users (
        id INTEGER PRIMARY KEY,
        email TEXT NOT NULL UNIQUE,         -- trimmed, lower case
        name TEXT NOT NULL DEFAULT '',
        password_hash TEXT,                 -- argon2id; NULL until an invitation is accepted
        is_admin INTEGER NOT NULL DEFAULT 0,
        disabled_at REAL,
        created_at REAL NOT NULL,
        last_login_at REAL
    );
    CREATE TABLE memberships (
        user_id INTEGER NOT NULL REFERENCES users(id),
        workspace_id INTEGER NOT NULL REFERENCES workspaces(id),
        role TEXT NOT NULL CHECK (role IN ('owner', 'member')),
        created_at REAL NOT NULL,
        PRIMARY KEY (user_id, workspace_id)
    );
    CREATE INDEX memberships_ws ON memberships (workspace_id);
    CREATE TABLE invitations (
        id INTEGER PRIMARY KEY,
        token_hash TEXT NOT NULL UNIQUE,
        email TEXT NOT NULL,
        workspace_id INTEGER REFERENCES workspaces(id),  -- NULL: an admin invitation
        role TEXT NOT NULL CHECK (role IN ('owner', 'member', 'admin')),
        invited_by INTEGER REFERENCES users(id),          -- NULL: operator token or CLI
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        accepted_at REAL,
        revoked_at REAL
    );
    CREATE TABLE sessions (
        id_hash TEXT PRIMARY KEY,
        user_id INTEGER NOT NULL REFERENCES users(id),
        csrf_token TEXT NOT NULL,
        created_at REAL NOT NULL,
        seen_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        address TEXT
    );
    CREATE INDEX sessions_user ON sessions (user_id);
    CREATE TABLE login_failures (
        scope TEXT NOT NULL,                -- 'account' or 'address'
        subject TEXT NOT NULL,              -- the email as typed (normalised) or the address
        ts REAL NOT NULL
    );
    CREATE INDEX login_failures_subject ON login_failures (scope, subject, ts);
    CREATE TABLE audit_log (
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        actor_user_id INTEGER,
        actor TEXT NOT NULL,                -- an email, 'operator token', 'cli (user)', 'SIGHUP'
        address TEXT,
        action TEXT NOT NULL,               -- key.create, user.disable, config.reload, ...
        target_type TEXT,
        target_id TEXT,
        workspace_id INTEGER,
        before TEXT,                        -- JSON, never a secret
        after TEXT
    );
    CREATE INDEX audit_ts ON audit_log (ts);
    CREATE INDEX audit_ws_ts ON audit_log (workspace_id, ts);
    ALTER TABLE api_keys ADD COLUMN user_id INTEGER REFERENCES users(id);
    CREATE INDEX api_keys_user ON api_keys (user_id);
    CREATE TRIGGER users_upd AFTER UPDATE OF disabled_at ON users BEGIN
        UPDATE meta SET value = value + 1 WHERE name = 'keys_generation'; END;
    """,
    # The id of the Responses object a request made (``resp_...``): the
    # row's workspace, upstream and model then say who owns it and where it
    # lives, so follow-ups (previous_response_id, GET/DELETE by id) go to
    # that upstream (gateway.affinity). Written with the usage row itself,
    # through the usage writer and its spool.
    """
    ALTER TABLE usage_events ADD COLUMN response_id TEXT;
    CREATE INDEX usage_response_id ON usage_events (response_id) WHERE response_id IS NOT NULL;
    """,
    # A spool file now also holds the requests in flight (gateway.store.spool):
    # recovery turns those a dead process never finished into rows, which an
    # offset cannot account for, so the file's row says when it has been
    # recovered whole (and is only waiting to be deleted).
    """
    ALTER TABLE usage_spool ADD COLUMN recovered INTEGER NOT NULL DEFAULT 0;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)

PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA foreign_keys=ON",
)

# How long a write waits for another connection's write lock (another
# worker's batch, a CLI command, a backup) before ``database is locked``:
# [database] busy_timeout_ms.
BUSY_TIMEOUT_MS = 10_000


def connect(path: Path, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    """A synchronous connection, migrated to the current schema (CLI, admin)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=busy_timeout_ms / 1000, isolation_level=None)
    conn.row_factory = sqlite3.Row
    for p in PRAGMAS:
        conn.execute(p)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise RuntimeError(f"{path}: schema version {version} is newer than this gateway ({SCHEMA_VERSION})")
    for i in range(version, SCHEMA_VERSION):
        # BEGIN IMMEDIATE makes a racing process (another worker, the CLI)
        # wait, then see the new version, rather than migrate twice.
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("PRAGMA user_version").fetchone()[0] == i:
                for stmt in _statements(MIGRATIONS[i]):
                    conn.execute(stmt)
                conn.execute(f"PRAGMA user_version = {i + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return conn


def _statements(script: str) -> list[str]:
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    return [s for s in out if s.strip(" ;\n")]


async def connect_async(path: Path, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> aiosqlite.Connection:
    """An aiosqlite connection on a database migrated by ``connect``."""
    connect(path, busy_timeout_ms).close()
    db = await aiosqlite.connect(path, timeout=busy_timeout_ms / 1000, isolation_level=None)
    for p in PRAGMAS:
        await db.execute(p)
    return db
