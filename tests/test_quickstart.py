"""The README's first command runs examples/quickstart.py on a SQLite file."""

import os
from pathlib import Path

from tests._run import python

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_issues_and_validates_a_key(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYCAP_")}
    for _ in range(2):  # a second run against the same file works too
        result = python(str(ROOT / "examples" / "quickstart.py"), cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].startswith("issued key (shown once): sk_live_")
        assert any(line.startswith("validated: key_") for line in lines)
        assert "refused: insufficient_scope ['chat:admin']" in lines
        assert any(line.startswith("refused: revoked_key") for line in lines)
    assert (tmp_path / "keycap-quickstart.db").exists()
