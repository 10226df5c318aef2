"""The ``keycap`` command's groups, run in-process (``keycap.cli.main``) on a SQLite
file: listings, budgets and limits, key update, the db commands, help, and
malformed arguments fed to every command."""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from keycap import __version__, migrations
from keycap.cli import _parser, main
from tests.conftest import SECRET


@pytest.fixture
def cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[CLI]:
    monkeypatch.setenv("KEYCAP_DATABASE_URL", f"sqlite:///{tmp_path / 'cli.db'}")
    monkeypatch.setenv("KEYCAP_SIGNING_SECRET", SECRET)
    monkeypatch.chdir(tmp_path)
    runner = CLI(capsys)
    assert runner("db", "upgrade").code == 0
    yield runner


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


class CLI:
    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def __call__(self, *argv: str) -> Result:
        self.capsys.readouterr()
        try:
            code = main(list(argv))
        except SystemExit as exit_:  # --help, --version
            code = int(exit_.code or 0)
        captured = self.capsys.readouterr()
        return Result(code, captured.out, captured.err)

    def ok(self, *argv: str) -> str:
        found = self(*argv)
        assert found.code == 0, found.err
        return found.out


def one_line(result: Result, code: int, text: str = "") -> None:
    assert result.code == code, (result.out, result.err)
    lines = [ln for ln in result.err.splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("keycap: error: "), result.err
    assert text in lines[0] and "Traceback" not in result.err


def test_version_and_help_list_every_command_and_action(cli: CLI) -> None:
    assert cli("--version").out.strip() == f"keycap {__version__}"
    top = cli("--help").out
    groups = _groups()
    for group, actions in groups.items():
        assert f"    {group} " in top, group
        shown = cli(group, "--help").out if actions else ""
        for action in actions:
            assert f"    {action} " in shown, (group, action)


def test_listings_are_newest_first_and_page(cli: CLI) -> None:
    for n in range(3):
        cli.ok("org", "create", f"org-{n}")
    page = json.loads(cli.ok("org", "list", "--json", "--limit", "2"))
    assert [o["name"] for o in page] == ["org-2", "org-1"]
    more = cli("org", "list", "--limit", "2")
    assert "more with --offset 2" in more.err
    assert [o["name"] for o in json.loads(cli.ok("org", "list", "--json", "--offset", "2"))] == [
        "org-0"
    ]
    for name in ("agents", "batch"):
        cli.ok("project", "create", "org-0", name)
        cli.ok("product", "create", "org-0", name + "-api")
    assert "batch" in cli.ok("project", "list", "org-0").splitlines()[1]
    assert [p["name"] for p in json.loads(cli.ok("product", "list", "org-0", "--json"))] == [
        "batch-api",
        "agents-api",
    ]
    first = cli.ok("key", "create", "--org", "org-0", "--name", "first").strip()
    second = cli.ok("key", "create", "--org", "org-0", "--name", "second").strip()
    assert first != second
    listed = json.loads(cli.ok("key", "list", "--json", "--limit", "1"))
    assert [k["name"] for k in listed] == ["second"]
    assert [k["name"] for k in json.loads(cli.ok("key", "list", "--json", "--offset", "1"))] == [
        "first"
    ]


def test_budgets_and_rate_limits_on_organizations_and_projects(cli: CLI) -> None:
    org = cli.ok("org", "create", "Acme").strip()
    project = cli.ok("project", "create", "Acme", "agents").strip()
    budget_id = cli.ok("budget", "set", "Acme", "500/month", "--anchor-day", "15").strip()
    cli.ok("budget", "set", project, "100000/day:tokens", "--alert", "80")
    assert json.loads(cli.ok("budget", "list", org, "--json"))[0]["anchor_day"] == 15
    assert "tokens" in cli.ok("budget", "list", project)
    assert cli.ok("rate", "set", project, "600/minute", "--name", "burst").strip() == "burst"
    assert json.loads(cli.ok("rate", "list", project, "--json"))[0]["limit"] == 600
    cli.ok("key", "create", "--org", "Acme", "--project", "agents")
    key_id = json.loads(cli.ok("key", "list", "--json"))[0]["id"]
    shown = json.loads(cli.ok("key", "show", key_id))
    assert {(r["meter"], r["binding"]["scope"]) for r in shown["remaining"]} == {
        ("spend", "organization"),
        ("tokens", "project"),
    }
    cli.ok("rate", "remove", project, "burst")
    cli.ok("budget", "remove", budget_id)
    assert json.loads(cli.ok("budget", "list", org, "--json")) == []
    one_line(cli("rate", "remove", project, "burst"), 1, "no rate limit named")


def test_a_key_is_updated_in_the_command_lines_words(cli: CLI) -> None:
    cli.ok("org", "create", "Acme")
    key = cli.ok("key", "create", "--org", "Acme", "--scope", "a").strip()
    key_id = json.loads(cli.ok("key", "list", "--json"))[0]["id"]
    assert key.startswith("sk_live_")
    cli.ok("key", "update", key_id, "--name", "renamed", "--scope", "b", "--expires", "7d")
    shown = json.loads(cli.ok("key", "show", key_id))
    assert (shown["name"], shown["scopes"], shown["expires_at"] is not None) == (
        "renamed",
        ["b"],
        True,
    )
    cli.ok("key", "update", key_id, "--never-expires", "--max-uses", "5")
    shown = json.loads(cli.ok("key", "show", key_id))
    assert (shown["expires_at"], shown["max_uses"]) == (None, 5)
    one_line(cli("key", "update", key_id), 2, "nothing to change")
    one_line(cli("key", "update", key_id, "--expires", "soon"), 2, "--expires: must be a duration")


def test_a_key_is_rolled_from_the_command_line(cli: CLI, monkeypatch: pytest.MonkeyPatch) -> None:
    cli.ok("org", "create", "Acme")
    old = cli.ok("key", "create", "--org", "Acme").strip()
    key_id = json.loads(cli.ok("key", "list", "--json"))[0]["id"]
    rolled = cli("key", "roll", key_id, "--grace", "0s")
    assert rolled.code == 0 and rolled.out.strip().startswith("sk_live_")
    assert rolled.out.strip() != old and "shown once" in rolled.err
    one_line(cli("key", "roll", key_id, "--grace", "40d"), 2, "--grace: must be at most 30 days")
    monkeypatch.delenv("KEYCAP_SIGNING_SECRET")
    one_line(cli("key", "roll", key_id), 2, "KEYCAP_SIGNING_SECRET")


def test_a_key_is_delegated_from_the_command_line(cli: CLI) -> None:
    cli.ok("org", "create", "Acme")
    cli.ok("key", "create", "--org", "Acme", "--scope", "chat:*", "--expires", "7d")
    parent = json.loads(cli.ok("key", "list", "--json"))[0]["id"]
    made = cli("key", "delegate", parent, "--scope", "chat:write", "--budget", "1.00/day")
    assert made.code == 0 and made.out.strip().startswith("sk_live_")
    assert f"from {parent}" in made.err and "scopes: chat:write" in made.err
    children = json.loads(cli.ok("key", "list", "--descendants-of", parent, "--json"))
    assert len(children) == 1
    shown = json.loads(cli.ok("key", "show", children[0]["id"]))
    assert shown["ancestors"] == [parent]
    one_line(cli("key", "delegate", parent, "--scope", "admin"), 2, "scopes")


def test_an_access_request_is_asked_decided_and_claimed_from_the_command_line(
    cli: CLI, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli.ok("org", "create", "Acme")
    asked = cli.ok(
        "access",
        "request",
        "Acme",
        "--requester",
        "ci-bot",
        "--scope",
        "chat:write",
        "--budget",
        "3.00/month",
        "--expires",
        "30d",
        "--reason",
        "nightly evals",
    )
    request_id, secret = asked.split()
    assert secret.startswith("kcr_")
    listed = json.loads(cli.ok("access", "list", "Acme", "--json"))
    assert [(r["id"], r["status"]) for r in listed] == [(request_id, "pending")]
    assert "ci-bot" in cli.ok("access", "list", "Acme")
    one_line(cli("access", "approve", request_id, "--budget", "9/month"), 2, "budgets")
    cli.ok("access", "approve", request_id, "--budget", "1.00/month", "--expires", "1d")
    monkeypatch.setenv("KEYCAP_CLAIM_SECRET", secret)
    plaintext = cli.ok("access", "claim", request_id).strip()
    assert plaintext.startswith("sk_live_")
    one_line(cli("access", "claim", request_id), 1, "claimed")
    second = cli.ok("access", "request", "Acme", "--requester", "other").split()[0]
    cli.ok("access", "deny", second, "--reason", "use the team key")
    assert json.loads(cli.ok("access", "list", "Acme", "--status", "all", "--json"))[0]["status"]


def test_the_db_commands_say_where_the_database_stands(cli: CLI) -> None:
    head = migrations.head()
    assert cli.ok("db", "current").strip() == head
    assert "matches" in cli("db", "check").err
    history = cli.ok("db", "history", "--mark-current").splitlines()
    assert [line.split()[0] for line in history] == [r for r, _ in migrations.revisions()]
    assert history[0].startswith("0001") and len(history) >= 4
    assert history[-1].endswith("(current)")
    one_line(cli("db", "upgrade", "nonsense"), 2, "unknown revision 'nonsense'")
    assert f"already at {head}" in cli("db", "upgrade", "0001").err  # never says it went back


@pytest.mark.parametrize(
    ("argv", "code", "text"),
    [
        (["key", "create", "--org", "Acme", "--rate", "100"], 2, "give a window"),
        (["key", "create", "--org", "Acme", "--max-uses", "0"], 2, "at least 1"),
        (["key", "create", "--org", "Acme", "--expires", "1 week"], 2, "--expires"),
        (["key", "create", "--org", "Acme", "--budget", "5/fortnight"], 2, "--budget"),
        (["key", "create", "--org", "Acme", "--metadata", "[1]"], 2, "JSON object"),
        (["key", "list", "--limit", "0"], 2, "at least 1"),
        (["key", "create"], 2, "--org"),
        (["budget", "set", "Acme", "five"], 2, "not a number"),
        (["usage"], 2, "--org or --key"),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, list) else str(v),
)
def test_a_mistake_is_one_line_in_the_command_lines_words(
    cli: CLI, argv: list[str], code: int, text: str
) -> None:
    cli.ok("org", "create", "Acme")
    found = cli(*argv)
    one_line(found, code, text)
    assert "expires_in" not in found.err and "timedelta" not in found.err


def test_read_only_commands_need_no_secret(cli: CLI, monkeypatch: pytest.MonkeyPatch) -> None:
    cli.ok("org", "create", "Acme")
    monkeypatch.delenv("KEYCAP_SIGNING_SECRET")
    for argv in (["org", "list"], ["key", "list"], ["db", "current"], ["budget", "list", "Acme"]):
        cli.ok(*argv)
    one_line(cli("key", "create", "--org", "Acme"), 2, "KEYCAP_SIGNING_SECRET")


def _groups() -> dict[str, list[str]]:
    """Every command group and its actions, read off the parser."""
    out: dict[str, list[str]] = {}
    for action in _parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                subs = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
                out[name] = list(subs[0].choices) if subs else []
    return out


_JUNK = [
    "",
    "-",
    "--",
    "x",
    "-1",
    "0",
    "1e309",
    "NaN",
    "∞",
    "key_AAAAAAAAAAAA",
    "org_",
    "sk_live_" + "A" * 40,
    "5/",
    "/minute",
    ":tokens",
    "100/minute:",
    "{",
    "[]",
    "'; DROP TABLE keycap_keys; --",
    "x" * 5000,
    "\u0000",
    "\ud800",
    "--limit",
    "--offset=-5",
    "--json",
    "--yes",
]


def test_no_input_to_any_command_prints_a_traceback(cli: CLI) -> None:
    cli.ok("org", "create", "Acme")
    rng = random.Random(12)
    commands = [[g, a] for g, actions in _groups().items() for a in actions or [""]]
    tried = 0
    for command in commands:
        base = [part for part in command if part]
        for _ in range(12):
            argv = base + rng.sample(_JUNK, rng.randint(0, 3))
            found = cli(*argv)
            tried += 1
            assert found.code in (0, 1, 2), (argv, found.err)
            assert "Traceback" not in found.err and "Traceback" not in found.out, argv
            if found.code != 0:
                errors = [ln for ln in found.err.splitlines() if ln.startswith("keycap: error: ")]
                assert len(errors) == 1 or "usage:" in found.err, (argv, found.err)
    assert tried >= 12 * len(commands)


def test_the_audit_log_names_the_command_line_actor(
    cli: CLI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KEYCAP_ACTOR", raising=False)
    cli.ok("org", "create", "Acme")
    cli.ok("key", "create", "--org", "Acme", "--name", "ops")
    key_id = json.loads(cli.ok("key", "list", "--json"))[0]["id"]
    cli.ok("--actor", "alice@acme", "key", "revoke", key_id, "--yes")
    monkeypatch.setenv("KEYCAP_ACTOR", "deploy-bot")
    cli.ok("key", "disable", key_id)
    entries = json.loads(cli.ok("audit", "--org", "Acme", "--json"))
    assert [(e["action"], e["actor"]) for e in entries[:3]] == [
        ("key.disabled", "deploy-bot"),
        ("key.revoked", "alice@acme"),
        ("key.created", entries[2]["actor"]),
    ]
    assert entries[2]["actor"].startswith("cli:")
    table = cli.ok("audit", "--org", "Acme", "--key", key_id, "--limit", "1")
    assert "key.disabled" in table and "key.revoked" not in table
    page = cli("audit", "--org", "Acme", "--limit", "1")
    assert f"more with --before {entries[0]['id']}" in page.err


def test_identities_from_the_command_line(cli: CLI) -> None:
    cli.ok("org", "create", "Acme")
    identity_id = cli.ok("identity", "create", "Acme", "auth0|7", "--name", "Ada").strip()
    assert identity_id.startswith("idn_")
    assert cli.ok("identity", "create", "Acme", "auth0|7").strip() == identity_id  # found
    cli.ok("key", "create", "--org", "Acme", "--identity", "auth0|7", "--name", "hers")
    cli.ok("key", "create", "--org", "Acme", "--name", "other")
    mine = json.loads(cli.ok("key", "list", "--identity", identity_id, "--json"))
    assert [k["name"] for k in mine] == ["hers"] and mine[0]["identity_id"] == identity_id
    cli.ok("budget", "set", identity_id, "5.00/month")  # shared by all her keys
    shown = json.loads(cli.ok("key", "show", mine[0]["id"]))
    assert shown["remaining"][0]["binding"]["scope"] == "identity"
    assert shown["remaining"][0]["amount"] == "5"
    cli.ok("identity", "disable", identity_id)
    listed = json.loads(cli.ok("identity", "list", "Acme", "--json"))
    assert listed[0]["disabled_at"] is not None
    assert "disabled" in cli.ok("identity", "list", "Acme")
    missing = cli("key", "create", "--org", "Acme", "--identity", "nobody")
    one_line(missing, 2, "no identity with external id 'nobody'")


def test_an_identity_is_found_by_external_id_past_the_first_page(cli: CLI) -> None:
    import asyncio
    import os

    from keycap import APIKeyClient

    org_id = cli.ok("org", "create", "Acme").strip()
    cli.ok("identity", "create", "Acme", "first")

    async def many() -> None:
        async with APIKeyClient(os.environ["KEYCAP_DATABASE_URL"], signing_secret=SECRET) as kc:
            for n in range(120):  # newer than "first": it is on the second page
                await kc.get_or_create_identity(org_id, f"later-{n}")

    asyncio.run(many())
    cli.ok("key", "create", "--org", "Acme", "--identity", "first", "--name", "hers")


def test_an_apikeys_platform_database_is_imported_from_the_command_line(
    cli: CLI, tmp_path: Path
) -> None:
    import asyncio

    from keycap import APIKeyClient
    from tests.test_imports import FOREIGN, apikeys_platform_database

    url, made, revoked = asyncio.run(apikeys_platform_database(tmp_path))
    one_line(cli("import", "apikeys-platform"), 2, "--from")
    first = cli("import", "apikeys-platform", "--from", url)
    assert first.code == 0, first.err
    assert "imported 3 keys (1 revoked, 0 already there)" in first.err
    assert (
        "imported 0 keys (0 revoked, 3 already there)"
        in cli("import", "apikeys-platform", "--from", url).err
    )
    listed = json.loads(cli.ok("key", "list", "--json"))
    assert sorted(k["status"] for k in listed) == ["active", "active", "revoked"]

    async def validate() -> list[str]:
        async with APIKeyClient(
            f"sqlite:///{tmp_path / 'cli.db'}",
            signing_secret=SECRET,
            imported_keys=True,
            foreign_secrets={"apikeys-platform": FOREIGN},
        ) as kc:
            names = [(await kc.validate_key(k, required_scopes=["read"])).name for k in made]
            with pytest.raises(Exception) as refused:
                await kc.validate_key(revoked)
            assert getattr(refused.value, "code", "") == "revoked_key"
            return names

    assert sorted(asyncio.run(validate())) == ["k0", "k1"]
