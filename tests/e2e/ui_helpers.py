"""Browser-test plumbing: the real API on a loopback port, Debian's headless chromium, screenshots.

The browser is the system ``chromium`` driven through the system ``chromedriver`` (both from apt):
Selenium is given both paths, so its manager never tries to download a browser or driver.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI

from core.settings import Settings
from service.launcher import free_port
from tests.conftest import wait_until

APT_HINT = "apt-get install -y chromium chromium-driver (scripts/setup.sh installs them)"
WINDOW = (1280, 800)


def with_dashboard(app: FastAPI) -> FastAPI:
    """Mount the dashboard unless ``create_app`` already does (it will once api/app.py includes it)."""
    from api.routes import dashboard

    if not any(getattr(r, "path", None) == "/" for r in app.routes):
        app.include_router(dashboard.router)
    return app


@contextlib.contextmanager
def running_api(settings: Settings) -> Iterator[str]:
    """``create_app(settings)`` under a real uvicorn in a thread; yields its base URL."""
    from api.app import create_app

    port = free_port()
    config = uvicorn.Config(
        with_dashboard(create_app(settings)),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="dashboard-api", daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), 60, "the API to start")
    assert server.started, "uvicorn did not start (see the log above)"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def artefacts_dir(tmp_path: Path) -> Path:
    root = os.environ.get("CVPO_TEST_ARTEFACTS")
    path = Path(root) / "dashboard" if root else tmp_path / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


def chromium(download_dir: Path) -> Any:
    """A headless Debian chromium at 1280×800; fails (never skips) when it is not installed."""
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: the dashboard tests need them; {APT_HINT}")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = shutil.which("chromium") or ""
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where chromium's sandbox cannot start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-features=Translate,MediaRouter",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--lang=en-US",
    ):
        opts.add_argument(arg)
    opts.add_experimental_option(
        "prefs", {"download.default_directory": str(download_dir), "download.prompt_for_download": False}
    )
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or ""), options=opts)
    driver.set_page_load_timeout(30)
    # --window-size is the outer window; grow it so the page itself gets exactly 1280×800.
    inner = driver.execute_script("return [window.innerWidth, window.innerHeight];")
    outer = driver.get_window_size()
    driver.set_window_size(outer["width"] + WINDOW[0] - inner[0], outer["height"] + WINDOW[1] - inner[1])
    return driver


class Browser:
    """A driver plus deadline-based waits that explain themselves, screenshots and console checks."""

    def __init__(self, driver: Any, shots: Path) -> None:
        self.d = driver
        self.shots = shots
        self.count = 0
        self.console: list[dict[str, Any]] = []

    def shot(self, name: str) -> Path:
        """The whole page at 1280 px wide (the first 800 px are what the window shows)."""
        self.count += 1
        path = self.shots / f"{self.count:02d}-{name}.png"
        height = self.js("return Math.max(document.documentElement.scrollHeight, window.innerHeight);")
        clip = {"x": 0, "y": 0, "width": WINDOW[0], "height": height, "scale": 1}
        shot = self.d.execute_cdp_cmd("Page.captureScreenshot", {"captureBeyondViewport": True, "clip": clip})
        path.write_bytes(base64.b64decode(shot["data"]))
        print(f"screenshot: {path}")
        return path

    def wait(self, predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
        """Poll ``predicate`` until truthy; on timeout save a screenshot and say what never happened."""
        try:
            return wait_until(lambda: _quiet(predicate), timeout_s, what, 0.2)
        except AssertionError:
            self.shot("timeout")
            raise

    def text(self, css: str) -> str:
        """The first match's text; the pages re-render live, so a node gone stale is looked up again."""
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.common.by import By

        for _ in range(5):
            try:
                found = self.d.find_elements(By.CSS_SELECTOR, css)
                return found[0].text if found else ""
            except StaleElementReferenceException:
                continue
        return ""

    def js(self, script: str, *args: Any) -> Any:
        return self.d.execute_script(script, *args)

    def collect_console(self) -> list[dict[str, Any]]:
        entries = self.d.get_log("browser")
        self.console.extend(entries)
        return entries

    def assert_accessible_basics(self) -> None:
        """Every visible form field has a label; nothing scrolls sideways at 1280×800."""
        unlabelled = self.js(
            "return [...document.querySelectorAll('input, select, textarea')]"
            ".filter(e => e.offsetParent !== null && e.type !== 'hidden')"
            ".filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))"
            ".map(e => e.id || e.name || e.outerHTML.slice(0, 80));"
        )
        assert unlabelled == [], f"form fields without a label: {unlabelled}"
        width = self.js("return [document.documentElement.scrollWidth, window.innerWidth];")
        assert width[0] <= width[1], f"the page scrolls sideways at {WINDOW}: {width}"
        clipped = self.js(
            "return [...document.querySelectorAll('.table-wrap')].filter(e => e.offsetParent !== null)"
            ".filter(e => e.scrollWidth > e.clientWidth).map(e => e.querySelector('table').id);"
        )
        assert clipped == [], f"tables wider than the window at {WINDOW}: {clipped}"


def _quiet(predicate: Callable[[], Any]) -> Any:
    """Stale or not-yet-present elements mean "not yet", not a failure."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    try:
        return predicate()
    except (NoSuchElementException, StaleElementReferenceException):
        return None


def severe(entries: list[dict[str, Any]], allowed: tuple[str, ...] = ()) -> list[str]:
    """Console errors (CSP violations, exceptions, failed loads) not expected by the test."""
    return [
        json.dumps(e)
        for e in entries
        if e.get("level") == "SEVERE" and not any(a in e.get("message", "") for a in allowed)
    ]
