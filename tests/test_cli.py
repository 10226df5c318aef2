"""The ``keycap`` console script, run for real in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from keycap import APIKeyClient, InvalidKeyError, RevokedKeyError, migrations
from tests.conftest import SECRET

SCRIPT = str(Path(sys.executable).parent / "keycap")


def keycap(
    *args: str, url: str | None = None, cwd: Path | None = None, secret: str | None = SECRET
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYCAP_")}
    if url is not None:
        env["KEYCAP_DATABASE_URL"] = url
    if secret is not None:
        env["KEYCAP_SIGNING_SECRET"] = secret
    return subprocess.run(
        [SCRIPT, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = [ln for ln in result.stderr.splitlines() if not ln.startswith("keycap: --dev")]
    assert len(lines) == 1 and lines[0].startswith("keycap: error: "), result.stderr
    assert text in lines[0] and "Traceback" not in result.stderr


async def test_a_key_created_by_the_cli_validates_until_revoked(
    client: APIKeyClient, db_url: str
) -> None:
    """create key → validate from Python → revoke → validation fails."""
    org = ok(keycap("org", "create", "Acme", url=db_url)).strip()
    assert org.startswith("org_")
    ok(keycap("product", "create", "Acme", "chat-api", url=db_url))
    created = keycap(
        "key", "create", "--org", "Acme", "--product", "chat-api",
        "--scope", "chat:write", "--budget", "5.00/month", "--rate", "100/minute",
        "--max-uses", "1000", "--expires", "7d", "--name", "research-agent",
        url=db_url,
    )  # fmt: skip
    plaintext = ok(created).strip()
    assert created.stdout == plaintext + "\n"  # the key alone: KEY=$(keycap key create ...)
    assert plaintext.startswith("sk_live_") and plaintext not in created.stderr
    assert "shown once" in created.stderr

    async with APIKeyClient(db_url, signing_secret=SECRET) as real_time:
        key = await real_time.validate_key(
            plaintext, required_scopes=["chat:write"], product_name="chat-api", cost=Decimal("1.25")
        )
        assert key.name == "research-agent" and key.max_uses == 1000
        listed = json.loads(ok(keycap("key", "list", "--org", org, "--json", url=db_url)))
        assert [k["id"] for k in listed] == [key.id]
        assert listed[0]["status"] == "active" and listed[0]["use_count"] == 1
        assert listed[0]["budgets"][0] | {"reset_at": None} == {
            "meter": "spend",
            "period": "month",
            "used": "1.25",
            "limit": "5",
            "reset_at": None,
        }
        table = ok(keycap("key", "list", url=db_url))
        assert "research-agent" in table and "1.25/5 spend" in table and "1/1000" in table
        shown = json.loads(ok(keycap("key", "show", key.id, url=db_url)))
        assert shown["rate_limits"][0]["limit"] == 100 and plaintext not in json.dumps(shown)
        [spend] = shown["remaining"]  # what the key can still spend, and what binds
        assert (spend["meter"], spend["amount"], spend["binding"]["scope"]) == (
            "spend",
            "3.75",
            "key",
        )
        assert "1.25" in ok(keycap("usage", "--org", "Acme", url=db_url))

        # Destructive: refused without --yes when there is no terminal to ask on.
        one_line_error(keycap("key", "revoke", key.id, url=db_url), 2, "--yes")
        await real_time.validate_key(plaintext)
        assert (
            "revoked"
            in ok(keycap("key", "revoke", key.id, "--yes", url=db_url))
            + keycap("key", "show", key.id, url=db_url).stdout
        )
        with pytest.raises(RevokedKeyError):
            await real_time.validate_key(plaintext)

        disabled = ok(keycap("key", "create", "--org", org, url=db_url)).strip()
        key_id = (await real_time.validate_key(disabled)).id
        ok(keycap("key", "disable", key_id, url=db_url))
        assert json.loads(ok(keycap("key", "show", key_id, url=db_url)))["status"] == "disabled"
        ok(keycap("key", "enable", key_id, url=db_url))
        await real_time.validate_key(disabled)
        ok(keycap("key", "delete", key_id, "--yes", url=db_url))
        with pytest.raises(InvalidKeyError):
            await real_time.validate_key(disabled)


def test_upgrade_and_defaults_in_a_fresh_directory(tmp_path: Path) -> None:
    # No database yet: nothing but `db upgrade` creates ./keycap.db.
    one_line_error(keycap("org", "list", cwd=tmp_path, secret=None), 2, "no database at keycap.db")
    assert not (tmp_path / "keycap.db").exists()
    upgraded = keycap("db", "upgrade", cwd=tmp_path, secret=None)  # needs no secret
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"upgraded from nothing to {migrations.head()}" in upgraded.stderr
    assert (tmp_path / "keycap.db").exists()  # the default: ./keycap.db
    org = org_of(tmp_path)
    one_line_error(
        keycap("key", "create", "--org", org, cwd=tmp_path, secret=None), 2, "KEYCAP_SIGNING_SECRET"
    )
    created = keycap("--dev", "key", "create", "--org", org, cwd=tmp_path, secret=None)
    assert ok(created).startswith("sk_live_") and "NOT secure" in created.stderr


def org_of(cwd: Path) -> str:
    return ok(keycap("org", "create", "Solo", cwd=cwd, secret=None)).strip()


def test_mistakes_are_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'k.db'}"
    (tmp_path / "k.db").touch()  # a database without keycap's tables
    one_line_error(keycap("org", "list", url=url), 1, "keycap db upgrade")
    ok(keycap("db", "upgrade", url=url))
    ok(keycap("org", "create", "Acme", url=url))
    one_line_error(keycap("org", "create", "Acme", url=url), 1, "already exists")
    one_line_error(keycap("key", "create", "--org", "Nope", url=url), 2, "no organization")
    for bad in (["--budget", "lots/month"], ["--budget", "5/fortnight"], ["--expires", "soon"]):
        one_line_error(keycap("key", "create", "--org", "Acme", *bad, url=url), 2, "")
    one_line_error(keycap("key", "show", "key_AAAAAAAAAAAA", url=url), 1, "not found")
    one_line_error(keycap("key", "show", "nonsense", url=url), 1, "not found")
    one_line_error(keycap("key", "list", "--project", "agents", url=url), 2, "needs --org")
    one_line_error(keycap("--database-url", "mysql+pymysql://x/y", "org", "list"), 1, "driver")
    assert keycap("key", url=url).returncode == 2  # no action: usage on stderr
