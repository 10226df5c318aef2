"""The example gateway end to end: a real uvicorn process on 127.0.0.1, driven with httpx."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from keycap import APIKeyClient
from tests.conftest import SECRET

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
async def gateway(client: APIKeyClient, db_url: str) -> AsyncIterator[str]:
    """The example app in its own uvicorn process, on the test database (emptied by ``client``)."""
    port = free_port()
    env = {**os.environ, "KEYCAP_DATABASE_URL": db_url, "KEYCAP_SIGNING_SECRET": SECRET}
    proc = subprocess.Popen(  # noqa: ASYNC220 - a server we keep running, not a call we await
        [sys.executable, "-m", "uvicorn", "--factory", "--app-dir", "examples",
         "gateway:app_from_env", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base) as http:
            for _ in range(300):
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"uvicorn exited: {proc.stdout.read() if proc.stdout else ''}"
                    )
                try:
                    await http.get("/openapi.json")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
        assert "Traceback" not in output, output


async def complete(
    http: httpx.AsyncClient, key: str, words: int, max_tokens: int
) -> httpx.Response:
    prompt = " ".join(f"w{i}" for i in range(words))
    return await http.post(
        "/v1/completions",
        json={"prompt": prompt, "max_tokens": max_tokens},
        headers={"Authorization": f"Bearer {key}"},
    )


async def test_the_budget_runs_out_exactly(gateway: str, db_url: str) -> None:
    async with APIKeyClient(db_url, signing_secret=SECRET) as setup:
        org = (await setup.create_organization("Acme")).id
        admin = (await setup.create_key(org, scopes=["admin"], name="ops")).plaintext
        other_org = (await setup.create_organization("Other")).id
        foreign = await setup.create_key(other_org, scopes=["chat:write"])

    as_admin = {"Authorization": f"Bearer {admin}"}
    async with httpx.AsyncClient(base_url=gateway) as http:
        made = await http.post(
            "/admin/keys", json={"name": "agent-1", "monthly_budget": "0.10"}, headers=as_admin
        )
        assert made.status_code == 201, made.text
        key, key_id = made.json()["key"], made.json()["id"]

        # 10 tokens used of 20 reserved: 0.01 charged, 0.01 returned.
        r = await complete(http, key, words=2, max_tokens=20)
        assert r.status_code == 200 and len(r.text.split()) == 10
        assert r.headers["content-type"].startswith("text/plain")
        assert r.headers["keycap-budget-remaining"] == "0.08"  # 0.10 - the 0.02 hold
        # Four of 20 tokens each: 0.09 used.
        for _ in range(4):
            r = await complete(http, key, words=4, max_tokens=20)
            assert r.status_code == 200 and len(r.text.split()) == 20
        # 0.01 left cannot hold a worst case of 0.02: refused before any work.
        r = await complete(http, key, words=4, max_tokens=20)
        assert r.status_code == 402 and r.headers["content-type"] == "application/problem+json"
        problem = r.json()
        assert problem["code"] == "budget_exceeded"
        assert Decimal(problem["remaining"]) == Decimal("0.01")
        assert r.headers["keycap-budget-remaining"] == "0.01"
        # A request that fits uses up the budget to the last cent, then nothing fits.
        r = await complete(http, key, words=2, max_tokens=10)
        assert r.status_code == 200 and len(r.text.split()) == 10
        r = await complete(http, key, words=1, max_tokens=1)
        assert r.status_code == 402

        listed = (await http.get("/admin/keys", headers=as_admin)).json()
        mine = next(k for k in listed if k["id"] == key_id)
        assert Decimal(mine["used"]) == Decimal("0.10") == Decimal(mine["limit"])
        assert mine["status"] == "active" and mine["resets_at"]

        # Scopes and tenancy.
        r = await http.get("/admin/keys", headers={"Authorization": f"Bearer {key}"})
        assert (r.status_code, r.json()["code"]) == (403, "insufficient_scope")
        r = await http.delete(f"/admin/keys/{foreign.id}", headers=as_admin)
        assert (r.status_code, r.json()["code"]) == (404, "not_found")
        r = await complete(http, "sk_live_nothing", words=1, max_tokens=1)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")

        assert (await http.delete(f"/admin/keys/{key_id}", headers=as_admin)).status_code == 200
        r = await complete(http, key, words=1, max_tokens=1)
        assert (r.status_code, r.json()["code"]) == (401, "revoked_key")

    async with APIKeyClient(db_url, signing_secret=SECRET) as check:
        [budget] = await check.get_budgets(key_id)
        assert (budget.used, budget.held) == (Decimal("0.10"), Decimal(0))


async def test_an_admin_signs_in_and_manages_keys_on_the_page(gateway: str, db_url: str) -> None:
    async with APIKeyClient(db_url, signing_secret=SECRET) as setup:
        org = (await setup.create_organization("Acme")).id
        admin = (await setup.create_key(org, scopes=["admin"], name="ops")).plaintext
        customer = await setup.create_key(org, scopes=["chat:write"], name="agent-7")
        chat = await setup.create_key(org, scopes=["chat:write"], name="no admin")

    async with httpx.AsyncClient(base_url=gateway) as http:
        away = await http.get("/admin/portal/")
        assert (away.status_code, away.headers["location"]) == (303, "/admin/login")
        refused = await http.post("/admin/login", data={"key": chat.plaintext})
        assert refused.status_code == 401 and chat.plaintext not in refused.text
        signed_in = await http.post("/admin/login", data={"key": admin})
        assert (signed_in.status_code, signed_in.headers["location"]) == (303, "/admin/portal/")
        page = await http.get("/admin/portal/")
        assert page.status_code == 200 and "agent-7" in page.text and admin not in page.text
        confirm = await http.get(f"/admin/portal/?key={customer.id}&dialog=revoke")
        token = re.search(r'name="csrf_token" value="([^"]+)"', confirm.text)
        assert token
        revoked = await http.post(
            f"/admin/portal/ui/keys/{customer.id}/revoke", data={"csrf_token": token.group(1)}
        )
        assert revoked.status_code == 303
        r = await complete(http, customer.plaintext, words=1, max_tokens=1)
        assert (r.status_code, r.json()["code"]) == (401, "revoked_key")
