"""Work run in separate processes by the concurrency tests (must be importable by spawn)."""

from __future__ import annotations

import asyncio
from collections import Counter

from keycap import APIKeyClient, KeycapError
from tests.conftest import SECRET


def validate_many(url: str, plaintext: str, calls: int) -> dict[str, int]:
    async def run() -> dict[str, int]:
        outcomes: Counter[str] = Counter()
        async with APIKeyClient(url, signing_secret=SECRET) as client:

            async def one() -> None:
                try:
                    await client.validate_key(plaintext)
                    outcomes["ok"] += 1
                except KeycapError as error:
                    outcomes[error.code] += 1

            await asyncio.gather(*(one() for _ in range(calls)))
        return dict(outcomes)

    return asyncio.run(run())


def get_or_create_many(url: str, name: str, calls: int) -> list[tuple[str, bool]]:
    async def run() -> list[tuple[str, bool]]:
        async with APIKeyClient(url, signing_secret=SECRET) as client:
            results = await asyncio.gather(
                *(client.get_or_create_organization(name) for _ in range(calls))
            )
        return [(org.id, created) for org, created in results]

    return asyncio.run(run())
