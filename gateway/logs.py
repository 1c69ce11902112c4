"""Log output: plain text or JSON lines (``server.log_format``), and the
per-request line (``server.log_requests``).

A JSON line holds the time, level, logger, message and, when the call passed
``extra={"fields": {...}}``, those fields at the top level. The request line is
built from the usage row only: ids, model, upstream, status, sizes and
timings. Bodies, headers and keys are never in it (the row holds none).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import orjson

from .bounds import shown
from .config import Config
from .store.columns import COLUMNS

REQUEST_LOG = logging.getLogger("gateway.request")

# Usage-row columns copied into the request line, in this order.
_REQUEST_FIELDS = (
    "request_id", "workspace_id", "key_id", "endpoint", "model", "upstream", "status", "stream",
    "input_tokens", "output_tokens", "cached_tokens", "cost", "latency_ms", "ttfb_ms", "upstream_ms",
    "overhead_ms", "bytes_in", "bytes_out", "error_type",
)
_INDEX = tuple((name, COLUMNS.index(name)) for name in _REQUEST_FIELDS)


class JsonFormatter(logging.Formatter):
    """One JSON object per line. ``worker`` is set in each worker process."""

    def __init__(self) -> None:
        super().__init__()
        self.worker: int | None = None

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        if self.worker is not None:
            out["worker"] = self.worker
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    """The classic one-line format, with the worker index when there is one."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.worker: int | None = None

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return line if self.worker is None else f"[worker {self.worker}] {line}"


def configure(fmt: str = "text", level: int = logging.INFO) -> None:
    """Replace the root handlers with one stderr handler in ``fmt``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)


def set_worker(index: int) -> None:
    """Tag every line of this (worker) process with its index."""
    for h in logging.getLogger().handlers:
        if isinstance(h.formatter, JsonFormatter | TextFormatter):
            h.formatter.worker = index


def log_request(row: tuple[Any, ...], method: str, path: str) -> None:
    """The one line per request (``server.log_requests``). Called after the
    usage row is built, off the streaming path: once per request. The method
    and path are the client's: bounded, and no control character can start
    a forged line."""
    method, path = shown(method), shown(path)
    fields: dict[str, Any] = {"event": "request", "method": method, "path": path}
    for name, i in _INDEX:
        v = row[i]
        if v is not None:
            fields[name] = round(v, 3) if isinstance(v, float) else v
    fields["started"] = round(row[0], 6) if isinstance(row[0], float) else time.time()
    REQUEST_LOG.info(
        "%s %s %s %s", method, path, fields.get("status"), fields.get("model", "-"), extra={"fields": fields}
    )


def startup_fields(cfg: Config, port: int, workers: int) -> dict[str, Any]:
    """The fields of the start-up line."""
    return {
        "event": "start",
        "host": cfg.server.host,
        "port": port,
        "workers": workers,
        "upstreams": [u.name for u in cfg.upstreams],
        "models": [m.name for m in cfg.models],
        "database": "postgresql" if cfg.database.url else str(cfg.database.path),  # a URL may hold a password
        "supervisor_pid": os.getpid(),
    }
