"""Correctness across real processes sharing one database."""

import multiprocessing
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import pytest

from keycap import APIKeyClient
from tests import _workers
from tests.conftest import REPORT

PROCESSES = 4

pytestmark = pytest.mark.concurrency


def _pool() -> ProcessPoolExecutor:
    return ProcessPoolExecutor(PROCESSES, mp_context=multiprocessing.get_context("spawn"))


async def test_use_count_is_exact_under_500_concurrent_validations_from_4_processes(
    client: APIKeyClient, db_url: str, backend: str
) -> None:
    org = (await client.create_organization("A")).id
    issued = await client.create_key(org)
    per_process = 125
    with _pool() as pool:
        futures = [
            pool.submit(_workers.validate_many, db_url, issued.plaintext, per_process)
            for _ in range(PROCESSES)
        ]
        outcomes = sum((Counter(f.result()) for f in futures), Counter())
    stored = await client.get_key(issued.id)
    REPORT.append(
        f"{backend}: {PROCESSES}x{per_process} concurrent validations -> "
        f"accepted={outcomes['ok']}, other={dict(outcomes - Counter(ok=outcomes['ok']))}, "
        f"use_count={stored.use_count}"
    )
    assert outcomes == Counter(ok=PROCESSES * per_process)
    assert stored.use_count == PROCESSES * per_process


async def test_get_or_create_from_4_processes_creates_exactly_once(
    client: APIKeyClient, db_url: str, backend: str
) -> None:
    with _pool() as pool:
        futures = [
            pool.submit(_workers.get_or_create_many, db_url, "Contended", 25)
            for _ in range(PROCESSES)
        ]
        results = [r for f in futures for r in f.result()]
    created = [org_id for org_id, was_created in results if was_created]
    REPORT.append(
        f"{backend}: {len(results)} concurrent get_or_create -> created={len(created)}, "
        f"distinct ids={len({org_id for org_id, _ in results})}"
    )
    assert len(created) == 1
    assert {org_id for org_id, _ in results} == set(created)
    assert len(await client.list_organizations()) == 1
