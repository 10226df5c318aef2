"""The key management page in a real headless Chromium (Debian's), driven by Playwright.

A customer logged in by the app's own cookie creates a key and reads it once,
revokes one and sees a protected route refuse it, and watches the usage chart
follow metered calls. Screenshots of the main states go to KEYCAP_SCREENSHOTS
(``KEYCAP_SCREENSHOTS=docs/images`` refreshes the ones docs/portal.md shows),
else to the test's own temporary folder.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal as D
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request

from keycap import APIKey, APIKeyClient, Budget, RateLimit
from keycap.integrations.fastapi import (
    KeycapMiddleware,
    Manager,
    key_management_router,
    require_scope,
)
from tests import _browser
from tests._server import serve
from tests.conftest import FakeClock

pytestmark = _browser.require()

PREFIX = "/account/api-keys"
#: The app's own sessions, keyed by its session cookie. keycap never sees them.
SESSIONS: dict[str, Manager] = {}
COST = D("0.25")


async def cookie_login(request: Request) -> Manager:
    found = SESSIONS.get(request.cookies.get("session", ""))
    if found is None:
        raise HTTPException(401, "log in")
    return found


def app_for(client: APIKeyClient) -> FastAPI:
    app = FastAPI()
    app.add_middleware(KeycapMiddleware, client=client, close_client=False)
    app.include_router(
        key_management_router(manager=cookie_login, page=True, title="Acme API keys"),
        prefix=PREFIX,
    )

    @app.post("/v1/chat")
    async def chat(
        key: Annotated[APIKey, Depends(require_scope("chat:write", cost=COST))],
    ) -> str:
        return key.id

    return app


@dataclass
class Site:
    base: str
    org_id: str
    shots: Path
    page: Any  # playwright's Page

    async def open(self, query: str = "") -> None:
        await self.page.goto(f"{self.base}{PREFIX}/{query}")

    async def shot(self, name: str, *, whole: bool = False) -> None:
        """The window (a dialog and its backdrop), or the ``whole`` page."""
        await self.page.screenshot(path=str(self.shots / f"{name}.png"), full_page=whole)


def screenshots(tmp_path: Path) -> Path:
    found = Path(os.environ.get("KEYCAP_SCREENSHOTS") or tmp_path)
    found.mkdir(parents=True, exist_ok=True)
    return found


@pytest.fixture
async def site(client: APIKeyClient, tmp_path: Path) -> AsyncIterator[Site]:
    """The app on a real port, and a Chromium page logged in as alice of Acme."""
    org_id = (await client.create_organization("Acme")).id
    SESSIONS["alice-session"] = Manager(
        actor="alice@acme", org_id=org_id, grantable=frozenset({"chat:*"})
    )
    shots = screenshots(tmp_path)
    async with (
        serve(app_for(client)) as base,
        _browser.chromium(
            viewport={"width": 1100, "height": 760},
            permissions=["clipboard-read", "clipboard-write"],
        ) as context,
    ):
        await context.add_cookies([{"name": "session", "value": "alice-session", "url": base}])
        yield Site(base, org_id, shots, await context.new_page())


async def call(base: str, plaintext: str) -> int:
    async with httpx.AsyncClient(base_url=base) as http:
        return (
            await http.post("/v1/chat", headers={"Authorization": f"Bearer {plaintext}"})
        ).status_code


async def test_a_customer_creates_a_key_in_the_browser_and_reads_it_once(
    site: Site, client: APIKeyClient, clock: FakeClock
) -> None:
    page = site.page
    clock.advance(days=-40)
    old = await client.create_key(site.org_id, name="old laptop", scopes=["chat:read"])
    clock.advance(days=10)
    await client.create_key(site.org_id, name="nightly report", scopes=["chat:write"])
    clock.advance(days=20)
    staging = await client.create_key(site.org_id, name="staging", scopes=["chat:write"])
    clock.advance(days=9, hours=3)
    await client.create_key(site.org_id, name="trial", scopes=["chat:read"], expires_in="30d")
    clock.advance(hours=-3, days=1)
    await client.revoke_key(old.id)
    await client.disable_key(staging.id)
    await site.open()
    statuses = await page.locator("tbody .status").all_inner_texts()
    assert statuses == ["Active", "Disabled", "Active", "Revoked"]  # newest first
    await site.shot("portal-keys", whole=True)
    await page.get_by_role("link", name="Create key").click()
    dialog = page.get_by_role("dialog", name="Create a key")
    await dialog.get_by_label("Name").fill("billing agent")
    await dialog.get_by_label("Scopes").fill("chat:write")
    await dialog.get_by_label("Budget").fill("5.00")
    await dialog.get_by_label("Requests per minute").fill("60")
    await site.shot("portal-create")
    await dialog.get_by_role("button", name="Create key").click()
    shown = page.get_by_role("dialog", name="Your new key")
    secret = await shown.get_by_label("New key").input_value()
    assert secret.startswith("sk_live_")
    await shown.get_by_role("button", name="Copy").click()
    await page.get_by_text("Copied.").wait_for()
    assert await page.evaluate("navigator.clipboard.readText()") == secret
    await site.shot("portal-new-key")
    await shown.get_by_role("link", name="I stored it").click()
    await page.get_by_role("heading", name="billing agent").wait_for()
    assert secret not in await page.content()  # shown once: gone from the page
    await page.reload()
    assert secret not in await page.content()
    assert await call(site.base, secret) == 200


async def test_a_key_revoked_in_the_browser_is_refused_by_a_protected_route(
    site: Site, client: APIKeyClient
) -> None:
    page = site.page
    issued = await client.create_key(site.org_id, name="old agent", scopes=["chat:write"])
    assert await call(site.base, issued.plaintext) == 200
    await site.open()
    await page.get_by_role("link", name="Revoke old agent").click()
    dialog = page.get_by_role("dialog", name="Revoke old agent?")
    await dialog.get_by_text("cannot be undone").wait_for()
    await site.shot("portal-revoke")
    await dialog.get_by_role("button", name="Revoke key").click()
    await page.get_by_text("The key is revoked.").wait_for()
    row = page.locator(f'tr[data-key-id="{issued.id}"]')
    assert "Revoked" in await row.inner_text()
    assert await call(site.base, issued.plaintext) == 401


async def test_the_usage_chart_follows_metered_calls(
    site: Site, client: APIKeyClient, clock: FakeClock
) -> None:
    page = site.page
    issued = await client.create_key(
        site.org_id,
        name="support bot",
        scopes=["chat:write"],
        budgets=[Budget(D("20"), "month")],
        rate_limits=[RateLimit(600, "minute")],
    )
    await site.open(f"?key={issued.id}")
    chart = page.locator('figure.chart[data-meter="spend"]')
    assert await chart.get_attribute("data-total") == "0"
    assert await chart.locator("rect").count() == 0
    for _ in range(3):
        assert await call(site.base, issued.plaintext) == 200
    await page.reload()
    assert await chart.get_attribute("data-total") == "0.75"
    assert await chart.locator("rect").count() == 1
    assert "0.75 used of 20" in await page.locator(".budget").inner_text()
    # Some history, for the picture: calls on earlier days of the month, by the clock.
    today = clock.now
    for back, calls in ((13, 4), (11, 9), (9, 2), (8, 12), (6, 7), (4, 15), (2, 10), (1, 5)):
        clock.now = today - timedelta(days=back)
        for _ in range(calls):
            assert await call(site.base, issued.plaintext) == 200
    clock.now = today
    assert await call(site.base, issued.plaintext) == 200
    await page.reload()
    assert await chart.locator("rect").count() == 9
    assert await chart.get_attribute("data-total") == "17"
    assert "3 left" in await page.locator(".budget").inner_text()
    await site.shot("portal-key", whole=True)
    await page.emulate_media(color_scheme="dark")
    background = await page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(13, 17, 23)"
    await site.shot("portal-key-dark", whole=True)


#: WCAG 2 contrast of every piece of text on the page against what is behind it.
CONTRAST = """() => {
  const rgb = c => c.match(/[\\d.]+/g).map(Number);
  const lum = c => { const [r, g, b] = rgb(c).slice(0, 3).map(v => { v /= 255;
    return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
  const behind = e => { for (; e; e = e.parentElement) {
    const c = getComputedStyle(e).backgroundColor;
    if (rgb(c).length < 4 || rgb(c)[3] > 0) return c; } return "rgb(255, 255, 255)"; };
  const worst = [];
  for (const e of document.querySelectorAll("main *")) {
    if (![...e.childNodes].some(n => n.nodeType === 3 && n.textContent.trim())) continue;
    if (!e.getClientRects().length) continue;
    const [a, b] = [lum(getComputedStyle(e).color), lum(behind(e))];
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    worst.push([Math.round(ratio * 100) / 100, e.tagName + "." + e.className]);
  }
  return worst.sort((x, y) => x[0] - y[0]).slice(0, 3);
}"""


async def test_the_page_works_from_the_keyboard_and_is_readable_in_light_and_dark(
    site: Site, client: APIKeyClient
) -> None:
    page = site.page
    issued = await client.create_key(site.org_id, name="cli", budgets=[Budget(D("5"), "day")])
    disabled = await client.create_key(site.org_id, name="off")
    await client.disable_key(disabled.id)
    await client.charge(issued.id, D("1"))
    for scheme in ("light", "dark"):
        await page.emulate_media(color_scheme=scheme)
        await site.open(f"?key={issued.id}")
        worst = await page.evaluate(CONTRAST)
        assert worst[0][0] >= 4.5, (scheme, worst)  # WCAG AA for body text
    await page.emulate_media(color_scheme="light")
    await site.open()
    for _ in range(10):  # Tab through the filter to the Create key link
        await page.keyboard.press("Tab")
        if await page.evaluate("document.activeElement.textContent") == "Create key":
            break
    else:
        raise AssertionError("Create key cannot be reached with Tab")
    await page.keyboard.press("Enter")
    dialog = page.get_by_role("dialog", name="Create a key")
    await dialog.wait_for()
    assert await page.evaluate("document.querySelector('dialog').matches(':modal')")
    await page.keyboard.press("Escape")  # a modal dialog: Escape goes back to the list
    await page.wait_for_url(f"{site.base}{PREFIX}/")
    assert await page.get_by_role("dialog").count() == 0
    labels = await page.evaluate(
        "[...document.querySelectorAll('input, select')].filter(e => e.type !== 'hidden' &&"
        " !e.labels.length && !e.getAttribute('aria-label')).length"
    )
    assert labels == 0
