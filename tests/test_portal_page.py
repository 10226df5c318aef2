"""The key management page over HTTP: forms, CSRF, tenancy, escaping (no browser here;
tests/test_portal_browser.py drives it in Chromium)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from decimal import Decimal as D
from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI, Header, HTTPException, Request

from keycap import APIKey, APIKeyClient, UsageRow
from keycap.integrations import _html
from keycap.integrations.fastapi import (
    KeycapMiddleware,
    Manager,
    key_management_router,
    require_scope,
)

SESSIONS: dict[str, tuple[str, str]] = {}
PREFIX = "/account/api-keys"


async def current_manager(
    authorization: Annotated[str, Header()] = "",
) -> Manager:
    found = SESSIONS.get(authorization.removeprefix("Session "))
    if found is None:
        raise HTTPException(401, "log in")
    return Manager(actor=found[0], org_id=found[1], grantable=frozenset({"chat:*"}))


def page_app(client: APIKeyClient, **options: object) -> FastAPI:
    app = FastAPI()
    app.add_middleware(KeycapMiddleware, client=client, close_client=False)
    app.include_router(
        key_management_router(manager=current_manager, page=True, **options),  # type: ignore[arg-type]
        prefix=PREFIX,
    )

    @app.get("/v1/chat")
    async def chat(key: Annotated[APIKey, Depends(require_scope("chat:write"))]) -> str:
        return key.id

    return app


@pytest.fixture
async def acme(client: APIKeyClient) -> AsyncIterator[tuple[httpx.AsyncClient, str, str]]:
    """A browser-like HTTP client logged in as alice of Acme; Acme's and Globex's ids."""
    acme = (await client.create_organization("Acme")).id
    globex = (await client.create_organization("Globex")).id
    SESSIONS.update({"alice": ("alice@acme", acme), "gina": ("gina@globex", globex)})
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=page_app(client)),
        base_url="http://app",
        headers={"Authorization": "Session alice"},
    ) as http:
        yield http, acme, globex


def token_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


async def form_token(http: httpx.AsyncClient) -> str:
    return token_of((await http.get(f"{PREFIX}/?dialog=create")).text)


async def test_the_page_lists_the_organizations_keys_and_shows_a_new_one_once(
    acme: tuple[httpx.AsyncClient, str, str], client: APIKeyClient
) -> None:
    http, acme_id, globex = acme
    await client.create_key(globex, name="globex-key")
    page = await http.get(f"{PREFIX}/")
    assert page.status_code == 200 and "No keys yet." in page.text
    assert page.headers["cache-control"] == "no-store"
    assert "default-src 'none'" in page.headers["content-security-policy"]
    created = await http.post(
        f"{PREFIX}/ui/keys",
        data={
            "csrf_token": await form_token(http),
            "name": "billing agent",
            "scopes": "chat:write",
            "budget": "5.00",
            "period": "month",
            "per_minute": "60",
            "expires_in": "30d",
        },
    )
    assert created.status_code == 201, created.text
    plaintext = re.search(r'id="new-secret" readonly value="([^"]+)"', created.text)
    assert plaintext and plaintext.group(1).startswith("sk_")
    assert "the only time it is shown" in created.text
    [key] = await client.list_keys(org_id=acme_id)
    assert (key.name, key.scopes, key.delegated_by) == (
        "billing agent",
        ("chat:write",),
        "alice@acme",
    )
    assert [b.limit for b in await client.get_budgets(key.id)] == [D("5.00")]
    assert (
        await http.get("/v1/chat", headers={"Authorization": f"Bearer {plaintext.group(1)}"})
    ).status_code == 200
    again = await http.get(f"{PREFIX}/?key={key.id}")
    assert "billing agent" in again.text and plaintext.group(1) not in again.text
    assert "globex-key" not in again.text
    assert '<meter aria-labelledby="budget-' in again.text and "5 left" in again.text


async def test_a_form_without_the_pages_token_or_from_another_site_does_nothing(
    acme: tuple[httpx.AsyncClient, str, str], client: APIKeyClient
) -> None:
    http, acme_id, _ = acme
    token = await form_token(http)
    key = await client.create_key(acme_id, name="kept")
    attempts = [
        ({"name": "forged"}, {}),  # no token
        ({"name": "forged", "csrf_token": "x" * 43}, {}),  # a token of its own
        ({"name": "forged", "csrf_token": token}, {"Origin": "https://evil.example"}),
    ]
    for data, headers in attempts:
        refused = await http.post(f"{PREFIX}/ui/keys", data=data, headers=headers)
        assert refused.status_code == 403, refused.text
        revoke = await http.post(
            f"{PREFIX}/ui/keys/{key.id}/revoke",
            data={"csrf_token": data.get("csrf_token", "")},
            headers=headers,
        )
        assert revoke.status_code == 403
    as_json = await http.post(f"{PREFIX}/ui/keys", json={"name": "forged", "csrf_token": token})
    assert as_json.status_code == 403
    assert [k.name for k in await client.list_keys(org_id=acme_id)] == ["kept"]
    assert (await client.get_key(key.id)).revoked_at is None
    # Another session (no cookie yet) cannot use alice's token either.
    fresh = httpx.AsyncClient(
        transport=http._transport, base_url="http://app", headers={"Authorization": "Session alice"}
    )
    async with fresh:
        stolen = await fresh.post(f"{PREFIX}/ui/keys", data={"name": "forged", "csrf_token": token})
        assert stolen.status_code == 403


async def test_another_organizations_key_is_not_on_the_page_nor_changed_by_its_forms(
    acme: tuple[httpx.AsyncClient, str, str], client: APIKeyClient
) -> None:
    http, _, globex = acme
    theirs = await client.create_key(globex, name="globex-secret")
    token = await form_token(http)
    shown = await http.get(f"{PREFIX}/?key={theirs.id}&dialog=revoke")
    assert shown.status_code == 404 and "There is no such key." in shown.text
    assert "globex-secret" not in shown.text and 'data-dialog="revoke"' not in shown.text
    for action in ("revoke", "disable", "roll"):
        response = await http.post(
            f"{PREFIX}/ui/keys/{theirs.id}/{action}", data={"csrf_token": token}
        )
        assert response.status_code == 404, (action, response.text)
        assert "globex-secret" not in response.text
    after = await client.get_key(theirs.id)
    assert (after.revoked_at, after.disabled_at) == (None, None)
    assert (await client.validate_key(theirs.plaintext)).id == theirs.id


async def test_revoke_disable_enable_and_roll_through_the_forms(
    acme: tuple[httpx.AsyncClient, str, str], client: APIKeyClient
) -> None:
    http, acme_id, _ = acme
    issued = await client.create_key(acme_id, name="agent", scopes=["chat:write"])
    token = await form_token(http)
    confirm = await http.get(f"{PREFIX}/?key={issued.id}&dialog=revoke")
    assert 'data-dialog="revoke"' in confirm.text and "cannot be undone" in confirm.text
    disabled = await http.post(f"{PREFIX}/ui/keys/{issued.id}/disable", data={"csrf_token": token})
    assert disabled.status_code == 303
    assert disabled.headers["location"] == f"{PREFIX}/?key={issued.id}&done=disable"
    assert "The key is disabled." in (await http.get(disabled.headers["location"])).text
    assert (
        await http.get("/v1/chat", headers={"Authorization": f"Bearer {issued.plaintext}"})
    ).status_code == 401
    await http.post(f"{PREFIX}/ui/keys/{issued.id}/enable", data={"csrf_token": token})
    rolled = await http.post(
        f"{PREFIX}/ui/keys/{issued.id}/roll", data={"csrf_token": token, "grace": "0s"}
    )
    new = re.search(r'id="new-secret" readonly value="([^"]+)"', rolled.text)
    assert rolled.status_code == 200 and new and new.group(1) != issued.plaintext
    assert (
        await http.get("/v1/chat", headers={"Authorization": f"Bearer {new.group(1)}"})
    ).status_code == 200
    assert (
        await http.get("/v1/chat", headers={"Authorization": f"Bearer {issued.plaintext}"})
    ).status_code == 401
    odd = await http.post(
        f"{PREFIX}/ui/keys/{issued.id}/roll", data={"csrf_token": token, "grace": "99y"}
    )
    assert odd.status_code == 400 and "grace" in odd.text
    revoked = await http.post(f"{PREFIX}/ui/keys/{issued.id}/revoke", data={"csrf_token": token})
    assert revoked.status_code == 303
    assert (
        await http.get("/v1/chat", headers={"Authorization": f"Bearer {new.group(1)}"})
    ).status_code == 401
    assert (await client.get_key(issued.id)).revoked_at is not None
    logged = await client.audit_log(acme_id, subject_id=issued.id)
    assert [(e.action, e.actor) for e in logged][:4] == [
        ("key.revoked", "alice@acme"),
        ("key.rolled", "alice@acme"),
        ("key.enabled", "alice@acme"),
        ("key.disabled", "alice@acme"),
    ]


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("budget", "5,00", "write an amount such as 5 or 12.50"),
        ("budget", "0.0000001", "write an amount such as 5 or 12.50"),
        ("budget", "1e9", "write an amount such as 5 or 12.50"),
        ("per_minute", "-3", "whole number"),
        ("period", "fortnight", "offered periods"),
        ("expires_in", "1000y", "offered expiries"),
        ("scopes", "admin", "not yours to grant: admin"),
        ("name", "  ", "give the key a name"),
    ],
)
async def test_a_refused_create_form_says_why_keeps_what_was_typed_and_creates_nothing(
    acme: tuple[httpx.AsyncClient, str, str],
    client: APIKeyClient,
    field: str,
    value: str,
    says: str,
) -> None:
    http, acme_id, _ = acme
    data = {
        "csrf_token": await form_token(http),
        "name": "typed <name>",
        "budget": "",
        "period": "month",
    }
    data[field] = value
    refused = await http.post(f"{PREFIX}/ui/keys", data=data)
    assert refused.status_code == 400
    assert says in refused.text and 'data-dialog="create"' in refused.text
    if field != "name":
        assert 'value="typed &lt;name&gt;"' in refused.text  # kept, escaped
    assert await client.list_keys(org_id=acme_id) == []


async def test_what_people_typed_is_escaped_everywhere(
    acme: tuple[httpx.AsyncClient, str, str], client: APIKeyClient
) -> None:
    http, acme_id, _ = acme
    evil = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
    issued = await client.create_key(acme_id, name=evil)
    for path in (
        f"{PREFIX}/",
        f"{PREFIX}/?key={issued.id}",
        f"{PREFIX}/?key={issued.id}&dialog=roll",
    ):
        text = (await http.get(path)).text
        assert "<script>alert" not in text and "<img src=x" not in text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    reflected = await http.get(
        f"{PREFIX}/", params={"done": "<b>owned</b>", "dialog": "<x>", "key": '"><x'}
    )
    assert "<b>owned</b>" not in reflected.text and "<x>" not in reflected.text


async def test_the_app_can_give_its_own_csrf_token(client: APIKeyClient) -> None:
    acme = (await client.create_organization("Acme")).id
    SESSIONS["bob"] = ("bob@acme", acme)

    def app_token(request: Request) -> str:
        return "app-token-" + request.headers["authorization"][-3:]

    app = page_app(client, csrf_token=app_token)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://app",
        headers={"Authorization": "Session bob"},
    ) as http:
        page = await http.get(f"{PREFIX}/?dialog=create")
        assert token_of(page.text) == "app-token-bob" and "set-cookie" not in page.headers
        bad = await http.post(
            f"{PREFIX}/ui/keys", data={"csrf_token": "app-token-eve", "name": "x"}
        )
        assert bad.status_code == 403
        good = await http.post(
            f"{PREFIX}/ui/keys", data={"csrf_token": "app-token-bob", "name": "x"}
        )
        assert good.status_code == 201


async def test_the_page_serves_its_own_stylesheet_and_script_and_nothing_else(
    acme: tuple[httpx.AsyncClient, str, str],
) -> None:
    http, _, _ = acme
    css = await http.get(f"{PREFIX}/ui/portal.css")
    js = await http.get(f"{PREFIX}/ui/portal.js")
    assert (
        css.headers["content-type"].startswith("text/css")
        and "prefers-color-scheme: dark" in css.text
    )
    assert js.headers["content-type"].startswith("text/javascript") and "showModal" in js.text
    assert (await http.get(f"{PREFIX}/ui/other.js")).status_code == 404
    page = (await http.get(f"{PREFIX}/")).text
    assert not re.search(r"""(src|href)=["']https?://""", page)  # works offline
    assert " style=" not in page and "<script>" not in page  # nothing inline for the CSP
    spec = (await http.get("/openapi.json")).json()
    assert not [p for p in spec["paths"] if "/ui/" in p or p == f"{PREFIX}/"]


async def test_without_a_login_the_page_is_the_apps_401(
    acme: tuple[httpx.AsyncClient, str, str],
) -> None:
    http, _, _ = acme
    assert (await http.get(f"{PREFIX}/", headers={"Authorization": ""})).status_code == 401


# --- the chart and the budget bar, without a database -------------------------------------


def test_the_usage_chart_draws_a_bar_per_day_scaled_to_the_busiest_day() -> None:
    today = date(2026, 1, 15)
    rows = [
        UsageRow(period="2026-01-15", meter="spend", amount=D("2.50"), charges=2),
        UsageRow(period="2026-01-14", meter="spend", amount=D("1.25"), charges=1),
        UsageRow(period="2025-12-17", meter="spend", amount=D("0.000001"), charges=1),  # first day
        UsageRow(period="2025-12-16", meter="spend", amount=D("9"), charges=1),  # 31 days ago
        UsageRow(period="2026-01-15", meter="tokens", amount=D("900"), charges=1),
    ]
    svg = _html.usage_chart(rows, "spend", today)
    heights = re.findall(
        r'<rect class="bar-day" x="[\d.]+" y="[\d.]+" width="[\d.]+" height="([\d.]+)"', svg
    )
    assert heights == ["1", "66.0", "132.0"]  # a tiny day still shows; the busiest fills the plot
    assert 'data-total="3.750001"' in svg and "at most 2.5 in a day" in svg
    assert "<title>2026-01-14: 1.25</title>" in svg
    assert "<td>2026-01-15</td><td>2.5</td>" in svg  # the same numbers as a table
    empty = _html.usage_chart([], "spend", today)
    assert "<rect" not in empty and 'data-total="0"' in empty


def test_a_budget_bar_shows_used_held_and_left_and_when_it_resets() -> None:
    from keycap import BudgetStatus

    budget = BudgetStatus(
        id="bud_1", scope="key", subject_id="key_1", meter="spend", period="month", anchor_day=None,
        limit=D("5"), credit=D("1"), used=D("3.5"), held=D("0.5"), remaining=D("2"),
        period_start=datetime(2026, 1, 1, tzinfo=UTC), reset_at=datetime(2026, 2, 1, tzinfo=UTC),
        alert_thresholds=(),
    )  # fmt: skip
    bar = _html.budget_bar(budget, datetime(2026, 1, 15, tzinfo=UTC))
    assert 'max="6" value="4"' in bar
    assert "3.5 used, 0.5 held of 6" in bar and "<strong>2 left</strong>" in bar
    assert '<time datetime="2026-02-01T00:00:00+00:00">2026-02-01 00:00 UTC</time>' in bar


async def test_two_pages_under_two_prefixes_in_a_mounted_app_keep_their_own_links(
    client: APIKeyClient,
) -> None:
    acme = (await client.create_organization("Acme")).id
    SESSIONS["carol"] = ("carol@acme", acme)
    app = page_app(client)
    app.include_router(
        key_management_router(manager=current_manager, page=True), prefix="/team/keys"
    )
    outer = FastAPI()
    outer.mount("/sub", app)  # mounted: the links carry the mount's path too
    key = await client.create_key(acme, name="shared")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=outer),
        base_url="http://app",
        headers={"Authorization": "Session carol"},
    ) as http:
        for prefix in ("/sub" + PREFIX, "/sub/team/keys"):
            page = await http.get(f"{prefix}/?key={key.id}&dialog=disable")
            assert f'href="{prefix}/ui/portal.css"' in page.text
            assert f'action="{prefix}/ui/keys/{key.id}/disable"' in page.text
            done = await http.post(
                f"{prefix}/ui/keys/{key.id}/disable", data={"csrf_token": token_of(page.text)}
            )
            assert done.headers["location"] == f"{prefix}/?key={key.id}&done=disable"


async def test_a_form_past_the_size_bound_is_refused_unread(
    acme: tuple[httpx.AsyncClient, str, str], client: APIKeyClient
) -> None:
    from keycap.integrations._page import MAX_FORM_BYTES

    http, acme_id, _ = acme
    token = await form_token(http)
    big = {"csrf_token": token, "name": "n" * MAX_FORM_BYTES}
    refused = await http.post(f"{PREFIX}/ui/keys", data=big)
    assert refused.status_code == 403 and "too big" in refused.text
    assert await client.list_keys(org_id=acme_id) == []
