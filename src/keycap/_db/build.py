"""What every statement module shares: the row type, integer and id binds, and the
runners of a cached UPDATE that must report the rows it changed.

Hot statements are built once per shape and cached (``lru_cache``): building
and cache-keying a CASE-heavy UPDATE costs several times more than executing
it. Every per-call value (ids, amounts, times, the window arithmetic) is then a
bind parameter, named ``m_...`` (metering) or ``hot_...`` (the key's own
validation), filled in by the function that runs the statement.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeAlias

from sqlalchemy import BigInteger, ColumnElement, Row, bindparam, case, func, literal
from sqlalchemy.ext.asyncio import AsyncConnection

from keycap._db.schema import ANCESTORS, budgets, holds, keys
from keycap._rules import ips

#: A result row of any width.
AnyRow: TypeAlias = Row[*tuple[Any, ...]]
#: How a statement that is atomic on its own is run: ``Database.rows`` (or
#: ``read_rows``), one round trip, its rows read as SQLAlchemy's are.
Execute: TypeAlias = Callable[[Any, Mapping[str, Any]], Awaitable[Sequence[AnyRow]]]

#: How many shapes of each hot statement are kept built.
HOT_CACHE = 512


def big(value: int) -> Any:
    """An integer bound as BIGINT. PostgreSQL types a bind by its context: in
    ``CASE ... THEN 0 ... END + :amount`` the literal 0 would make ``:amount`` an
    int32 and 6e10 micro-units would not fit. Every integer entering a metering
    statement goes through here."""
    return literal(value, BigInteger())


def int_param(name: str) -> Any:
    """A per-call integer, bound as BIGINT (see :func:`big`)."""
    return bindparam(name, type_=BigInteger())


# --- the bind parameters of the cached metering statements ----------------------------

KEY_ID = bindparam("m_key_id", type_=keys.c.id.type)
ORG_ID = bindparam("m_org_id", type_=keys.c.org_id.type)
PROJECT_ID = bindparam("m_project_id", type_=keys.c.project_id.type)
IDENTITY_ID = bindparam("m_identity_id", type_=keys.c.identity_id.type)
ANCESTOR_IDS = tuple(bindparam(f"m_{name}", type_=keys.c.id.type) for name in ANCESTORS)
NOW = bindparam("m_now", type_=keys.c.last_used_at.type)
BUDGET_ID = bindparam("m_budget_id", type_=budgets.c.id.type)
HOLD_ID = bindparam("m_hold_id", type_=holds.c.id.type)


class Cost:
    """The per-meter amounts of a metering statement's call, as bind parameters
    ``m_meter_i``/``m_amount_i``."""

    def __init__(self, meter_count: int) -> None:
        self.meters = [
            bindparam(f"m_meter_{i}", type_=budgets.c.meter.type) for i in range(meter_count)
        ]
        self.amounts = [int_param(f"m_amount_{i}") for i in range(meter_count)]

    def on(self, meter: Any) -> Any:
        """The amount of ``meter`` (0 if the call has none of it)."""
        pairs = zip(self.meters, self.amounts, strict=True)
        return case(*((meter == m, a) for m, a in pairs), else_=big(0))


@dataclass(frozen=True, slots=True)
class KeyRef:
    """A key inside a metered transaction: the ids its limits and budgets hang on."""

    id: str
    org_id: str
    project_id: str | None
    identity_id: str | None
    #: A delegated key's ancestors, nearest first (``ancestor_1`` ...).
    ancestors: tuple[str | None, ...] = (None,) * len(ANCESTORS)

    @classmethod
    def of_identity(cls, identity_id: str, org_id: str) -> KeyRef:
        """An identity metered without a key: its own limits and budgets, and its
        organization's, apply."""
        return cls(identity_id, org_id, None, identity_id)

    @property
    def keyless_identity_id(self) -> str | None:
        """The identity, when this is one metered without a key; else None."""
        return self.identity_id if self.key_id is None else None

    @property
    def key_id(self) -> str | None:
        """The key's id; None for an identity metered without a key (whose ref has
        the identity's id as ``id``: its own limits and budgets, and its
        organization's, apply)."""
        return None if self.id == self.identity_id else self.id

    @classmethod
    def of(cls, key_id: str, row: Any, prefix: str = "") -> KeyRef:
        """The key ``key_id`` as a row describes it: its columns ``org_id`` ...,
        each named with ``prefix`` (``"key_"`` in a one-statement result)."""
        m = row._mapping
        return cls(
            key_id,
            m[f"{prefix}org_id"] or "",
            m[f"{prefix}project_id"],
            m[f"{prefix}identity_id"],
            tuple(m[f"{prefix}{name}"] for name in ANCESTORS),
        )


def key_params(key: KeyRef) -> dict[str, Any]:
    """The values of ``KEY_ID``, ``ORG_ID``, ``PROJECT_ID``, ``IDENTITY_ID`` and
    ``ANCESTOR_IDS`` for ``key``."""
    return {
        "m_key_id": key.id,
        "m_org_id": key.org_id,
        "m_project_id": key.project_id,
        "m_identity_id": key.identity_id,
        **{f"m_{name}": ancestor for name, ancestor in zip(ANCESTORS, key.ancestors, strict=True)},
    }


# --- the bind parameters of the key's own validation statements -----------------------


def hot_params(
    key_id: str, now: datetime, digests: Mapping[str, str], client: ips.Address | None = None
) -> dict[str, Any]:
    """The key id, ``now`` and :func:`grant_params`."""
    return {"hot_key_id": key_id, "hot_now": now, **grant_params(digests, client)}


def grant_params(digests: Mapping[str, str], client: ips.Address | None) -> dict[str, str]:
    """The grant predicate's own binds: one digest per pepper, and the networks
    holding ``client``'s address (``keycap._db.grant.ip_allowed``)."""
    params = {f"hot_digest_{i}": digest for i, digest in enumerate(digests.values())}
    if client is not None:
        params.update({f"hot_net_{i}": net for i, net in enumerate(ips.networks(client))})
    return params


def hot_binds(peppers: tuple[str, ...]) -> tuple[Any, dict[str, Any], Any]:
    """Bind parameters for the key id, ``now`` and one digest per pepper id."""
    now = bindparam("hot_now", type_=keys.c.last_used_at.type)
    digests = {
        pid: bindparam(f"hot_digest_{i}", type_=keys.c.digest.type) for i, pid in enumerate(peppers)
    }
    return bindparam("hot_key_id", type_=keys.c.id.type), digests, now


def contains(column: Any, needle: Any, dialect: str) -> ColumnElement[bool]:
    """A plain, case-sensitive substring test. LIKE would need escaping of ``_`` and
    is case-insensitive on SQLite; strpos/instr are neither."""
    if dialect == "postgresql":
        return func.strpos(column, needle) > 0
    return func.instr(column, needle) > 0


# --- UPDATEs that report what they changed --------------------------------------------


@dataclass(frozen=True, slots=True)
class Changing:
    """A cached UPDATE in both forms :func:`changed_rows` may run: with ``RETURNING``,
    and plain followed by ``reread`` (a SELECT of the same columns and rows)."""

    returning: Any
    plain: Any
    reread: Any


def changing(stmt: Any, reread: Any) -> Changing:
    return Changing(stmt.returning(*reread.selected_columns), stmt, reread)


async def changed(
    conn: AsyncConnection, stmt: Changing, params: Mapping[str, Any]
) -> AnyRow | None:
    """Run a single-row UPDATE; the row after it, or None if it changed nothing
    (:func:`changed_rows` for several rows; this one's columns need not include
    ``id``). Without RETURNING (MySQL) the row is read after it, under its lock."""
    if conn.dialect.update_returning:
        return (await conn.execute(stmt.returning, params)).first()
    if (await conn.execute(stmt.plain, params)).rowcount != 1:
        return None
    return (await conn.execute(stmt.reread, params)).one()


async def changed_rows(
    conn: AsyncConnection, stmt: Changing, params: Mapping[str, Any], count: int
) -> list[AnyRow] | None:
    """Run a multi-row UPDATE that must change exactly ``count`` rows; the rows after
    it in id order, or None when it changed fewer (one refused: the caller rolls
    back). PostgreSQL and SQLite return them from the UPDATE itself
    (``RETURNING``); MySQL/MariaDB cannot, so the SELECT runs after it, with the
    same parameters, under the row locks the UPDATE took until commit: both read
    what was written."""
    if conn.dialect.update_returning:
        after = sorted((await conn.execute(stmt.returning, params)).all(), key=_by_id)
    elif (await conn.execute(stmt.plain, params)).rowcount == count:
        after = list((await conn.execute(stmt.reread, params)).all())
    else:
        return None
    return after if len(after) == count else None


def _by_id(row: AnyRow) -> str:
    return str(row.id)
