"""The grant rule, step by step, with no database and a fixed clock."""

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from keycap._errors import (
    DisabledKeyError,
    ExpiredKeyError,
    ForbiddenError,
    InsufficientScopeError,
    InvalidKeyError,
    RevokedKeyError,
)
from keycap._rules.policy import KeyFacts, Requirement, check

NOW = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)
ORG, OTHER_ORG = "org_A", "org_B"
GOOD = KeyFacts(
    key_id="key_x",
    digest_ok=True,
    org_id=ORG,
    project_id=None,
    product_id=None,
    scopes=("chat:*",),
    expires_at=None,
    revoked_at=None,
    disabled_at=None,
)


def test_a_good_key_with_no_requirement_passes() -> None:
    check(GOOD, Requirement(), NOW)


def test_wrong_digest_is_invalid_and_carries_no_key_id() -> None:
    with pytest.raises(InvalidKeyError) as info:
        check(replace(GOOD, digest_ok=False), Requirement(), NOW)
    assert info.value.key_id is None


def test_revoked_disabled_expired_in_that_order() -> None:
    t = NOW - timedelta(days=1)
    all_bad = replace(GOOD, revoked_at=t, disabled_at=t, expires_at=t)
    with pytest.raises(RevokedKeyError) as revoked:
        check(all_bad, Requirement(), NOW)
    assert revoked.value.revoked_at == t
    with pytest.raises(DisabledKeyError) as disabled:
        check(replace(all_bad, revoked_at=None), Requirement(), NOW)
    assert disabled.value.disabled_at == t
    with pytest.raises(ExpiredKeyError) as expired:
        check(replace(all_bad, revoked_at=None, disabled_at=None), Requirement(), NOW)
    assert expired.value.expired_at == t


def test_expiry_boundary_is_exclusive() -> None:
    with pytest.raises(ExpiredKeyError):
        check(replace(GOOD, expires_at=NOW), Requirement(), NOW)
    check(replace(GOOD, expires_at=NOW + timedelta(microseconds=1)), Requirement(), NOW)


def test_a_key_is_valid_only_for_its_organization() -> None:
    check(GOOD, Requirement(org_id=ORG), NOW)
    with pytest.raises(ForbiddenError) as info:
        check(GOOD, Requirement(org_id=OTHER_ORG), NOW)
    assert info.value.reason == "organization"


def test_project_key_only_for_its_project() -> None:
    key = replace(GOOD, project_id="proj_1", asked_project_org_id=ORG)
    check(key, Requirement(project_id="proj_1"), NOW)
    with pytest.raises(ForbiddenError, match="project"):
        check(key, Requirement(project_id="proj_2"), NOW)


def test_org_wide_key_for_projects_of_its_org_only() -> None:
    check(replace(GOOD, asked_project_org_id=ORG), Requirement(project_id="proj_1"), NOW)
    with pytest.raises(ForbiddenError):
        check(replace(GOOD, asked_project_org_id=OTHER_ORG), Requirement(project_id="p"), NOW)
    with pytest.raises(ForbiddenError):  # the project does not exist
        check(replace(GOOD, asked_project_org_id=None), Requirement(project_id="p"), NOW)


def test_org_wide_key_and_products() -> None:
    check(replace(GOOD, asked_product_org_id=ORG), Requirement(product_id="prod_1"), NOW)
    # The peers' bug: a key without a product passed for another organization's product.
    with pytest.raises(ForbiddenError) as info:
        check(replace(GOOD, asked_product_org_id=OTHER_ORG), Requirement(product_id="p"), NOW)
    assert info.value.reason == "product"
    with pytest.raises(ForbiddenError):
        check(replace(GOOD, asked_product_org_id=None), Requirement(product_id="p"), NOW)


def test_project_key_needs_the_product_linked_to_its_project() -> None:
    key = replace(GOOD, project_id="proj_1", asked_product_org_id=ORG)
    check(replace(key, asked_product_linked=True), Requirement(product_id="prod_1"), NOW)
    with pytest.raises(ForbiddenError, match="product"):
        check(replace(key, asked_product_linked=False), Requirement(product_id="prod_1"), NOW)


def test_product_key_only_for_its_product() -> None:
    key = replace(GOOD, product_id="prod_1", asked_product_org_id=ORG)
    check(key, Requirement(product_id="prod_1"), NOW)
    with pytest.raises(ForbiddenError):
        check(key, Requirement(product_id="prod_2"), NOW)


def test_scopes_are_checked_last_and_report_what_is_missing() -> None:
    with pytest.raises(InsufficientScopeError) as info:
        check(GOOD, Requirement(scopes=(("billing:read",), ("chat:write",), ("admin",))), NOW)
    assert info.value.missing_scopes == ("billing:read", "admin")
    with pytest.raises(ForbiddenError):  # forbidden wins over scopes
        check(GOOD, Requirement(org_id=OTHER_ORG, scopes=(("billing:read",),)), NOW)


def test_empty_grant_list_grants_nothing_but_passes_no_requirement() -> None:
    key = replace(GOOD, scopes=())
    check(key, Requirement(), NOW)
    with pytest.raises(InsufficientScopeError):
        check(key, Requirement(scopes=(("chat:write",),)), NOW)
