"""The Grafana dashboard only queries metrics the gateway really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aiohttp

from .conftest import Gateway

DASHBOARD = Path(__file__).resolve().parent.parent / "grafana" / "gateway-dashboard.json"
SUFFIXES = {"counter": ("", "_total"), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("", "_sum", "_count")}


def queries(node: Any) -> list[str]:
    """Every PromQL string in the dashboard: panel targets and variables."""
    out: list[str] = []
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, str) and (k in ("expr", "definition") or (k == "query" and v != "prometheus")):
                out.append(v)
            else:
                out.extend(queries(v))
    elif isinstance(node, list):
        for v in node:
            out.extend(queries(v))
    return out


async def test_dashboard_metrics_are_exported(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    key = await gateway.key()
    async with http.post(gateway.url + "/v1/chat/completions", json={"model": "gpt-test", "messages": []},
                         headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200
    await gateway.wait_usage(1)
    async with http.get(gateway.url + "/metrics") as r:
        text = await r.text()
    exported: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        base = name.removesuffix("_total") if kind == "counter" else name
        exported.update(base + s for s in SUFFIXES.get(kind, ("",)))
    exported.update(re.findall(r"^([a-zA-Z_:][\w:]*)[{ ]", text, re.M))

    dashboard = json.loads(DASHBOARD.read_text())
    exprs = queries(dashboard)
    assert len(exprs) >= 20
    used = {m for e in exprs for m in re.findall(r"\bgateway_[a-z0-9_]+", e)}
    missing = sorted(used - exported)
    assert not missing, f"dashboard queries metrics the gateway does not export: {missing}"
    # The SPEC's series are all on the dashboard.
    for needed in ("gateway_requests_total", "gateway_request_duration_seconds_bucket",
                   "gateway_time_to_first_byte_seconds_bucket", "gateway_tokens_total", "gateway_usage_queue_depth",
                   "gateway_circuit_state", "gateway_upstream_errors_total"):
        assert needed in used, needed
    # Every panel has a datasource variable, not a hard-wired uid.
    for p in dashboard["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
