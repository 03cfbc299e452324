"""The web page of `fluxrt serve` at GET /: one self-contained file (page.html: HTML, CSS and JS, no CDN, no build
step) that drives the server's own API, /v1/images/generations streamed (live previews, a progress bar) and
/v1/images/edits (an input image), with this server's settings filled in where the page says so.

    add_page(app, engine, "tiny-random", api_key=None, default_size=(1024, 1024))

What the page is told (PageSettings, JSON in the page's <script id="fluxrt-settings">): the model's name and mode,
the loaded LoRAs and their scales, the default size, steps and guidance, whether /v1/ needs an API key (the page asks
for it; GET / itself is open, it holds no secret), and whether live previews are served (--batching step).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from .. import modes

SETTINGS_MARK = "/*FLUXRT_SETTINGS*/null"  # where page.html takes its settings (valid JS before it is replaced)
# what an input image is to each model mode (fluxrt.conditioning.call_mode): its label, and whether a mask goes with it
EDIT_MODES = {"text-to-image": "img2img", "fill": "fill", "kontext": "kontext", "control": "control"}
IMAGE_ROLES = {
    "text-to-image": {"image": "Input image (img2img; add a mask to inpaint)", "mask": True, "required": False},
    "fill": {"image": "Image to fill (with its mask)", "mask": True, "required": True},
    "kontext": {"image": "Image to edit (Kontext)", "mask": False, "required": False},
    "control": {"image": "Control image (Canny edges or depth map)", "mask": False, "required": True},
}


@cache
def _template() -> str:
    return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")


def page_settings(engine, model_name: str, api_key: str | None, default_size: tuple[int, int]) -> dict:
    """What the page needs to know about this server (JSON-serialisable)."""
    pipe = engine.pipe
    return {
        "model": model_name,
        "mode": pipe.mode,
        "image_role": IMAGE_ROLES[pipe.mode],
        "loras": dict(pipe.loras) if pipe.lora_hotswap else {},
        "size": f"{default_size[0]}x{default_size[1]}",
        "steps": pipe.default_steps,
        "guidance": pipe.default_guidance,
        "edit": edit_defaults(pipe),
        "needs_api_key": api_key is not None,
        "previews": engine.batching == "step",
    }


def edit_defaults(pipe) -> dict:
    """The steps, guidance and strength an edit (a request with an input image) runs at by default: diffusers' for
    the mode the image selects (img2img: guidance 7, strength 0.6; Fill: 50 steps, guidance 30, strength 1), which the
    page fills in when an image is chosen. Guidance stays None on a model without a guidance input."""
    mode = EDIT_MODES[pipe.mode]
    guidance = None if pipe.default_guidance is None else modes.DEFAULT_GUIDANCE.get(mode, pipe.default_guidance)
    return {"mode": mode, "steps": modes.DEFAULT_STEPS.get(mode, pipe.default_steps), "guidance": guidance,
            "strength": modes.DEFAULT_STRENGTH.get(mode)}


def render(settings: dict) -> str:
    """page.html with its settings in place; '<' escaped so no value can close the script element."""
    text = json.dumps(settings).replace("<", "\\u003c")
    return _template().replace(SETTINGS_MARK, text, 1)


def add_page(app: FastAPI, engine, model_name: str, api_key: str | None, default_size: tuple[int, int]) -> None:
    """GET / on `app`: the page, rendered once (the settings do not change while the server runs)."""
    html = render(page_settings(engine, model_name, api_key, default_size))

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> HTMLResponse:
        # the page runs its own inline script and style only, and talks to this server alone
        headers = {"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                   "style-src 'unsafe-inline'; img-src data: blob:; connect-src 'self'; form-action 'none'; "
                   "base-uri 'none'; frame-ancestors 'none'", "Cache-Control": "no-cache"}
        return HTMLResponse(html, headers=headers)
