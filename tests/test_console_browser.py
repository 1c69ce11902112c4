"""The console in a real headless Chromium: sign in, create a key, use it,
see the request in the log and the chart, revoke it, see it refused."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from .browser import post_chat, require_browser, start_chrome
from .conftest import ADMIN_TOKEN, PASSWORD, Gateway

# A group of its own (pyproject.toml markers), run by .ci/run on both stores.
pytestmark = pytest.mark.browser


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
        # No account exists yet: the page opens on the admin token form.
        wait_for(lambda: visible("#signin-form"), what="admin token form")
        assert not visible("#login-form")

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
        assert visible("#login-form")
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


# ------------------------------------------------------------------ console users


def api_call(base: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """An admin API call with the operator token (urllib: usable from the
    selenium thread)."""
    import json
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + "/admin/api" + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        payload = json.loads(e.read())
        e.close()
        return e.code, payload


class Page:
    """One Chromium and the few things every console scenario does with it."""

    def __init__(self, base: str, profile: Path) -> None:
        self.base = base
        self.driver = start_chrome(profile)

    def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def rows(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def visible(self, css: str) -> bool:
        from selenium.common.exceptions import NoSuchElementException

        try:
            return bool(self.find(css).is_displayed())
        except NoSuchElementException:
            return False

    def type(self, css: str, text: str) -> None:
        box = self.find(css)
        box.clear()
        box.send_keys(text)

    def sign_in(self, email: str, password: str) -> None:
        self.driver.get(self.base + "/console/")
        wait_for(lambda: self.visible("#login-form") or self.visible("#app"), what="console")
        if self.visible("#app"):
            self.find("#signout").click()
        wait_for(lambda: self.visible("#login-form"), what="sign-in form")
        self.type("#login-email", email)
        self.type("#login-password", password)
        self.find("#login-button").click()
        wait_for(lambda: self.visible("#app"), what=f"{email} signed in")

    def view(self, name: str, query: str = "") -> None:
        self.driver.get(f"{self.base}/console/#{name}{query}")
        wait_for(lambda: self.visible(f"#view-{name}[data-ready='1']"), what=f"{name} view")

    def page_text(self) -> str:
        return str(self.driver.execute_script("return document.body.innerText"))


def member_journey(base: str, profile: Path, shots: Path, ids: dict[str, Any]) -> dict[str, Any]:
    """An owner invites; the invitee sets a password, creates a key, uses it
    with curl, sees the request and its cost, and cannot reach another
    workspace by editing the URL; the owner then revokes the member's key."""
    import shlex
    import subprocess

    page = Page(base, profile)
    d = page.driver
    out: dict[str, Any] = {}
    try:
        # The owner creates the invitation in the console; the link is shown once.
        page.sign_in("owner@example.com", PASSWORD)
        assert page.find("#whoami").text == "owner@example.com"
        assert not page.visible("a[data-view=upstreams]") and page.visible("a[data-view=members]")
        page.view("members")
        page.type("#invite-email", "newbie@example.com")
        page.find("#invite-create button[type=submit]").click()
        wait_for(lambda: page.visible("#invite-link"), what="invitation link")
        link = page.find("#invite-link-value").text
        assert link.startswith(base + "/console/#invite=")
        wait_for(lambda: "newbie@example.com" in page.find("#invites-table").text, what="pending invitation")
        d.save_screenshot(str(shots / "console-members.png"))
        page.find("#signout").click()
        wait_for(lambda: page.visible("#login-form"), what="signed out")

        # The invitee opens the link and chooses a password.
        d.get(link)
        wait_for(lambda: "newbie@example.com is invited to workspace team as member" in page.find("#invite-info").text,
                 what="invitation details")
        page.type("#invite-name", "New Bie")
        page.type("#invite-password", "short")
        page.find("#invite-button").click()
        wait_for(lambda: page.visible("#invite-error"), what="password too short")
        assert "10 to 1024" in page.find("#invite-error").text
        page.type("#invite-password", "newbie's own password")
        page.find("#invite-button").click()
        wait_for(lambda: page.visible("#view-keys[data-ready='1']"), what="signed in on the keys view")
        assert "#invite=" not in d.current_url  # the token leaves the address bar
        assert page.find("#whoami").text == "newbie@example.com"
        assert not page.visible("#ws-form") and not page.visible("a[data-view=members]")
        assert "gpt-test" in page.find("#ws-table").text  # the models their group allows

        # A key of their own; the examples fill it in.
        page.type("#key-name", "laptop")
        page.find("#key-create").click()
        wait_for(lambda: page.visible("#new-key"), what="new key")
        plaintext = page.find("#new-key-value").text
        example = wait_for(lambda: plaintext in page.find("#example-code").text and page.find("#example-code").text,
                           what="the key in the example")
        assert plaintext in example and base + "/v1/chat/completions" in example
        for tab, needle in (("OpenAI SDK", f'base_url="{base}/v1"'), ("Anthropic SDK", f'base_url="{base}"'),
                            ("Claude Code", f'ANTHROPIC_BASE_URL="{base}"'), ("Codex", f'base_url = "{base}/v1"')):
            page.find(f"button[data-example='{tab}']").click()
            assert needle in page.find("#example-code").text, tab
            assert plaintext in page.find("#example-code").text, tab
        d.save_screenshot(str(shots / "console-member-keys.png"))
        page.find("button[data-example='curl']").click()
        curl = page.find("#example-code").text

        # The copied curl line, run as it is, works (within the key refresh).
        def run_curl() -> str:
            p = subprocess.run(["bash", "-c", curl + " -s -w '\\n%{http_code}' -H 'x-request-id: member-curl-1'"],
                               capture_output=True, text=True, timeout=20)
            return p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""

        wait_for(lambda: run_curl() == "200", timeout=5, step=0.2, what="curl with the new key")
        assert shlex.split(curl)[0] == "curl"
        page.find("#new-key-done").click()

        # Their request, and what it cost, in their console.
        def logged() -> bool:
            page.view("requests")
            return page.visible("#log-table tr[data-request='member-curl-1']")

        wait_for(logged, timeout=10, what="the curl request in the log")
        row = page.find("#log-table tr[data-request='member-curl-1']").text
        assert "gpt-test" in row and "200" in row and "team" in row and "laptop" in row
        out["row"] = row
        assert "secret-team" not in page.find("#log-table").text
        d.save_screenshot(str(shots / "console-member-requests.png"))
        page.view("dashboard")
        wait_for(lambda: page.find("#total-requests").text.endswith("1"), what="dashboard totals")
        out["cost_card"] = page.find("#total-cost").text

        # Editing the URL to another workspace gets nothing of it.
        d.get(f"{base}/console/#members?workspace={ids['secret']}")  # not an owner: no such view for them
        wait_for(lambda: page.visible("#view-dashboard[data-ready='1']"), what="dashboard instead")
        assert not page.visible("#view-members")
        for view, err in (("keys", "#keys-error"), ("requests", "#log-error")):
            page.view(view, f"?workspace={ids['secret']}")
            wait_for(lambda err=err: page.visible(err), what=f"{view}: not yours")
            assert "does not exist or is not yours" in page.find(err).text
            assert "secret-key" not in page.page_text()
        status = d.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            f"fetch('/admin/api/keys?workspace_id={ids['secret']}').then((r) => done(r.status));")
        assert status == 404
        status = d.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            f"fetch('/admin/api/keys/{ids['secret_key']}', {{method: 'DELETE'}}).then((r) => done(r.status));")
        assert status == 403  # no CSRF token: refused before anything else
        out["plaintext"] = plaintext

        # The owner sees the member's key and revokes it.
        page.sign_in("owner@example.com", PASSWORD)
        page.view("keys")
        row = wait_for(lambda: [r for r in page.rows("#key-table tbody tr") if "laptop" in r.text],
                       what="member's key in the owner's list")[0]
        assert "newbie@example.com" in row.text
        key_id = row.get_attribute("data-key")
        page.find(f"button.revoke[data-key='{key_id}']").click()
        d.switch_to.alert.accept()
        wait_for(lambda: "revoked" in page.find(f"#key-table tr[data-key='{key_id}']").text, what="revoked")
        wait_for(lambda: run_curl() == "401", timeout=2.5, step=0.1, what="401 after the owner's revoke")

        page.view("audit")
        text = page.find("#audit-table").text
        assert "key.revoke" in text and "owner@example.com" in text and "invitation.accept" in text
        d.save_screenshot(str(shots / "console-audit.png"))
    finally:
        d.quit()
    return out


async def test_console_member_from_invitation_to_usage(admin_gateway: Gateway, tmp_path: Path) -> None:
    require_browser()
    gw = admin_gateway
    await gw.add_user("owner@example.com", team="owner")
    secret_key = await gw.key("secret-team", name="secret-key")
    ids = {"secret": gw.conn.execute("SELECT id FROM workspaces WHERE name = 'secret-team'").fetchone()[0],
           "secret_key": gw.conn.execute("SELECT id FROM api_keys WHERE name = 'secret-key'").fetchone()[0]}
    shots = Path(os.environ.get("GATEWAY_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    out = await asyncio.to_thread(member_journey, gw.url, tmp_path / "chrome-member", shots, ids)
    # The cost shown is the recorded one.
    rows = [r for r in gw.usage_rows() if r["request_id"] == "member-curl-1" and r["status"] == 200]
    assert len(rows) == 1 and rows[0]["cost"] > 0
    cost = rows[0]["cost"]
    assert f"${cost:.6f}" in out["row"] and out["cost_card"].endswith(f"${cost:.6f}")
    assert await asyncio.to_thread(post_chat, gw.url, secret_key) == 200  # the other workspace's key untouched


def disable_scenario(base: str, profile: Path, user_id: int) -> None:
    page = Page(base, profile)
    d = page.driver
    try:
        page.sign_in("member@example.com", PASSWORD)
        page.view("keys")
        # An admin disables the account elsewhere: this open console signs out by itself.
        status, _ = api_call(base, "PATCH", f"/users/{user_id}", {"disabled": True})
        assert status == 200
        t0 = time.monotonic()
        wait_for(lambda: page.visible("#login-form"), timeout=8, what="signed out after the disable")
        assert time.monotonic() - t0 < 8
        assert "session has ended" in page.find("#signin-message").text
        page.type("#login-email", "member@example.com")
        page.type("#login-password", PASSWORD)
        page.find("#login-button").click()
        wait_for(lambda: page.visible("#login-error"), what="sign-in refused")
        assert page.find("#login-error").text == "Email or password is incorrect."

        # The admin enables the account again from the console.
        page.sign_in("admin@example.com", PASSWORD)
        page.view("members")
        button = wait_for(lambda: page.find(f"button.enable-user[data-user='{user_id}']"), what="enable button")
        button.click()
        wait_for(lambda: page.visible(f"button.disable-user[data-user='{user_id}']"), what="enabled")
        page.sign_in("member@example.com", PASSWORD)
    finally:
        d.quit()


async def test_console_disabling_a_user_signs_them_out(admin_gateway: Gateway, tmp_path: Path) -> None:
    require_browser()
    gw = admin_gateway
    await gw.add_user("admin@example.com", admin=True)
    uid = await gw.add_user("member@example.com", team="member")
    await asyncio.to_thread(disable_scenario, gw.url, tmp_path / "chrome-disable", uid)


XSS = '<img src=x onerror="window.__xss=1">'


def xss_scenario(base: str, profile: Path) -> None:
    page = Page(base, profile)
    d = page.driver
    try:
        page.sign_in("admin@example.com", PASSWORD)
        for view in ("keys", "members", "audit", "requests", "dashboard"):
            page.view(view)
            time.sleep(0.3)
            assert d.execute_script("return window.__xss") is None, view
            assert d.execute_script("return document.querySelectorAll('img[src=x], svg').length") == 0, view
            if view in ("keys", "members", "audit"):
                assert XSS in page.page_text(), view
        # The invitation page shows the invitee's email as text too.
        status, inv = api_call(base, "POST", "/invitations", {"email": "<svg/onload=window.__xss=1>@example.com",
                                                               "workspace_id": 1})
        assert status == 201
        page.find("#signout").click()
        wait_for(lambda: page.visible("#login-form"), what="signed out")
        d.get(inv["link"])
        wait_for(lambda: "<svg/onload=window.__xss=1>@example.com" in page.find("#invite-info").text,
                 what="invitation details as text")
        assert d.execute_script("return window.__xss") is None
    finally:
        d.quit()


async def test_console_shows_hostile_names_as_text(admin_gateway: Gateway, tmp_path: Path) -> None:
    require_browser()
    gw = admin_gateway
    await gw.add_user("admin@example.com", admin=True)
    uid = await gw.add_user("member@example.com", name=XSS, **{XSS: "owner"})
    key = await gw.key(XSS, name=XSS, user_id=uid)
    assert await asyncio.to_thread(post_chat, gw.url, key, "gpt-test", "xss-1") == 200
    gw.conn.execute("UPDATE workspaces SET name = ? WHERE id = 1", (XSS,))
    status, _ = await asyncio.to_thread(api_call, gw.url, "PATCH", "/keys/1", {"name": XSS + " "})
    assert status == 200  # an audit row carrying the name too
    await asyncio.to_thread(xss_scenario, gw.url, tmp_path / "chrome-xss")
