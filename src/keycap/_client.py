"""``APIKeyClient``: the one object users touch. It orchestrates; it holds no SQL or crypto."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from enum import Enum
from types import TracebackType
from typing import Any, Final, Self, TypeVar, cast

from sqlalchemy.ext.asyncio import AsyncEngine

from keycap._db import access as access_db
from keycap._db import audit as audit_statements
from keycap._db import holds, keys, ledger, rate_limits, rows, tenancy
from keycap._db.build import KeyRef
from keycap._db.engine import (
    Database,
    Waits,
    create_engine,
    made_for_pooler,
    normalize_url,
    pooler_flag,
    require_pooler_settings,
)
from keycap._db.schema import ANCESTORS, MAX_DEPTH, identities
from keycap._db.schema import metadata as schema_metadata
from keycap._errors import (
    ConfigurationError,
    DatabaseUnavailableError,
    InvalidArgumentError,
    InvalidKeyError,
    KeycapError,
    NotFoundError,
    RevokedKeyError,
)
from keycap._models import (
    AccessRequest,
    APIKey,
    AuditEntry,
    BudgetStatus,
    Charge,
    Hold,
    Identity,
    IssuedKey,
    KeyEvent,
    KeyStatus,
    Organization,
    Product,
    Project,
    RateLimitStatus,
    Remaining,
    Settlement,
    UsageRow,
)
from keycap._ops import access as access_ops
from keycap._ops import admin, audit, charges, pipeline, results
from keycap._ops import holds as hold_ops
from keycap._ops import identities as identity_ops
from keycap._ops import imports as import_ops
from keycap._ops import leases as lease_ops
from keycap._ops import release as release_ops
from keycap._ops.authcache import AuthCache
from keycap._rules import access as access_rules
from keycap._rules import delegation, ids, inputs, ips, money, policy, timeutil, tokens
from keycap._rules import imports as import_rules
from keycap._rules import scopes as scope_rules
from keycap._rules.base62 import random_string
from keycap._rules.budgets import Budget
from keycap._rules.hashing import PepperRing
from keycap._rules.leases import LeasePolicy
from keycap._rules.rate_limits import RateLimit
from keycap._rules.timeutil import Clock
from keycap._settlements import Pending, PendingSettlement
from keycap._telemetry import Telemetry

__all__ = ["UNSET", "APIKeyClient"]


class _Unset(Enum):
    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


#: "Leave unchanged" in ``update_key`` (None there means "clear").
UNSET: Final = _Unset.UNSET
log = logging.getLogger("keycap")

_MAX_HOLD_TTL = timedelta(days=30)


#: A hot call of the client, its signature kept by :func:`_observed`.
Hot = TypeVar("Hot", bound=Callable[..., Awaitable[Any]])


def _observed(
    operation: str, key_of: Callable[[APIKeyClient, Any], str | None], argument: str
) -> Callable[[Hot], Hot]:
    """Log a hot call's failure and, with OpenTelemetry, trace and count it
    (keycap._telemetry). ``key_of`` names the key from the first argument
    (``argument``, given by position or by name), or None."""

    def wrap(method: Hot) -> Hot:
        @functools.wraps(method)
        async def observed(self: APIKeyClient, *args: Any, **kwargs: Any) -> Any:
            first = args[0] if args else kwargs.get(argument)
            return await self._telemetry.observe(
                operation, lambda: key_of(self, first), lambda: method(self, *args, **kwargs)
            )

        return cast(Hot, observed)

    return wrap


def _presented_key(client: APIKeyClient, plaintext: Any) -> str | None:
    """The id of a well-formed presented key (never the key itself), or None."""
    try:
        return ids.key_id(client._format.parse(plaintext))
    except KeycapError:
        return None


def _given_key(_client: APIKeyClient, key_id: Any) -> str | None:
    """``key_id`` if it is one: a secret passed there by mistake is never logged."""
    return key_id if ids.is_valid(ids.KEY, key_id) else None


def _no_key(_client: APIKeyClient, _first: Any) -> None:
    return None


class APIKeyClient:
    """Issues and validates API keys stored in your database.

    Args:
        database: a URL (``sqlite:///app.db``, ``postgresql://…``, ``mysql://…``,
            ``mariadb://…``; plain schemes use aiosqlite/asyncpg/aiomysql) or an
            ``AsyncEngine`` you own (keycap will not dispose it).
        signing_secret: the HMAC pepper, at least 32 bytes; or a list, newest
            first, to rotate: new keys use the first, every one verifies.
        key_prefix: the first part of every key (``sk``).
        environment: the second part (``live``, ``test``).
        track_usage: record ``last_used_at`` and ``use_count`` on each accepted
            validation (default True; also settable per call).
        clock: returns the current aware datetime; inject one in tests. Rate
            windows and budget periods follow it too (docs/limits-and-budgets.md).
        on_budget_alert: ``async def handler(alert: BudgetAlert)``, awaited after
            commit once for each alert threshold a charge crosses.
        auth_cache_ttl: seconds to remember successful read-path validations in
            this process (off by default). Only untracked validations without cost,
            rate limit or use cap are served from it; changes made through this
            client clear it, changes by other processes show within the TTL
            (docs/performance.md).
        timeout: the most seconds a call waits for the database (10 by default):
            past it, DatabaseUnavailableError, while the call's own transaction still
            finishes and returns its connection. On an engine keycap creates it also
            bounds the wait for a pooled or new connection.
        lock_timeout: the most seconds a statement waits for a row lock (SQLite: the
            write lock), 5 by default; set on engines keycap creates (pass None to
            keep the server's setting). For an engine you pass in, set it there
            (docs/deployment.md). Behind a transaction pooler it is the server's
            (set it on the role); passing a number there is a ConfigurationError.
        read_replica: a URL or ``AsyncEngine`` of a read replica (a streaming
            replica of the same database). Read-path validations (no tracking, no
            cost, no rate limit, no use cap) are answered from it when it accepts
            the key; a refusal, a key it does not have yet, or a replica that
            cannot be reached is decided again on the primary. Everything else
            runs on the primary. A revocation reaches the replica's answers after
            its replication lag (docs/deployment.md).
        on_key_event: ``async def hook(event: KeyEvent)``, awaited after a key is
            created, updated, rolled, revoked, disabled, enabled or deleted through
            this client, once the change has committed. A hook that fails is
            logged; the change stands.
        on_unsettled: ``async def hook(pending: PendingSettlement)``, awaited when
            :meth:`settle_eventually` (or a FastAPI meter) cannot write a settlement
            because the database is down; persist it to replay it after a crash.
        opentelemetry: trace and count the hot calls (validate, charge, reserve,
            settle, release) with the OpenTelemetry API (``pip install
            'keycap[otel]'``); keycap logs their failures either way
            (docs/observability.md).
        transaction_pooler: the PostgreSQL URL or engine leads to PgBouncer in
            transaction mode, or a pooler like it (also ``?transaction_pooler=true``
            in the URL): every statement runs in a transaction and nothing stays
            prepared on a server connection. An engine you pass in must already
            be set up so (docs/deployment.md); if not, ConfigurationError. An engine
            keycap made for a pooler (``other_client.engine``) is known as one.
        max_delegation_depth: how many generations of delegated keys may sit below
            a root key (:meth:`delegate`): 4 at most and by default; 0 forbids
            delegation.
        imported_keys: also accept keys imported from other systems
            (:meth:`import_key`): a presented key that is not keycap's is looked
            up among them (one indexed read). Off by default, so a malformed key
            costs no I/O.
        foreign_secrets: the secrets other systems hashed their keys with, by
            scheme (``{"apikeys-platform": "..."}``), to verify imported keys
            until their first use re-digests them (docs/migrating.md).
        key_hasher: ``"hmac"`` (the default: HMAC-SHA256, docs/security.md) or
            ``"argon2id"`` for a policy that demands a memory-hard hash (``pip
            install 'keycap[argon2]'``): new keys, and older ones on their next
            use, are digested with Argon2id; its cost is in docs/performance.md.
        leases: a :class:`LeasePolicy` to serve :meth:`charge` (one meter, no
            idempotency key, no metadata), and :meth:`validate_key` with a cost
            or of a rate-limited key, from in-process slices held in the
            database: holds, uses and rate-limit units taken for many calls at
            once, spent in memory, settled in batches. Never overspends; what
            it trades away (exact refusals near exhaustion, a revocation by
            another process seen within ``refresh``, a dead process's slice)
            is in docs/limits-and-budgets.md.

    Raises:
        ConfigurationError: a bad URL, a missing driver, or bad secrets/prefixes.
    """

    def __init__(
        self,
        database: str | AsyncEngine,
        *,
        signing_secret: str | bytes | Sequence[str | bytes],
        key_prefix: str = "sk",
        environment: str = "live",
        track_usage: bool = True,
        clock: Clock | None = None,
        on_budget_alert: results.AlertHandler | None = None,
        auth_cache_ttl: float | None = None,
        timeout: float = 10.0,
        lock_timeout: float | _Unset | None = UNSET,
        transaction_pooler: bool = False,
        read_replica: str | AsyncEngine | None = None,
        opentelemetry: bool = False,
        on_unsettled: Callable[[PendingSettlement], Awaitable[None]] | None = None,
        on_key_event: Callable[[KeyEvent], Awaitable[None]] | None = None,
        max_delegation_depth: int = MAX_DEPTH,
        imported_keys: bool = False,
        foreign_secrets: Mapping[str, str] | None = None,
        key_hasher: str = "hmac",
        leases: LeasePolicy | None = None,
    ) -> None:
        self._format = tokens.KeyFormat(key_prefix, environment)
        self._telemetry = Telemetry(inputs.flag(opentelemetry, "opentelemetry"))
        if on_unsettled is not None and not callable(on_unsettled):
            raise ConfigurationError("on_unsettled must be an async callable")
        self._pending = Pending(self._settle_pending, self._charge_expired, on_unsettled)
        if on_key_event is not None and not callable(on_key_event):
            raise ConfigurationError("on_key_event must be an async callable")
        self._on_key_event = on_key_event
        self._max_depth = _depth(max_delegation_depth)
        self._imported = inputs.flag(imported_keys, "imported_keys")
        self._foreign = _foreign_secrets(foreign_secrets)
        self._ring = PepperRing(signing_secret, hasher=key_hasher)
        self._track_usage = inputs.flag(track_usage, "track_usage")
        if clock is not None and not callable(clock):
            raise ConfigurationError("clock must be a callable returning an aware datetime")
        self._clock = clock or timeutil.utcnow
        if on_budget_alert is not None and not callable(on_budget_alert):
            raise ConfigurationError("on_budget_alert must be an async callable")
        self._on_alert = on_budget_alert
        self._cache = _auth_cache(auth_cache_ttl)
        pooled = inputs.flag(transaction_pooler, "transaction_pooler")
        made_pooled = isinstance(database, AsyncEngine) and made_for_pooler(database)
        if isinstance(database, AsyncEngine):
            pooled = pooled or made_pooled
        else:
            pooled = pooled or pooler_flag(normalize_url(database))
        if lock_timeout is UNSET:
            lock_timeout = None if pooled else 5.0
        waits = Waits(
            call=_seconds(timeout, "timeout"),
            lock=None if lock_timeout is None else _seconds(lock_timeout, "lock_timeout"),
        )
        if isinstance(database, AsyncEngine):
            if pooled and not made_pooled:
                require_pooler_settings(database)
            engine, owned = database, False
        else:
            engine, owned = create_engine(database, waits, transaction_pooler=pooled), True
        self._db = Database(engine, owned=owned, call_timeout=waits.call, transaction_pooler=pooled)
        self._replica: Database | None = None
        if isinstance(read_replica, AsyncEngine):
            self._replica = Database(read_replica, owned=False, call_timeout=waits.call)
        elif read_replica is not None:
            self._replica = Database(
                create_engine(read_replica, waits), owned=True, call_timeout=waits.call
            )
        if self._replica is not None and self._replica.dialect != self._db.dialect:
            raise ConfigurationError("read_replica must be the same kind of database")
        self._leases: lease_ops.Leases | None = None
        if leases is not None:
            if not isinstance(leases, LeasePolicy):
                raise ConfigurationError("leases must be a keycap.LeasePolicy")
            self._leases = lease_ops.Leases(
                self._db, leases.checked(), self._on_alert, self._keep_settlement
            )
        self._pipeline = pipeline.Pipeline(
            self._db, self._replica, self._ring, self._cache, self._on_alert, self._leases
        )

    def __repr__(self) -> str:
        url = self._db.engine.url.render_as_string(hide_password=True)
        fmt = self._format
        return f"APIKeyClient({url!r}, key_prefix={fmt.prefix!r}, environment={fmt.environment!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Let calls whose callers gave up finish, then dispose the engine if keycap
        created it."""
        await self._pending.close()
        if self._leases is not None:
            await self._leases.close(self._now())
        await self._db.dispose()
        if self._replica is not None:
            await self._replica.dispose()

    @property
    def engine(self) -> AsyncEngine:
        """The SQLAlchemy engine keycap runs on: the one passed in, or the one it made
        from the URL (disposed by :meth:`aclose`). Use it to run your own statements
        or migrations on keycap's database."""
        return self._db.engine

    @property
    def pepper_id(self) -> str:
        """The id of the newest signing secret. New keys are digested with it, and an
        older key's digest is moved to it on its next successful validation; a key
        row whose ``pepper_id`` differs still awaits that (docs/security.md)."""
        return self._ring.current_id

    def now(self) -> datetime:
        """The current time by the client's clock (aware, UTC): what expiry, rate
        windows and budget periods are measured against."""
        return self._now()

    def _now(self) -> datetime:
        try:
            return timeutil.aware_utc(self._clock(), "clock()")
        except InvalidArgumentError as error:
            raise ConfigurationError(f"the client's clock is broken: {error.problem}") from None

    # --- schema ---------------------------------------------------------------------

    async def create_tables(self) -> None:
        """Create keycap's tables if missing. A development convenience: deploys
        run ``alembic upgrade head`` (or :meth:`migrate`) so the schema is versioned."""
        async with self._db.begin() as conn:
            await conn.run_sync(schema_metadata.create_all)

    async def migrate(self, revision: str = "head") -> None:
        """Run keycap's shipped Alembic migrations up to ``revision`` on this database."""
        from keycap.migrations import upgrade_connection

        async with self._db.begin() as conn:
            await conn.run_sync(upgrade_connection, revision)

    # --- organizations, projects, products -------------------------------------------

    async def create_organization(self, name: str) -> Organization:
        """Create an organization.

        Raises:
            AlreadyExistsError: an organization of that name exists (``existing_id``).
            InvalidArgumentError: a bad name.
        """
        return rows.to_organization(await self._create(ids.ORG, None, name))

    async def get_or_create_organization(self, name: str) -> tuple[Organization, bool]:
        """The organization of that name, created if missing; ``(org, created)``.
        Safe to call concurrently: exactly one caller creates it."""
        found, created = await self._get_or_create(ids.ORG, None, name)
        return rows.to_organization(found), created

    async def set_allowed_scopes(self, org_id: str, scopes: Sequence[str] | None) -> Organization:
        """Fix the scopes the organization's keys may be granted (patterns allowed:
        ``chat:*`` allows ``chat:write``); ``None`` allows any scope again. From now
        on ``create_key`` and ``update_key`` refuse a scope outside them with
        InvalidArgumentError; keys that already hold one keep it.

        Raises: NotFoundError, InvalidArgumentError.
        """
        org_id = ids.check(ids.ORG, org_id)
        allowed = None if scopes is None else scope_rules.normalize(scopes, "scopes")
        row = await admin.set_allowed_scopes(self._db, org_id, allowed, self._now())
        if row is None:
            raise NotFoundError("organization", org_id)
        return rows.to_organization(row)

    def acting_as(self, actor: str) -> contextlib.AbstractContextManager[None]:
        """Name who makes the administrative changes inside the ``with`` block, for
        the audit log::

            with client.acting_as("alice@acme.example"):
                await client.revoke_key(key_id)

        A context variable: concurrent requests (tasks) each keep their own.

        Raises: InvalidArgumentError (a bad actor).
        """
        return audit.acting_as(actor)

    async def audit_log(
        self,
        org_id: str,
        *,
        subject_id: str | None = None,
        action: str | None = None,
        before: int | None = None,
        limit: int = 50,
    ) -> list[AuditEntry]:
        """The organization's administrative changes, newest first: who (the actor
        of :meth:`acting_as`), what, when, and the subject before and after. Each
        change's row is written in the change's own transaction. Filter by
        ``subject_id`` (a key, project, identity or the organization) or ``action``; page
        with ``before=`` the last entry's ``id``.

        Raises: InvalidArgumentError.
        """
        org_id = ids.check(ids.ORG, org_id)
        subject = None if subject_id is None else inputs.text(subject_id, "subject_id")
        what = None if action is None else inputs.text(action, "action")
        limit, _ = inputs.page(limit, 0)
        if before is not None and (isinstance(before, bool) or not isinstance(before, int)):
            raise InvalidArgumentError("before", "must be an audit entry's id")
        found = await self._db.read(audit_statements.entries, org_id, subject, what, before, limit)
        return [rows.to_audit_entry(r) for r in found]

    async def get_organization(self, org_id: str) -> Organization:
        """Raises: NotFoundError."""
        return rows.to_organization(await self._get(ids.ORG, org_id))

    async def list_organizations(
        self, *, limit: int = 100, offset: int = 0, newest_first: bool = False
    ) -> list[Organization]:
        """Organizations, oldest first (or ``newest_first``)."""
        limit, offset = inputs.page(limit, offset)
        newest = inputs.flag(newest_first, "newest_first")
        found = await self._db.read(
            tenancy.list_rows, tenancy.TABLES[ids.ORG], None, limit, offset, newest
        )
        return [rows.to_organization(r) for r in found]

    async def delete_organization(self, org_id: str) -> None:
        """Delete an organization with its projects, products, keys, limits and
        budgets. Its keys are revoked and their open holds released first, as
        :meth:`delete_project` does; its ledger rows stay, as financial history.

        Raises: NotFoundError.
        """
        org_id = ids.check(ids.ORG, org_id)
        await self._retire_keys("org_id", org_id)
        await self._delete(ids.ORG, org_id)

    async def create_project(self, org_id: str, name: str) -> Project:
        """Raises: NotFoundError (organization), AlreadyExistsError, InvalidArgumentError."""
        return rows.to_project(await self._create(ids.PROJECT, org_id, name))

    async def get_or_create_project(self, org_id: str, name: str) -> tuple[Project, bool]:
        found, created = await self._get_or_create(ids.PROJECT, org_id, name)
        return rows.to_project(found), created

    async def get_project(self, project_id: str) -> Project:
        """Raises: NotFoundError."""
        return rows.to_project(await self._get(ids.PROJECT, project_id))

    async def list_projects(
        self, org_id: str, *, limit: int = 100, offset: int = 0, newest_first: bool = False
    ) -> list[Project]:
        """The organization's projects, oldest first (or ``newest_first``)."""
        org_id = ids.check(ids.ORG, org_id)
        limit, offset = inputs.page(limit, offset)
        newest = inputs.flag(newest_first, "newest_first")
        found = await self._db.read(
            tenancy.list_rows, tenancy.TABLES[ids.PROJECT], org_id, limit, offset, newest
        )
        return [rows.to_project(r) for r in found]

    async def delete_project(self, project_id: str) -> None:
        """Delete a project, its product links and its keys (whose open holds are
        released first). Raises: NotFoundError."""
        project_id = ids.check(ids.PROJECT, project_id)
        await self._retire_keys("project_id", project_id)
        await self._delete(ids.PROJECT, project_id)

    async def create_product(self, org_id: str, name: str) -> Product:
        """Raises: NotFoundError (organization), AlreadyExistsError, InvalidArgumentError."""
        return rows.to_product(await self._create(ids.PRODUCT, org_id, name))

    async def get_or_create_product(self, org_id: str, name: str) -> tuple[Product, bool]:
        found, created = await self._get_or_create(ids.PRODUCT, org_id, name)
        return rows.to_product(found), created

    async def get_product(self, product_id: str) -> Product:
        """Raises: NotFoundError."""
        return rows.to_product(await self._get(ids.PRODUCT, product_id))

    async def list_products(
        self, org_id: str, *, limit: int = 100, offset: int = 0, newest_first: bool = False
    ) -> list[Product]:
        """The organization's products, oldest first (or ``newest_first``)."""
        org_id = ids.check(ids.ORG, org_id)
        limit, offset = inputs.page(limit, offset)
        newest = inputs.flag(newest_first, "newest_first")
        found = await self._db.read(
            tenancy.list_rows, tenancy.TABLES[ids.PRODUCT], org_id, limit, offset, newest
        )
        return [rows.to_product(r) for r in found]

    async def delete_product(self, product_id: str) -> None:
        """Delete a product, its project links and the keys narrowed to it.

        Raises: NotFoundError.
        """
        product_id = ids.check(ids.PRODUCT, product_id)
        await self._retire_keys("product_id", product_id)
        await self._delete(ids.PRODUCT, product_id)

    async def add_product_to_project(self, product_id: str, project_id: str) -> bool:
        """Let keys of the project use the product. Idempotent: False if already linked.

        Raises:
            NotFoundError: either is missing.
            InvalidArgumentError: they belong to different organizations.
        """
        product = await self.get_product(product_id)
        project = await self.get_project(project_id)
        if product.org_id != project.org_id:
            raise InvalidArgumentError(
                "product_id", "belongs to another organization than the project"
            )
        linked = await admin.link_product(
            self._db, project.org_id, project.id, product.id, self._now()
        )
        self._changed()
        return linked

    async def remove_product_from_project(self, product_id: str, project_id: str) -> bool:
        """Unlink; the project's keys lose the product at once. False if not linked."""
        unlinked = await admin.unlink_product(
            self._db,
            ids.check(ids.PROJECT, project_id),
            ids.check(ids.PRODUCT, product_id),
            self._now(),
        )
        self._changed()
        return unlinked

    async def _create(self, kind: str, org_id: str | None, name: str) -> dict[str, Any]:
        name = inputs.text(name, "name")
        parent = None if kind == ids.ORG else ids.check(ids.ORG, org_id)
        return await admin.create_named(self._db, kind, parent, name, self._now())

    async def _get_or_create(
        self, kind: str, org_id: str | None, name: str
    ) -> tuple[rows.Source, bool]:
        name = inputs.text(name, "name")
        parent = None if kind == ids.ORG else ids.check(ids.ORG, org_id)
        return await admin.get_or_create_named(self._db, kind, parent, name, self._now())

    async def _get(self, kind: str, id_: str) -> Any:
        return await admin.get_named(self._db, kind, ids.check(kind, id_))

    async def _retire_keys(self, column: str, value: str) -> None:
        await admin.retire_keys(self._db, column, value, self._now())
        self._changed()

    async def _delete(self, kind: str, id_: str) -> None:
        id_ = ids.check(kind, id_)
        try:
            await admin.delete_named(self._db, kind, id_, self._now())
        finally:
            self._changed()

    # --- identities ---------------------------------------------------------------------

    async def get_or_create_identity(
        self,
        org_id: str,
        external_id: str,
        *,
        name: str = "",
        metadata: dict[str, Any] | None = None,
        allowed_ips: Sequence[str] | None = None,
    ) -> tuple[Identity, bool]:
        """The organization's identity with your ``external_id`` (the id your
        identity provider gives a person or system), created if missing;
        ``(identity, created)``. ``name``, ``metadata`` and ``allowed_ips`` (CIDR
        ranges every key of the identity may be used from, on top of each key's
        own) are used only when it is created. Safe to call concurrently:
        exactly one caller creates it.

        Raises: NotFoundError (the organization), InvalidArgumentError.
        """
        org_id = ids.check(ids.ORG, org_id)
        external = inputs.text(external_id, "external_id")
        found, created = await admin.get_or_create_identity(
            self._db,
            org_id,
            external,
            inputs.text(name, "name", allow_empty=True),
            inputs.metadata(metadata),
            self._now(),
            ips.stored(ips.optional_ranges(allowed_ips)),
        )
        return rows.to_identity(found), created

    async def get_identity(self, identity_id: str) -> Identity:
        """Raises: NotFoundError."""
        identity_id = ids.check(ids.IDENTITY, identity_id)
        row = await self._db.read(tenancy.get_by_id, identities, identity_id)
        if row is None:
            raise NotFoundError("identity", identity_id)
        return rows.to_identity(row)

    async def list_identities(
        self, org_id: str, *, limit: int = 100, offset: int = 0
    ) -> list[Identity]:
        """The organization's identities, newest first."""
        org_id = ids.check(ids.ORG, org_id)
        limit, offset = inputs.page(limit, offset)
        found = await self._db.read(tenancy.list_identities, org_id, limit, offset)
        return [rows.to_identity(r) for r in found]

    async def update_identity(
        self,
        identity_id: str,
        *,
        name: str | _Unset = UNSET,
        metadata: dict[str, Any] | _Unset = UNSET,
        allowed_ips: Sequence[str] | _Unset | None = UNSET,
    ) -> Identity:
        """Change an identity's name, metadata or IP ranges (``allowed_ips=None``:
        any address). A change of ranges takes effect on its keys' next call.

        Raises: NotFoundError, InvalidArgumentError."""
        values: dict[str, Any] = {}
        if name is not UNSET:
            values["name"] = inputs.text(name, "name", allow_empty=True)
        if metadata is not UNSET:
            values["metadata"] = inputs.metadata(metadata)
        if allowed_ips is not UNSET:
            values["allowed_ips"] = ips.stored(ips.optional_ranges(allowed_ips))
        return await self._change_identity(identity_id, "identity.updated", values)

    @_observed("validate", _given_key, "identity_id")
    async def validate_identity(
        self,
        identity_id: str,
        *,
        cost: money.Amount | Mapping[str, money.Amount] | None = None,
    ) -> Identity:
        """A call by an identity your app authenticated itself, metered without a
        key: the identity is not disabled, every rate limit of the identity and
        its organization admits the call, and (with ``cost``) every budget of
        theirs takes it; in one transaction, or nothing is consumed. The result
        carries the tightest ``rate_limit`` and the ``charge``.

        Raises: NotFoundError, DisabledKeyError (``identity=True``),
        RateLimitedError, BudgetExceededError, InvalidArgumentError.
        """
        identity_id = ids.check(ids.IDENTITY, identity_id)
        amounts = {} if cost is None else money.costs(cost, "cost")
        return await identity_ops.validate(
            self._db, identity_id, amounts, self._now(), self._on_alert
        )

    async def disable_identity(self, identity_id: str) -> Identity:
        """Refuse every key of the identity (``DisabledKeyError`` with
        ``identity=True``) until :meth:`enable_identity`, decided in each call's
        own statement. Idempotent: a second call keeps the first ``disabled_at``.

        Raises: NotFoundError.
        """
        return await self._change_identity(
            identity_id,
            "identity.disabled",
            {"disabled_at": self._now()},
            only_if=identities.c.disabled_at.is_(None),  # the first disabled_at stays
        )

    async def enable_identity(self, identity_id: str) -> Identity:
        """Accept the identity's keys again (each still by its own state).

        Raises: NotFoundError.
        """
        return await self._change_identity(identity_id, "identity.enabled", {"disabled_at": None})

    async def _change_identity(
        self, identity_id: str, action: str, values: dict[str, Any], only_if: Any = None
    ) -> Identity:
        identity_id = ids.check(ids.IDENTITY, identity_id)
        now = self._now()
        row = await admin.update_identity(
            self._db, identity_id, action, {**values, "updated_at": now}, now, only_if
        )
        self._changed()  # cached validations of its keys must see it
        if row is None:
            raise NotFoundError("identity", identity_id)
        return rows.to_identity(row)

    # --- keys: administration -----------------------------------------------------------

    async def create_key(
        self,
        org_id: str,
        *,
        project_id: str | None = None,
        product_id: str | None = None,
        name: str = "",
        scopes: Sequence[str] = (),
        expires_in: str | timedelta | None = None,
        expires_at: datetime | None = None,
        metadata: dict[str, Any] | None = None,
        delegated_by: str | None = None,
        max_uses: int | None = None,
        rate_limits: Sequence[RateLimit] = (),
        budgets: Sequence[Budget] = (),
        allowed_ips: Sequence[str] | None = None,
        identity_id: str | None = None,
    ) -> IssuedKey:
        """Issue a key. Its plaintext is in the result, once; only a digest is stored.

        Args:
            org_id: the owning organization.
            project_id: narrow the key to one project (and the products linked to it).
            product_id: narrow the key to one product.
            name: a label for people.
            scopes: granted scopes; ``["*"]`` grants all, ``[]`` grants none.
            expires_in: a duration (``"7d"``), or ``expires_at``: an aware datetime.
            metadata: a JSON object of at most 16 KiB, returned with the key.
            delegated_by: who the key acts for (a user id, a parent key id).
            max_uses: a lifetime cap on accepted validations ("activations").
            rate_limits: the key's own rate limits (:class:`RateLimit`).
            budgets: the key's own budgets (:class:`Budget`). Limits and budgets
                are created in the same transaction as the key.
            allowed_ips: CIDR ranges (IPv4, IPv6) the key may be used from;
                ``validate_key`` then needs ``client_ip`` inside one of them.
            identity_id: the identity (of the same organization) the key belongs
                to: disabling the identity refuses the key.

        Raises:
            NotFoundError: the organization, project or product does not exist in that org.
            InvalidArgumentError: any bad argument, including a naive ``expires_at``,
                a product not linked to the project, or a scope the organization
                does not allow (:meth:`set_allowed_scopes`).
        """
        org_id = ids.check(ids.ORG, org_id)
        project_id = ids.check_optional(ids.PROJECT, project_id, field="project_id")
        product_id = ids.check_optional(ids.PRODUCT, product_id, field="product_id")
        identity_id = ids.check_optional(ids.IDENTITY, identity_id, field="identity_id")
        name = inputs.text(name, "name", allow_empty=True)
        granted = scope_rules.normalize(scopes, "scopes")
        meta = inputs.metadata(metadata)
        delegated = None if delegated_by is None else inputs.text(delegated_by, "delegated_by")
        cap = _max_uses(max_uses)
        networks = ips.optional_ranges(allowed_ips)
        limit_specs = _sequence(rate_limits, RateLimit, "rate_limits")
        budget_specs = [b.spec for b in _sequence(budgets, Budget, "budgets")]
        now = self._now()
        expiry = timeutil.resolve_expiry(expires_in, expires_at, now)

        public_id, plaintext = self._format.generate()
        key_id = ids.key_id(public_id)
        values = keys.new_key_row(
            key_id=key_id,
            org_id=org_id,
            project_id=project_id,
            product_id=product_id,
            name=name,
            start=self._format.start(plaintext),
            digest=self._ring.digest(plaintext),
            pepper_id=self._ring.current_id,
            scopes=scope_rules.encode(granted),
            metadata=meta,
            delegated_by=delegated,
            expires_at=expiry,
            max_uses=cap,
            now=now,
            allowed_ips=ips.stored(networks),
            identity_id=identity_id,
        )
        await admin.create_key(self._db, values, limit_specs, budget_specs)
        key = rows.to_key({**values, "scopes": granted})
        await self._key_event("created", key)
        return IssuedKey.model_construct(key=key, plaintext=plaintext)

    async def delegate(
        self,
        key_id: str,
        *,
        name: str = "",
        scopes: Sequence[str] | None = None,
        project_id: str | None = None,
        product_id: str | None = None,
        expires_in: str | timedelta | None = None,
        expires_at: datetime | None = None,
        metadata: dict[str, Any] | None = None,
        max_uses: int | None = None,
        rate_limits: Sequence[RateLimit] = (),
        budgets: Sequence[Budget] = (),
        allowed_ips: Sequence[str] | None = None,
    ) -> IssuedKey:
        """Mint a child of the key ``key_id`` (for an agent, a script, a sub-task).

        A child never exceeds its parent: its scopes are covered by the parent's,
        it expires no later, and it stays inside the parent's project, product and
        IP ranges; what is left out (``None``) is the parent's. It belongs to the
        parent's organization and identity. Its own ``budgets``, ``rate_limits``
        and ``max_uses`` come on top of its ancestors': every charge and metered
        validation of the child debits the child's and every ancestor's budgets
        and rate limits in the same atomic step, so a tree of keys never spends
        more than its root allows. Revoking or disabling an ancestor refuses the
        child on its next call; narrowing one (:meth:`update_key`) narrows the
        child; deleting one deletes it.

        Raises:
            NotFoundError: no such key (or project, product).
            RevokedKeyError, DisabledKeyError, ExpiredKeyError: the parent cannot
                delegate (``ancestor=True``: a key above it was revoked or disabled).
            InvalidArgumentError: the child would exceed its parent (the field is
                named), or would sit deeper than ``max_delegation_depth``.
        """
        parent_id = ids.check(ids.KEY, key_id)
        project_id = ids.check_optional(ids.PROJECT, project_id, field="project_id")
        product_id = ids.check_optional(ids.PRODUCT, product_id, field="product_id")
        name = inputs.text(name, "name", allow_empty=True)
        granted = None if scopes is None else scope_rules.normalize(scopes, "scopes")
        meta = inputs.metadata(metadata)
        cap = _max_uses(max_uses)
        networks = ips.optional_ranges(allowed_ips)
        limit_specs = _sequence(rate_limits, RateLimit, "rate_limits")
        budget_specs = [b.spec for b in _sequence(budgets, Budget, "budgets")]
        now = self._now()
        expiry = timeutil.resolve_expiry(expires_in, expires_at, now)
        asked = delegation.Grants(granted or (), expiry, project_id, product_id, networks)
        left_out = {
            "scopes": granted is None,
            "expires_at": expiry is None,
            "project_id": project_id is None,
            "product_id": product_id is None,
            "allowed_ips": networks is None,
        }
        inherit = frozenset(field for field, out in left_out.items() if out)
        if self._max_depth == 0:
            raise InvalidArgumentError("key_id", "delegation is off (max_delegation_depth=0)")

        public_id, plaintext = self._format.generate()
        child_id = ids.key_id(public_id)

        def child_row(parent: Any) -> dict[str, Any]:
            m = parent._mapping
            grants = delegation.child(delegation.Grants.of(m), asked, inherit=inherit)
            ancestors = (parent_id, *(m[name] for name in ANCESTORS))[: len(ANCESTORS)]
            return {
                **keys.new_key_row(
                    key_id=child_id,
                    org_id=m["org_id"],
                    project_id=grants.project_id,
                    product_id=grants.product_id,
                    name=name,
                    start=self._format.start(plaintext),
                    digest=self._ring.digest(plaintext),
                    pepper_id=self._ring.current_id,
                    scopes=scope_rules.encode(grants.scopes),
                    metadata=meta,
                    delegated_by=parent_id,
                    expires_at=grants.expires_at,
                    max_uses=cap,
                    now=now,
                    allowed_ips=ips.stored(grants.allowed_ips),
                    identity_id=m["identity_id"],
                ),
                **dict(zip(ANCESTORS, ancestors, strict=True)),
            }

        values = await admin.delegate(
            self._db, parent_id, child_row, limit_specs, budget_specs, self._max_depth, now
        )
        key = rows.to_key(values)
        await self._key_event("delegated", key)
        return IssuedKey.model_construct(key=key, plaintext=plaintext)

    # --- access requests ------------------------------------------------------------

    async def request_access(
        self,
        org_id: str,
        *,
        requester: str,
        scopes: Sequence[str] = (),
        project_id: str | None = None,
        product_id: str | None = None,
        budgets: Sequence[Budget] = (),
        expires_in: str | timedelta | None = None,
        reason: str = "",
        identity_id: str | None = None,
        ttl: str | timedelta = "7d",
    ) -> tuple[AccessRequest, str]:
        """An agent or app asks the organization for a key: these scopes, project or
        product, budgets, and a key that lives ``expires_in`` from its claim. The
        owner approves it (:meth:`approve_access`, as asked or narrower) or denies
        it; the requester then claims the key once (:meth:`claim_access`) with the
        claim secret returned here, shown once (only its digest is kept). The
        request expires after ``ttl`` (7 days; at most 30) if not claimed by then.

        Returns: the pending request, and its claim secret (``kcr_...``).

        Raises: NotFoundError (organization, project, product, identity),
        InvalidArgumentError.
        """
        org_id = ids.check(ids.ORG, org_id)
        identity_id = ids.check_optional(ids.IDENTITY, identity_id, field="identity_id")
        asked = access_rules.Terms(
            scopes=scope_rules.normalize(scopes, "scopes"),
            project_id=ids.check_optional(ids.PROJECT, project_id, field="project_id"),
            product_id=ids.check_optional(ids.PRODUCT, product_id, field="product_id"),
            budgets=tuple(_sequence(budgets, Budget, "budgets")),
            lifetime=access_rules.lifetime(expires_in),
        )
        open_for = timeutil.parse_duration(ttl, "ttl")
        if open_for > _MAX_GRACE:
            raise InvalidArgumentError("ttl", "must be at most 30 days")
        now = self._now()
        secret = access_rules.CLAIM_PREFIX + random_string(32)
        values = {
            "id": ids.new_id(ids.ACCESS_REQUEST),
            "org_id": org_id,
            "requester": inputs.text(requester, "requester"),
            "reason": access_rules.reason(reason, allow_empty=True),
            "identity_id": identity_id,
            "asked": asked.to_json(),
            "granted": None,
            "status": "pending",
            "claim_digest": self._ring.digest(secret),
            "claim_pepper_id": self._ring.current_id,
            "created_at": now,
            "expires_at": now + open_for,
            "decided_at": None,
            "decided_by": None,
            "decision_reason": None,
            "key_id": None,
            "claimed_at": None,
        }
        await access_ops.request(self._db, values)
        return rows.to_access_request(values, now), secret

    async def get_access_request(self, request_id: str) -> AccessRequest:
        """Raises: NotFoundError."""
        request_id = ids.check(ids.ACCESS_REQUEST, request_id)
        row = await self._db.read(access_db.get_request, request_id)
        if row is None:
            raise NotFoundError("access request", request_id)
        return rows.to_access_request(row, self._now())

    async def list_access_requests(
        self, org_id: str, *, status: str | None = "pending", limit: int = 100, offset: int = 0
    ) -> list[AccessRequest]:
        """The organization's requests, newest first; ``status``: pending (the
        default), approved, denied, claimed, expired, or None for all.

        Raises: InvalidArgumentError."""
        org_id = ids.check(ids.ORG, org_id)
        status = access_rules.status(status)
        limit, offset = inputs.page(limit, offset)
        now = self._now()
        found = await self._db.read(access_db.list_requests, org_id, status, now, limit, offset)
        return [rows.to_access_request(r, now) for r in found]

    async def approve_access(
        self,
        request_id: str,
        *,
        scopes: Sequence[str] | None = None,
        budgets: Sequence[Budget] | None = None,
        expires_in: str | timedelta | None = None,
        note: str | None = None,
    ) -> AccessRequest:
        """Approve a pending request, as asked or narrower: fewer ``scopes``,
        ``budgets`` no larger (each asked-for budget stays; more may be added), a
        shorter ``expires_in``. Who approved is the actor (:meth:`acting_as`).

        Raises: NotFoundError, AccessNotGrantedError (not pending: decided,
        claimed or expired), InvalidArgumentError (wider than asked).
        """
        request_id = ids.check(ids.ACCESS_REQUEST, request_id)
        granted_scopes = None if scopes is None else scope_rules.normalize(scopes, "scopes")
        granted_budgets = None if budgets is None else tuple(_sequence(budgets, Budget, "budgets"))
        lifetime = access_rules.lifetime(expires_in)
        said = None if note is None else access_rules.reason(note, "note")
        now = self._now()

        def values(asked: access_rules.Terms) -> dict[str, Any]:
            terms = access_rules.approved(
                asked, scopes=granted_scopes, budgets=granted_budgets, lifetime=lifetime
            )
            return access_ops.decision("approved", now, said, granted=terms.to_json())

        row = await access_ops.decide(self._db, request_id, values, "access.approved", now)
        return rows.to_access_request(row, now)

    async def deny_access(self, request_id: str, *, reason: str) -> AccessRequest:
        """Deny a pending request; the requester's claim then says ``reason``.

        Raises: NotFoundError, AccessNotGrantedError (not pending), InvalidArgumentError.
        """
        request_id = ids.check(ids.ACCESS_REQUEST, request_id)
        why = access_rules.reason(reason)
        now = self._now()
        row = await access_ops.decide(
            self._db,
            request_id,
            lambda _: access_ops.decision("denied", now, why),
            "access.denied",
            now,
        )
        return rows.to_access_request(row, now)

    async def claim_access(self, request_id: str, claim_secret: str) -> IssuedKey:
        """The key of an approved request, with its plaintext: once. The key has
        the granted terms, the request's identity, and ``metadata`` naming the
        request.

        Raises:
            NotFoundError: no such request, or not its claim secret.
            AccessNotGrantedError: pending, denied (with the owner's reason),
                already claimed, or expired.
        """
        request_id = ids.check(ids.ACCESS_REQUEST, request_id)
        if not access_rules.looks_like_claim_secret(claim_secret):
            raise NotFoundError("access request", request_id)
        now = self._now()
        public_id, plaintext = self._format.generate()

        def verify(pepper_id: str, digest: str) -> bool:
            ring = self._ring
            return ring.knows(pepper_id) and ring.verify(claim_secret, pepper_id, digest)

        def key_row(found: Any, granted: access_rules.Terms) -> dict[str, Any]:
            return keys.new_key_row(
                key_id=ids.key_id(public_id),
                org_id=found.org_id,
                project_id=granted.project_id,
                product_id=granted.product_id,
                name=found.requester,
                start=self._format.start(plaintext),
                digest=self._ring.digest(plaintext),
                pepper_id=self._ring.current_id,
                scopes=scope_rules.encode(granted.scopes),
                metadata={"access_request": request_id},
                delegated_by=found.decided_by,
                expires_at=None if granted.lifetime is None else now + granted.lifetime,
                max_uses=None,
                now=now,
                identity_id=found.identity_id,
            )

        row = await access_ops.claim(self._db, request_id, verify, key_row, now)
        key = rows.to_key(row)
        await self._key_event("created", key)
        return IssuedKey.model_construct(key=key, plaintext=plaintext)

    async def import_key(
        self,
        org_id: str,
        *,
        scheme: str,
        hash: str,
        prefix: str | None = None,
        start: str = "",
        project_id: str | None = None,
        product_id: str | None = None,
        name: str = "",
        scopes: Sequence[str] = (),
        expires_at: datetime | None = None,
        metadata: dict[str, Any] | None = None,
        max_uses: int | None = None,
        rate_limits: Sequence[RateLimit] = (),
        budgets: Sequence[Budget] = (),
        identity_id: str | None = None,
    ) -> APIKey:
        """Bring a key from another system without reissuing it: its customer keeps
        using the same plaintext. ``hash`` is what that system stored, ``scheme``
        how (``"apikeys-platform"``, ``"sha256"``, ``"drf"``), and ``prefix`` the
        lookup part it stored beside it (apikeys-platform's ``key_prefix``,
        djangorestframework-api-key's ``prefix``). The key is verified by that
        scheme until its first success, which re-digests it with keycap's HMAC and
        drops the foreign hash. Everything else is as :meth:`create_key`; the
        client must be made with ``imported_keys=True`` to accept such keys.
        ``start``: what UIs show of the key (its first characters, never all).

        Raises: NotFoundError, InvalidArgumentError.
        """
        org_id = ids.check(ids.ORG, org_id)
        lookup, foreign = import_rules.stored_hash(scheme, hash, prefix=prefix)
        now = self._now()
        if expires_at is not None:
            expires_at = timeutil.aware_utc(expires_at, "expires_at")
        key_id = ids.key_id(self._format.generate()[0])
        row = keys.new_key_row(
            key_id=key_id,
            org_id=org_id,
            project_id=ids.check_optional(ids.PROJECT, project_id, field="project_id"),
            product_id=ids.check_optional(ids.PRODUCT, product_id, field="product_id"),
            name=inputs.text(name, "name", allow_empty=True),
            start=inputs.text(start, "start", allow_empty=True, max_length=40),
            digest=import_rules.IMPORTED_DIGEST,
            pepper_id=import_rules.IMPORTED_PEPPER,
            scopes=scope_rules.encode(scope_rules.normalize(scopes, "scopes")),
            metadata=inputs.metadata(metadata),
            delegated_by=None,
            expires_at=expires_at,
            max_uses=_max_uses(max_uses),
            now=now,
            identity_id=ids.check_optional(ids.IDENTITY, identity_id, field="identity_id"),
        )
        imported = {
            "key_id": key_id,
            "scheme": scheme,
            "lookup": lookup,
            "foreign_hash": foreign,
            "imported_at": now,
            "upgraded_at": None,
        }
        limit_specs = _sequence(rate_limits, RateLimit, "rate_limits")
        budget_specs = [b.spec for b in _sequence(budgets, Budget, "budgets")]
        await import_ops.import_key(self._db, row, imported, limit_specs, budget_specs)
        key = rows.to_key({**row, "scopes": scope_rules.decode(row["scopes"])})
        await self._key_event("imported", key)
        return key

    async def get_key(self, key_id: str) -> APIKey:
        """Raises: NotFoundError."""
        key_id = ids.check(ids.KEY, key_id)
        row = await self._db.read(keys.get_key, key_id)
        if row is None:
            raise NotFoundError("key", key_id)
        return rows.to_key(row)

    async def list_keys(
        self,
        *,
        org_id: str | None = None,
        project_id: str | None = None,
        product_id: str | None = None,
        status: KeyStatus | str | None = None,
        limit: int = 100,
        offset: int = 0,
        newest_first: bool = False,
        identity_id: str | None = None,
        descendants_of: str | None = None,
    ) -> list[APIKey]:
        """Keys oldest first (or ``newest_first``), filtered in SQL. ``status`` is
        active, revoked, expired or disabled; ``identity_id``: only its keys;
        ``descendants_of``: only keys delegated from that key, at any depth.

        Raises: InvalidArgumentError.
        """
        descendants_of = ids.check_optional(ids.KEY, descendants_of, field="descendants_of")
        org_id = ids.check_optional(ids.ORG, org_id, field="org_id")
        project_id = ids.check_optional(ids.PROJECT, project_id, field="project_id")
        product_id = ids.check_optional(ids.PRODUCT, product_id, field="product_id")
        identity_id = ids.check_optional(ids.IDENTITY, identity_id, field="identity_id")
        if status is not None:
            try:
                status = KeyStatus(status)
            except ValueError:
                raise InvalidArgumentError(
                    "status", "must be one of " + ", ".join(s.value for s in KeyStatus)
                ) from None
        limit, offset = inputs.page(limit, offset)
        found = await self._db.read(
            keys.list_keys,
            org_id=org_id,
            project_id=project_id,
            product_id=product_id,
            status=status.value if status is not None else None,
            now=self._now(),
            limit=limit,
            offset=offset,
            newest_first=inputs.flag(newest_first, "newest_first"),
            identity_id=identity_id,
            descendants_of=descendants_of,
        )
        return [rows.to_key(r) for r in found]

    async def update_key(
        self,
        key_id: str,
        *,
        name: str | _Unset = UNSET,
        scopes: Sequence[str] | _Unset = UNSET,
        metadata: dict[str, Any] | _Unset = UNSET,
        expires_in: str | timedelta | _Unset = UNSET,
        expires_at: datetime | _Unset | None = UNSET,
        max_uses: int | _Unset | None = UNSET,
        allowed_ips: Sequence[str] | _Unset | None = UNSET,
    ) -> APIKey:
        """Change a key's name, scopes, metadata, expiry (``expires_at=None``: never),
        usage cap (``max_uses=None``: none) or IP ranges (``allowed_ips=None``: any
        address). Arguments left out are unchanged. Takes effect on the next
        validation.

        Raises: NotFoundError, InvalidArgumentError (also for scopes the key's
        organization does not allow).
        """
        key_id = ids.check(ids.KEY, key_id)
        now = self._now()
        values: dict[str, Any] = {"updated_at": now}
        if name is not UNSET:
            values["name"] = inputs.text(name, "name", allow_empty=True)
        if scopes is not UNSET:
            values["scopes"] = scope_rules.encode(scope_rules.normalize(scopes, "scopes"))
        if metadata is not UNSET:
            values["metadata"] = inputs.metadata(metadata)
        if max_uses is not UNSET:
            values["max_uses"] = _max_uses(max_uses)
        if allowed_ips is not UNSET:
            values["allowed_ips"] = ips.stored(ips.optional_ranges(allowed_ips))
        if expires_in is not UNSET or expires_at is not UNSET:
            if expires_in is not UNSET and expires_at is not UNSET:
                raise InvalidArgumentError("expires_in", "give expires_in or expires_at, not both")
            if expires_at is None:
                values["expires_at"] = None
            else:
                values["expires_at"] = timeutil.resolve_expiry(
                    None if expires_in is UNSET else expires_in,
                    None if expires_at is UNSET else expires_at,
                    now,
                )
        row = await admin.update_key(self._db, key_id, values)
        self._changed()
        if row is None:
            raise NotFoundError("key", key_id)
        return await self._key_event("updated", rows.to_key(row))

    async def roll_key(self, key_id: str, *, grace: str | timedelta = "24h") -> IssuedKey:
        """Give the key a new secret: same id, scopes, budgets, limits, counts and
        ledger. The old secret keeps working for ``grace`` (``"24h"``; ``"0s"`` or
        ``timedelta(0)`` cuts it at once, at most 30 days), then is refused with
        ``RolledKeyError`` (``rolled_key``). The new plaintext is in the result,
        shown once. Rolling again replaces the previous secret with the current one.

        Raises: NotFoundError, RevokedKeyError, InvalidArgumentError.
        """
        key_id = ids.check(ids.KEY, key_id)
        span = _grace(grace)
        _, plaintext = self._format.generate(ids.public_id(key_id))
        now = self._now()
        row = await admin.change_key(
            self._db,
            key_id,
            "key.rolled",
            functools.partial(
                keys.roll_key,
                key_id=key_id,
                digest=self._ring.digest(plaintext),
                pepper_id=self._ring.current_id,
                previous_until=now + span,
                now=now,
            ),
            now,
        )
        if row is None:
            existing = await self.get_key(key_id)  # NotFoundError if it is not there
            assert existing.revoked_at is not None
            raise RevokedKeyError(existing.revoked_at, key_id=key_id)
        self._changed()
        key = await self._key_event("rolled", rows.to_key(row))
        return IssuedKey.model_construct(key=key, plaintext=plaintext)

    async def revoke_key(self, key_id: str) -> APIKey:
        """Revoke for good. Idempotent: a second call keeps the first ``revoked_at``.

        Raises: NotFoundError.
        """
        key_id, now = ids.check(ids.KEY, key_id), self._now()
        change = functools.partial(keys.revoke_key, key_id=key_id, now=now)
        row = await admin.change_key(self._db, key_id, "key.revoked", change, now)
        await self._forget_leases(key_id)
        return await self._key_event("revoked", self._found(row, key_id))

    async def disable_key(self, key_id: str) -> APIKey:
        """Suspend a key until :meth:`enable_key`. Idempotent. Raises: NotFoundError."""
        key_id, now = ids.check(ids.KEY, key_id), self._now()
        change = functools.partial(keys.set_disabled, key_id=key_id, now=now, disabled=True)
        row = await admin.change_key(self._db, key_id, "key.disabled", change, now)
        await self._forget_leases(key_id)
        return await self._key_event("disabled", self._found(row, key_id))

    async def enable_key(self, key_id: str) -> APIKey:
        """Lift a suspension (a revoked key stays revoked). Raises: NotFoundError."""
        key_id, now = ids.check(ids.KEY, key_id), self._now()
        change = functools.partial(keys.set_disabled, key_id=key_id, now=now, disabled=False)
        row = await admin.change_key(self._db, key_id, "key.enabled", change, now)
        return await self._key_event("enabled", self._found(row, key_id))

    async def delete_key(self, key_id: str) -> None:
        """Delete a key with its own limits and budgets, and the keys delegated from
        it. Prefer :meth:`revoke_key`, which keeps the record. The keys are revoked
        first and their open holds are released, so no reservation is left holding
        an ancestor's, project's or organization's budget; their ledger rows stay
        (with their ids) as financial history.

        Raises: NotFoundError.
        """
        key_id = ids.check(ids.KEY, key_id)
        key = await self.get_key(key_id) if self._on_key_event is not None else None
        await self._forget_leases(key_id)
        await self._retire_keys("id", key_id)
        await self._delete(ids.KEY, key_id)
        if key is not None:
            await self._key_event("deleted", key)

    async def _forget_leases(self, key_id: str) -> None:
        """Settle this client's lease slices of a key it just revoked, disabled or is
        deleting: its next charge goes to the database, which refuses it."""
        if self._leases is not None:
            await self._leases.forget(key_id, self._now())

    async def _key_event(self, kind: str, key: APIKey) -> APIKey:
        """Tell ``on_key_event`` (after commit); a failing hook is logged."""
        if self._on_key_event is not None:
            event = KeyEvent.model_construct(
                kind=kind, key_id=key.id, org_id=key.org_id, at=self._now(), key=key
            )
            try:
                await self._on_key_event(event)
            except Exception:
                log.exception("keycap: on_key_event failed for %s of %s", kind, key.id)
        return key

    def _found(self, row: Any, key_id: str) -> APIKey:
        """The key a write changed (revoke, disable, enable)."""
        self._changed()
        if row is None:
            raise NotFoundError("key", key_id)
        return rows.to_key(row)

    # --- keys: validation ---------------------------------------------------------------

    @_observed("validate", _presented_key, "plaintext")
    async def validate_key(
        self,
        plaintext: str,
        *,
        required_scopes: Sequence[str | scope_rules.AnyOf] = (),
        product_id: str | None = None,
        project_id: str | None = None,
        org_id: str | None = None,
        product_name: str | None = None,
        track_usage: bool | None = None,
        cost: money.Amount | Mapping[str, money.Amount] | None = None,
        client_ip: str | None = None,
    ) -> APIKey:
        """Check a presented key against the grant rule (docs/security.md) and its limits.

        ``required_scopes``: every one is needed; an item ``any_of("chat:write",
        "chat:admin")`` needs one of its scopes.

        Rate limits and the usage cap always apply. With ``cost`` (a ``Decimal``
        for the ``spend`` meter, or ``{meter: amount}``), every applicable budget
        is debited too. It is all decided in one transaction: all pass and all are
        consumed, or the call is refused and nothing is consumed or written.

        The returned key carries the tightest rate limit (``rate_limit``) and, with
        ``cost``, the charge and its budgets (``charge``), for response headers.

        ``product_name`` asks for a product by name in the key's own organization
        (``"chat-api"``), resolved in the same statement; use it or ``product_id``.

        ``client_ip``: the caller's address. A key with ``allowed_ips`` is refused
        (``ForbiddenError``, reason ``"ip"``) without one, or from outside them.

        Raises:
            InvalidKeyError: malformed, unknown, or wrong secret.
            RevokedKeyError, DisabledKeyError, ExpiredKeyError: the key's state.
            ForbiddenError: not valid for the organization, project or product asked for.
            InsufficientScopeError: ``missing_scopes`` (and ``missing_any_of``)
                list what is lacking.
            UsageExhaustedError: ``max_uses`` reached.
            RateLimitedError: a rate limit refused; ``retry_after`` says when to retry.
            BudgetExceededError: a budget of the key, project or organization refused.
            InvalidArgumentError: a bad ``required_scopes``, id or ``cost`` argument.
            DatabaseUnavailableError: the database could not be reached.
        """
        # Everything that can be refused without I/O is refused first, cheapest first.
        try:
            public_id: str | None = self._format.parse(plaintext)
        except InvalidKeyError:
            if not self._imported or not isinstance(plaintext, str):
                raise
            public_id = None  # maybe a key imported from another system: looked up below
        client = None if client_ip is None else ips.address(client_ip)
        req = policy.Requirement(
            scopes=scope_rules.required(required_scopes, "required_scopes"),
            org_id=_asked(ids.ORG, org_id, "org_id"),
            project_id=_asked(ids.PROJECT, project_id, "project_id"),
            product_id=_asked(ids.PRODUCT, product_id, "product_id"),
            product_name=None
            if product_name is None
            else inputs.text(product_name, "product_name"),
            ip_version=None if client is None else client.version,
        )
        if product_id is not None and product_name is not None:
            raise InvalidArgumentError("product_name", "give product_id or product_name, not both")
        track = (
            self._track_usage if track_usage is None else inputs.flag(track_usage, "track_usage")
        )
        amounts = None if cost is None else money.costs(cost)
        now = self._now()
        if public_id is not None:
            key_id = ids.key_id(public_id)
        elif (
            found := await import_ops.resolve(self._db, plaintext, self._ring, self._foreign, now)
        ) is not None:
            key_id = found
        else:
            raise InvalidKeyError()
        return await self._pipeline.validate(plaintext, key_id, req, amounts, track, now, client)

    # --- metering: limits and budgets -------------------------------------------------

    async def set_rate_limit(self, subject_id: str, limit: RateLimit) -> RateLimitStatus:
        """Attach (or change, by name) a rate limit on a key, project or organization.
        A project's or organization's limit is shared by all keys under it.

        Raises: NotFoundError, InvalidArgumentError.
        """
        subject_id = ids.check_subject(subject_id)
        spec = _sequence([limit], RateLimit, "limit")[0]
        now = self._now()
        row = await admin.set_rate_limit(self._db, subject_id, spec, now)
        self._changed()  # a cached key may now be rate-limited
        return results.rate_limit_status(row, now)

    async def remove_rate_limit(self, subject_id: str, name: str) -> bool:
        """Remove a rate limit by name; False if there was none."""
        subject_id = ids.check_subject(subject_id)
        name = inputs.text(name, "name")
        return await admin.remove_rate_limit(self._db, subject_id, name, self._now())

    async def get_rate_limits(self, subject_id: str) -> list[RateLimitStatus]:
        """The rate limits attached directly to a key, project or organization."""
        subject_id = ids.check_subject(subject_id)
        now = self._now()
        found = await self._db.read(rate_limits.rate_limits_of, subject_id)
        return [results.rate_limit_status(r, now) for r in found]

    async def set_budget(self, subject_id: str, budget: Budget) -> BudgetStatus:
        """Attach (or change: one per meter and period) a budget on a key, project or
        organization. Changing a limit keeps what was used and held this period.

        Raises: NotFoundError, InvalidArgumentError.
        """
        subject_id = ids.check_subject(subject_id)
        if not isinstance(budget, Budget):
            raise InvalidArgumentError("budget", "must be a keycap.Budget")
        spec = budget.spec
        now = self._now()
        return results.budget_status(await admin.set_budget(self._db, subject_id, spec, now), now)

    async def remove_budget(self, budget_id: str) -> bool:
        """Remove a budget (its ledger rows stay); False if there was none."""
        budget_id = ids.check(ids.BUDGET, budget_id)
        return await admin.remove_budget(self._db, budget_id, self._now())

    async def get_budgets(self, subject_id: str) -> list[BudgetStatus]:
        """The budgets attached directly to a key, project or organization, as they stand
        (holds past their ttl are returned to them first)."""
        subject_id = ids.check_subject(subject_id)
        now = self._now()
        found = await admin.swept_budgets(self._db, subject_id, now)
        return [results.budget_status(r, now) for r in found]

    async def remaining(self, key_id: str) -> list[Remaining]:
        """What the key can still spend now, per meter: the least any budget of that
        meter applying to it (its own, its ancestors', its identity's, its project's,
        its organization's) has left,
        the budget that binds, and when that one resets. Holds past their ttl are
        returned first. Meters without a budget are not listed (nothing limits
        them); nor are rate limits (``get_rate_limits``). The key's state is not
        consulted: a revoked key still shows its budgets.

        Raises: NotFoundError.
        """
        key_id = ids.check(ids.KEY, key_id)
        row = await self._db.read(keys.get_key, key_id)
        if row is None:
            raise NotFoundError("key", key_id)
        now = self._now()
        found = await admin.key_budgets(self._db, KeyRef.of(key_id, row), now)
        return results.remaining(found, now)

    async def grant_credit(self, budget_id: str, amount: money.Amount) -> BudgetStatus:
        """Top a budget up for its current period (a lifetime budget: for good).

        Raises: NotFoundError, InvalidArgumentError.
        """
        budget_id = ids.check(ids.BUDGET, budget_id)
        micros = money.to_micros(amount, "amount", allow_zero=False)
        now = self._now()
        return results.budget_status(
            await admin.grant_credit(self._db, budget_id, micros, now), now
        )

    # --- metering: charges and holds --------------------------------------------------

    @_observed("charge", _given_key, "key_id")
    async def charge(
        self,
        key_id: str,
        amount: money.Amount | Mapping[str, money.Amount],
        *,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Charge:
        """Charge a cost known after the work: every budget of each meter on the key,
        its ancestors, its identity, its project and its organization takes it, or
        none does. ``key_id`` may be an identity's id instead: an identity your app
        authenticates itself, metered without a key (its own budgets and its
        organization's; always one transaction).

        Raises:
            BudgetExceededError: names the budget that refused.
            RevokedKeyError, DisabledKeyError, ExpiredKeyError, NotFoundError: the key
                (or identity).
            InvalidArgumentError: a bad amount, meter or idempotency key.
        """
        key_id = ids.check_payer(key_id)
        amounts = money.costs(amount, "amount")
        leasing = self._leases is not None and idempotency_key is None and metadata is None
        if leasing and len(amounts) == 1 and not ids.is_valid(ids.IDENTITY, key_id):
            assert self._leases is not None
            ((meter, micros),) = amounts.items()
            if (
                leased := await self._leases.charge(key_id, meter, micros, self._now())
            ) is not None:
                return leased
        return await charges.charge(
            self._db,
            key_id=key_id,
            amounts=amounts,
            idempotency_key=_idempotency(idempotency_key),
            metadata=inputs.metadata(metadata) or None,
            now=self._now(),
            on_alert=self._on_alert,
        )

    @_observed("reserve", _given_key, "key_id")
    async def reserve(
        self,
        key_id: str,
        amount: money.Amount,
        *,
        meter: str = money.DEFAULT_METER,
        ttl: str | timedelta = "15m",
        idempotency_key: str | None = None,
    ) -> Hold:
        """Reserve ``amount`` on every budget of ``meter`` before work whose cost is known
        only afterwards; :meth:`settle` or :meth:`release` it after. Unsettled, it
        returns to the budgets by itself after ``ttl`` (1 second to 30 days).

        ``key_id`` may be an identity's id, as for :meth:`charge`.

        Raises: BudgetExceededError, the key's errors, InvalidArgumentError.
        """
        key_id = ids.check_payer(key_id)
        micros = money.to_micros(amount, "amount")
        lifetime = timeutil.parse_duration(ttl, "ttl")
        if lifetime > _MAX_HOLD_TTL:
            raise InvalidArgumentError("ttl", "must be at most 30 days")
        return await hold_ops.reserve(
            self._db,
            key_id=key_id,
            meter=money.meter_name(meter),
            amount=micros,
            ttl=lifetime,
            idempotency_key=_idempotency(idempotency_key),
            now=self._now(),
        )

    @_observed("settle", _no_key, "hold_id")
    async def settle(
        self, hold_id: str, actual: money.Amount, *, idempotency_key: str | None = None
    ) -> Settlement:
        """Charge what was actually used against a hold and return the rest. At or below
        the held amount this always succeeds; above it the excess is charged as far as
        the budgets allow and the rest is recorded as ``shortfall``.

        Raises: NotFoundError, HoldClosedError, InvalidArgumentError.
        """
        hold_id = ids.check(ids.HOLD, hold_id)
        micros = money.to_micros(actual, "actual")
        return await hold_ops.settle(
            self._db,
            hold_id=hold_id,
            actual=micros,
            idempotency_key=_idempotency(idempotency_key),
            now=self._now(),
            on_alert=self._on_alert,
        )

    async def settle_eventually(self, hold_id: str, actual: money.Amount) -> Settlement | None:
        """:meth:`settle`, and if the database cannot be reached, keep the settlement
        and retry it until it can: what was used is not lost to an outage.

        Returns the settlement, or None when it was kept: it is then handed to
        ``on_unsettled`` (persist it there to survive this process), retried with
        backoff, and listed in :attr:`pending_settlements` until written. A hold
        that expired meanwhile is charged with ``actual`` instead. Every attempt
        carries the same idempotency key, so the hold is settled once.
        (docs/observability.md says what can still be lost.)

        Raises: as :meth:`settle`, except DatabaseUnavailableError.
        """
        hold_id = ids.check(ids.HOLD, hold_id)
        amount = money.from_micros(money.to_micros(actual, "actual"))
        pending = PendingSettlement(
            hold_id, amount, f"keycap-settle-{hold_id}", failed_at=self._now()
        )
        try:
            return await self._settle_pending(pending)
        except DatabaseUnavailableError as error:
            await self._pending.keep(pending, error)
            return None

    @property
    def pending_settlements(self) -> tuple[PendingSettlement, ...]:
        """Settlements :meth:`settle_eventually` kept because the database was down,
        oldest first; each leaves once written."""
        return self._pending.kept

    async def retry_settlements(self) -> int:
        """Try the kept settlements now (they are retried on their own too); how
        many were written."""
        return await self._pending.retry()

    async def _keep_settlement(self, hold_id: str, micros: int, error: KeycapError) -> None:
        """A lease slice's settlement the database could not take: kept and retried
        as :meth:`settle_eventually` keeps its own."""
        pending = PendingSettlement(
            hold_id, money.from_micros(micros), f"keycap-settle-{hold_id}", failed_at=self._now()
        )
        await self._pending.keep(pending, error)

    async def _settle_pending(self, pending: PendingSettlement) -> Settlement:
        return await self.settle(
            pending.hold_id, pending.actual, idempotency_key=pending.idempotency_key
        )

    async def _charge_expired(self, pending: PendingSettlement) -> Charge:
        hold = await self.get_hold(pending.hold_id)
        if hold.key_id is None:  # the key was deleted: nothing left to charge
            raise NotFoundError("key", "(deleted)")
        return await self.charge(
            hold.key_id, {hold.meter: pending.actual}, idempotency_key=pending.idempotency_key
        )

    @_observed("release", _no_key, "hold_id")
    async def release(self, hold_id: str, *, idempotency_key: str | None = None) -> Hold:
        """Return a hold to its budgets unused. Raises: NotFoundError, HoldClosedError."""
        hold_id = ids.check(ids.HOLD, hold_id)
        return await release_ops.release(
            self._db,
            hold_id=hold_id,
            idempotency_key=_idempotency(idempotency_key),
            now=self._now(),
        )

    async def get_hold(self, hold_id: str) -> Hold:
        """Raises: NotFoundError."""
        hold_id = ids.check(ids.HOLD, hold_id)
        row = await self._db.read(holds.get_hold, hold_id)
        if row is None:
            raise NotFoundError("hold", hold_id)
        return release_ops.hold_model(row)

    async def sweep_expired_holds(self) -> int:
        """Return every hold past its ttl to its budgets now (they are also returned
        lazily when they stand in a charge's way). Returns how many."""
        return await release_ops.sweep(self._db, self._now())

    async def usage(
        self,
        *,
        key_id: str | None = None,
        project_id: str | None = None,
        org_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        per: str = "day",
    ) -> list[UsageRow]:
        """What was charged, per day or month (UTC) and meter, from the ledger.

        ``since`` defaults to 30 days ago; ``until`` (exclusive) to no end.
        """
        now = self._now()
        if per not in ("day", "month"):
            raise InvalidArgumentError("per", "must be 'day' or 'month'")
        start = now - timedelta(days=30) if since is None else timeutil.aware_utc(since, "since")
        end = timeutil.MAX_DATETIME if until is None else timeutil.aware_utc(until, "until")
        found = await self._db.read(
            ledger.usage,
            key_id=ids.check_optional(ids.KEY, key_id, field="key_id"),
            project_id=ids.check_optional(ids.PROJECT, project_id, field="project_id"),
            org_id=ids.check_optional(ids.ORG, org_id, field="org_id"),
            since=start,
            until=end,
            monthly=per == "month",
        )
        return [
            UsageRow.model_construct(
                period=r.bucket,
                meter=r.meter,
                amount=money.from_micros(int(r.micros)),
                charges=r.charges,
            )
            for r in found
        ]

    def _changed(self) -> None:
        """Something a validation depends on changed: forget cached validations."""
        if self._cache is not None:
            self._cache.clear()


_MAX_GRACE = timedelta(days=30)


def _foreign_secrets(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        k in import_rules.SCHEMES and isinstance(v, str) and v for k, v in value.items()
    ):
        raise ConfigurationError(
            "foreign_secrets maps a scheme (" + ", ".join(import_rules.SCHEMES) + ") to its secret"
        )
    return dict(value)


def _depth(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_DEPTH:
        raise ConfigurationError(f"max_delegation_depth must be an integer from 0 to {MAX_DEPTH}")
    return value


def _grace(value: object) -> timedelta:
    """A roll's grace: a duration from 0 (cut at once) to 30 days."""
    if value in ("0", "0s", 0) or value == timedelta(0):
        return timedelta(0)
    span = timeutil.parse_duration(value, "grace")
    if span > _MAX_GRACE:
        raise InvalidArgumentError("grace", "must be at most 30 days")
    return span


def _asked(kind: str, value: object, field: str) -> str | None:
    """An asked-for id. One that is not an id of that kind matches nothing, so it is
    replaced by a value no id equals: the rule then refuses it as forbidden, after
    the key itself was checked, and the odd string never reaches the driver."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgumentError(field, "must be a string id")
    return value if ids.is_valid(kind, value) else "-"


def _max_uses(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10**12:
        raise InvalidArgumentError("max_uses", "must be None or an int from 0 to 10**12")
    return value


def _sequence(value: object, kind: type[Any], field: str) -> list[Any]:
    """A list of value objects (each validated when it was built)."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise InvalidArgumentError(field, f"must be a list of {kind.__name__}")
    items = list(value)
    if len(items) > 50 or not all(isinstance(v, kind) for v in items):
        raise InvalidArgumentError(field, f"must be at most 50 {kind.__name__} objects")
    return items


def _idempotency(value: object) -> str | None:
    return None if value is None else inputs.text(value, "idempotency_key")


def _seconds(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 3600:
        raise ConfigurationError(f"{name} must be a number of seconds, above 0, at most 3600")
    return float(value)


def _auth_cache(ttl: object) -> AuthCache | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= 3600:
        raise ConfigurationError(
            "auth_cache_ttl must be a number of seconds, above 0, at most 3600"
        )
    return AuthCache(timedelta(seconds=ttl))
