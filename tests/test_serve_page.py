"""The web page of `fluxrt serve` (GET /, fluxrt/serve/page.html) in a real browser: Debian's headless Chromium driven
by selenium (tests/browser.py) against servers on loopback with the tiny-random model (--batching step, the default,
so the page gets live previews).

What a user does: fill the form and generate (by click and by Ctrl+Enter), watch the previews and the progress bar,
get the image (its natural size, the download link, the gallery), read the server's own words on a 400 and a 401,
edit an input image, choose and scale LoRAs, reuse a seed past 2**53, cancel, and see a server that died mid-run
reported. The page's image is compared with the API's plain answer for the same request: the same pixels. Screenshots go to
$FLUXRT_ARTIFACTS (default out/artifacts/). Without chromium and chromedriver these tests skip, naming the apt
packages; under `make test` as root (FLUXRT_REQUIRE_BROWSER=1) they fail instead, since CI installed them.
"""

import base64
import importlib
import io
import os
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from browser import INSTALL, REQUIRE_ENV, browser_missing, browser_required, chromium, data_url_pixels, page_report, \
    save_screenshot, wait_for
from test_serve_http import ServerProcess, png_bytes

API_KEY = "page-key"
DONE_S = 60  # one small image end to end on a loaded 2-core box, with margin
ARTIFACTS = Path(os.environ.get("FLUXRT_ARTIFACTS") or Path(__file__).resolve().parents[1] / "out" / "artifacts")
DESKTOP = (1280, 900)
PHONE = (390, 844)
PARTIAL_IMAGES = 3  # what the page asks for (OpenAI's most)
FINISHED = "const s = document.body.dataset.state; return ['done', 'error', 'cancelled'].includes(s) && s;"
ARMED = "armed-by-test"  # a state the page never sets: a finished run must replace it


def _needs_browser() -> None:
    reason = browser_missing()
    if reason is None:
        return
    if browser_required():
        pytest.fail(f"{reason}; {REQUIRE_ENV} is set (make test installed the browser), so this is a failure")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def server():
    process = ServerProcess("--model", "tiny-random")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def keyed_server():
    process = ServerProcess("--model", "tiny-random", "--api-key", API_KEY)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def browser():
    _needs_browser()
    with chromium(*DESKTOP) as driver:
        yield driver


def open_page(driver, server) -> None:
    driver.get(server.url + "/")
    wait_for(driver, "return document.body.dataset.state === 'idle' && document.getElementById('prompt')", DONE_S,
             "the page to load")


def fill(driver, **values) -> None:
    """Type each value into the field of that id (underscores for dashes), replacing what was there."""
    for name, value in values.items():
        field = driver.find_element(By.ID, name.replace("_", "-"))
        field.clear()
        field.send_keys(str(value))


def run(driver, trigger) -> str:
    """Start a generation with trigger() and wait until the page finishes it; its final state."""
    driver.execute_script("document.body.dataset.state = arguments[0]", ARMED)
    trigger()
    state = wait_for(driver, FINISHED, DONE_S, "the generation to finish")
    wait_for(driver, "return !document.getElementById('generate').disabled", DONE_S, "#generate enabled again")
    return state


def click_generate(driver) -> str:
    return run(driver, driver.find_element(By.ID, "generate").click)


def ctrl_enter(driver) -> str:
    def press():
        ActionChains(driver).key_down(Keys.CONTROL).send_keys(Keys.ENTER).key_up(Keys.CONTROL).perform()
    return run(driver, press)


def shown_image(driver, image_id: str) -> dict:
    """An <img>'s natural size and src, once the browser has decoded it."""
    wait_for(driver, "const i = document.getElementById(arguments[0]); return i.complete && i.naturalWidth > 0;",
             DONE_S, f"#{image_id} to be decoded", image_id)
    return driver.execute_script("""
        const i = document.getElementById(arguments[0]);
        return {width: i.naturalWidth, height: i.naturalHeight, src: i.src, count: i.dataset.count,
                step: i.dataset.step, seed: i.dataset.seed};""", image_id)


def gallery_captions(driver) -> list[str]:
    return [item.text for item in driver.find_elements(By.CSS_SELECTOR, "#gallery > li")]


def error_text(driver) -> str:
    error = driver.find_element(By.ID, "error")
    assert error.is_displayed(), f"#error is hidden; {page_report(driver)}"
    return error.text


def page_body(prompt: str, size: str, steps: int, seed: int, **extra) -> dict:
    """The JSON the page posts for these fields (settings.previews is on: --batching step)."""
    return {"prompt": prompt, "size": size, "steps": steps, "seed": seed, "partial_images": PARTIAL_IMAGES,
            "progress": True, "stream": True, **extra}


def api_error(server, body: dict, key: str | None = None) -> str:
    """The page's rendering of the server's JSON error for `body`: "HTTP <status> <code>: <message>"."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(server.url + "/v1/images/generations", json=body, headers=headers, timeout=DONE_S)
    assert response.status_code >= 400, response.text
    error = response.json()["error"]
    return f"HTTP {response.status_code} {error['code']}: {error['message']}"


def api_image(server, path: str, **request) -> np.ndarray:
    """The plain (not streamed) answer's pixels for the same request."""
    response = httpx.post(server.url + path, timeout=DONE_S, **request)
    assert response.status_code == 200, response.text
    with Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))) as image:
        return np.asarray(image.convert("RGB"))


def screenshot(driver, name: str, size: tuple[int, int]) -> None:
    """Save the viewport as an artefact and check it is a PNG of the viewport's size."""
    path = save_screenshot(driver, ARTIFACTS / name)
    assert path.stat().st_size > 0, f"{path} is empty"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size, (path, image.format, image.size)


def watch_progress(driver) -> None:
    """Record every value #progress takes from now on (window.progressValues)."""
    driver.execute_script("""
        const bar = document.getElementById('progress');
        window.progressOld = [];
        new MutationObserver(records => records.forEach(r => window.progressOld.push(r.oldValue)))
            .observe(bar, {attributes: true, attributeFilter: ['value'], attributeOldValue: true});""")


def progress_values(driver) -> list[int]:
    """The values #progress showed since watch_progress, in order, repeats and the indeterminate state dropped."""
    old, final = driver.execute_script(
        "return [window.progressOld, document.getElementById('progress').getAttribute('value')]")
    shown = [int(float(value)) for value in [*old[1:], final] if value is not None]  # old[0]: before this run
    return [value for k, value in enumerate(shown) if k == 0 or value != shown[k - 1]]


# ---- tests ----


def test_a_missing_browser_skips_or_fails_where_ci_installed_it(monkeypatch, tmp_path):
    harness = importlib.import_module("browser")
    monkeypatch.setattr(harness, "CHROMIUM", str(tmp_path / "chromium"))
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    skipped = _outcome(_needs_browser)
    assert isinstance(skipped, pytest.skip.Exception) and INSTALL in str(skipped), repr(skipped)
    monkeypatch.setenv(REQUIRE_ENV, "1")
    failed = _outcome(_needs_browser)
    assert isinstance(failed, pytest.fail.Exception) and f"{REQUIRE_ENV} is set" in str(failed), repr(failed)


def _outcome(check) -> BaseException:
    """What check() raised, a skip or a failure alike (pytest.raises would let a skip through as this test's own)."""
    with pytest.raises(BaseException) as raised:
        check()
    return raised.value


def test_generate_shows_previews_progress_and_the_image_of_the_plain_api(server, browser):
    open_page(browser, server)
    assert not browser.find_element(By.ID, "api-key").is_displayed(), "an API key asked of a server without one"
    fill(browser, prompt="a red star on a white background", size="128x96", steps=8, seed=11)
    watch_progress(browser)
    assert click_generate(browser) == "done", page_report(browser)

    preview, result = shown_image(browser, "preview"), shown_image(browser, "result")
    assert int(preview["count"]) >= 1, f"no preview shown: data-count {preview['count']}"
    assert 1 <= int(preview["step"]) <= 8, f"preview step {preview['step']} of 8"
    assert (preview["width"], preview["height"]) == (128, 96), f"preview of {preview['width']}x{preview['height']}"
    assert preview["src"].startswith("data:image/png;base64,"), preview["src"][:40]
    assert (result["width"], result["height"]) == (128, 96), f"image of {result['width']}x{result['height']}"
    assert result["seed"] == "11", result["seed"]
    assert progress_values(browser) == list(range(1, 9)), "the progress bar did not show steps 1 .. 8 in order"
    bar = browser.execute_script("const p = document.getElementById('progress'); return [p.value, p.max]")
    assert bar == [8, 8], f"progress value/max at the end: {bar}"

    download = browser.find_element(By.ID, "download")
    assert download.get_attribute("href") == result["src"], "the download link is not the image shown"
    assert download.get_attribute("download").endswith(".png"), download.get_attribute("download")
    captions = gallery_captions(browser)
    assert len(captions) == 1 and "a red star on a white background" in captions[0], captions
    screenshot(browser, "serve_page.png", DESKTOP)

    guidance = float(browser.find_element(By.ID, "guidance").get_attribute("value"))  # the page sends the field's
    plain = api_image(server, "/v1/images/generations", json={
        "prompt": "a red star on a white background", "size": "128x96", "steps": 8, "seed": 11, "guidance": guidance})
    shown = data_url_pixels(result["src"])
    assert shown.shape == plain.shape and np.array_equal(shown, plain), \
        "the page's image differs from the API's plain answer for the same request"


def test_keyboard_generates_and_gallery_items_open_with_enter(server, browser):
    open_page(browser, server)
    prompt = browser.find_element(By.ID, "prompt")
    prompt.click()
    prompt.send_keys("a blue circle")
    fill(browser, size="64x64", steps=2, seed=1)
    browser.find_element(By.ID, "prompt").click()  # the shortcut is the prompt's: focus it again
    assert ctrl_enter(browser) == "done", page_report(browser)
    first = shown_image(browser, "result")

    fill(browser, prompt="a green square", seed=2)
    assert ctrl_enter(browser) == "done", page_report(browser)
    captions = gallery_captions(browser)
    assert len(captions) == 2, captions
    assert "a green square" in captions[0] and "a blue circle" in captions[1], f"not newest first: {captions}"
    assert shown_image(browser, "result")["seed"] == "2"

    older = browser.find_elements(By.CSS_SELECTOR, "#gallery > li button")[1]
    older.send_keys(Keys.ENTER)
    wait_for(browser, "return document.getElementById('result').dataset.seed === '1'", DONE_S,
             "Enter on the older gallery item to show it")
    assert shown_image(browser, "result")["src"] == first["src"], "the gallery item shows another image"


def test_a_bad_size_shows_the_servers_400(server, browser):
    open_page(browser, server)
    fill(browser, prompt="a red star", size="1000x1000", steps=2, seed=3)
    assert click_generate(browser) == "error", page_report(browser)
    expected = api_error(server, page_body("a red star", "1000x1000", 2, 3))
    assert expected.startswith("HTTP 400 invalid_size: "), expected  # the case this test is about
    assert error_text(browser) == expected
    screenshot(browser, "serve_page_error.png", DESKTOP)


def test_the_api_key_is_asked_for_checked_and_remembered(keyed_server, browser):
    open_page(browser, keyed_server)
    assert browser.find_element(By.ID, "api-key").is_displayed(), "a server with --api-key: no #api-key field"
    fill(browser, prompt="a red star", size="64x64", steps=2, seed=3, api_key="wrong-key")
    assert click_generate(browser) == "error", page_report(browser)
    expected = api_error(keyed_server, page_body("a red star", "64x64", 2, 3), key="wrong-key")
    assert expected.startswith("HTTP 401 "), expected
    assert error_text(browser) == expected

    fill(browser, api_key=API_KEY)
    assert click_generate(browser) == "done", page_report(browser)
    assert not browser.find_element(By.ID, "error").is_displayed(), "the old error still shows after a success"
    open_page(browser, keyed_server)
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == API_KEY, "the key was not remembered"


def test_phone_layout_has_no_sideways_scroll(server):
    _needs_browser()
    with chromium(*PHONE, mobile=True) as phone:
        open_page(phone, server)
        # a wide image and a long unbroken prompt (the gallery's caption) are what would push the page sideways
        fill(phone, prompt="a_long_unbroken_prompt_" * 8, size="512x256", steps=2, seed=5)
        assert click_generate(phone) == "done", page_report(phone)
        shown_image(phone, "result")
        layout = phone.execute_script("""
            const rect = id => document.getElementById(id).getBoundingClientRect();
            return {scroll: document.documentElement.scrollWidth, width: innerWidth,
                    generate: [rect('generate').left, rect('generate').right],
                    formBottom: rect('generate-form').bottom, outputTop: rect('output').top};""")
        # against the phone's width, not innerWidth: a phone widens its layout viewport to fit content that is wider
        assert layout["scroll"] <= PHONE[0], f"the page is wider than the phone (it scrolls sideways): {layout}"
        assert layout["width"] == PHONE[0], f"the page is not laid out at the phone's width: {layout}"
        left, right = layout["generate"]
        assert 0 <= left < right <= PHONE[0], f"#generate is off screen: {layout}"
        assert layout["outputTop"] >= layout["formBottom"], f"form and output side by side on a phone: {layout}"
        assert phone.find_element(By.ID, "generate").is_displayed(), "#generate is hidden on a phone"
        screenshot(phone, "serve_page_phone.png", PHONE)


@pytest.mark.parametrize("which", ["plain", "api key"])
def test_every_field_has_a_label(which, server, keyed_server, browser):
    open_page(browser, server if which == "plain" else keyed_server)
    unlabelled = browser.execute_script("""
        const named = f => (f.id && [...document.querySelectorAll('label[for]')].some(
                               l => l.htmlFor === f.id && l.textContent.trim()))
                           || (f.getAttribute('aria-label') || '').trim();
        const fields = [...document.querySelectorAll('input, textarea, select')];
        return [fields.length, fields.filter(f => f.type !== 'hidden' && !named(f)).map(f => f.outerHTML)];""")
    count, missing = unlabelled
    assert count >= 5, f"only {count} fields on the page"
    assert missing == [], f"fields without a label: {missing}"


def test_an_input_image_goes_to_the_edits_endpoint(server, browser, tmp_path):
    source = Image.new("RGB", (64, 48), (40, 90, 200))
    source.paste((230, 60, 20), (16, 8, 48, 40))
    path = tmp_path / "input.png"
    path.write_bytes(png_bytes(source))
    open_page(browser, server)
    fill(browser, prompt="a red square", steps=4, seed=9)
    browser.find_element(By.ID, "image").send_keys(str(path))
    field = lambda name: browser.find_element(By.ID, name).get_attribute("value")  # noqa: E731
    assert field("size") == "auto", "an edit's size: the image's"
    # the fields still holding text-to-image defaults switch to img2img's (diffusers'); steps, set above, stay
    assert (field("guidance"), field("strength"), field("steps")) == ("7", "0.6", "4")
    assert click_generate(browser) == "done", page_report(browser)
    result = shown_image(browser, "result")
    assert (result["width"], result["height"]) == source.size, f"edit of {result['width']}x{result['height']}"

    # the API's own defaults for guidance and strength: the page's edit must be the one the API makes without them
    plain = api_image(server, "/v1/images/edits", files={"image": ("input.png", path.read_bytes(), "image/png")},
                      data={"prompt": "a red square", "size": "auto", "steps": "4", "seed": "9"})
    assert np.array_equal(data_url_pixels(result["src"]), plain), \
        "the page's edit differs from the API's plain answer with the API's defaults"


def test_a_seed_past_2_to_the_53_is_used_and_shown_exactly(server, browser):
    """JS numbers round ints past 2**53 (seeds run to 2**63): the page sends and reads seeds as their digits."""
    seed = 2**53 + 1  # a JS number would make it 2**53
    open_page(browser, server)
    fill(browser, prompt="a red star", size="64x64", steps=2, seed=seed)
    assert click_generate(browser) == "done", page_report(browser)
    result = shown_image(browser, "result")
    assert result["seed"] == str(seed), f"the page shows seed {result['seed']}, asked {seed}"
    assert str(seed) in gallery_captions(browser)[0], gallery_captions(browser)
    plain = api_image(server, "/v1/images/generations",
                      json={"prompt": "a red star", "size": "64x64", "steps": 2, "seed": seed,
                            "guidance": float(browser.find_element(By.ID, "guidance").get_attribute("value"))})
    assert np.array_equal(data_url_pixels(result["src"]), plain), "the page's image is not the one of its seed"


def test_cancel_stops_the_servers_job(server, browser):
    """Cancel aborts the page's request; the server notices the client left and cancels the job mid-run."""
    from test_serve_http import metric

    with httpx.Client(base_url=server.url, timeout=DONE_S) as http:
        cancelled_before = metric(http, "fluxrt_jobs_total", outcome="cancelled")
        open_page(browser, server)
        fill(browser, prompt="a long one", size="256x256", steps=400, seed=2)
        browser.find_element(By.ID, "generate").click()
        wait_for(browser, "return /^Step [0-9]+ of 400$/.test(document.getElementById('status').textContent)",
                 DONE_S, "the first steps")
        browser.find_element(By.ID, "cancel").click()
        assert wait_for(browser, "return document.body.dataset.state === 'cancelled' && 'cancelled'", DONE_S,
                        "the page to show the cancel") == "cancelled"
        assert not browser.find_element(By.ID, "generate").get_attribute("disabled"), "Generate stays disabled"
        assert browser.find_element(By.ID, "cancel").get_attribute("disabled"), "Cancel stays enabled"
        deadline = time.monotonic() + DONE_S
        while metric(http, "fluxrt_jobs_total", outcome="cancelled") == cancelled_before:
            assert time.monotonic() < deadline, "the server never cancelled the job the page dropped"
            time.sleep(0.2)
        assert not browser.find_element(By.ID, "error").is_displayed(), "a cancel is not an error"


def test_a_server_that_dies_mid_run_is_reported(browser):
    """The stream breaks off without its completed event: the page says the connection dropped (no hang)."""
    doomed = ServerProcess("--model", "tiny-random")
    try:
        open_page(browser, doomed)
        fill(browser, prompt="interrupted", size="256x256", steps=400, seed=4)
        browser.find_element(By.ID, "generate").click()
        wait_for(browser, "return /^Step [0-9]+ of 400$/.test(document.getElementById('status').textContent)",
                 DONE_S, "the first steps")
        doomed.proc.kill()
        assert wait_for(browser, "return document.body.dataset.state === 'error' && 'error'", DONE_S,
                        "the page to report the lost server") == "error"
        assert "connection dropped" in error_text(browser), error_text(browser)
    finally:
        doomed.stop()


def test_loras_are_chosen_and_scaled_on_the_page(browser, tmp_path):
    """The server's --lora files appear with their scales; the page's choice is the image the API gives for it."""
    from test_pipeline_lora import write_lora

    paths = [write_lora(tmp_path / f"{name}.safetensors", seed=k) for k, name in enumerate(("ink", "glow"))]
    lora_server = ServerProcess("--model", "tiny-random", "--backend", "torch", "--lora", f"{paths[0]}:0.8",
                                "--lora", paths[1])
    try:
        open_page(browser, lora_server)
        scale = lambda name: browser.find_element(By.CSS_SELECTOR, f'.lora-scale[data-lora="{name}"]')  # noqa: E731
        box = lambda name: browser.find_element(By.CSS_SELECTOR, f'.lora-on[data-lora="{name}"]')  # noqa: E731
        assert [scale(n).get_attribute("value") for n in ("ink", "glow")] == ["0.8", "1"], "the loaded scales"
        assert box("ink").is_selected() and box("glow").is_selected(), "every loaded LoRA starts chosen"
        scale("ink").clear()
        scale("ink").send_keys("0.5")
        box("glow").click()  # unchosen
        fill(browser, prompt="a red star", size="64x64", steps=3, seed=6)
        assert click_generate(browser) == "done", page_report(browser)
        shown = data_url_pixels(shown_image(browser, "result")["src"])
        guidance = float(browser.find_element(By.ID, "guidance").get_attribute("value"))
        asked = {"prompt": "a red star", "size": "64x64", "steps": 3, "seed": 6, "guidance": guidance}
        chosen = api_image(lora_server, "/v1/images/generations", json={**asked, "loras": {"ink": 0.5}})
        loaded = api_image(lora_server, "/v1/images/generations", json=asked)  # both at their loaded scales
        assert np.array_equal(shown, chosen), "the page's image is not the API's for ink at 0.5 alone"
        assert not np.array_equal(chosen, loaded), "the LoRA choice changes nothing here: the test proves nothing"
    finally:
        lora_server.stop()
