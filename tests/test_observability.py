"""Logs, and OpenTelemetry spans and metrics, for the hot calls."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from decimal import Decimal as D
from typing import Any

import pytest
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from keycap import (
    APIKeyClient,
    Budget,
    ConfigurationError,
    DatabaseUnavailableError,
    RevokedKeyError,
)
from tests.conftest import SECRET, FakeClock

_SPANS = InMemorySpanExporter()
_METRICS = InMemoryMetricReader()


@pytest.fixture(scope="session", autouse=True)
def _providers() -> Iterator[None]:
    """The app's OpenTelemetry SDK, as an app would configure it: once per process
    (a reader belongs to one provider; the global providers are set once)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_SPANS))
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[_METRICS]))
    yield


def _points(name: str) -> list[Any]:
    data = _METRICS.get_metrics_data()
    assert data is not None
    return [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


async def test_a_refusal_is_logged_at_debug_with_its_code_and_never_the_key(
    client: APIKeyClient, caplog: pytest.LogCaptureFixture
) -> None:
    issued = await client.create_key((await client.create_organization("A")).id)
    await client.revoke_key(issued.id)
    with caplog.at_level(logging.DEBUG, logger="keycap"), pytest.raises(RevokedKeyError):
        await client.validate_key(issued.plaintext)
    [record] = [r for r in caplog.records if r.name == "keycap.refusals"]
    assert record.levelno == logging.DEBUG
    assert "revoked_key" in record.getMessage() and issued.id in record.getMessage()
    assert issued.plaintext not in caplog.text


async def test_a_key_passed_where_an_id_goes_is_not_logged(
    client: APIKeyClient, caplog: pytest.LogCaptureFixture
) -> None:
    issued = await client.create_key((await client.create_organization("A")).id)
    with caplog.at_level(logging.DEBUG, logger="keycap"), pytest.raises(Exception):
        await client.charge(issued.plaintext, D(1))  # a mistake: the secret, not the id
    assert issued.plaintext not in caplog.text


async def test_a_database_failure_is_logged_as_a_warning_without_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = "postgresql://keycap:s3cret-pw@127.0.0.1:1/keycap"
    async with APIKeyClient(url, signing_secret=SECRET, timeout=2) as unreachable:
        with (
            caplog.at_level(logging.WARNING, logger="keycap"),
            pytest.raises(DatabaseUnavailableError),
        ):
            await unreachable.charge("key_AAAAAAAAAAAA", D(1))
    [record] = [r for r in caplog.records if r.name == "keycap.database"]
    assert record.levelno == logging.WARNING and "charge failed" in record.getMessage()
    assert "s3cret-pw" not in caplog.text


async def test_hot_calls_are_traced_and_counted_with_their_outcome(
    db_url: str, clock: FakeClock
) -> None:
    async with APIKeyClient(
        db_url, signing_secret=SECRET, clock=clock, opentelemetry=True
    ) as client:
        org = (await client.create_organization("otel")).id
        issued = await client.create_key(org, budgets=[Budget(D(5))])
        _SPANS.clear()
        await client.validate_key(issued.plaintext, cost=D("1.50"))
        hold = await client.reserve(issued.id, D(1))
        await client.settle(hold.id, D("0.25"))
        await client.revoke_key(issued.id)
        with pytest.raises(RevokedKeyError):
            await client.validate_key(issued.plaintext)
        spans = [
            (s.name, (s.attributes or {}).get("keycap.outcome"))
            for s in _SPANS.get_finished_spans()
        ]
        assert spans == [
            ("keycap.validate", "ok"),
            ("keycap.reserve", "ok"),
            ("keycap.settle", "ok"),
            ("keycap.validate", "revoked_key"),
        ]
        assert _SPANS.get_finished_spans()[0].attributes["keycap.key_id"] == issued.id  # type: ignore[index]
        calls = {
            (p.attributes["keycap.operation"], p.attributes["keycap.outcome"]): p.value
            for p in _points("keycap.calls")
        }
        assert calls[("validate", "revoked_key")] >= 1 and calls[("settle", "ok")] >= 1
        assert any(p.count >= 1 for p in _points("keycap.call.duration"))
        remaining = [
            p.value
            for p in _points("keycap.budget.remaining")
            if p.attributes["keycap.budget_id"] == hold.budgets[0].id
        ]
        assert remaining == [5 - 1.50 - 0.25]


def test_opentelemetry_without_its_package_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(ConfigurationError, match=r"keycap\[otel\]"):
        APIKeyClient("sqlite://", signing_secret=SECRET, opentelemetry=True)
