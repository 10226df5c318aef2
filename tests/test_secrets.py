"""Plaintext keys and signing secrets never reach the database, a repr, a log or an error."""

import logging
from typing import Any

import pytest
from sqlalchemy import select

from keycap import APIKeyClient, InvalidKeyError, KeycapError
from keycap._db.schema import metadata
from tests.conftest import SECRET


async def _all_stored_text(client: APIKeyClient) -> str:
    out = []
    async with client.engine.begin() as conn:
        for table in metadata.sorted_tables:
            for row in (await conn.execute(select(table))).all():
                out.extend(repr(v) for v in row)
    return "\n".join(out)


async def test_no_plaintext_or_secret_in_any_row(client: APIKeyClient) -> None:
    org = (await client.create_organization("A")).id
    issued = [await client.create_key(org, name=f"k{i}", metadata={"i": i}) for i in range(20)]
    for item in issued:
        await client.validate_key(item.plaintext)
    stored = await _all_stored_text(client)
    assert SECRET not in stored
    for item in issued:
        secret_part = item.plaintext[len("sk_live_") + 12 :]
        assert item.plaintext not in stored
        assert secret_part[:-6] not in stored  # the random part, without the checksum
        assert secret_part[:12] not in stored


async def test_reprs_and_lists_mask_the_plaintext(client: APIKeyClient) -> None:
    org = (await client.create_organization("A")).id
    issued = await client.create_key(org)
    for text in (
        repr(issued),
        str(issued),
        repr(issued.key),
        repr(await client.list_keys()),
        repr(client),
    ):
        assert issued.plaintext not in text
        assert SECRET not in text
    assert "plaintext" not in repr(issued)


async def test_errors_and_logs_never_contain_the_plaintext(
    client: APIKeyClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    org = (await client.create_organization("A")).id
    issued = await client.create_key(org, expires_in="1h")
    errors: list[KeycapError] = []
    for attempt in [
        lambda: client.validate_key(issued.plaintext, required_scopes=["x"]),
        # A different last character: the checksum no longer matches.
        lambda: client.validate_key(
            issued.plaintext[:-1] + ("1" if issued.plaintext[-1] == "0" else "0")
        ),
        lambda: client.get_key(issued.plaintext),
        lambda: client.get_organization(issued.plaintext),
        lambda: client.create_key(org, name=issued.plaintext * 10),
    ]:
        with pytest.raises(KeycapError) as info:
            await attempt()
        errors.append(info.value)
    await client.revoke_key(issued.id)
    with pytest.raises(KeycapError) as revoked:
        await client.validate_key(issued.plaintext)
    errors.append(revoked.value)
    for error in errors:
        for text in (str(error), repr(error), repr(error.to_dict())):
            assert issued.plaintext not in text
            assert issued.plaintext[20:40] not in text
    assert issued.plaintext not in caplog.text
    assert SECRET not in caplog.text


async def test_client_repr_hides_the_database_password() -> None:
    client = APIKeyClient("postgresql://u:hunter2hunter2@127.0.0.1/x", signing_secret=SECRET)
    assert "hunter2hunter2" not in repr(client)
    await client.aclose()


def test_invalid_key_error_says_nothing_about_the_input() -> None:
    error: Any = InvalidKeyError()
    assert error.to_dict() == {"code": "invalid_key", "message": "invalid API key"}
