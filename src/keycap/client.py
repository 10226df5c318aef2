"""``APIKeyClient``: the one object users touch. It orchestrates; it holds no SQL or crypto."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from enum import Enum
from types import TracebackType
from typing import Any, Final, Self

from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncEngine

from keycap import ids, inputs, policy, timeutil, tokens
from keycap import scopes as scope_rules
from keycap.db import queries, rows
from keycap.db.engine import Database, create_engine
from keycap.db.schema import keys, organizations, products, projects
from keycap.db.schema import metadata as schema_metadata
from keycap.errors import (
    AlreadyExistsError,
    ConfigurationError,
    DatabaseError,
    InvalidArgumentError,
    InvalidKeyError,
    NotFoundError,
)
from keycap.hashing import PepperRing
from keycap.models import APIKey, IssuedKey, KeyStatus, Organization, Product, Project
from keycap.timeutil import Clock

__all__ = ["UNSET", "APIKeyClient"]


class _Unset(Enum):
    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


#: "Leave unchanged" in ``update_key`` (None there means "clear").
UNSET: Final = _Unset.UNSET

# Attempts of validate_key when the key changes between its statements.
_VALIDATE_ATTEMPTS = 3


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
        clock: returns the current aware datetime; inject one in tests.

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
    ) -> None:
        self._format = tokens.KeyFormat(key_prefix, environment)
        self._ring = PepperRing(signing_secret)
        self._track_usage = inputs.flag(track_usage, "track_usage")
        if clock is not None and not callable(clock):
            raise ConfigurationError("clock must be a callable returning an aware datetime")
        self._clock = clock or timeutil.utcnow
        if isinstance(database, AsyncEngine):
            self._db = Database(database, owned=False)
        else:
            self._db = Database(create_engine(database), owned=True)

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
        """Dispose the engine if keycap created it."""
        await self._db.dispose()

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
        return rows.to_organization(await self._create(organizations, ids.ORG, None, name))

    async def get_or_create_organization(self, name: str) -> tuple[Organization, bool]:
        """The organization of that name, created if missing; ``(org, created)``.
        Safe to call concurrently: exactly one caller creates it."""
        found, created = await self._get_or_create(organizations, ids.ORG, None, name)
        return rows.to_organization(found), created

    async def get_organization(self, org_id: str) -> Organization:
        """Raises: NotFoundError."""
        return rows.to_organization(await self._get(organizations, ids.ORG, org_id))

    async def list_organizations(self, *, limit: int = 100, offset: int = 0) -> list[Organization]:
        limit, offset = inputs.page(limit, offset)
        found = await queries.list_rows(self._db, organizations, None, limit, offset)
        return [rows.to_organization(r) for r in found]

    async def delete_organization(self, org_id: str) -> None:
        """Delete an organization with its projects, products and keys.

        Raises: NotFoundError.
        """
        await self._delete(organizations, ids.ORG, org_id)

    async def create_project(self, org_id: str, name: str) -> Project:
        """Raises: NotFoundError (organization), AlreadyExistsError, InvalidArgumentError."""
        return rows.to_project(await self._create(projects, ids.PROJECT, org_id, name))

    async def get_or_create_project(self, org_id: str, name: str) -> tuple[Project, bool]:
        found, created = await self._get_or_create(projects, ids.PROJECT, org_id, name)
        return rows.to_project(found), created

    async def get_project(self, project_id: str) -> Project:
        """Raises: NotFoundError."""
        return rows.to_project(await self._get(projects, ids.PROJECT, project_id))

    async def list_projects(
        self, org_id: str, *, limit: int = 100, offset: int = 0
    ) -> list[Project]:
        org_id = ids.check(ids.ORG, org_id)
        limit, offset = inputs.page(limit, offset)
        return [
            rows.to_project(r)
            for r in await queries.list_rows(self._db, projects, org_id, limit, offset)
        ]

    async def delete_project(self, project_id: str) -> None:
        """Delete a project, its product links and its keys. Raises: NotFoundError."""
        await self._delete(projects, ids.PROJECT, project_id)

    async def create_product(self, org_id: str, name: str) -> Product:
        """Raises: NotFoundError (organization), AlreadyExistsError, InvalidArgumentError."""
        return rows.to_product(await self._create(products, ids.PRODUCT, org_id, name))

    async def get_or_create_product(self, org_id: str, name: str) -> tuple[Product, bool]:
        found, created = await self._get_or_create(products, ids.PRODUCT, org_id, name)
        return rows.to_product(found), created

    async def get_product(self, product_id: str) -> Product:
        """Raises: NotFoundError."""
        return rows.to_product(await self._get(products, ids.PRODUCT, product_id))

    async def list_products(
        self, org_id: str, *, limit: int = 100, offset: int = 0
    ) -> list[Product]:
        org_id = ids.check(ids.ORG, org_id)
        limit, offset = inputs.page(limit, offset)
        return [
            rows.to_product(r)
            for r in await queries.list_rows(self._db, products, org_id, limit, offset)
        ]

    async def delete_product(self, product_id: str) -> None:
        """Delete a product, its project links and the keys narrowed to it.

        Raises: NotFoundError.
        """
        await self._delete(products, ids.PRODUCT, product_id)

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
        return await queries.link_product(
            self._db, project.org_id, project.id, product.id, self._now()
        )

    async def remove_product_from_project(self, product_id: str, project_id: str) -> bool:
        """Unlink; the project's keys lose the product at once. False if not linked."""
        return await queries.unlink_product(
            self._db, ids.check(ids.PROJECT, project_id), ids.check(ids.PRODUCT, product_id)
        )

    async def _create(
        self, table: Table, kind: str, org_id: str | None, name: str
    ) -> dict[str, Any]:
        values: dict[str, Any] = {"id": ids.new_id(kind), "name": inputs.text(name, "name")}
        if kind != ids.ORG:
            values["org_id"] = ids.check(ids.ORG, org_id)
        values["created_at"] = self._now()
        await queries.insert_named(self._db, table, values, ids.resource_name(kind))
        return values

    async def _get_or_create(
        self, table: Table, kind: str, org_id: str | None, name: str
    ) -> tuple[rows.Source, bool]:
        name = inputs.text(name, "name")
        if kind != ids.ORG:
            org_id = ids.check(ids.ORG, org_id)
        existing = await queries.find_named(self._db, table, name, org_id)
        if existing is not None:
            return existing, False
        try:
            return await self._create(table, kind, org_id, name), True
        except AlreadyExistsError:
            # Lost a race with another creator: theirs is the one.
            winner = await queries.find_named(self._db, table, name, org_id)
            if winner is None:  # created and deleted meanwhile
                raise
            return winner, False

    async def _get(self, table: Table, kind: str, id_: str) -> Any:
        id_ = ids.check(kind, id_)
        row = await queries.get_by_id(self._db, table, id_)
        if row is None:
            raise NotFoundError(ids.resource_name(kind), id_)
        return row

    async def _delete(self, table: Table, kind: str, id_: str) -> None:
        id_ = ids.check(kind, id_)
        if not await queries.delete_by_id(self._db, table, id_):
            raise NotFoundError(ids.resource_name(kind), id_)

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

        Raises:
            NotFoundError: the organization, project or product does not exist in that org.
            InvalidArgumentError: any bad argument, including a naive ``expires_at``
                or a product not linked to the project.
        """
        org_id = ids.check(ids.ORG, org_id)
        project_id = ids.check_optional(ids.PROJECT, project_id, field="project_id")
        product_id = ids.check_optional(ids.PRODUCT, product_id, field="product_id")
        name = inputs.text(name, "name", allow_empty=True)
        granted = scope_rules.normalize(scopes, "scopes")
        meta = inputs.metadata(metadata)
        delegated = None if delegated_by is None else inputs.text(delegated_by, "delegated_by")
        now = self._now()
        expiry = timeutil.resolve_expiry(expires_in, expires_at, now)

        public_id, plaintext = self._format.generate()
        values: dict[str, Any] = {
            "id": ids.key_id(public_id),
            "org_id": org_id,
            "project_id": project_id,
            "product_id": product_id,
            "name": name,
            "start": self._format.start(plaintext),
            "digest": self._ring.digest(plaintext),
            "pepper_id": self._ring.current_id,
            "scopes": scope_rules.encode(granted),
            "metadata": meta,
            "delegated_by": delegated,
            "created_at": now,
            "updated_at": now,
            "expires_at": expiry,
            "revoked_at": None,
            "disabled_at": None,
            "last_used_at": None,
            "use_count": 0,
        }
        await queries.insert_key(self._db, values, project_id, product_id)
        key = rows.to_key({**values, "scopes": granted})
        return IssuedKey.model_construct(key=key, plaintext=plaintext)

    async def get_key(self, key_id: str) -> APIKey:
        """Raises: NotFoundError."""
        key_id = ids.check(ids.KEY, key_id)
        row = await queries.get_key(self._db, key_id)
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
    ) -> list[APIKey]:
        """Keys oldest first, filtered in SQL. ``status`` is active, revoked, expired or disabled.

        Raises: InvalidArgumentError.
        """
        org_id = ids.check_optional(ids.ORG, org_id, field="org_id")
        project_id = ids.check_optional(ids.PROJECT, project_id, field="project_id")
        product_id = ids.check_optional(ids.PRODUCT, product_id, field="product_id")
        if status is not None:
            try:
                status = KeyStatus(status)
            except ValueError:
                raise InvalidArgumentError(
                    "status", "must be one of " + ", ".join(s.value for s in KeyStatus)
                ) from None
        limit, offset = inputs.page(limit, offset)
        found = await queries.list_keys(
            self._db,
            org_id=org_id,
            project_id=project_id,
            product_id=product_id,
            status=status.value if status is not None else None,
            now=self._now(),
            limit=limit,
            offset=offset,
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
    ) -> APIKey:
        """Change a key's name, scopes, metadata or expiry (``expires_at=None``: never).
        Arguments left out are unchanged. Takes effect on the next validation.

        Raises: NotFoundError, InvalidArgumentError.
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
        row = await queries.update_key(self._db, key_id, values, only_if=None)
        if row is None:
            raise NotFoundError("key", key_id)
        return rows.to_key(row)

    async def revoke_key(self, key_id: str) -> APIKey:
        """Revoke for good. Idempotent: a second call keeps the first ``revoked_at``.

        Raises: NotFoundError.
        """
        key_id = ids.check(ids.KEY, key_id)
        return self._found(await queries.revoke_key(self._db, key_id, self._now()), key_id)

    async def disable_key(self, key_id: str) -> APIKey:
        """Suspend a key until :meth:`enable_key`. Idempotent. Raises: NotFoundError."""
        key_id = ids.check(ids.KEY, key_id)
        return self._found(await queries.set_disabled(self._db, key_id, self._now(), True), key_id)

    async def enable_key(self, key_id: str) -> APIKey:
        """Lift a suspension (a revoked key stays revoked). Raises: NotFoundError."""
        key_id = ids.check(ids.KEY, key_id)
        return self._found(await queries.set_disabled(self._db, key_id, self._now(), False), key_id)

    async def delete_key(self, key_id: str) -> None:
        """Delete a key and everything recorded for it. Prefer :meth:`revoke_key`,
        which keeps the record. Raises: NotFoundError."""
        await self._delete(keys, ids.KEY, key_id)

    @staticmethod
    def _found(row: Any, key_id: str) -> APIKey:
        if row is None:
            raise NotFoundError("key", key_id)
        return rows.to_key(row)

    # --- keys: validation ---------------------------------------------------------------

    async def validate_key(
        self,
        plaintext: str,
        *,
        required_scopes: Sequence[str] = (),
        product_id: str | None = None,
        project_id: str | None = None,
        org_id: str | None = None,
        track_usage: bool | None = None,
    ) -> APIKey:
        """Check a presented key against the grant rule (docs/security.md) and return it.

        A refused call writes nothing. An accepted one records the use
        (``use_count``, ``last_used_at``) unless usage tracking is off; the
        returned key shows the use just recorded.

        Raises:
            InvalidKeyError: malformed, unknown, or wrong secret.
            RevokedKeyError, DisabledKeyError, ExpiredKeyError: the key's state.
            ForbiddenError: not valid for the organization, project or product asked for.
            InsufficientScopeError: ``missing_scopes`` lists what is lacking.
            InvalidArgumentError: a bad ``required_scopes`` or id argument.
            DatabaseUnavailableError: the database could not be reached.
        """
        # Everything that can be refused without I/O is refused first, cheapest first.
        public_id = self._format.parse(plaintext)
        req = policy.Requirement(
            scopes=scope_rules.normalize(required_scopes, "required_scopes"),
            org_id=_asked(ids.ORG, org_id, "org_id"),
            project_id=_asked(ids.PROJECT, project_id, "project_id"),
            product_id=_asked(ids.PRODUCT, product_id, "product_id"),
        )
        track = (
            self._track_usage if track_usage is None else inputs.flag(track_usage, "track_usage")
        )
        key_id = ids.key_id(public_id)
        digests = self._ring.digests(plaintext)
        now = self._now()

        for _ in range(_VALIDATE_ATTEMPTS):
            if track and self._db.update_returning:
                # PostgreSQL, SQLite: an accepted call is this one statement.
                row = await queries.record_use_returning(self._db, key_id, digests, req, now)
                if row is not None:
                    await self._upgrade_pepper(key_id, row.pepper_id, plaintext)
                    return rows.to_key(row)
            # Refused (or not tracking, or MySQL): read the row and let the policy say why.
            looked = await queries.lookup_for_validation(self._db, key_id, req)
            if looked is None:
                raise InvalidKeyError()
            digest_ok = self._ring.verify(plaintext, looked.pepper_id, looked.digest)
            policy.check(rows.to_facts(looked, digest_ok), req, now)
            if not track:
                await self._upgrade_pepper(key_id, looked.pepper_id, plaintext)
                return rows.to_key(looked)
            if not self._db.update_returning and await queries.record_use(
                self._db, key_id, digests, req, now
            ):
                # MySQL/MariaDB: recorded under the rule re-checked in SQL.
                await self._upgrade_pepper(key_id, looked.pepper_id, plaintext)
                return rows.to_key(looked, use_count=looked.use_count + 1, last_used_at=now)
            # The key changed between our statements (enabled, re-scoped...): decide again.
        raise DatabaseError("the key kept changing during validation; try again")

    async def _upgrade_pepper(self, key_id: str, pepper_id: str, plaintext: str) -> None:
        if self._ring.needs_upgrade(pepper_id):
            await queries.upgrade_digest(
                self._db, key_id, pepper_id, self._ring.current_id, self._ring.digest(plaintext)
            )


def _asked(kind: str, value: object, field: str) -> str | None:
    """An asked-for id. One that is not an id of that kind matches nothing, so it is
    replaced by a value no id equals: the rule then refuses it as forbidden, after
    the key itself was checked, and the odd string never reaches the driver."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgumentError(field, "must be a string id")
    return value if ids.is_valid(kind, value) else "-"
