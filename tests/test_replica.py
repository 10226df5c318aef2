"""Read-path validations from a real streaming replica of PostgreSQL.

scripts/databases starts the replica (pg_basebackup, port 5433) and exports
KEYCAP_TEST_REPLICA_URL. The replica is the whole primary cluster, so its
keycap_test database is the primary's, as of its replication lag.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from keycap import APIKeyClient, ConfigurationError, RevokedKeyError
from keycap._db.engine import create_engine
from tests.conftest import DATABASES, REPORT, SECRET, server_url

_REPLICA = os.environ.get("KEYCAP_TEST_REPLICA_URL")
if "postgresql" in DATABASES and not _REPLICA and os.environ.get("KEYCAP_REQUIRE_ALL_DATABASES"):
    raise pytest.UsageError("KEYCAP_TEST_REPLICA_URL is not set; run scripts/test")
pytestmark = pytest.mark.skipif(
    "postgresql" not in DATABASES or not _REPLICA, reason="no PostgreSQL replica configured"
)


def _replica_url() -> str:
    assert _REPLICA is not None
    return f"{_REPLICA.rstrip('/')}/keycap_test"


@contextmanager
def _statements(engine: AsyncEngine) -> Iterator[list[str]]:
    seen: list[str] = []

    def before(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", before)


@asynccontextmanager
async def _clients(tmp_path: Path) -> AsyncIterator[tuple[APIKeyClient, APIKeyClient, AsyncEngine]]:
    """A client on the primary alone, one with the replica, and the replica's engine."""
    primary_url = server_url("postgresql", "keycap_test", tmp_path)
    replica = create_engine(_replica_url())
    primary = APIKeyClient(primary_url, signing_secret=SECRET)
    both = APIKeyClient(primary_url, signing_secret=SECRET, read_replica=replica)
    try:
        await primary.create_tables()
        yield primary, both, replica
    finally:
        await both.aclose()
        await primary.aclose()
        await replica.dispose()


async def _replicated(replica: AsyncEngine, key_id: str, revoked: bool = False) -> float:
    """Wait until the replica has the key (revoked, if asked); the seconds it took."""
    started = time.monotonic()
    column = "revoked_at IS NOT NULL" if revoked else "TRUE"
    while time.monotonic() - started < 10:
        async with replica.connect() as conn:
            found = await conn.scalar(
                text(f"SELECT {column} FROM keycap_keys WHERE id = :id"), {"id": key_id}
            )
        if found:
            return time.monotonic() - started
        await asyncio.sleep(0.005)
    raise AssertionError("the replica did not catch up within 10 s")


async def test_a_read_path_validation_is_answered_by_the_replica(tmp_path: Path) -> None:
    async with _clients(tmp_path) as (primary, both, replica):
        org = (await primary.create_organization(f"r-{uuid.uuid4()}")).id
        issued = await primary.create_key(org, scopes=["chat:write"])
        await _replicated(replica, issued.id)
        with _statements(replica) as on_replica, _statements(both.engine) as on_primary:
            key = await both.validate_key(
                issued.plaintext, required_scopes=["chat:write"], track_usage=False
            )
        assert key.id == issued.id
        assert (len(on_replica), len(on_primary)) == (1, 0)
        # Tracked, metered and every other call: the primary only.
        with _statements(replica) as on_replica:
            await both.validate_key(issued.plaintext)
            await both.validate_key(issued.plaintext, cost=1)
            await both.get_key(issued.id)
        assert on_replica == []


async def test_what_the_replica_refuses_or_lacks_is_decided_by_the_primary(
    tmp_path: Path,
) -> None:
    async with _clients(tmp_path) as (primary, both, replica):
        org = (await primary.create_organization(f"r-{uuid.uuid4()}")).id
        async with replica.connect() as conn:
            await conn.execute(text("SELECT pg_wal_replay_pause()"))
        try:
            # Created while the replica stands still: it has never heard of the key.
            issued = await primary.create_key(org)
            with _statements(both.engine) as on_primary:
                await both.validate_key(issued.plaintext, track_usage=False)
            assert len(on_primary) == 1
        finally:
            async with replica.connect() as conn:
                await conn.execute(text("SELECT pg_wal_replay_resume()"))


async def test_a_revocation_is_seen_on_the_replica_within_its_lag(tmp_path: Path) -> None:
    async with _clients(tmp_path) as (primary, both, replica):
        org = (await primary.create_organization(f"r-{uuid.uuid4()}")).id
        issued = await primary.create_key(org)
        await _replicated(replica, issued.id)
        async with replica.connect() as conn:
            await conn.execute(text("SELECT pg_wal_replay_pause()"))
        try:
            await primary.revoke_key(issued.id)
            # The documented bound: until the replica replays the revocation, the
            # read path still accepts the key.
            await both.validate_key(issued.plaintext, track_usage=False)
        finally:
            async with replica.connect() as conn:
                await conn.execute(text("SELECT pg_wal_replay_resume()"))
        await _replicated(replica, issued.id, revoked=True)
        with pytest.raises(RevokedKeyError):
            await both.validate_key(issued.plaintext, track_usage=False)
        # Replication lag with replay running: a revocation, then polling the replica.
        lags = []
        for _ in range(20):
            again = await primary.create_key(org)
            await _replicated(replica, again.id)
            await primary.revoke_key(again.id)
            lags.append(await _replicated(replica, again.id, revoked=True))
        lags.sort()
        REPORT.append(
            f"replica: a revocation seen on the replica after p50 {lags[10] * 1000:.1f} ms, "
            f"max {lags[-1] * 1000:.1f} ms (20 revocations, streaming on this machine)"
        )
        assert lags[-1] < 5


async def test_an_unreachable_replica_falls_back_to_the_primary(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    primary_url = server_url("postgresql", "keycap_test", tmp_path)
    async with (
        APIKeyClient(primary_url, signing_secret=SECRET) as primary,
        APIKeyClient(
            primary_url,
            signing_secret=SECRET,
            read_replica="postgresql://keycap:keycap@127.0.0.1:1/keycap_test",
            timeout=2,
        ) as both,
    ):
        org = (await primary.create_organization(f"r-{uuid.uuid4()}")).id
        issued = await primary.create_key(org)
        with caplog.at_level(logging.WARNING, logger="keycap"):
            assert (await both.validate_key(issued.plaintext, track_usage=False)).id == issued.id
        assert "read replica unavailable" in caplog.text
        assert "keycap:keycap" not in caplog.text  # no password in the log


def test_a_replica_of_another_kind_of_database_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="same kind"):
        APIKeyClient(
            server_url("postgresql", "keycap_test", tmp_path),
            signing_secret=SECRET,
            read_replica=f"sqlite:///{tmp_path / 'x.db'}",
        )
