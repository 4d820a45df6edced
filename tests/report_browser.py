"""Opening a migration report in Debian's chromium through playwright: console messages, the
requests the page made, and a screenshot (skips when the chromium binary is absent)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

#: Debian's chromium package (playwright's own browser download cannot reach the internet).
CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
#: Set to 1 to write the screenshots of the README under docs/ (else they go to tmp_path).
UPDATE_DOCS = os.environ.get("PGMIGRATE_UPDATE_SCREENSHOTS") == "1"
DOCS = Path(__file__).resolve().parent.parent / "docs"


def screenshot_path(tmp_path: Path, name: str) -> Path:
    """Where a test saves its screenshot `name`: docs/ when asked to update them."""
    return (DOCS if UPDATE_DOCS else tmp_path) / name


def chromium() -> str:
    """The chromium executable, or skip the test saying how to get it."""
    for path in (*CANDIDATES, shutil.which("chromium") or ""):
        if path and Path(path).exists():
            return path
    pytest.skip("no chromium binary: apt-get install chromium (Debian's package)")


@dataclass
class Opened:
    """What the browser saw of a page."""

    text: str  # the page's visible text (document.body.innerText)
    errors: list[str] = field(default_factory=list)  # console errors and page errors
    requests: list[str] = field(default_factory=list)  # every URL it asked for
    dialogs: list[str] = field(default_factory=list)  # alert() and the like: a script ran
    sections: list[dict[str, Any]] = field(default_factory=list)


def open_report(page_file: Path, screenshot: Path | None = None) -> Opened:
    """Load `page_file` from file:// in headless chromium and look at it."""
    playwright = pytest.importorskip("playwright.sync_api")
    executable = chromium()
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 900})
            opened = Opened(text="")

            def console(message: Any) -> None:
                if message.type in ("error", "warning"):
                    opened.errors.append(f"{message.type}: {message.text}")

            def dialog(box: Any) -> None:
                opened.dialogs.append(box.message)
                box.dismiss()

            page.on("console", console)
            page.on("pageerror", lambda exc: opened.errors.append(str(exc)))
            page.on("request", lambda request: opened.requests.append(request.url))
            page.on("dialog", dialog)
            page.goto(page_file.resolve().as_uri(), wait_until="load")
            opened.text = page.inner_text("body")
            opened.sections = page.eval_on_selector_all(
                "section.stmt",
                """nodes => nodes.map(n => ({
                    label: n.querySelector('h2 .label').innerText,
                    sql: n.querySelector('pre.sql').innerText,
                    blockers: (n.querySelector('table.blockers') || {innerText: ''}).innerText,
                    outcome: n.querySelector('h2 .badge').innerText,
                    visible: n.getBoundingClientRect().height > 0,
                    bars: n.querySelectorAll('svg.timeline rect').length,
                }))""",
            )
            if screenshot is not None:
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return opened
