"""The web page's server side (fluxrt.serve.page): what GET / answers and the settings it renders into the page,
from real engines over real tiny pipelines. The page's behaviour in a browser: tests/test_serve_page.py."""

import json
import re
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from fluxrt.serve.app import create_app
from fluxrt.serve.engine import Engine
from fluxrt.serve.models import load_pipeline
from fluxrt.serve.page import page_settings, render
from fluxrt.tiny import tiny_random_pipeline
from test_serve_http import WAIT_S

SETTINGS = re.compile(r'<script id="fluxrt-settings" type="application/json">(.*?)</script>', re.S)


@pytest.fixture(scope="module")
def pipe():
    return tiny_random_pipeline(progress=False)


def served(pipe, batching="step", **app_options):
    """(engine, TestClient of its app); the caller shuts the engine down."""
    engine = Engine(pipe, batching=batching).start()
    return engine, TestClient(create_app(engine, "tiny-random", **app_options))


def settings_of(html: str) -> dict:
    match = SETTINGS.search(html)
    assert match, "the page has no settings script"
    return json.loads(match[1])


def test_the_page_carries_this_servers_settings(pipe):
    engine, http = served(pipe, default_size=(512, 384))
    try:
        response = http.get("/")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
        settings = settings_of(response.text)
        assert settings == page_settings(engine, "tiny-random", None, (512, 384))
        assert settings["size"] == "512x384" and settings["steps"] == pipe.default_steps
        assert settings["guidance"] == pipe.default_guidance and settings["mode"] == "text-to-image"
        assert settings["previews"] is True and settings["needs_api_key"] is False and settings["loras"] == {}
        assert settings["image_role"]["mask"] is True, "a text-to-image model inpaints with a mask"
        assert http.head("/").status_code == 200
    finally:
        assert engine.shutdown(timeout_s=WAIT_S)


def test_the_page_is_open_while_the_api_needs_a_key(pipe):
    engine, http = served(pipe, api_key="sesame")
    try:
        response = http.get("/")
        assert response.status_code == 200, "the page holds no secret; the key is asked for on it"
        assert settings_of(response.text)["needs_api_key"] is True
        assert "sesame" not in response.text, "the page must never carry the key"
        assert http.post("/v1/images/generations", json={"prompt": "x"}).status_code == 401
    finally:
        assert engine.shutdown(timeout_s=WAIT_S)


def test_no_previews_without_step_batching(pipe):
    engine, http = served(pipe, batching="request")
    try:
        assert settings_of(http.get("/").text)["previews"] is False
    finally:
        assert engine.shutdown(timeout_s=WAIT_S)


def test_the_page_lists_the_servers_loras(tmp_path):
    from test_pipeline_lora import write_lora

    path = Path(write_lora(tmp_path / "ink.safetensors", seed=3))
    engine = Engine(load_pipeline("tiny-random", "cpu", backend="torch", loras=[(path, 0.7)])).start()
    try:
        settings = page_settings(engine, "tiny-random", None, (64, 64))
        assert settings["loras"] == {"ink": pytest.approx(0.7)}
    finally:
        assert engine.shutdown(timeout_s=WAIT_S)


def test_settings_cannot_break_out_of_their_script():
    hostile = {"model": "</script><script>alert(1)</script>", "n": "<!--"}
    html = render(hostile)
    assert "</script><script>alert(1)" not in html and "<!--\"" not in html
    assert settings_of(html) == hostile, "the escaped JSON reads back as the same settings"


def test_the_page_is_self_contained(pipe):
    engine, http = served(pipe)
    try:
        response = http.get("/")
    finally:
        assert engine.shutdown(timeout_s=WAIT_S)
    html = response.text
    remote = re.findall(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//|@import|url\(\s*["']?(?:https?:)?//""", html)
    assert not remote, f"the page loads from elsewhere: {remote}"
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy, policy


@pytest.mark.parametrize("mode, edit", [
    ("text-to-image", {"mode": "img2img", "guidance": 7.0, "strength": 0.6}),
    ("fill", {"mode": "fill", "steps": 50, "guidance": 30.0, "strength": 1.0}),
    ("kontext", {"mode": "kontext", "strength": None}),
])
def test_an_edit_gets_its_modes_defaults(mode, edit):
    """The page fills these in when an image is chosen: an edit from the page runs as the API's edit would."""
    pipe = tiny_random_pipeline(progress=False, mode=mode)
    engine = Engine(pipe).start()
    try:
        got = page_settings(engine, "m", None, (64, 64))["edit"]
    finally:
        assert engine.shutdown(timeout_s=WAIT_S)
    expected = {"steps": pipe.default_steps, "guidance": pipe.default_guidance, **edit}
    assert got == expected, f"{mode}: {got} != {expected}"
