"""Rows to result models, built without re-validation (the database is the source)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Row

from keycap._db.build import AnyRow
from keycap._db.schema import ANCESTORS
from keycap._models import (
    AccessRequest,
    AccessTerms,
    APIKey,
    AuditEntry,
    Identity,
    Organization,
    Product,
    Project,
)
from keycap._rules import access, ips, scopes
from keycap._rules.policy import KeyFacts

Source = AnyRow | Mapping[str, Any]


def as_mapping(row: Source) -> Mapping[str, Any]:
    """A row's columns by name, whether it is a ``Row`` or already a mapping."""
    return row._mapping if isinstance(row, Row) else row  # type: ignore[return-value]


def to_organization(row: Source) -> Organization:
    m = as_mapping(row)
    allowed = m.get("allowed_scopes")
    return Organization.model_construct(
        id=m["id"],
        name=m["name"],
        created_at=m["created_at"],
        allowed_scopes=None if allowed is None else scopes.decode(allowed),
    )


def to_project(row: Source) -> Project:
    m = as_mapping(row)
    return Project.model_construct(
        id=m["id"], org_id=m["org_id"], name=m["name"], created_at=m["created_at"]
    )


def to_product(row: Source) -> Product:
    m = as_mapping(row)
    return Product.model_construct(
        id=m["id"], org_id=m["org_id"], name=m["name"], created_at=m["created_at"]
    )


def to_key(row: Source, **override: Any) -> APIKey:
    """A key from its row; ``scopes`` may be the stored string or already a tuple."""
    m = as_mapping(row)
    stored_scopes = m["scopes"]
    return APIKey.model_construct(
        id=m["id"],
        org_id=m["org_id"],
        project_id=m["project_id"],
        product_id=m["product_id"],
        name=m["name"],
        start=m["start"],
        scopes=scopes.decode(stored_scopes) if isinstance(stored_scopes, str) else stored_scopes,
        metadata=m["metadata"],
        delegated_by=m["delegated_by"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        expires_at=m["expires_at"],
        revoked_at=m["revoked_at"],
        disabled_at=m["disabled_at"],
        last_used_at=override.get("last_used_at", m["last_used_at"]),
        use_count=override.get("use_count", m["use_count"]),
        max_uses=m.get("max_uses"),
        allowed_ips=_ranges(m.get("allowed_ips")),
        identity_id=m.get("identity_id"),
        ancestors=tuple(a for name in ANCESTORS if (a := m.get(name)) is not None),
        rate_limit=override.get("rate_limit"),
        charge=override.get("charge"),
    )


def to_facts(row: Row[Any], digest_ok: bool) -> KeyFacts:
    m = row._mapping
    return KeyFacts(
        key_id=m["id"],
        digest_ok=digest_ok,
        org_id=m["org_id"],
        project_id=m["project_id"],
        product_id=m["product_id"],
        scopes=scopes.decode(m["scopes"]),
        expires_at=m["expires_at"],
        revoked_at=m["revoked_at"],
        disabled_at=m["disabled_at"],
        asked_project_org_id=m.get("asked_project_org_id"),
        asked_product_org_id=m.get("asked_product_org_id"),
        asked_product_linked=bool(m.get("asked_product_linked")),
        asked_product_id=m.get("asked_product_id"),
        allowed_ips=_ranges(m.get("allowed_ips")),
        identity_disabled_at=m.get("identity_disabled_at"),
        identity_allowed_ips=_ranges(m.get("identity_allowed_ips")),
        ancestors_revoked_at=m.get("ancestors_revoked_at"),
        ancestors_disabled_at=m.get("ancestors_disabled_at"),
    )


def _ranges(stored: str | tuple[str, ...] | None) -> tuple[str, ...] | None:
    """A key's IP ranges from their stored form (or already a tuple); None: any."""
    return ips.decode(stored) if isinstance(stored, str) else stored


def to_audit_entry(row: Source) -> AuditEntry:
    m = as_mapping(row)
    return AuditEntry.model_construct(
        id=m["id"],
        org_id=m["org_id"],
        at=m["at"],
        actor=m["actor"],
        action=m["action"],
        subject_id=m["subject_id"],
        before=m["before"],
        after=m["after"],
    )


def to_identity(row: Source) -> Identity:
    m = as_mapping(row)
    return Identity.model_construct(
        id=m["id"],
        org_id=m["org_id"],
        external_id=m["external_id"],
        name=m["name"],
        metadata=m["metadata"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        disabled_at=m["disabled_at"],
        allowed_ips=_ranges(m.get("allowed_ips")),
    )


def to_access_request(row: Source, now: datetime) -> AccessRequest:
    """An access request as of ``now`` (a pending one past its time: expired)."""
    m = as_mapping(row)
    granted = m["granted"]
    return AccessRequest.model_construct(
        id=m["id"],
        org_id=m["org_id"],
        requester=m["requester"],
        reason=m["reason"],
        identity_id=m["identity_id"],
        status=access.status_at(m["status"], m["expires_at"], now),
        asked=_terms(access.Terms.from_json(m["asked"])),
        granted=None if granted is None else _terms(access.Terms.from_json(granted)),
        created_at=m["created_at"],
        expires_at=m["expires_at"],
        decided_at=m["decided_at"],
        decided_by=m["decided_by"],
        decision_reason=m["decision_reason"],
        key_id=m["key_id"],
        claimed_at=m["claimed_at"],
    )


def _terms(terms: access.Terms) -> AccessTerms:
    return AccessTerms.model_construct(
        scopes=terms.scopes,
        project_id=terms.project_id,
        product_id=terms.product_id,
        budgets=terms.budgets,
        expires_in=terms.lifetime,
    )
