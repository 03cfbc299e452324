"""Regenerate the README's screenshots of `fluxrt serve`'s web page: docs/serve_page.png (a desktop window) and
docs/serve_page_phone.png (a phone). It starts `fluxrt serve --model tiny` (the embedded trained model, which draws
recognisable shapes) on loopback, opens the page in headless Chromium, generates a few of the tiny model's prompts
as a user would (type, click Generate, wait for the image), and saves the page.

    python tools/page_screenshot.py [--out docs]

Needs Debian's chromium and chromium-driver (`apt-get install chromium chromium-driver`) and the test extras
(selenium); it drives the browser with the page tests' own helpers (tests/browser.py, tests/test_serve_page.py).
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from browser import browser_missing, chromium, page_report  # noqa: E402  (tests/ on the path first)
from test_serve_http import ServerProcess  # noqa: E402
from test_serve_page import DESKTOP, PHONE, click_generate, fill, open_page, shown_image  # noqa: E402

# prompts from the tiny model's world (README, "The tiny model"); the last one is the image shown large
PROMPTS = [("a large green circle at the top left on a gray background", 3),
           ("a large blue triangle at the bottom right on a white background", 5),
           ("a large red star at the center on a white background", 1)]
MAX_BYTES = 300_000  # a README image, kept small in the repository


def generate(driver, prompt: str, seed: int) -> None:
    fill(driver, prompt=prompt, seed=seed)
    if click_generate(driver) != "done":
        raise SystemExit(f"page_screenshot: the page did not finish {prompt!r}: {page_report(driver)}")
    shown_image(driver, "result")  # decoded, so the screenshot shows it


def save_png(driver, path: Path) -> None:
    """The viewport as an optimised PNG at `path`, refused when it is too big for the README."""
    with Image.open(io.BytesIO(driver.get_screenshot_as_png())) as shot:
        buffer = io.BytesIO()
        shot.convert("RGB").save(buffer, format="PNG", optimize=True)
    if buffer.tell() > MAX_BYTES:
        raise SystemExit(f"page_screenshot: {path.name} would be {buffer.tell()} bytes, over {MAX_BYTES}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    print(f"page_screenshot: wrote {path} ({buffer.tell()} bytes)")


def shoot(server, out: Path) -> None:
    with chromium(*DESKTOP) as desktop:
        open_page(desktop, server)
        for prompt, seed in PROMPTS:
            generate(desktop, prompt, seed)
        save_png(desktop, out / "serve_page.png")
    with chromium(*PHONE, mobile=True) as phone:
        open_page(phone, server)
        generate(phone, *PROMPTS[-1])
        # a phone stacks the form over the output: show the button, the progress and the images
        phone.execute_script("document.getElementById('generate').scrollIntoView({block: 'start'})")
        save_png(phone, out / "serve_page_phone.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="folder for the two PNGs (default: docs/)")
    args = parser.parse_args(argv)
    reason = browser_missing()
    if reason is not None:
        print(f"page_screenshot: {reason}", file=sys.stderr)
        return 2
    server = ServerProcess("--model", "tiny")
    try:
        shoot(server, args.out)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
