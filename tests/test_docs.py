"""Every Python block in README.md and docs/ runs, on SQLite, as written.

How a page is run:
- A page is one program: its blocks run top to bottom in one namespace, so a
  block may continue an earlier one (use ``client`` made above).
- Top-level ``await`` is allowed, as in an async REPL.
- What the page only implies (a client, an organization, a stub for your own
  ``stream_completion``) goes in a hidden comment right where it is needed::

      <!-- doc: setup
      org, _ = await client.get_or_create_organization("Acme")
      -->

- A block that cannot run outside its host says so, and why, just above it:
  ``<!-- doc: not run: an Alembic env.py runs inside Alembic -->``.
- ``DATABASE_URL`` (a fresh SQLite file) and ``SECRET`` are given; the working
  directory is a temporary one.
"""

from __future__ import annotations

import ast
import asyncio
import os
import re
from pathlib import Path
from typing import Any

import pytest

from keycap import APIKeyClient

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

_PIECE = re.compile(
    r"<!-- doc: setup\n(?P<setup>.*?)-->"
    r"|(?:<!-- doc: not run: (?P<reason>[^\n]*?) -->\n)?```python\n(?P<code>.*?)```",
    re.S,
)


def _pieces(page: Path) -> list[tuple[str, str | None, int]]:
    """(code, why it is not run, line) for each setup and Python block, in order."""
    text = page.read_text()
    out = []
    for match in _PIECE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        if match["setup"] is not None:
            out.append((match["setup"], None, line))
        else:
            out.append((match["code"], match["reason"], line))
    return out


PAGES_WITH_CODE = [p for p in PAGES if any(r is None for _, r, _ in _pieces(p))]


def test_every_page_with_python_is_run() -> None:
    assert {p.name for p in PAGES_WITH_CODE} >= {"README.md", "limits-and-budgets.md"}


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_of_the_page_runs(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    made: list[APIKeyClient] = []  # every client the page makes, closed at the end
    init = APIKeyClient.__init__

    def recording(self: APIKeyClient, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(APIKeyClient, "__init__", recording)
    namespace: dict[str, object] = {
        "__name__": f"doc_{page.stem}",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'docs.db'}",
        "SECRET": "docs-signing-secret-" + "x" * 32,
    }
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    with asyncio.Runner() as runner:
        for code, reason, line in _pieces(page):
            if reason is not None:
                assert reason.strip(), f"{page.name}:{line}: say why the block is not run"
                continue
            compiled = compile(code, f"{page.name}:{line}", "exec", flags=flags)
            result = eval(compiled, namespace)
            if asyncio.iscoroutine(result):
                runner.run(result)
        for client in made:
            runner.run(client.aclose())
    assert os.getcwd() == str(tmp_path)
