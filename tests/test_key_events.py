"""on_key_event: a key's lifecycle, told after each change commits."""

from __future__ import annotations

import logging

import pytest

from keycap import APIKeyClient, KeyEvent, NotFoundError
from tests.conftest import SECRET, FakeClock


async def test_every_change_to_a_key_is_told_once_after_it_commits(
    db_url: str, clock: FakeClock, client: APIKeyClient
) -> None:
    told: list[KeyEvent] = []

    async def hook(event: KeyEvent) -> None:
        # After commit: the change is visible to anyone when the hook runs.
        if event.kind != "deleted":
            assert (await client.get_key(event.key_id)).updated_at == event.key.updated_at
        told.append(event)

    async with APIKeyClient(
        db_url, signing_secret=SECRET, clock=clock, on_key_event=hook
    ) as watched:
        org = (await watched.create_organization("A")).id
        issued = await watched.create_key(org, name="agent")
        await watched.update_key(issued.id, name="renamed")
        rolled = await watched.roll_key(issued.id, grace="1h")
        await watched.disable_key(issued.id)
        await watched.enable_key(issued.id)
        await watched.revoke_key(issued.id)
        await watched.delete_key(issued.id)
        with pytest.raises(NotFoundError):
            await watched.update_key(issued.id, name="gone")  # nothing changed: no event
    kinds = ["created", "updated", "rolled", "disabled", "enabled", "revoked", "deleted"]
    assert [e.kind for e in told] == kinds
    assert {(e.key_id, e.org_id) for e in told} == {(issued.id, org)}
    assert told[1].key.name == "renamed" and told[5].key.revoked_at is not None
    text = repr(told) + "".join(e.model_dump_json() for e in told)
    assert issued.plaintext not in text and rolled.plaintext not in text


async def test_a_failing_hook_is_logged_and_the_change_stands(
    db_url: str, clock: FakeClock, client: APIKeyClient, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(event: KeyEvent) -> None:
        raise RuntimeError("the audit service is down")

    async with APIKeyClient(
        db_url, signing_secret=SECRET, clock=clock, on_key_event=broken
    ) as watched:
        org = (await watched.create_organization("A")).id
        with caplog.at_level(logging.ERROR, logger="keycap"):
            issued = await watched.create_key(org)
            await watched.revoke_key(issued.id)
    assert (await client.get_key(issued.id)).revoked_at is not None
    assert caplog.text.count("on_key_event failed") == 2
