"""What keycap tells operators: logs always, OpenTelemetry when asked.

Logs (standard ``logging``, never a key, a secret or a database password):

- ``keycap.refusals``, DEBUG: a call refused (the outcome code, the key id);
- ``keycap.database``, WARNING: a call that failed on the database (its
  message: the driver's words, which HTTP bodies never carry);
- ``keycap.settlements``: see :mod:`keycap._settlements`.

OpenTelemetry (``APIKeyClient(..., opentelemetry=True)``, extra ``otel``): a
span per hot call (``keycap.validate``, ``keycap.charge``, ``keycap.reserve``,
``keycap.settle``, ``keycap.release``) with ``keycap.outcome`` (``ok`` or the
error code), and metrics from the meter ``keycap``: ``keycap.calls`` (by
operation and outcome), ``keycap.call.duration`` (seconds, by operation) and
``keycap.budget.remaining`` (by budget, meter and scope, after each debit).
keycap uses only the OpenTelemetry API; the app configures the SDK and exporters.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from keycap._errors import ConfigurationError, DatabaseError, KeycapError
from keycap._models import APIKey, BudgetStatus, Charge, Hold, Settlement

refusals = logging.getLogger("keycap.refusals")
database = logging.getLogger("keycap.database")

T = TypeVar("T")


class Telemetry:
    """Logs every hot call's failure; with OpenTelemetry, spans and metrics too."""

    def __init__(self, opentelemetry: bool) -> None:
        self._tracer: Any = None
        if not opentelemetry:
            return
        try:
            from opentelemetry import metrics, trace
        except ImportError:
            raise ConfigurationError(
                "opentelemetry=True needs the OpenTelemetry API: pip install 'keycap[otel]'"
            ) from None
        from keycap import __version__

        self._tracer = trace.get_tracer("keycap", __version__)
        self._status = trace.Status
        self._error = trace.StatusCode.ERROR
        meter = metrics.get_meter("keycap", __version__)
        self._calls = meter.create_counter(
            "keycap.calls", unit="{call}", description="keycap calls, by operation and outcome"
        )
        self._duration = meter.create_histogram(
            "keycap.call.duration", unit="s", description="keycap calls' duration"
        )
        self._remaining = meter.create_gauge(
            "keycap.budget.remaining", description="what a budget has left after a debit"
        )

    async def observe(
        self,
        operation: str,
        key_of: Callable[[], str | None],
        call: Callable[[], Awaitable[T]],
    ) -> T:
        """Run ``call``; log its failure, and with OpenTelemetry record it.
        ``key_of()`` names the key (only asked when it is needed)."""
        if self._tracer is None:
            try:
                return await call()
            except KeycapError as error:
                _log(operation, key_of(), error)
                raise
        key_id = key_of()
        started = time.perf_counter()
        outcome = "ok"
        with self._tracer.start_as_current_span(f"keycap.{operation}") as span:
            if key_id is not None:
                span.set_attribute("keycap.key_id", key_id)
            try:
                result = await call()
            except KeycapError as error:
                outcome = error.code
                _log(operation, key_id, error)
                if isinstance(error, DatabaseError):
                    span.set_status(self._status(self._error, error.code))
                raise
            else:
                self._budgets(result)
                return result
            finally:
                span.set_attribute("keycap.outcome", outcome)
                labels = {"keycap.operation": operation, "keycap.outcome": outcome}
                self._calls.add(1, labels)
                self._duration.record(
                    time.perf_counter() - started, {"keycap.operation": operation}
                )

    def _budgets(self, result: object) -> None:
        for budget in _debited(result):
            self._remaining.set(
                float(budget.remaining),  # a metric, not money: the ledger stays exact
                {
                    "keycap.budget_id": budget.id,
                    "keycap.meter": budget.meter,
                    "keycap.scope": budget.scope,
                },
            )


def _debited(result: object) -> tuple[BudgetStatus, ...]:
    if isinstance(result, APIKey):
        return result.charge.budgets if result.charge is not None else ()
    if isinstance(result, Charge | Hold | Settlement):
        return result.budgets
    return ()


def _log(operation: str, key_id: str | None, error: KeycapError) -> None:
    if isinstance(error, DatabaseError):
        database.warning("keycap: %s failed (key %s): %s", operation, key_id, error)
    else:
        refusals.debug("keycap: %s refused (key %s): %s", operation, key_id, error.code)
