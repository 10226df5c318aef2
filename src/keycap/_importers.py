"""Whole-database imports from other systems, through the public client: read the
other system's tables, map its organizations, projects and products onto
keycap's by name, and import every key (``APIKeyClient.import_key``).

Used by ``keycap import apikeys-platform``; docs/migrating.md.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, DateTime, MetaData, String, Table, select
from sqlalchemy.ext.asyncio import create_async_engine

from keycap._client import APIKeyClient
from keycap._db import imports as statements
from keycap._db.engine import normalize_url
from keycap._rules import imports
from keycap._rules.rate_limits import RateLimit

__all__ = ["ImportReport", "from_apikeys_platform"]

_their = MetaData()
_orgs = Table("organizations", _their, Column("id", String), Column("name", String))
_projects = Table(
    "projects", _their, Column("id", String), Column("org_id", String), Column("name", String)
)
_products = Table(
    "products", _their, Column("id", String), Column("org_id", String), Column("name", String)
)
_links = Table(
    "project_products", _their, Column("project_id", String), Column("product_id", String)
)
_keys = Table(
    "api_keys",
    _their,
    Column("id", String),
    Column("org_id", String),
    Column("project_id", String),
    Column("product_id", String),
    Column("key_prefix", String),
    Column("key_hash", String),
    Column("metadata", JSON),
    Column("revoked_at", DateTime(timezone=True)),
)


@dataclass
class ImportReport:
    """What an import did."""

    organizations: int = 0
    projects: int = 0
    products: int = 0
    keys: int = 0
    revoked: int = 0
    #: Keys already imported by an earlier run (found by their lookup): left alone.
    skipped: int = 0


async def from_apikeys_platform(client: APIKeyClient, url: str) -> ImportReport:
    """Import every organization, project, product, link and key of the
    apikeys-platform database at ``url`` (read only). Idempotent: names map onto
    existing ones, and a key whose lookup is already imported is skipped."""
    report = ImportReport()
    engine = create_async_engine(normalize_url(url))
    try:
        async with engine.connect() as conn:
            orgs = (await conn.execute(select(_orgs))).all()
            projects = (await conn.execute(select(_projects))).all()
            products = (await conn.execute(select(_products))).all()
            links = (await conn.execute(select(_links))).all()
            keys = (await conn.execute(select(_keys))).all()
    finally:
        await engine.dispose()

    org_ids: dict[str, str] = {}
    for org in orgs:
        ours, created = await client.get_or_create_organization(org.name)
        org_ids[str(org.id)] = ours.id
        report.organizations += created
    project_ids, report.projects = await _named(client.get_or_create_project, projects, org_ids)
    product_ids, report.products = await _named(client.get_or_create_product, products, org_ids)
    for link in links:
        await client.add_product_to_project(
            product_ids[str(link.product_id)], project_ids[str(link.project_id)]
        )
    done = set(await client._db.read(statements.existing_lookups, imports.APIKEYS))
    for key in keys:
        if imports.lookup(imports.APIKEYS, key.key_prefix) in done:
            report.skipped += 1
            continue
        meta = _meta(key.metadata)
        limit = meta.get("rate_limit")
        imported = await client.import_key(
            org_ids[str(key.org_id)],
            scheme=imports.APIKEYS,
            hash=key.key_hash,
            prefix=key.key_prefix,
            start=key.key_prefix,
            project_id=project_ids.get(str(key.project_id)) if key.project_id else None,
            product_id=product_ids.get(str(key.product_id)) if key.product_id else None,
            name=meta.get("name") or "",
            scopes=meta.get("scopes") or [],
            expires_at=_when(meta.get("expires_at")),
            metadata={
                "imported_from": "apikeys-platform",
                "id": str(key.id),
                **(meta.get("custom") or {}),
            },
            rate_limits=[RateLimit(int(limit["requests"]), limit.get("window", "minute"))]
            if limit
            else [],
        )
        report.keys += 1
        if key.revoked_at is not None:
            await client.revoke_key(imported.id)
            report.revoked += 1
    return report


async def _named(
    get_or_create: Callable[[str, str], Awaitable[tuple[Any, bool]]],
    found: Sequence[Any],
    org_ids: dict[str, str],
) -> tuple[dict[str, str], int]:
    """Projects or products by name in their organizations: {their id: ours}, and
    how many were created."""
    ours: dict[str, str] = {}
    created = 0
    for row in found:
        mine, made = await get_or_create(org_ids[str(row.org_id)], row.name)
        ours[str(row.id)] = mine.id
        created += made
    return ours, created


def _meta(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        value = json.loads(value)
    return value if isinstance(value, dict) else {}


def _when(value: Any) -> datetime | None:
    if value is None:
        return None
    when = datetime.fromisoformat(value) if isinstance(value, str) else value
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
