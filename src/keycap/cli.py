"""The ``keycap`` command: a thin shell over :class:`~keycap.APIKeyClient` (docs/cli.md).

``keycap key create`` prints the plaintext key alone on stdout, so
``KEY=$(keycap key create ...)`` works; everything meant for people goes to
stderr. Errors are one line on stderr and a non-zero exit: 1 for a refusal or
a failure, 2 for a usage mistake.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

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
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return 2
    try:
        secret = _secret(args)
        return asyncio.run(_run(args, secret))
    except UsageError as error:
        print(f"keycap: error: {error}", file=sys.stderr)
        return 2
    except InvalidArgumentError as error:
        print(f"keycap: error: {error.message}", file=sys.stderr)
        return 2
    except DatabaseError as error:
        hint = "" if args.command == "db" else " (has `keycap db upgrade` been run?)"
        print(f"keycap: error: {error.message}{hint}", file=sys.stderr)
        return 1
    except KeycapError as error:
        print(f"keycap: error: {error.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


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
    return secret


async def _run(args: argparse.Namespace, secret: str) -> int:
    url = args.database_url or os.environ.get("KEYCAP_DATABASE_URL") or DEFAULT_URL
    client = APIKeyClient(
        url, signing_secret=secret, key_prefix=args.key_prefix, environment=args.environment
    )
    async with client:
        result: int = await args.run(client, args)
        return result


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


async def _named(page_at: Callable[[int], Awaitable[Sequence[Any]]], name: str) -> str | None:
    """The id of the entity called ``name``, paging through a list_* method."""
    offset = 0
    while page := await page_at(offset):
        for item in page:
            if item.name == name:
                return str(item.id)
        offset += len(page)
    return None


# --- parsing ------------------------------------------------------------------------


def _decimal(text: str, what: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        raise UsageError(f"{what}: {text!r} is not a number") from None


def _budget(text: str) -> Budget:
    """``5.00/month``, ``100000/day:tokens``, ``20`` (lifetime)."""
    spec, _, meter = text.partition(":")
    amount, _, period = spec.partition("/")
    return Budget(_decimal(amount, "--budget"), period=period or "lifetime", meter=meter or "spend")


def _rate(text: str) -> RateLimit:
    """``100/minute``, ``10/second``, ``50000/minute:tokens``."""
    spec, _, meter = text.partition(":")
    limit, _, window = spec.partition("/")
    number = _decimal(limit, "--rate")
    return RateLimit(
        int(number) if number == number.to_integral_value() and not meter else number,
        window or "minute",
        meter=meter or None,
    )


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
    reset = min(resets).strftime("%Y-%m-%d %H:%M") if resets else "never"
    return ", ".join(parts), reset


# --- commands -----------------------------------------------------------------------


async def db_upgrade(client: APIKeyClient, args: argparse.Namespace) -> int:
    await client.migrate(args.revision)
    print(f"keycap: database at {args.revision}", file=sys.stderr)
    return 0


async def org_create(client: APIKeyClient, args: argparse.Namespace) -> int:
    org = await client.create_organization(args.name)
    print(org.id)
    return 0


async def org_list(client: APIKeyClient, args: argparse.Namespace) -> int:
    orgs = await client.list_organizations(limit=args.limit)
    if args.json:
        _json([o.model_dump() for o in orgs])
    elif orgs:
        _table([["ID", "NAME"], *([o.id, o.name] for o in orgs)])
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
    metadata = None
    if args.metadata is not None:
        try:
            metadata = json.loads(args.metadata)
        except json.JSONDecodeError:
            raise UsageError("--metadata must be a JSON object") from None
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
        status=args.status,
        limit=args.limit,
    )
    found = await _key_rows(client, keys)
    if args.json:
        _json(found)
    elif found:
        rows = [["ID", "NAME", "STATUS", "USED/LIMIT", "RESETS", "USES"]]
        for row in found:
            used, reset = _used(row)
            uses = str(row["use_count"]) + (f"/{row['max_uses']}" if row["max_uses"] else "")
            rows.append([row["id"], row["name"], row["status"], used, reset, uses])
        _table(rows)
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="keycap", description="Issue and manage capped API keys.")
    p.add_argument("--database-url", help=f"default: $KEYCAP_DATABASE_URL or {DEFAULT_URL}")
    p.add_argument("--signing-secret", help="default: $KEYCAP_SIGNING_SECRET (prefer the variable)")
    p.add_argument("--dev", action="store_true", help="use a throwaway, insecure signing secret")
    p.add_argument("--key-prefix", default=os.environ.get("KEYCAP_KEY_PREFIX", "sk"))
    p.add_argument("--environment", default=os.environ.get("KEYCAP_ENVIRONMENT", "live"))
    groups = p.add_subparsers(dest="command", metavar="COMMAND")

    db = groups.add_parser("db", help="the schema").add_subparsers(metavar="ACTION")
    up = db.add_parser("upgrade", help="run the shipped migrations")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(run=db_upgrade)

    org = groups.add_parser("org", help="organizations").add_subparsers(metavar="ACTION")
    create = org.add_parser("create", help="create one; prints its id")
    create.add_argument("name")
    create.set_defaults(run=org_create)
    listing = org.add_parser("list")
    listing.add_argument("--json", action="store_true")
    listing.add_argument("--limit", type=int, default=100)
    listing.set_defaults(run=org_list)

    for kind, word in ((ids.PROJECT, "project"), (ids.PRODUCT, "product")):
        sub = groups.add_parser(word, help=f"{word}s").add_subparsers(metavar="ACTION")
        create = sub.add_parser("create", help="create one; prints its id")
        create.add_argument("org", help="organization id or name")
        create.add_argument("name")
        create.set_defaults(run=child_create, kind=kind)
        if kind == ids.PRODUCT:
            link = sub.add_parser("link", help="make a product usable by a project's keys")
            link.add_argument("org")
            link.add_argument("product")
            link.add_argument("project")
            link.set_defaults(run=product_link)

    key = groups.add_parser("key", help="API keys").add_subparsers(metavar="ACTION")
    create = key.add_parser("create", help="issue a key; prints the plaintext alone on stdout")
    create.add_argument("--org", required=True, help="organization id or name")
    create.add_argument("--project", help="project id or name")
    create.add_argument("--product", help="product id or name")
    create.add_argument("--name", default="")
    create.add_argument("--scope", action="append", default=[], help="repeatable")
    create.add_argument("--budget", action="append", default=[], help="5.00/month[:meter]")
    create.add_argument("--rate", action="append", default=[], help="100/minute[:meter]")
    create.add_argument("--max-uses", type=int)
    create.add_argument("--expires", help="a duration: 30m, 12h, 7d")
    create.add_argument("--metadata", help="a JSON object")
    create.add_argument("--delegated-by")
    create.set_defaults(run=key_create)
    listing = key.add_parser("list", help="keys with status, used/limit and reset")
    listing.add_argument("--org")
    listing.add_argument("--project")
    listing.add_argument("--status", choices=["active", "revoked", "expired", "disabled"])
    listing.add_argument("--limit", type=int, default=100)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=key_list)
    show = key.add_parser("show", help="one key, as JSON")
    show.add_argument("id")
    show.set_defaults(run=key_show)
    for action in ("revoke", "disable", "enable", "delete"):
        change = key.add_parser(action)
        change.add_argument("id")
        if action in ("revoke", "delete"):
            change.add_argument("--yes", "-y", action="store_true", help="do not ask")
        change.set_defaults(run=key_change, action=action)

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
