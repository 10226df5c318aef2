"""Leases: what a process may admit in memory, and how big its next slice is.

A lease is a hold (``reserve``) a process takes on a key's budgets of one
meter, its *slice*, and spends in memory, call after call, settling it for
what it spent when it is used up or :attr:`LeasePolicy.refresh` old. Since
every slice is a hold, exact in the database, the budgets are never
overspent. What a lease trades away is said in docs/limits-and-budgets.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal, InvalidOperation

from keycap._errors import ConfigurationError, KeycapError
from keycap._rules import money, timeutil

#: What a slice's hold does at its expiry if its process never settled it
#: (it died): ``"release"`` gives it back (the calls it admitted since its last
#: settle are never charged), ``"charge"`` charges all of it (never
#: undercharged; overcharged by what it had left).
ON_EXPIRY = ("release", "charge")
#: The most calls one slice of validations may admit.
MAX_CALLS = 1_000_000


@dataclass(frozen=True, slots=True)
class LeasePolicy:
    """Charges served from in-process leases (``APIKeyClient(leases=...)``).

    Args:
        slice: the most one slice holds (a ``Decimal`` amount, or its string).
        refresh: how long a slice is spent from before it is settled and a new
            one reserved; also the bound on how late a key revoked or disabled
            by another process is refused (the new slice's reserve refuses it).
        ttl: the slice's hold lifetime: how long a dead process's slice waits
            before ``on_expiry`` applies (``sweep_expired_holds`` or the next
            refusal on its budget). At least ``refresh``.
        on_expiry: ``"release"`` (default) or ``"charge"``: see :data:`ON_EXPIRY`.
        min_calls: a slice smaller than this many calls' cost is not taken: near
            exhaustion each call is charged exactly instead.
        calls: the most validations one slice admits (``validate_key`` with a
            cost, or of a rate-limited key): its uses, its rate limits' units and
            its budgets' holds are taken together for that many calls.
        validations: serve validations from slices too (default); False leases
            ``charge`` only.
    """

    slice: Decimal | str
    refresh: timedelta | str = "1s"
    ttl: timedelta | str = "60s"
    on_expiry: str = "release"
    min_calls: int = 4
    calls: int = 100
    validations: bool = True

    def checked(self) -> Lease:
        """This policy in micro-units and timedeltas, checked.

        Raises:
            ConfigurationError: a value out of range.
        """
        try:
            most = money.to_micros(_decimal(self.slice), "slice")
            refresh = timeutil.parse_duration(self.refresh, "refresh")
            ttl = timeutil.parse_duration(self.ttl, "ttl")
        except KeycapError as error:
            raise ConfigurationError(f"leases: {error}") from None
        if most <= 0:
            raise ConfigurationError("leases: slice must be more than 0")
        if ttl < refresh:
            raise ConfigurationError("leases: ttl must be at least refresh")
        if ttl > timedelta(days=30):
            raise ConfigurationError("leases: ttl must be at most 30 days")
        if self.on_expiry not in ON_EXPIRY:
            raise ConfigurationError("leases: on_expiry must be 'release' or 'charge'")
        for name, count in (("min_calls", self.min_calls), ("calls", self.calls)):
            if not isinstance(count, int) or isinstance(count, bool):
                raise ConfigurationError(f"leases: {name} must be a whole number")
            if not 1 <= count <= MAX_CALLS:
                raise ConfigurationError(f"leases: {name} must be from 1 to {MAX_CALLS}")
        if not isinstance(self.validations, bool):
            raise ConfigurationError("leases: validations must be True or False")
        return Lease(
            most, refresh, ttl, self.on_expiry, self.min_calls, self.calls, self.validations
        )


def _decimal(value: object) -> object:
    """A string amount as a Decimal (``"0.10"``); anything else as given."""
    if isinstance(value, str):
        try:
            return Decimal(value)
        except InvalidOperation:
            raise ConfigurationError("leases: slice must be a decimal amount") from None
    return value


@dataclass(frozen=True, slots=True)
class Lease:
    """A checked :class:`LeasePolicy`: the slice in micro-units."""

    most: int
    refresh: timedelta
    ttl: timedelta
    on_expiry: str
    min_calls: int
    calls: int = 100
    validations: bool = True

    def next_slice(self, amount: int, remaining: int | None) -> int | None:
        """The slice to reserve for calls of ``amount``, when the budgets had
        ``remaining`` left at the last look (None: not looked yet).

        At most the policy's slice, and at most a quarter of what is left, so
        slices shrink as the budgets run out and what other processes hold
        back near exhaustion stays small; a whole number of calls. None: too
        little is left for ``min_calls`` calls, and the call is charged
        exactly.
        """
        if amount <= 0:
            return None  # nothing to spend: the exact path records it
        most = self.most if remaining is None else min(self.most, remaining // 4)
        calls = most // amount
        if calls < self.min_calls:
            return None
        return calls * amount

    def next_calls(self, amounts: Mapping[str, int], fits: int | None) -> int | None:
        """How many validations of ``amounts`` (micro-units per meter) the next slice
        admits, when ``fits`` more calls fitted every limit at the last look (None:
        not looked yet).

        At most :attr:`calls`, at most a quarter of what fits, and at most the
        policy's slice of each meter. None: fewer than ``min_calls``, and the
        call goes the exact way.
        """
        calls = self.calls if fits is None else min(self.calls, fits // 4)
        for amount in amounts.values():
            if amount > 0:
                calls = min(calls, self.most // amount)
        return calls if calls >= self.min_calls else None


def calls_that_fit(room: Iterable[tuple[int, int]]) -> int | None:
    """How many more calls fit, from ``(left, per_call)`` pairs of every limit a
    call consumes (a rate limit, the usage cap, a budget); None: no limit
    constrains it. A limit a call costs nothing on does not count."""
    fits = [left // per_call for left, per_call in room if per_call > 0]
    return max(0, min(fits)) if fits else None
