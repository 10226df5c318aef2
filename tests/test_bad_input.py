"""No exception other than a KeycapError escapes a public method, whatever the input."""

from datetime import datetime, timedelta

import pytest

from keycap import (
    APIKeyClient,
    InvalidArgumentError,
    InvalidKeyError,
    KeycapError,
    NotFoundError,
)

HUGE = "x" * 10_000_000
BAD_VALUES = [
    None,
    b"bytes",
    "nul\x00byte",
    "\ud800lone",
    "",
    " ",
    HUGE,
    42,
    1.5,
    ["list"],
    {"d": 1},
    object(),
]
NOT_NONE = [v for v in BAD_VALUES if v is not None]
BAD_IDS = [
    *NOT_NONE,
    "org_",
    "key_" + "A" * 11,
    "key_" + "A" * 13,
    "org_AAAAAAAAAAAAAAA!",
    "sk_live_x",
]


@pytest.mark.parametrize("value", [*BAD_VALUES, "ünïcødé", "sk_live_" + "é" * 51], ids=repr)
async def test_validate_key_garbage_is_an_invalid_key(client: APIKeyClient, value: object) -> None:
    with pytest.raises(InvalidKeyError) as info:
        await client.validate_key(value)  # type: ignore[arg-type]
    assert str(info.value) == "invalid API key"


@pytest.mark.parametrize(
    "value", [None, b"x", "\ud800", "a" * 201, "", "tab\there", "\x00"], ids=repr
)
async def test_a_bad_name_is_refused(client: APIKeyClient, value: object) -> None:
    with pytest.raises(InvalidArgumentError):
        await client.create_organization(value)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        await client.get_or_create_organization(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("Ünïcødé GmbH", id="accents"),
        pytest.param("株式会社", id="cjk"),
        pytest.param("emoji 🚀", id="emoji"),
        pytest.param("a" * 200, id="200-characters"),
    ],
)
async def test_a_non_ascii_or_long_name_round_trips(client: APIKeyClient, name: str) -> None:
    org = await client.create_organization(name)
    assert (await client.get_organization(org.id)).name == name


@pytest.mark.parametrize("value", BAD_IDS, ids=repr)
async def test_a_malformed_id_is_refused_everywhere(client: APIKeyClient, value: object) -> None:
    # (None is not here: for optional filters it means "no filter".)
    calls = [
        lambda: client.get_organization(value),  # type: ignore[arg-type]
        lambda: client.get_project(value),  # type: ignore[arg-type]
        lambda: client.get_product(value),  # type: ignore[arg-type]
        lambda: client.get_key(value),  # type: ignore[arg-type]
        lambda: client.revoke_key(value),  # type: ignore[arg-type]
        lambda: client.disable_key(value),  # type: ignore[arg-type]
        lambda: client.enable_key(value),  # type: ignore[arg-type]
        lambda: client.delete_key(value),  # type: ignore[arg-type]
        lambda: client.update_key(value, name="x"),  # type: ignore[arg-type]
        lambda: client.delete_organization(value),  # type: ignore[arg-type]
        lambda: client.create_project(value, "p"),  # type: ignore[arg-type]
        lambda: client.create_key(value),  # type: ignore[arg-type]
        lambda: client.list_keys(org_id=value),  # type: ignore[arg-type]
        lambda: client.list_projects(value),  # type: ignore[arg-type]
        lambda: client.add_product_to_project(value, value),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises((NotFoundError, InvalidArgumentError)) as info:
            await call()
        # A malformed id is never echoed (it might be a pasted plaintext key).
        if isinstance(value, str) and len(value) > 40:
            assert value not in str(info.value)


@pytest.mark.parametrize("value", [*NOT_NONE, "org_AAAAAAAAAAAAAAAA"], ids=repr)
async def test_bad_asked_for_ids_fail_the_rule_not_the_driver(
    client: APIKeyClient, value: object
) -> None:
    issued = await client.create_key((await client.create_organization("A")).id)
    for field in ("org_id", "project_id", "product_id"):
        with pytest.raises(KeycapError):
            await client.validate_key(issued.plaintext, **{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"expires_at": datetime(2030, 1, 1)},  # naive
        {"expires_at": "2030-01-01"},
        {"expires_in": "-1d"},
        {"expires_in": "0s"},
        {"expires_in": "1y"},
        {"expires_in": "99999999d"},
        {"expires_in": timedelta(days=-1)},
        {"expires_in": timedelta(days=10**6)},
        {"expires_in": HUGE},
        {"expires_in": "1d", "expires_at": datetime(2099, 1, 1).astimezone()},
        {"scopes": "chat:write"},
        {"scopes": [None]},
        {"scopes": ["\x00"]},
        {"scopes": [HUGE]},
        {"metadata": "not a dict"},
        {"metadata": {"x": float("nan")}},
        {"metadata": {"x": object()}},
        {"metadata": {"x": "\ud800"}},
        {"metadata": {"x": HUGE}},
        {"name": None},
        {"name": HUGE},
        {"delegated_by": ""},
        {"delegated_by": b"x"},
        {"project_id": 5},
        {"product_id": b"prod"},
    ],
    ids=lambda kw: ",".join(f"{k}={str(v)[:20]!r}" for k, v in kw.items()),
)
async def test_bad_create_key_arguments_change_nothing(
    client: APIKeyClient, kwargs: dict[str, object]
) -> None:
    org = (await client.create_organization("A")).id
    with pytest.raises(InvalidArgumentError) as info:
        await client.create_key(org, **kwargs)  # type: ignore[arg-type]
    assert len(str(info.value)) < 300
    assert await client.list_keys() == []


async def test_naive_datetime_message_is_clear(client: APIKeyClient) -> None:
    org = (await client.create_organization("A")).id
    with pytest.raises(InvalidArgumentError, match="timezone-aware") as info:
        await client.create_key(org, expires_at=datetime(2030, 1, 1))
    assert info.value.field == "expires_at"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"required_scopes": "chat:write"},
        {"required_scopes": [None]},
        {"required_scopes": ["bad scope"]},
        {"track_usage": "yes"},
    ],
)
async def test_bad_validate_arguments_are_refused(
    client: APIKeyClient, kwargs: dict[str, object]
) -> None:
    issued = await client.create_key((await client.create_organization("A")).id)
    with pytest.raises(InvalidArgumentError):
        await client.validate_key(issued.plaintext, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs", [{"limit": 0}, {"limit": 1001}, {"limit": "10"}, {"offset": -1}, {"limit": True}]
)
async def test_bad_paging_is_refused(client: APIKeyClient, kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidArgumentError):
        await client.list_keys(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        await client.list_organizations(**kwargs)  # type: ignore[arg-type]
