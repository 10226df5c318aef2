"""Debian's Chromium, headless, driven by Playwright for Python (never a downloaded browser).

scripts/test installs the ``chromium`` package when it is missing and sets
KEYCAP_REQUIRE_BROWSER=1, so there a missing browser fails the tests instead of
skipping them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

#: Where Debian puts it; KEYCAP_CHROMIUM overrides.
CHROMIUM = os.environ.get("KEYCAP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
#: Flags for a root user on a machine with no outside network (no sandbox, no
#: background fetches, no first-run screens).
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


def require() -> pytest.MarkDecorator:
    """Skip without a browser, unless KEYCAP_REQUIRE_BROWSER=1 (then the tests fail)."""
    why = missing()
    required = os.environ.get("KEYCAP_REQUIRE_BROWSER") == "1"
    return pytest.mark.skipif(why is not None and not required, reason=why or "")


@asynccontextmanager
async def chromium(**context: Any) -> AsyncIterator[Any]:
    """A fresh browser context (its own cookies); ``context`` goes to ``new_context``."""
    from playwright.async_api import async_playwright

    async with async_playwright() as driver:
        browser = await driver.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            found = await browser.new_context(**context)
            yield found
            await found.close()
        finally:
            await browser.close()
