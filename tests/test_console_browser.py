"""The console in a real headless Chromium: sign in, create a key, use it,
see the request in the log and the chart, revoke it, see it refused."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from .browser import post_chat, require_browser, start_chrome
from .conftest import ADMIN_TOKEN, Gateway


def wait_for(cond: Any, timeout: float = 10.0, step: float = 0.1, what: str = "condition") -> Any:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while True:
        try:
            value = cond()
        except (NoSuchElementException, StaleElementReferenceException):
            value = None  # the page re-rendered under us: look again
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(step)


def scenario(base: str, profile: Path, shots: Path) -> None:
    from selenium.common.exceptions import NoSuchElementException
    from selenium.webdriver.common.by import By

    driver = start_chrome(profile)
    try:
        find = driver.find_element

        def visible(css: str) -> bool:
            try:
                return bool(find(By.CSS_SELECTOR, css).is_displayed())
            except NoSuchElementException:
                return False

        driver.get(base + "/console/")
        wait_for(lambda: visible("#signin-form"), what="sign-in form")

        # A wrong token is refused and the console stays locked.
        find(By.ID, "token").send_keys("not-the-token")
        find(By.ID, "signin-button").click()
        wait_for(lambda: visible("#signin-error"), what="sign-in error")
        assert "not accepted" in find(By.ID, "signin-error").text
        assert not visible("#app")

        find(By.ID, "token").clear()
        find(By.ID, "token").send_keys(ADMIN_TOKEN)
        find(By.ID, "signin-button").click()
        wait_for(lambda: visible("#app"), what="console after sign-in")
        assert ADMIN_TOKEN not in driver.current_url
        assert driver.execute_script("return sessionStorage.getItem('gateway.adminToken')") == ADMIN_TOKEN
        assert driver.execute_script("return localStorage.length") == 0

        # Workspace, then a key with limits: the plaintext is shown once.
        find(By.CSS_SELECTOR, "a[data-view=keys]").click()
        wait_for(lambda: visible("#view-keys[data-ready='1']"), what="keys view")
        find(By.ID, "ws-name").send_keys("browser-team")
        find(By.CSS_SELECTOR, "#ws-form button[type=submit]").click()
        wait_for(lambda: "browser-team" in find(By.ID, "ws-table").text, what="workspace row")
        find(By.ID, "key-name").send_keys("e2e")
        find(By.ID, "key-models").send_keys("gpt-test")
        find(By.ID, "key-rpm").send_keys("600")
        find(By.ID, "key-create").click()
        wait_for(lambda: visible("#new-key"), what="new key box")
        plaintext = find(By.ID, "new-key-value").text
        assert plaintext.startswith("gw-") and len(plaintext) > 40
        find(By.ID, "new-key-copy").click()
        wait_for(lambda: find(By.ID, "new-key-copy").text == "Copied", what="copy button")
        row = wait_for(lambda: [r for r in find(By.ID, "key-table").find_elements(By.CSS_SELECTOR, "tbody tr")
                                if "e2e" in r.text], what="key row")[0]
        key_id = row.get_attribute("data-key")
        assert "active" in row.text and "rpm 600" in row.text and plaintext not in row.text
        find(By.ID, "new-key-done").click()
        assert find(By.ID, "new-key-value").text == ""
        driver.save_screenshot(str(shots / "console-keys.png"))

        # The key works through the gateway (within the key-refresh interval).
        status = wait_for(lambda: post_chat(base, plaintext, request_id="e2e-chat-1") == 200, timeout=5,
                          what="the new key to work")
        assert status

        # The request shows in the log...
        find(By.CSS_SELECTOR, "a[data-view=requests]").click()

        def logged() -> bool:
            find(By.CSS_SELECTOR, "#log-form button[type=submit]").click()
            time.sleep(0.2)
            return visible("#log-table tr[data-request='e2e-chat-1']")

        wait_for(logged, what="the request in the log")
        text = wait_for(lambda: find(By.CSS_SELECTOR, "#log-table tr[data-request='e2e-chat-1']").text)
        assert "gpt-test" in text and "200" in text and "browser-team" in text

        # ... and in the dashboard's charts.
        find(By.CSS_SELECTOR, "a[data-view=dashboard]").click()
        series = "#chart-requests [data-series='gpt-test']"

        def charted() -> bool:
            find(By.ID, "dash-refresh").click()
            time.sleep(0.2)
            return visible(series) and find(By.CSS_SELECTOR, series).get_attribute("data-value") == "1"

        wait_for(charted, what="the request in the chart")
        wait_for(lambda: visible("#chart-requests canvas") and visible("#chart-latency canvas"), what="canvases")
        assert wait_for(lambda: find(By.ID, "total-requests").text).endswith("1")
        driver.save_screenshot(str(shots / "console-dashboard.png"))

        # The range picker: the last hour in minute buckets still holds it.
        from selenium.webdriver.support.ui import Select

        Select(find(By.ID, "dash-range")).select_by_value("3600")
        wait_for(lambda: find(By.ID, "dash-bucket").text == "minute buckets", what="minute buckets")
        wait_for(lambda: find(By.CSS_SELECTOR, series).get_attribute("data-value") == "1", what="minute chart")
        Select(find(By.ID, "dash-model")).select_by_value("renamed")
        wait_for(lambda: visible("#chart-requests .empty"), what="empty chart for another model")

        # Revoke, with confirmation; the key then gets 401.
        find(By.CSS_SELECTOR, "a[data-view=keys]").click()
        wait_for(lambda: visible("#view-keys[data-ready='1']"), what="keys view loaded")
        button = wait_for(lambda: find(By.CSS_SELECTOR, f"button.revoke[data-key='{key_id}']"), what="revoke")
        button.click()
        alert = driver.switch_to.alert
        assert "Revoke key" in alert.text
        alert.dismiss()  # cancelled: nothing happens
        assert "active" in find(By.CSS_SELECTOR, f"#key-table tr[data-key='{key_id}']").text
        find(By.CSS_SELECTOR, f"button.revoke[data-key='{key_id}']").click()
        driver.switch_to.alert.accept()
        wait_for(lambda: "revoked" in find(By.CSS_SELECTOR, f"#key-table tr[data-key='{key_id}']").text,
                 what="revoked status")
        t0 = time.monotonic()
        wait_for(lambda: post_chat(base, plaintext) == 401, timeout=2.0, step=0.05, what="401 after revoke")
        assert time.monotonic() - t0 < 2.0

        # Upstream health page lists the configured upstream.
        find(By.CSS_SELECTOR, "a[data-view=upstreams]").click()
        wait_for(lambda: visible("#up-table tr[data-upstream='mock']"), what="upstream row")

        # Sign out forgets the token.
        find(By.ID, "signout").click()
        assert driver.execute_script("return sessionStorage.getItem('gateway.adminToken')") is None
        assert visible("#signin-form")
    finally:
        driver.quit()


async def test_console_end_to_end(admin_gateway: Gateway, tmp_path: Path) -> None:
    require_browser()
    shots = Path(os.environ.get("GATEWAY_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    # Selenium is synchronous: drive it from a thread while the gateway
    # keeps serving on this event loop.
    await asyncio.to_thread(scenario, admin_gateway.url, tmp_path / "chrome-profile", shots)
    assert (shots / "console-dashboard.png").stat().st_size > 10_000
