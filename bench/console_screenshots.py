"""Screenshots of the console for the docs: a gateway on a temporary
database holding a synthetic day of traffic, driven in headless Chromium.

    python bench/console_screenshots.py docs/img

Needs the Debian packages chromium and chromium-driver and the selenium
package (the test extra). Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.config import load_config  # noqa: E402
from gateway.passwords import HASHER  # noqa: E402
from gateway.server import start_gateway, start_mock  # noqa: E402
from gateway.store import queries  # noqa: E402
from gateway.store import users as accounts  # noqa: E402
from gateway.store.columns import COLUMNS  # noqa: E402
from gateway.store.rows import insert_rows  # noqa: E402
from gateway.store.schema import connect  # noqa: E402
from tests.browser import post_chat, start_chrome  # noqa: E402

TOKEN = "screenshot-admin-token"
MODELS = {"gpt-5.5": (1.25, 10.0, 900), "gpt-5-mini": (0.25, 2.0, 350), "claude-sonnet": (3.0, 15.0, 1400)}


def config(mock_url: str, db: Path) -> str:
    models = "\n".join(
        f'[[models]]\nname = "{m}"\nroutes = [{{ upstream = "{"anthropic" if "claude" in m else "openai"}", '
        f'model = "{m}" }}]\nprice = {{ input = {i}, output = {o} }}\n'
        for m, (i, o, _) in MODELS.items()
    )
    return f"""
[server]
port = 0
key_refresh_ms = 200
[database]
path = "{db}"
[[upstreams]]
name = "openai"
kind = "openai"
base_url = "{mock_url}/v1"
[[upstreams]]
name = "anthropic"
kind = "openai"
base_url = "{mock_url}/v1"
{models}
"""


def history(db: Path, now: float) -> None:
    """A day of synthetic traffic with a daily rhythm, written the way the
    usage writer writes it (raw rows plus rollups, batch by batch)."""
    conn = connect(db)
    rng = random.Random(5)
    teams = {name: queries.create_workspace(conn, name)["id"] for name in ("research", "support-bot", "platform")}
    keys = []
    for team, ws in teams.items():
        for n in range(2):
            row, _ = queries.create_key(conn, ws, name=f"{team}-{n + 1}", limits=queries.KeyLimits(rpm=600))
            keys.append((ws, row["id"]))
    rows = []
    t = now - 86400
    while t < now - 120:
        hour = (t % 86400) / 3600
        rate = 0.25 + 0.2 * (1 + math.sin((hour - 9) / 24 * 2 * math.pi))  # requests per second
        t += rng.expovariate(rate)
        model = rng.choices(list(MODELS), weights=(5, 8, 3))[0]
        pin, pout, base = MODELS[model]
        ws, key = rng.choice(keys)
        lat = base * math.exp(rng.gauss(0, 0.45))
        status = rng.choices((200, 429, 500, 400), weights=(960, 15, 10, 15))[0]
        tin, tout = (rng.randint(200, 3000), rng.randint(50, 900)) if status == 200 else (0, 0)
        rec = {"ts": t, "request_id": f"hist-{len(rows)}", "workspace_id": ws, "key_id": key,
               "endpoint": "/v1/chat/completions", "model": model,
               "upstream": "anthropic" if "claude" in model else "openai", "status": status,
               "stream": rng.randint(0, 1), "input_tokens": tin, "output_tokens": tout, "cached_tokens": 0,
               "reasoning_tokens": 0, "images": 0, "video_tokens": 0, "cost": (tin * pin + tout * pout) / 1e6,
               "latency_ms": lat, "ttfb_ms": lat * rng.uniform(0.1, 0.35), "upstream_ms": lat - 0.3,
               "overhead_ms": 0.3, "bytes_in": 900, "bytes_out": 3000,
               "error_type": None if status == 200 else "upstream_error",
               "cache_write_tokens": 0, "cache_write_1h_tokens": 0, "response_id": None}
        rows.append(tuple(rec[c] for c in COLUMNS))
    for i in range(0, len(rows), 1000):
        batch = rows[i:i + 1000]
        conn.execute("BEGIN")
        insert_rows(conn, batch)
        conn.execute("COMMIT")
    conn.close()


OWNER, OWNER_PASSWORD = "dana@example.com", "dana's long password"


def users(db: Path) -> None:
    """An owner of the research workspace, for the account pages."""
    conn = connect(db)
    u = accounts.create_user(conn, OWNER, now=time.time(), name="Dana", password_hash=HASHER.hash(OWNER_PASSWORD))
    accounts.set_membership(conn, u["id"], queries.find_workspace(conn, "research")["id"], "owner", time.time())
    conn.close()


def shoot(base: str, out: Path, profile: Path) -> None:
    from selenium.webdriver.common.by import By

    driver = start_chrome(profile)
    try:
        driver.get(base + "/console/")
        time.sleep(0.5)
        driver.find_element(By.ID, "show-token").click()
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.ID, "signin-button").click()
        time.sleep(1.5)
        driver.set_window_size(1440, 1400)
        time.sleep(0.8)
        driver.save_screenshot(str(out / "console-dashboard.png"))
        driver.set_window_size(1440, 900)
        driver.find_element(By.CSS_SELECTOR, "a[data-view=keys]").click()
        time.sleep(0.5)
        driver.find_element(By.ID, "key-name").send_keys("ci-runner")
        driver.find_element(By.ID, "key-models").send_keys("gpt-5-mini")
        driver.find_element(By.ID, "key-rpm").send_keys("120")
        driver.find_element(By.ID, "key-spend").send_keys("50")
        driver.find_element(By.ID, "key-create").click()
        time.sleep(0.8)
        driver.save_screenshot(str(out / "console-keys.png"))
        driver.find_element(By.CSS_SELECTOR, "a[data-view=requests]").click()
        time.sleep(0.8)
        driver.save_screenshot(str(out / "console-requests.png"))
        driver.find_element(By.CSS_SELECTOR, "a[data-view=upstreams]").click()
        time.sleep(0.8)
        driver.save_screenshot(str(out / "console-upstreams.png"))
        driver.find_element(By.ID, "signout").click()
        time.sleep(0.3)
        shoot_accounts(driver, base, out)
    finally:
        driver.quit()


def sign_in(driver: Any) -> None:
    from selenium.webdriver.common.by import By

    for field, value in (("login-email", OWNER), ("login-password", OWNER_PASSWORD)):
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    driver.find_element(By.ID, "login-button").click()


def shoot_accounts(driver: Any, base: str, out: Path) -> None:
    """The owner invites someone, who joins and makes a key; the audit log."""
    from selenium.webdriver.common.by import By

    find = driver.find_element
    sign_in(driver)
    time.sleep(1.0)
    driver.get(base + "/console/#members")
    time.sleep(0.8)
    find(By.ID, "invite-email").send_keys("sam@example.com")
    find(By.CSS_SELECTOR, "#invite-create button[type=submit]").click()
    time.sleep(0.8)
    driver.save_screenshot(str(out / "console-members.png"))
    link = find(By.ID, "invite-link-value").text
    find(By.ID, "signout").click()
    time.sleep(0.5)
    driver.get(link)
    time.sleep(0.8)
    find(By.ID, "invite-name").send_keys("Sam")
    find(By.ID, "invite-password").send_keys("sam's long password")
    driver.save_screenshot(str(out / "console-invitation.png"))
    find(By.ID, "invite-button").click()
    time.sleep(1.0)
    find(By.ID, "key-name").send_keys("laptop")
    find(By.ID, "key-spend").send_keys("20")
    find(By.ID, "key-create").click()
    time.sleep(0.8)
    driver.set_window_size(1440, 1000)
    driver.save_screenshot(str(out / "console-member-keys.png"))
    find(By.ID, "signout").click()
    time.sleep(0.5)
    sign_in(driver)
    time.sleep(1.0)
    driver.get(base + "/console/#audit")
    time.sleep(0.8)
    driver.save_screenshot(str(out / "console-audit.png"))


async def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    os.environ["GATEWAY_ADMIN_TOKEN"] = TOKEN
    with tempfile.TemporaryDirectory() as d:
        mock = await start_mock()
        db = Path(d) / "gateway.db"
        history(db, time.time())
        users(db)
        cfg_path = Path(d) / "gateway.toml"
        cfg_path.write_text(config(mock.url, db))
        gw = await start_gateway(load_config(cfg_path))
        try:
            conn = connect(db)
            _, key = queries.create_key(conn, 1, name="live")
            conn.close()
            await asyncio.sleep(0.5)
            for i in range(6):
                await asyncio.to_thread(post_chat, gw.url, key, "gpt-5-mini", f"live-{i}")
            await asyncio.sleep(0.5)
            await asyncio.to_thread(shoot, gw.url, out, Path(d) / "profile")
        finally:
            await gw.runner.cleanup()
            await mock.runner.cleanup()
    print("wrote", ", ".join(sorted(p.name for p in out.glob("console-*.png"))))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/img")))
