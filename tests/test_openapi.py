"""The OpenAPI schema of a FastAPI app behind KeycapMiddleware documents keycap:
the problems a protected route can answer, its scopes, and the headers keycap
reads. No database: the schema is built without one."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI

from keycap import APIKey, APIKeyClient
from keycap.integrations.fastapi import KeycapMiddleware, Meter, metered, require_scope
from tests.conftest import SECRET


def _app(tmp_path: Path, **options: Any) -> FastAPI:
    app = FastAPI()
    client = APIKeyClient(f"sqlite:///{tmp_path / 'openapi.db'}", signing_secret=SECRET)
    app.add_middleware(KeycapMiddleware, client=client, **options)

    @app.get("/chat")
    async def chat(key: Annotated[APIKey, Depends(require_scope("chat:write"))]) -> str:
        return key.id

    @app.post("/paid")
    async def paid(
        key: Annotated[APIKey, Depends(require_scope("chat:write", cost=Decimal("0.01")))],
    ) -> str:
        return key.id

    @app.post("/stream")
    async def stream(meter: Annotated[Meter, Depends(metered(reserve=Decimal("0.40")))]) -> str:
        return meter.key.id

    @app.get("/health")
    async def health() -> str:
        return "ok"

    return app


async def _schema(app: FastAPI) -> dict[str, Any]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
        response = await http.get("/openapi.json")
    assert response.status_code == 200
    return response.json()  # type: ignore[no-any-return]


async def test_a_protected_route_lists_the_problems_keycap_answers(tmp_path: Path) -> None:
    schema = await _schema(_app(tmp_path))
    chat = schema["paths"]["/chat"]["get"]["responses"]
    assert set(chat) == {"200", "401", "403", "429", "503"}  # no cost: no 402
    assert chat["401"]["content"]["application/problem+json"]["schema"] == {
        "$ref": "#/components/schemas/KeycapProblem"
    }
    assert "WWW-Authenticate" in chat["401"]["headers"]
    assert {"Retry-After", "RateLimit", "RateLimit-Policy"} <= set(chat["429"]["headers"])
    assert "Retry-After" in chat["503"]["headers"]
    assert "code" in schema["components"]["schemas"]["KeycapProblem"]["required"]
    for charging in ("/paid", "/stream"):
        assert "402" in schema["paths"][charging]["post"]["responses"]
    assert set(schema["paths"]["/health"]["get"]["responses"]) == {"200"}


async def test_each_route_shows_its_scopes_under_both_key_headers(tmp_path: Path) -> None:
    schema = await _schema(_app(tmp_path))
    assert schema["paths"]["/chat"]["get"]["security"] == [
        {"APIKeyBearer": ["chat:write"]},
        {"APIKeyHeader": ["chat:write"]},
    ]
    assert schema["paths"]["/stream"]["post"]["security"] == [
        {"APIKeyBearer": []},
        {"APIKeyHeader": []},
    ]
    schemes = schema["components"]["securitySchemes"]
    assert schemes["APIKeyBearer"]["scheme"] == "bearer"
    assert (schemes["APIKeyHeader"]["in"], schemes["APIKeyHeader"]["name"]) == (
        "header",
        "X-API-Key",
    )
    assert "security" not in schema["paths"]["/health"]["get"]


@pytest.mark.parametrize(
    ("headers", "schemes"),
    [
        (("x-token",), {"APIKeyHeader": "x-token"}),
        (("x-token", "authorization"), {"APIKeyHeader": "x-token", "APIKeyBearer": None}),
        (("x-a", "x-b"), {"APIKeyHeader": "x-a", "APIKeyHeader-x-b": "x-b"}),
    ],
    ids=["one-custom", "custom-and-bearer", "two-custom"],
)
async def test_the_security_schemes_are_the_headers_keycap_reads(
    tmp_path: Path, headers: tuple[str, ...], schemes: dict[str, str | None]
) -> None:
    schema = await _schema(_app(tmp_path, headers=headers))
    declared = schema["components"]["securitySchemes"]
    assert {name: scheme.get("name") for name, scheme in declared.items()} == schemes
    assert [next(iter(r)) for r in schema["paths"]["/chat"]["get"]["security"]] == list(schemes)


async def test_a_budget_refused_as_429_is_not_documented_as_402(tmp_path: Path) -> None:
    schema = await _schema(_app(tmp_path, budget_status=429))
    paid = schema["paths"]["/paid"]["post"]["responses"]
    assert "402" not in paid and "budget" in paid["429"]["description"]


async def test_the_legacy_rate_limit_headers_are_documented_when_chosen(tmp_path: Path) -> None:
    schema = await _schema(_app(tmp_path, rate_limit_headers="legacy"))
    limited = schema["paths"]["/chat"]["get"]["responses"]["429"]["headers"]
    assert {"RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"} <= set(limited)
