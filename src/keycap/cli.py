"""The ``keycap`` command: a thin shell over :class:`~keycap.APIKeyClient` (docs/cli.md).

``keycap key create`` prints the plaintext key alone on stdout, so
``KEY=$(keycap key create ...)`` works; everything meant for people goes to
stderr. Errors are one line on stderr and a non-zero exit: 1 for a refusal or
a failure, 2 for a usage mistake.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, NoReturn

from sqlalchemy.engine import make_url

from keycap import __version__, migrations
from keycap._client import APIKeyClient
from keycap._errors import DatabaseError, InvalidArgumentError, KeycapError
from keycap._models import APIKey
from keycap._rules import ids, money, timeutil
from keycap._rules.budgets import Budget
from keycap._rules.rate_limits import RateLimit

DEFAULT_URL = "sqlite:///keycap.db"
#: Only with --dev, and said so on every run: keys made with it are not secret.
DEV_SECRET = "keycap-dev-secret-NOT-FOR-PRODUCTION-do-not-use"  # noqa: S105


class UsageError(Exception):
    """A mistake in how the command was called (exit 2)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if not hasattr(args, "run"):
            _subparser(parser, args).print_help(sys.stderr)
            return 2
        url = _url(args)
        secret = _secret(args) if getattr(args, "needs_secret", False) else _UNUSED_SECRET
        return asyncio.run(_run(args, url, secret))
    except UsageError as error:
        _error(str(error))
        return 2
    except InvalidArgumentError as error:
        _error(_in_cli_words(error))
        return 2
    except DatabaseError as error:
        hint = " (has `keycap db upgrade` been run?)" if _tables_missing(error) else ""
        _error(f"{error.message}{hint}")
        return 1
    except KeycapError as error:
        _error(error.message)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # a bug: one line, the traceback on request
        if os.environ.get("KEYCAP_DEBUG"):
            raise
        _error(
            f"unexpected {type(error).__name__}: {error} "
            "(KEYCAP_DEBUG=1 shows the traceback; please report it)"
        )
        return 1


def _error(message: str) -> None:
    """One line on stderr, whatever the message holds (a lone surrogate from the
    command line would not encode)."""
    line = f"keycap: error: {message}".replace("\n", " ")
    print(line.encode("utf-8", "backslashreplace").decode("utf-8"), file=sys.stderr)


#: For commands that never digest a key: keycap's client wants a secret, and
#: nothing these commands do depends on which.
_UNUSED_SECRET = "keycap-cli-read-only-commands-never-digest-a-key"  # noqa: S105


def _secret(args: argparse.Namespace) -> str:
    secret = args.signing_secret or os.environ.get("KEYCAP_SIGNING_SECRET")
    if args.dev:
        print(
            "keycap: --dev: using the built-in development signing secret; "
            "keys made this way are NOT secure",
            file=sys.stderr,
        )
        return DEV_SECRET
    if not secret:
        raise UsageError(
            "no signing secret: set KEYCAP_SIGNING_SECRET (or --signing-secret); "
            "--dev uses a throwaway one for local trials"
        )
    return str(secret)


def _url(args: argparse.Namespace) -> str:
    """The database URL. A SQLite file that is not there is only made by
    ``db upgrade``: any other command would leave an empty file behind."""
    url = args.database_url or os.environ.get("KEYCAP_DATABASE_URL") or DEFAULT_URL
    if args.run is not db_upgrade:
        try:
            parsed = make_url(url)
        except Exception:
            raise UsageError("the database URL is not a valid URL") from None
        path = parsed.database
        sqlite_file = parsed.get_backend_name() == "sqlite" and path and path != ":memory:"
        if sqlite_file and not os.path.exists(str(path)):
            raise UsageError(
                f"no database at {path}: set KEYCAP_DATABASE_URL, "
                "or create it with `keycap db upgrade`"
            )
    return str(url)


async def _run(args: argparse.Namespace, url: str, secret: str) -> int:
    client = APIKeyClient(
        url, signing_secret=secret, key_prefix=args.key_prefix, environment=args.environment
    )
    async with client:
        with client.acting_as(_actor(args)):
            result: int = await args.run(client, args)
        return result


def _actor(args: argparse.Namespace) -> str:
    """Who the audit log names for this command's changes: ``--actor``, else
    ``$KEYCAP_ACTOR``, else ``cli:`` and the login name."""
    if args.actor:
        return str(args.actor)
    if found := os.environ.get("KEYCAP_ACTOR"):
        return found
    try:
        user = getpass.getuser()
    except Exception:  # no login name (a container without one)
        user = "unknown"
    return f"cli:{user}"


async def audit_list(client: APIKeyClient, args: argparse.Namespace) -> int:
    org_id = await _org(client, args.org)
    subject = args.key or (None if args.subject is None else args.subject)
    found = await client.audit_log(
        org_id, subject_id=subject, action=args.action, before=args.before, limit=args.limit
    )
    if args.json:
        _json([entry.model_dump() for entry in found])
        return 0
    rows = [["ID", "AT", "ACTOR", "ACTION", "SUBJECT"]]
    for entry in found:
        rows.append(
            [str(entry.id), _when(entry.at), entry.actor or "-", entry.action, entry.subject_id]
        )
    if found:
        _table(rows)
    if len(found) == args.limit:
        print(f"keycap: newest first; more with --before {found[-1].id}", file=sys.stderr)
    return 0


#: The library's argument names, as the command line spells them.
_FLAGS = {
    "expires_in": "--expires",
    "expires_at": "--expires",
    "scopes": "--scope",
    "required_scopes": "--scope",
    "max_uses": "--max-uses",
    "grace": "--grace",
    "name": "--name",
    "metadata": "--metadata",
    "delegated_by": "--delegated-by",
    "limit": "--limit",
    "offset": "--offset",
    "since": "--since",
    "status": "--status",
    "org_id": "--org",
    "project_id": "--project",
    "product_id": "--product",
}


def _in_cli_words(error: InvalidArgumentError) -> str:
    flag = _FLAGS.get(error.field, error.field)
    problem = error.problem.replace("a timedelta or a string like", "a duration like")
    return f"{flag}: {problem.replace('timedelta', 'duration')}"


def _tables_missing(error: DatabaseError) -> bool:
    text = error.message.lower()
    return "no such table" in text or "does not exist" in text or "doesn't exist" in text


def _subparser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Any:
    """The parser of the group named on the command line (for its help)."""
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if actions and args.command is not None:
        return actions[0].choices[args.command]
    return parser


# --- resolving names ----------------------------------------------------------------


async def _org(client: APIKeyClient, value: str) -> str:
    if ids.is_valid(ids.ORG, value):
        return value
    found = await _named(lambda offset: client.list_organizations(limit=100, offset=offset), value)
    if found is None:
        raise UsageError(f"no organization named {value!r}")
    return found


async def _child(client: APIKeyClient, kind: str, org_id: str, value: str | None) -> str | None:
    if value is None or ids.is_valid(kind, value):
        return value
    lister = client.list_projects if kind == ids.PROJECT else client.list_products
    found = await _named(lambda offset: lister(org_id, limit=100, offset=offset), value)
    if found is None:
        raise UsageError(f"no {ids.resource_name(kind)} named {value!r} in {org_id}")
    return found


async def _named(
    page_at: Callable[[int], Awaitable[Sequence[Any]]], name: str, field: str = "name"
) -> str | None:
    """The id of the entity whose ``field`` is ``name``, paging through a list_* method."""
    offset = 0
    while page := await page_at(offset):
        for item in page:
            if getattr(item, field) == name:
                return str(item.id)
        offset += len(page)
    return None


# --- parsing ------------------------------------------------------------------------


def _decimal(text: str, what: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        raise UsageError(f"{what}: {text!r} is not a number") from None


def _budget(text: str, flag: str = "--budget") -> Budget:
    """``5.00/month``, ``100000/day:tokens``, ``20`` (lifetime)."""
    spec, _, meter = text.partition(":")
    amount, _, period = spec.partition("/")
    try:
        return Budget(_decimal(amount, flag), period=period or "lifetime", meter=meter or "spend")
    except InvalidArgumentError as error:
        raise UsageError(f"{flag} {text!r}: {error.field}: {error.problem}") from None


def _rate(text: str, flag: str = "--rate", name: str | None = None) -> RateLimit:
    """``100/minute``, ``10/second``, ``50000/minute:tokens``: the window is never implied."""
    spec, _, meter = text.partition(":")
    limit, slash, window = spec.partition("/")
    if not slash or not window:
        raise UsageError(f"{flag} {text!r}: give a window, as in 100/minute or 10/second")
    number = _decimal(limit, flag)
    try:
        return RateLimit(
            int(number) if number == number.to_integral_value() and not meter else number,
            window,
            meter=meter or None,
            name=name,
        )
    except InvalidArgumentError as error:
        raise UsageError(f"{flag} {text!r}: {error.field}: {error.problem}") from None


def _whole(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``least``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}")
        return value

    return parse


def _metadata(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        found = json.loads(text)
    except json.JSONDecodeError:
        raise UsageError("--metadata must be a JSON object") from None
    if not isinstance(found, dict):
        raise UsageError("--metadata must be a JSON object")
    return found


async def _subject(client: APIKeyClient, value: str) -> str:
    """A key, identity, project or organization id; or an organization's name."""
    if any(ids.is_valid(kind, value) for kind in (ids.KEY, ids.IDENTITY, ids.PROJECT, ids.ORG)):
        return value
    return await _org(client, value)


# --- output -------------------------------------------------------------------------


def _json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=_jsonable))


def _jsonable(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return money.plain(value)  # exact, as a string: never a float
    return str(value)


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


async def _key_rows(client: APIKeyClient, keys: list[APIKey]) -> list[dict[str, Any]]:
    now = client.now()
    out = []
    for key in keys:
        budgets = await client.get_budgets(key.id)
        spend = [b for b in budgets if b.scope == "key"]
        out.append(
            {
                "id": key.id,
                "name": key.name,
                "status": key.status_at(now).value,
                "start": key.start,
                "scopes": list(key.scopes),
                "identity_id": key.identity_id,
                "use_count": key.use_count,
                "max_uses": key.max_uses,
                "last_used_at": key.last_used_at,
                "expires_at": key.expires_at,
                "budgets": [
                    {
                        "meter": b.meter,
                        "period": b.period,
                        "used": b.used,
                        "limit": b.limit + b.credit,
                        "reset_at": b.reset_at,
                    }
                    for b in spend
                ],
            }
        )
    return out


def _used(row: dict[str, Any]) -> tuple[str, str]:
    if not row["budgets"]:
        return "-", "-"
    parts = [
        f"{money.plain(b['used'])}/{money.plain(b['limit'])} {b['meter']}" for b in row["budgets"]
    ]
    resets = [b["reset_at"] for b in row["budgets"] if b["reset_at"] is not None]
    reset = _when(min(resets)) if resets else "never"
    return ", ".join(parts), reset


# --- commands -----------------------------------------------------------------------


async def db_upgrade(client: APIKeyClient, args: argparse.Namespace) -> int:
    try:
        target = migrations.resolve(args.revision)
    except ValueError as error:
        raise UsageError(str(error)) from None
    before = await _current(client)
    await client.migrate(target)
    after = await _current(client)
    if before == after:
        print(f"keycap: database already at {after}; nothing to do", file=sys.stderr)
    else:
        print(f"keycap: database upgraded from {before or 'nothing'} to {after}", file=sys.stderr)
    return 0


async def _current(client: APIKeyClient) -> str | None:
    async with client.engine.connect() as conn:
        return await conn.run_sync(migrations.current_revision)


async def db_current(client: APIKeyClient, args: argparse.Namespace) -> int:
    current = await _current(client)
    head = migrations.head()
    print(current or "none")
    state = "head" if current == head else f"head is {head}"
    print(f"keycap: {state}" if current else "keycap: never migrated", file=sys.stderr)
    return 0


async def db_check(client: APIKeyClient, args: argparse.Namespace) -> int:
    current = await _current(client)
    head = migrations.head()
    if current != head:
        raise KeycapError(
            f"the database is at {current or 'nothing'}, not {head}: run `keycap db upgrade`"
        )
    async with client.engine.connect() as conn:
        found = await conn.run_sync(migrations.differences)
    if found:
        for difference in found:
            print(f"keycap: differs: {difference}", file=sys.stderr)
        raise KeycapError(f"{len(found)} differences between the tables and keycap {__version__}")
    print(f"keycap: the database is at {head} and matches keycap {__version__}", file=sys.stderr)
    return 0


async def db_history(client: APIKeyClient, args: argparse.Namespace) -> int:
    current = await _current(client) if args.mark_current else None
    for revision, message in migrations.revisions():
        mark = "  (current)" if revision == current else ""
        print(f"{revision}  {message.strip().splitlines()[0] if message.strip() else ''}{mark}")
    return 0


async def org_create(client: APIKeyClient, args: argparse.Namespace) -> int:
    org = await client.create_organization(args.name)
    print(org.id)
    return 0


async def org_list(client: APIKeyClient, args: argparse.Namespace) -> int:
    found = await client.list_organizations(limit=args.limit, offset=args.offset, newest_first=True)
    _listed(
        args,
        found,
        [["ID", "NAME", "CREATED"], *([o.id, o.name, _when(o.created_at)] for o in found)],
    )
    return 0


async def _identity(client: APIKeyClient, org_id: str, value: str | None) -> str | None:
    """An identity's id, given its id or its external id in the organization."""
    if value is None or ids.is_valid(ids.IDENTITY, value):
        return value
    found = await _named(
        lambda offset: client.list_identities(org_id, limit=100, offset=offset),
        value,
        "external_id",
    )
    if found is not None:
        return found
    raise UsageError(f"no identity with external id {value!r} in {org_id} (identity create)")


async def identity_create(client: APIKeyClient, args: argparse.Namespace) -> int:
    org_id = await _org(client, args.org)
    found, created = await client.get_or_create_identity(org_id, args.external_id, name=args.name)
    print(found.id)
    if not created:
        print(f"keycap: {found.id} already existed", file=sys.stderr)
    return 0


async def identity_list(client: APIKeyClient, args: argparse.Namespace) -> int:
    org_id = await _org(client, args.org)
    found = await client.list_identities(org_id, limit=args.limit, offset=args.offset)
    _listed(
        args,
        found,
        [
            ["ID", "EXTERNAL ID", "NAME", "STATUS", "CREATED"],
            *(
                [
                    i.id,
                    i.external_id,
                    i.name,
                    "disabled" if i.disabled_at else "active",
                    _when(i.created_at),
                ]
                for i in found
            ),
        ],
    )
    return 0


async def identity_change(client: APIKeyClient, args: argparse.Namespace) -> int:
    method = client.disable_identity if args.action == "disable" else client.enable_identity
    found = await method(args.id)
    state = "disabled: its keys are refused" if found.disabled_at else "active"
    print(f"keycap: {found.id} is {state}", file=sys.stderr)
    return 0


async def access_request(client: APIKeyClient, args: argparse.Namespace) -> int:
    org_id = await _org(client, args.org)
    request, secret = await client.request_access(
        org_id,
        requester=args.requester,
        reason=args.reason,
        scopes=args.scope,
        budgets=[_budget(b) for b in args.budget],
        expires_in=args.expires,
        ttl=args.ttl,
    )
    print(f"{request.id} {secret}")
    print(
        f"keycap: {request.id} is pending until {request.expires_at.isoformat()}; the claim "
        "secret above is shown once (keycap access claim ID, with it on stdin)",
        file=sys.stderr,
    )
    return 0


async def access_list(client: APIKeyClient, args: argparse.Namespace) -> int:
    org_id = await _org(client, args.org)
    status = None if args.status == "all" else args.status
    found = await client.list_access_requests(
        org_id, status=status, limit=args.limit, offset=args.offset
    )
    rows = [["ID", "REQUESTER", "STATUS", "SCOPES", "REASON", "EXPIRES"]]
    for r in found:
        scopes = " ".join((r.granted or r.asked).scopes) or "(none)"
        rows.append([r.id, r.requester, r.status, scopes, r.reason, _when(r.expires_at)])
    _listed(args, found, rows)
    return 0


async def access_decide(client: APIKeyClient, args: argparse.Namespace) -> int:
    if args.action == "deny":
        decided = await client.deny_access(args.id, reason=args.reason)
    else:
        decided = await client.approve_access(
            args.id,
            scopes=args.scope,
            budgets=None if args.budget is None else [_budget(b) for b in args.budget],
            expires_in=args.expires,
            note=args.note,
        )
    print(f"keycap: {decided.id} {decided.status}", file=sys.stderr)
    return 0


async def access_claim(client: APIKeyClient, args: argparse.Namespace) -> int:
    secret = os.environ.get("KEYCAP_CLAIM_SECRET") or sys.stdin.readline().strip()
    issued = await client.claim_access(args.id, secret)
    print(issued.plaintext)
    print(f"keycap: claimed {issued.id}; the key above is shown once", file=sys.stderr)
    return 0


async def import_apikeys(client: APIKeyClient, args: argparse.Namespace) -> int:
    from keycap._importers import from_apikeys_platform

    url = os.environ.get("KEYCAP_IMPORT_URL") or args.source
    if not url:
        raise UsageError("give the apikeys-platform database URL: --from URL or $KEYCAP_IMPORT_URL")
    done = await from_apikeys_platform(client, url)
    print(
        f"keycap: imported {done.keys} keys ({done.revoked} revoked, {done.skipped} already "
        f"there), {done.organizations} new organizations, {done.projects} projects, "
        f"{done.products} products. Validate them with APIKeyClient(imported_keys=True, "
        "foreign_secrets={'apikeys-platform': ...}) until each is used once.",
        file=sys.stderr,
    )
    return 0


async def child_list(client: APIKeyClient, args: argparse.Namespace) -> int:
    org_id = await _org(client, args.org)
    lister = client.list_projects if args.kind == ids.PROJECT else client.list_products
    found = await lister(org_id, limit=args.limit, offset=args.offset, newest_first=True)
    _listed(
        args,
        found,
        [["ID", "NAME", "CREATED"], *([c.id, c.name, _when(c.created_at)] for c in found)],
    )
    return 0


def _listed(args: argparse.Namespace, found: Sequence[Any], table: list[list[str]]) -> None:
    """A page, newest first: JSON or a table on stdout; on stderr, how to get more."""
    if args.json:
        _json([item.model_dump() if hasattr(item, "model_dump") else item for item in found])
    elif found:
        _table(table)
    if len(found) == args.limit:
        print(
            f"keycap: showing {args.offset + 1}-{args.offset + len(found)}, newest first; "
            f"more with --offset {args.offset + len(found)}",
            file=sys.stderr,
        )


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value is not None else "-"


async def budget_set(client: APIKeyClient, args: argparse.Namespace) -> int:
    subject = await _subject(client, args.subject)
    spec = _budget(args.spec, "BUDGET")
    if args.anchor_day is not None or args.alert:
        spec = Budget(
            spec.limit,
            spec.period,
            meter=spec.meter,
            anchor_day=args.anchor_day,
            alert_thresholds=args.alert,
        )
    status = await client.set_budget(subject, spec)
    print(status.id)
    return 0


async def budget_list(client: APIKeyClient, args: argparse.Namespace) -> int:
    found = await client.get_budgets(await _subject(client, args.subject))
    header = ["ID", "METER", "PERIOD", "USED", "HELD", "LIMIT", "REMAINING", "RESETS"]
    _shown(args, found, header, lambda b: [
        b.id, b.meter, b.period, money.plain(b.used), money.plain(b.held),
        money.plain(b.limit + b.credit), money.plain(b.remaining),
        _when(b.reset_at) if b.reset_at else "never",
    ])  # fmt: skip
    return 0


def _shown(
    args: argparse.Namespace,
    found: Sequence[Any],
    header: list[str],
    row: Callable[[Any], list[str]],
) -> None:
    """A subject's budgets or limits: JSON, or a table with ``header``."""
    if args.json:
        _json([item.model_dump() for item in found])
    elif found:
        _table([header, *(row(item) for item in found)])


async def budget_remove(client: APIKeyClient, args: argparse.Namespace) -> int:
    if not await client.remove_budget(args.id):
        raise KeycapError(f"budget not found: {args.id}")
    return 0


async def rate_set(client: APIKeyClient, args: argparse.Namespace) -> int:
    subject = await _subject(client, args.subject)
    status = await client.set_rate_limit(subject, _rate(args.spec, "RATE", args.name))
    print(status.name)
    return 0


async def rate_list(client: APIKeyClient, args: argparse.Namespace) -> int:
    found = await client.get_rate_limits(await _subject(client, args.subject))
    header = ["NAME", "METER", "LIMIT", "WINDOW S", "REMAINING"]
    _shown(args, found, header, lambda r: [
        r.name, r.meter or "calls", money.plain(r.limit), money.plain(r.window_seconds),
        money.plain(r.remaining),
    ])  # fmt: skip
    return 0


async def rate_remove(client: APIKeyClient, args: argparse.Namespace) -> int:
    if not await client.remove_rate_limit(await _subject(client, args.subject), args.name):
        raise KeycapError(f"no rate limit named {args.name!r} on {args.subject}")
    return 0


async def key_roll(client: APIKeyClient, args: argparse.Namespace) -> int:
    rolled = await client.roll_key(args.id, grace=args.grace)
    print(rolled.plaintext)
    print(
        f"keycap: {rolled.id} has a new secret (above, shown once); "
        f"the old one works for {args.grace} more",
        file=sys.stderr,
    )
    return 0


async def key_update(client: APIKeyClient, args: argparse.Namespace) -> int:
    changes: dict[str, Any] = {}
    if args.name is not None:
        changes["name"] = args.name
    if args.scope is not None:
        changes["scopes"] = args.scope
    if args.metadata is not None:
        changes["metadata"] = _metadata(args.metadata)
    if args.expires is not None and args.never_expires:
        raise UsageError("give --expires or --never-expires, not both")
    if args.expires is not None:
        changes["expires_in"] = args.expires
    if args.never_expires:
        changes["expires_at"] = None
    if args.max_uses is not None:
        changes["max_uses"] = args.max_uses
    if not changes:
        raise UsageError(
            "nothing to change: give --name, --scope, --expires, --max-uses or --metadata"
        )
    key = await client.update_key(args.id, **changes)
    print(f"keycap: {key.id} updated", file=sys.stderr)
    return 0


async def child_create(client: APIKeyClient, args: argparse.Namespace) -> int:
    org_id = await _org(client, args.org)
    create = client.create_project if args.kind == ids.PROJECT else client.create_product
    print((await create(org_id, args.name)).id)
    return 0


async def product_link(client: APIKeyClient, args: argparse.Namespace) -> int:
    org_id = await _org(client, args.org)
    product = await _child(client, ids.PRODUCT, org_id, args.product)
    project = await _child(client, ids.PROJECT, org_id, args.project)
    assert product is not None and project is not None
    await client.add_product_to_project(product, project)
    return 0


async def key_create(client: APIKeyClient, args: argparse.Namespace) -> int:
    org_id = await _org(client, args.org)
    metadata = _metadata(args.metadata)
    issued = await client.create_key(
        org_id,
        project_id=await _child(client, ids.PROJECT, org_id, args.project),
        product_id=await _child(client, ids.PRODUCT, org_id, args.product),
        name=args.name,
        scopes=args.scope,
        expires_in=args.expires,
        metadata=metadata,
        delegated_by=args.delegated_by,
        max_uses=args.max_uses,
        rate_limits=[_rate(r) for r in args.rate],
        budgets=[_budget(b) for b in args.budget],
        identity_id=await _identity(client, org_id, args.identity),
    )
    key = issued.key
    print(issued.plaintext)
    print(
        f"keycap: created {key.id} ({key.name or 'unnamed'}) in {key.org_id}; "
        f"scopes: {' '.join(key.scopes) or '(none)'}; "
        f"expires: {key.expires_at.isoformat() if key.expires_at else 'never'}. "
        "The key above is shown once.",
        file=sys.stderr,
    )
    return 0


async def key_delegate(client: APIKeyClient, args: argparse.Namespace) -> int:
    parent = await client.get_key(args.parent)
    issued = await client.delegate(
        parent.id,
        name=args.name,
        scopes=args.scope,
        project_id=await _child(client, ids.PROJECT, parent.org_id, args.project),
        product_id=await _child(client, ids.PRODUCT, parent.org_id, args.product),
        expires_in=args.expires,
        metadata=_metadata(args.metadata),
        max_uses=args.max_uses,
        rate_limits=[_rate(r) for r in args.rate],
        budgets=[_budget(b) for b in args.budget],
    )
    key = issued.key
    print(issued.plaintext)
    print(
        f"keycap: delegated {key.id} ({key.name or 'unnamed'}) from {parent.id}; "
        f"scopes: {' '.join(key.scopes) or '(none)'}; "
        f"expires: {key.expires_at.isoformat() if key.expires_at else 'never'}. "
        "The key above is shown once.",
        file=sys.stderr,
    )
    return 0


async def key_list(client: APIKeyClient, args: argparse.Namespace) -> int:
    org_id = None if args.org is None else await _org(client, args.org)
    project = args.project
    if org_id is not None:
        project = await _child(client, ids.PROJECT, org_id, project)
    elif project is not None and not ids.is_valid(ids.PROJECT, project):
        raise UsageError("--project by name needs --org")
    keys = await client.list_keys(
        org_id=org_id,
        project_id=project,
        identity_id=args.identity,
        descendants_of=args.descendants_of,
        status=args.status,
        limit=args.limit,
        offset=args.offset,
        newest_first=True,
    )
    found = await _key_rows(client, keys)
    rows = [["ID", "NAME", "STATUS", "USED/LIMIT", "RESETS", "USES"]]
    for row in found:
        used, reset = _used(row)
        uses = str(row["use_count"]) + (f"/{row['max_uses']}" if row["max_uses"] else "")
        rows.append([row["id"], row["name"], row["status"], used, reset, uses])
    _listed(args, found, rows)
    return 0


async def key_show(client: APIKeyClient, args: argparse.Namespace) -> int:
    key = await client.get_key(args.id)
    [row] = await _key_rows(client, [key])
    row.update(
        org_id=key.org_id,
        project_id=key.project_id,
        product_id=key.product_id,
        metadata=key.metadata,
        delegated_by=key.delegated_by,
        ancestors=list(key.ancestors),
        created_at=key.created_at,
        rate_limits=[r.model_dump() for r in await client.get_rate_limits(key.id)],
        remaining=[
            {
                "meter": r.meter,
                "amount": r.amount,
                "binding": {
                    "scope": r.binding.scope,
                    "budget_id": r.binding.id,
                    "period": r.binding.period,
                },
                "reset_at": r.reset_at,
            }
            for r in await client.remaining(key.id)
        ],
    )
    _json(row)
    return 0


async def key_change(client: APIKeyClient, args: argparse.Namespace) -> int:
    action = args.action
    if action in ("revoke", "delete") and not args.yes:
        key = await client.get_key(args.id)
        _confirm(f"{action} {key.id} ({key.name or 'unnamed'}, {key.start}…)?")
    if action == "delete":
        await client.delete_key(args.id)
    else:
        method = {"revoke": client.revoke_key, "disable": client.disable_key}.get(
            action, client.enable_key
        )
        key = await method(args.id)
        print(f"keycap: {key.id} is {key.status_at(client.now()).value}", file=sys.stderr)
    return 0


def _confirm(question: str) -> None:
    if not sys.stdin.isatty():
        raise UsageError("refusing without --yes: stdin is not a terminal to confirm on")
    print(f"keycap: {question} This cannot be undone. [y/N] ", end="", file=sys.stderr, flush=True)
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise UsageError("not confirmed; nothing changed")


async def usage(client: APIKeyClient, args: argparse.Namespace) -> int:
    org_id = None if args.org is None else await _org(client, args.org)
    if org_id is None and args.key is None:
        raise UsageError("give --org or --key")
    since: timedelta = timeutil.parse_duration(args.since, "--since")
    rows = await client.usage(
        org_id=org_id, key_id=args.key, since=client.now() - since, per=args.per
    )
    if args.json:
        _json([r.model_dump() for r in rows])
    elif rows:
        table = [["PERIOD", "METER", "AMOUNT", "CHARGES"]]
        table += [[r.period, r.meter, money.plain(r.amount), str(r.charges)] for r in rows]
        _table(table)
    return 0


# --- the parser ---------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake as one line (``UsageError``, exit 2)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _group(groups: Any, name: str, help_: str) -> Any:
    """A command group whose help lists every action (``keycap key --help``)."""
    parser = groups.add_parser(name, help=help_, description=help_)
    return parser.add_subparsers(title="actions", metavar="ACTION")


def _paging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=_whole(1), default=100, help="at most this many (100)")
    parser.add_argument("--offset", type=_whole(0), default=0, help="skip this many first")
    parser.add_argument("--json", action="store_true", help="JSON for scripts")


def _on_subject(group: Any, action: str, help_: str, run: Any) -> argparse.ArgumentParser:
    """An action on a key's, project's or organization's budgets or limits."""
    parser: argparse.ArgumentParser = group.add_parser(action, help=help_)
    parser.add_argument(
        "subject", help="key, identity, project or organization id (or organization name)"
    )
    parser.set_defaults(run=run)
    return parser


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="keycap", description="Issue and manage capped API keys (docs/cli.md).")
    p.add_argument("--version", action="version", version=f"keycap {__version__}")
    p.add_argument("--database-url", help=f"default: $KEYCAP_DATABASE_URL or {DEFAULT_URL}")
    p.add_argument("--signing-secret", help="default: $KEYCAP_SIGNING_SECRET (prefer the variable)")
    p.add_argument("--dev", action="store_true", help="use a throwaway, insecure signing secret")
    p.add_argument("--key-prefix", default=os.environ.get("KEYCAP_KEY_PREFIX", "sk"))
    p.add_argument("--environment", default=os.environ.get("KEYCAP_ENVIRONMENT", "live"))
    p.add_argument(
        "--actor", help="who the audit log names: default $KEYCAP_ACTOR, else cli:<login name>"
    )
    groups = p.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    db = _group(groups, "db", "the schema: keycap's shipped migrations")
    up = db.add_parser("upgrade", help="run the migrations (to head); creates a SQLite file")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(run=db_upgrade)
    db.add_parser("current", help="the revision the database is at").set_defaults(run=db_current)
    db.add_parser(
        "check", help="exit 1 unless the tables are at head and match this keycap"
    ).set_defaults(run=db_check)
    history = db.add_parser("history", help="the shipped revisions, oldest first")
    history.add_argument("--mark-current", action="store_true", help="mark the database's")
    history.set_defaults(run=db_history)

    org = _group(groups, "org", "organizations")
    create = org.add_parser("create", help="create one; prints its id")
    create.add_argument("name")
    create.set_defaults(run=org_create)
    listing = org.add_parser("list", help="newest first")
    _paging(listing)
    listing.set_defaults(run=org_list)

    for kind, word in ((ids.PROJECT, "project"), (ids.PRODUCT, "product")):
        sub = _group(groups, word, f"{word}s of an organization")
        create = sub.add_parser("create", help="create one; prints its id")
        create.add_argument("org", help="organization id or name")
        create.add_argument("name")
        create.set_defaults(run=child_create, kind=kind)
        listing = sub.add_parser("list", help="newest first")
        listing.add_argument("org", help="organization id or name")
        _paging(listing)
        listing.set_defaults(run=child_list, kind=kind)
        if kind == ids.PRODUCT:
            link = sub.add_parser("link", help="make a product usable by a project's keys")
            link.add_argument("org")
            link.add_argument("product")
            link.add_argument("project")
            link.set_defaults(run=product_link)

    identity = _group(groups, "identity", "people or systems of yours, owning keys")
    made = identity.add_parser("create", help="find or create one by external id; prints its id")
    made.add_argument("org", help="organization id or name")
    made.add_argument("external_id", help="your id for it (from your identity provider)")
    made.add_argument("--name", default="")
    made.set_defaults(run=identity_create)
    listed = identity.add_parser("list", help="newest first")
    listed.add_argument("org", help="organization id or name")
    _paging(listed)
    listed.set_defaults(run=identity_list)
    for action, help_ in (
        ("disable", "refuse every key of the identity"),
        ("enable", "accept its keys again"),
    ):
        change = identity.add_parser(action, help=help_)
        change.add_argument("id")
        change.set_defaults(run=identity_change, action=action)

    access = _group(groups, "access", "requests for keys, from agents and apps")
    ask = access.add_parser(
        "request", help="ask for a key; prints the request id and its claim secret"
    )
    ask.add_argument("org", help="organization id or name")
    ask.add_argument("--requester", required=True, help="who asks (an app or agent name)")
    ask.add_argument("--reason", default="")
    ask.add_argument("--scope", action="append", default=[], help="repeatable")
    ask.add_argument("--budget", action="append", default=[], help="5.00/month[:meter]")
    ask.add_argument("--expires", help="the key's lifetime: 30m, 12h, 7d")
    ask.add_argument("--ttl", default="7d", help="how long the request stays open (7d)")
    ask.set_defaults(run=access_request, needs_secret=True)
    pending = access.add_parser("list", help="newest first (pending by default)")
    pending.add_argument("org", help="organization id or name")
    pending.add_argument(
        "--status",
        default="pending",
        choices=["pending", "approved", "denied", "claimed", "expired", "all"],
    )
    _paging(pending)
    pending.set_defaults(run=access_list)
    approve = access.add_parser("approve", help="as asked, or narrower")
    approve.add_argument("id")
    approve.add_argument("--scope", action="append", help="repeatable; narrows the scopes")
    approve.add_argument("--budget", action="append", help="repeatable; no larger than asked")
    approve.add_argument("--expires", help="a key lifetime no longer than asked")
    approve.add_argument("--note")
    approve.set_defaults(run=access_decide, action="approve")
    deny = access.add_parser("deny", help="refuse, saying why")
    deny.add_argument("id")
    deny.add_argument("--reason", required=True)
    deny.set_defaults(run=access_decide, action="deny")
    claim = access.add_parser(
        "claim",
        help="the key of an approved request, once; the claim secret from "
        "$KEYCAP_CLAIM_SECRET or stdin",
    )
    claim.add_argument("id")
    claim.set_defaults(run=access_claim, needs_secret=True)

    importing = _group(groups, "import", "keys from other systems, kept as they are")
    apikeys = importing.add_parser(
        "apikeys-platform",
        help="every organization, project, product and key of an apikeys-platform database",
    )
    apikeys.add_argument(
        "--from", dest="source", help="its database URL (or $KEYCAP_IMPORT_URL, kept out of ps)"
    )
    apikeys.set_defaults(run=import_apikeys)

    key = _group(groups, "key", "API keys")
    create = key.add_parser("create", help="issue a key; prints the plaintext alone on stdout")
    create.add_argument("--org", required=True, help="organization id or name")
    create.add_argument("--project", help="project id or name")
    create.add_argument("--product", help="product id or name")
    create.add_argument("--name", default="")
    create.add_argument("--identity", help="identity id, or its external id")
    create.add_argument("--scope", action="append", default=[], help="repeatable")
    create.add_argument("--budget", action="append", default=[], help="5.00/month[:meter]")
    create.add_argument("--rate", action="append", default=[], help="100/minute[:meter]")
    create.add_argument("--max-uses", type=_whole(1), help="at least 1")
    create.add_argument("--expires", help="a duration: 30m, 12h, 7d")
    create.add_argument("--metadata", help="a JSON object")
    create.add_argument("--delegated-by")
    create.set_defaults(run=key_create, needs_secret=True)
    child = key.add_parser(
        "delegate", help="mint a child of a key, never wider; prints the plaintext on stdout"
    )
    child.add_argument("parent", help="the parent key's id")
    child.add_argument("--name", default="")
    child.add_argument("--project", help="project id or name (if the parent has none)")
    child.add_argument("--product", help="product id or name (if the parent has none)")
    child.add_argument(
        "--scope", action="append", default=None, help="repeatable; default: the parent's"
    )
    child.add_argument("--budget", action="append", default=[], help="5.00/month[:meter]")
    child.add_argument("--rate", action="append", default=[], help="100/minute[:meter]")
    child.add_argument("--max-uses", type=_whole(1), help="at least 1")
    child.add_argument("--expires", help="a duration: 30m, 12h, 7d; default: the parent's")
    child.add_argument("--metadata", help="a JSON object")
    child.set_defaults(run=key_delegate, needs_secret=True)
    listing = key.add_parser("list", help="newest first, with status, used/limit and reset")
    listing.add_argument("--org")
    listing.add_argument("--project")
    listing.add_argument("--status", choices=["active", "revoked", "expired", "disabled"])
    listing.add_argument("--identity", help="identity id: only its keys")
    listing.add_argument("--descendants-of", help="key id: only keys delegated from it")
    _paging(listing)
    listing.set_defaults(run=key_list)
    show = key.add_parser("show", help="one key as JSON, with what it can still spend")
    show.add_argument("id")
    show.set_defaults(run=key_show)
    update = key.add_parser("update", help="change name, scopes, expiry, use cap or metadata")
    update.add_argument("id")
    update.add_argument("--name")
    update.add_argument("--scope", action="append", help="repeatable; replaces the scopes")
    update.add_argument("--expires", help="a duration from now: 30m, 12h, 7d")
    update.add_argument("--never-expires", action="store_true")
    update.add_argument("--max-uses", type=_whole(1))
    update.add_argument("--metadata", help="a JSON object; replaces the metadata")
    update.set_defaults(run=key_update)
    roll = key.add_parser("roll", help="a new secret for the key; prints it alone on stdout")
    roll.add_argument("id")
    roll.add_argument(
        "--grace", default="24h", help="how long the old secret still works (0s: none)"
    )
    roll.set_defaults(run=key_roll, needs_secret=True)
    helps = {
        "revoke": "for good (asks first)",
        "disable": "suspend, reversibly",
        "enable": "lift a suspension",
        "delete": "remove with its budgets and limits (asks first)",
    }
    for action, help_ in helps.items():
        change = key.add_parser(action, help=help_)
        change.add_argument("id")
        if action in ("revoke", "delete"):
            change.add_argument("--yes", "-y", action="store_true", help="do not ask")
        change.set_defaults(run=key_change, action=action)

    budget = _group(groups, "budget", "budgets of a key, project or organization")
    put = _on_subject(budget, "set", "set (or change) one; prints its id", budget_set)
    put.add_argument("spec", help="AMOUNT[/PERIOD][:METER]: 5.00/month, 100000/day:tokens")
    put.add_argument("--anchor-day", type=_whole(1), help="monthly: the day periods start")
    put.add_argument("--alert", type=_whole(1), action="append", default=[], help="percent")
    _on_subject(budget, "list", "the subject's own budgets", budget_list).add_argument(
        "--json", action="store_true"
    )
    remove = budget.add_parser("remove", help="remove one by id (its ledger stays)")
    remove.add_argument("id")
    remove.set_defaults(run=budget_remove)

    rate = _group(groups, "rate", "rate limits of a key, project or organization")
    put = _on_subject(rate, "set", "set (or change, by name) one; prints its name", rate_set)
    put.add_argument("spec", help="LIMIT/WINDOW[:METER]: 100/minute, 50000/minute:tokens")
    put.add_argument("--name")
    _on_subject(rate, "list", "the subject's own rate limits", rate_list).add_argument(
        "--json", action="store_true"
    )
    _on_subject(rate, "remove", "remove one by name", rate_remove).add_argument("name")

    log = groups.add_parser("audit", help="administrative changes, newest first")
    log.add_argument("--org", required=True, help="organization id or name")
    log.add_argument("--key", help="only this key's changes")
    log.add_argument("--subject", help="only this project's, key's or organization's")
    log.add_argument("--action", help="only this action, e.g. key.revoked")
    log.add_argument("--before", type=_whole(1), help="entries older than this id (next page)")
    log.add_argument("--limit", type=_whole(1), default=50, help="at most this many (50)")
    log.add_argument("--json", action="store_true", help="JSON, with before and after")
    log.set_defaults(run=audit_list)

    report = groups.add_parser("usage", help="what was charged, per day or month")
    report.add_argument("--org")
    report.add_argument("--key")
    report.add_argument("--since", default="30d")
    report.add_argument("--per", choices=["day", "month"], default="day")
    report.add_argument("--json", action="store_true")
    report.set_defaults(run=usage)
    return p


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
