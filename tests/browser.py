"""Headless Chromium for console tests: the system's chromium and
chromedriver (Debian packages ``chromium`` and ``chromium-driver``) driven by
selenium. Nothing is downloaded. Under CI (``CI=true``) a missing browser is
a failure, not a skip, so the console tests cannot pass silently."""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1440,1000", "--force-device-scale-factor=1",
)


def _find_chromium() -> str | None:
    for path in ("/usr/lib/chromium/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if path and Path(path).exists():
            return path
    return None


def require_browser() -> tuple[str, str]:
    """Paths of chromium and chromedriver, or skip (fail under CI)."""
    chromium, driver = _find_chromium(), shutil.which("chromedriver")
    missing = [name for name, p in (("chromium", chromium), ("chromedriver", driver)) if not p]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        message = "console browser tests need " + ", ".join(missing) + " (apt-get install chromium chromium-driver)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    assert chromium and driver
    return chromium, driver


def start_chrome(user_data_dir: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = require_browser()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={user_data_dir}")
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def post_chat(base_url: str, key: str, model: str = "gpt-test", request_id: str | None = None,
              headers: dict[str, str] | None = None) -> int:
    """A chat completion with urllib (usable from a worker thread)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hello there"}]}).encode()
    h = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", **(headers or {})}
    if request_id:
        h["x-request-id"] = request_id
    req = urllib.request.Request(base_url + "/v1/chat/completions", data=body, headers=h, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()
            return int(r.status)
    except urllib.error.HTTPError as e:
        e.read()
        e.close()
        return int(e.code)
