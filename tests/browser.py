"""Headless Chromium from Debian's packages (`chromium`, `chromium-driver`) driven by selenium: the shared harness of
the web page's tests (tests/test_serve_page.py) and of tools/page_screenshot.py.

    reason = browser_missing()          # None, or why no browser can run here (then skip, or fail in CI)
    with chromium(1280, 900) as driver:  # a fresh profile, removed with the browser when the block ends
        driver.get(url)
        wait_for(driver, "return document.body.dataset.state === 'done'", 60, "the image")

Selenium is given the system chromedriver (never Selenium Manager: it would download a driver, and CI has no network),
and Chromium runs headless with everything that phones home turned off. `make test` installs the packages where it
can (root with apt-get) and then sets FLUXRT_REQUIRE_BROWSER=1, so a missing browser there fails the tests instead of
skipping them.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
INSTALL = "apt-get install chromium chromium-driver"
REQUIRE_ENV = "FLUXRT_REQUIRE_BROWSER"
# as root (CI, containers) Chromium's sandbox cannot start; the rest keeps a headless run offline and quiet
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--force-device-scale-factor=1")
START_S = 60  # chromedriver's wait for the browser on a loaded 2-core box


def browser_missing() -> str | None:
    """Why no browser can run here (one line naming the fix), or None when chromium and chromedriver are installed."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if not missing:
        return None
    return f"no headless browser: {' and '.join(missing)} not found; install them with `{INSTALL}` (as root)"


def browser_required() -> bool:
    """Whether a missing browser is a failure (CI installed one) rather than a skip (a developer without root)."""
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


@contextmanager
def chromium(width: int, height: int, mobile: bool = False):
    """A selenium driver of a fresh headless Chromium whose page viewport is width x height CSS pixels (mobile: a
    phone's touch viewport, which honours the page's <meta name=viewport>); quit and its profile removed at the end."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="fluxrt-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, for failure messages
    driver = None
    try:
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        driver.set_page_load_timeout(START_S)
        driver.set_script_timeout(START_S)
        set_viewport(driver, width, height, mobile)
        yield driver
    finally:
        if driver is not None:
            driver.quit()  # also ends chromedriver, the Service it started
        shutil.rmtree(profile, ignore_errors=True)  # a profile half-written by a crashed browser is still removed


def set_viewport(driver, width: int, height: int, mobile: bool = False) -> None:
    """The page's viewport exactly (the window size also counts the headless browser's own bars)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})
    driver.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": mobile})


def wait_for(driver, script: str, timeout_s: float, what: str, *args):
    """The first truthy value of `script` (JavaScript that returns something), polled until timeout_s; on timeout
    an AssertionError naming `what` and the page's state, error text and console."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout_s, poll_frequency=0.05).until(
            lambda d: d.execute_script(script, *args))
    except TimeoutException:
        raise AssertionError(f"waited {timeout_s} s for {what}; {page_report(driver)}") from None


def page_report(driver) -> str:
    """The page's state, status, error text and console messages: what a failed wait needs to be understood."""
    state = driver.execute_script("""
        const text = id => { const e = document.getElementById(id); return e ? e.textContent.trim() : null; };
        return {state: document.body.dataset.state, status: text('status'), error: text('error')};""")
    console = [f"{entry['level']}: {entry['message']}" for entry in driver.get_log("browser")]
    return f"page {state}; console: {console or 'empty'}"


def save_screenshot(driver, path: Path) -> Path:
    """The viewport as a PNG at `path` (its folder made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(driver.get_screenshot_as_png())
    return path


def data_url_pixels(url: str) -> np.ndarray:
    """The RGB pixels [H, W, 3] of a data:image/png;base64 URL (an image the page shows)."""
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix), f"not a base64 PNG data URL: {url[:60]!r}"
    with Image.open(io.BytesIO(base64.b64decode(url[len(prefix):]))) as image:
        assert image.format == "PNG", image.format
        return np.asarray(image.convert("RGB"))
