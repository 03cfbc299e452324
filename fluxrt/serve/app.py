"""The HTTP API of `fluxrt serve`: OpenAI's images endpoints in front of an Engine (fluxrt.serve.engine).

    POST /v1/images/generations   JSON: prompt, n, size "WxH", response_format "b64_json", model; FLUX extras: steps
                                  (or num_inference_steps), guidance (or guidance_scale), seed, negative_prompt,
                                  true_cfg_scale, loras {name: scale} (the server's --lora files by stem), cache
                                  (step caching: "fbc:0.08", "taylorseer:1:5:5"; fluxrt.cache); streaming: stream,
                                  partial_images, preview_every, progress (below)
    POST /v1/images/edits         multipart: image, optional mask, prompt, n, size (default: the image's),
                                  response_format, strength, the extras and streaming fields above as text (stream and
                                  progress "true" / "false"; loras as JSON text, '{"style": 0.8}'): img2img /
                                  inpainting / Fill / Kontext, by the loaded model; on a Canny/Depth model the image is
                                  the control image and a mask is refused. The mask is FLUX's (white: repaint), or
                                  OpenAI's if it has transparency (transparent: repaint)
    GET  /v1/models               the one model;  GET /health: the process is up and can run requests (503 once every
                                  replica, or the context-parallel group, failed);  GET /ready: the engine accepts jobs
    GET  /metrics                 Prometheus text
    GET  /                        the web page (fluxrt.serve.page): a form, live previews, the result, a gallery

Streaming (OpenAI's images stream, both endpoints): "stream": true answers text/event-stream: up to "partial_images"
(0 to 3, default 0) partial-image events, each a fluxrt.preview PNG of the requested size with partial_image_index
and "step" (of "steps", the denoising steps the job runs: img2img's are the strength's share), one every
"preview_every" steps (default: those steps spread evenly, steps // (partial_images + 1)), then one completed event
with the image the plain answer gives. The events are OpenAI's: `image_generation.partial_image` and
`image_generation.completed` from generations, `image_edit.partial_image` and `image_edit.completed` from edits.
fluxrt's extension "progress": true adds a `fluxrt.progress` event ({"type": "fluxrt.progress", "step": k, "steps":
n}) after every step k = 1 .. n, the last one too (the decode follows it), each before its step's partial image; it is
never sent unless asked, so OpenAI's clients see their own events only. One image per streamed request (n 1);
previews and progress need --batching step; a client that leaves cancels the job. A bad request still gets its JSON
error; a failure during generation ends the stream with an `error` event ({"type": "error", "error": {message, type,
param, code}}).

A request for n images is n jobs with seeds seed, seed + 1, ... (no seed: one is drawn and reported per image);
they are queued together or not at all. Answers: {"created", "data": [{"b64_json": PNG, "revised_prompt": null,
"seed"[, "cache_stats"]}]}; errors: {"error": {"message", "type", "param", "code"}} with 400 (a bad request,
fluxrt.validation's limits), 401 (api_key set: no or a wrong Bearer token on /v1/), 404, 429 (the queue is full;
Retry-After), 500 (the generation failed), 503 (shutting down), 504 (--timeout passed). A client that disconnects
cancels its jobs.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import re
import secrets
import time
from concurrent.futures import CancelledError
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import validation
from ..preview import LatentPreview, png_base64
from ..serving import GenerationRequest
from .engine import EngineDraining, EngineFailed, JobTimeout, QueueFull
from .page import add_page

GENERATIONS, EDITS = "/v1/images/generations", "/v1/images/edits"
ENDPOINTS = ("/", GENERATIONS, EDITS, "/v1/models", "/health", "/ready", "/metrics")
DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer (counted, never sent)
EXTRAS = ("steps", "num_inference_steps", "guidance", "guidance_scale", "seed", "negative_prompt", "true_cfg_scale",
          "cache")
STREAM_FIELDS = ("stream", "partial_images", "preview_every", "progress")  # stream first: the others need it
GENERATION_FIELDS = {"prompt", "n", "size", "response_format", "model", "user", "loras", *EXTRAS, *STREAM_FIELDS}
MAX_PARTIAL_IMAGES = 3  # OpenAI's bound (its default is 0: the final image alone)
EDIT_FIELDS = {"image", "mask", "prompt", "n", "size", "response_format", "model", "user", "strength", "loras",
               *EXTRAS, *STREAM_FIELDS}
# multipart sends text: the edit fields read as the JSON body's types
INT_FIELDS = ("n", "steps", "num_inference_steps", "seed", "partial_images", "preview_every")
FLOAT_FIELDS = ("guidance", "guidance_scale", "true_cfg_scale", "strength")
BOOL_FIELDS = ("stream", "progress")
BOOLEANS = {"true": True, "false": False}  # what the openai client sends for True / False
EVENT_PREFIXES = {GENERATIONS: "image_generation", EDITS: "image_edit"}  # OpenAI's image stream events per endpoint
PROGRESS_EVENT = "fluxrt.progress"
SIZE_PATTERN = re.compile(r"(\d+)x(\d+)")
LIBRARY_ARGUMENTS = {"image": "an input image", "mask_image": "a mask", "control_image": "a control image"}


class ApiError(Exception):
    """One error answer in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def response(self, stats) -> JSONResponse:
        """The answer, counted in /metrics' fluxrt_errors_total by its code."""
        stats.count_error(self.code or f"http_{self.status}")
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def create_app(engine, model_name: str, api_key: str | None = None,
               default_size: tuple[int, int] = (1024, 1024)) -> FastAPI:
    """The FastAPI app serving `engine` (started and shut down by the caller) as model `model_name`. api_key: the
    Bearer token /v1/ requires (None: open). default_size: (width, height) of a generation without size."""
    app = FastAPI(title="fluxrt serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, stats=engine.stats, api_key=api_key)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return err.response(engine.stats)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {err.detail}"
        if err.status_code == 404:
            message += f"; this server has {', '.join(ENDPOINTS)}"
        code = "not_found" if err.status_code == 404 else None
        return ApiError(err.status_code, message, code=code).response(engine.stats)

    @app.post(GENERATIONS)
    async def generations(request: Request) -> JSONResponse:
        body = _json_object(await request.body())
        _check_fields(body, GENERATION_FIELDS)
        _check_model(body.get("model"), model_name)
        size = _size(body.get("size"), default_size)
        if _streamed(body):
            return await _stream(request, engine, body, size, {}, GENERATIONS)
        return await _serve(request, engine, body, size, images={})

    @app.post(EDITS)
    async def edits(request: Request) -> JSONResponse:
        form = await _form(request)
        _check_fields(form, EDIT_FIELDS)
        _check_model(form.get("model"), model_name)
        fields = _edit_fields(form)
        image = await _read_image(form, "image")
        images = await _edit_images(engine.pipe.mode, image, form)
        size = _size(fields.get("size"), image.size, "the image's size (pass size)")
        if _streamed(fields):
            return await _stream(request, engine, fields, size, images, EDITS)
        return await _serve(request, engine, fields, size, images)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "fluxrt"}]}

    @app.get("/health")
    async def health() -> dict:
        if engine.failure is not None:  # the process is up, but can run nothing (every replica or the CP group failed)
            raise ApiError(503, engine.failure, code="engine_failed", kind="server_error")
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict:
        if not engine.accepting:
            why = engine.failure or "the engine is not running or is shutting down"
            raise ApiError(503, why, code="not_ready", kind="server_error")
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(engine.metrics(), media_type="text/plain; version=0.0.4")

    add_page(app, engine, model_name, api_key, default_size)
    return app


class _Guard:
    """ASGI middleware (a plain one: Starlette's BaseHTTPMiddleware hides client disconnects from the endpoint):
    the Bearer token on /v1/, and the request count by endpoint and status for /metrics."""

    def __init__(self, app, stats, api_key: str | None):
        self.app, self.stats, self.api_key = app, stats, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        status = [CLIENT_CLOSED_REQUEST]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.api_key is not None and path.startswith("/v1/") and not self._authorized(scope):
                response = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY' with "
                                    "the server's --api-key", code="invalid_api_key").response(self.stats)
                return await response(scope, receive, send_counted)
            await self.app(scope, receive, send_counted)
        finally:
            self.stats.count_request(endpoint, status[0])

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode())


# ---- parsing ----


def _json_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({err}); send a JSON object with at least "
                            "\"prompt\"", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


async def _form(request: Request) -> dict:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(400, "/v1/images/edits takes multipart/form-data (an image file, optional mask file, prompt, "
                            "...)", code="invalid_content_type")
    form = await request.form()
    _check_lora_fields(form.keys())
    return {key: form.get(key) for key in form.keys()}


def _check_lora_fields(names) -> None:
    """The openai client sends a dict in extra_body as one multipart field per key (loras[style]); the edits
    endpoint takes loras as one field of JSON text."""
    spread = sorted(name for name in names if name.startswith("loras["))
    if spread:
        raise ApiError(400, "loras is one multipart field of JSON text, e.g. loras={\"style\": 0.8} (the openai "
                            "client: extra_body={\"loras\": json.dumps(choice)}), got the fields "
                            f"{', '.join(spread)}", param="loras")


def _check_fields(body: dict, known: set) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise ApiError(400, f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; this endpoint "
                            f"takes {', '.join(sorted(known))}", param=unknown[0], code="unknown_parameter")


def _check_model(model, model_name: str) -> None:
    if model is not None and model != model_name:
        raise ApiError(404, f"model {model!r} is not served here; this server serves {model_name!r} (GET /v1/models)",
                       param="model", code="model_not_found")


def _size(size, default: tuple[int, int], default_what: str = "") -> tuple[int, int]:
    """"WxH" -> (width, height) by fluxrt.validation's size rules; None -> default."""
    if size is None or size == "auto":
        width, height = default
        what = default_what or "the default size"
    else:
        match = SIZE_PATTERN.fullmatch(size) if isinstance(size, str) else None
        if match is None:
            raise ApiError(400, f"size must be \"WIDTHxHEIGHT\" (multiples of 16, e.g. \"1024x768\"), got {size!r}",
                           param="size", code="invalid_size")
        width, height = int(match[1]), int(match[2])
        what = "size"
    try:
        return validation.check_size(width, height)
    except ValueError as err:
        raise ApiError(400, f"{what}: {err}", param="size", code="invalid_size") from None


def _one_of(body: dict, names: tuple[str, str]):
    """A value that has two names (OpenAI-style and diffusers-style): either, or both if they agree."""
    values = [body[name] for name in names if body.get(name) is not None]
    if len(values) == 2 and values[0] != values[1]:
        raise ApiError(400, f"{names[0]} and {names[1]} are the same setting and disagree ({values[0]!r} vs "
                            f"{values[1]!r}): pass one", param=names[1])
    return values[0] if values else None


def _edit_fields(form: dict) -> dict:
    """The form's text fields as the JSON body's types (multipart sends everything as text)."""
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    for name in INT_FIELDS:
        if name in fields:
            fields[name] = _parse_number(fields[name], name, int)
    for name in FLOAT_FIELDS:
        if name in fields:
            fields[name] = _parse_number(fields[name], name, float)
    for name in BOOL_FIELDS:
        if name in fields:
            fields[name] = _parse_bool(fields[name], name)
    if "loras" in fields:
        fields["loras"] = _parse_loras(fields["loras"])
    return fields


def _parse_number(text: str, name: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise ApiError(400, f"{name} must be {'an int' if kind is int else 'a number'}, got {text!r}",
                       param=name) from None


def _parse_bool(text: str, name: str) -> bool:
    if text not in BOOLEANS:
        raise ApiError(400, f"{name} must be \"true\" or \"false\" (multipart text), got {text!r}", param=name)
    return BOOLEANS[text]


def _parse_loras(text: str):
    """loras' JSON text; its shape ({name: scale} of loaded LoRAs) is checked as the generations endpoint's."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ApiError(400, f"loras must be JSON text of an object {{name: scale}}, e.g. {{\"style\": 0.8}}; got "
                            f"{text!r}, which is not JSON ({err})", param="loras") from None


async def _edit_images(model_mode: str, image, form: dict) -> dict:
    """The edit's image arguments for the loaded model: a Canny/Depth model's one image is its control image (the
    only image it takes); any other model's is the input image, with the mask if one came."""
    masked = form.get("mask") is not None
    if model_mode == "control":
        if masked:
            raise ApiError(400, "a Canny/Depth model takes no mask: its image is the control image (Canny edges or a "
                                "depth map) the generation follows; drop mask", param="mask")
        return {"control_image": image}
    images = {"image": image}
    if masked:
        images["mask_image"] = _openai_mask(await _read_image(form, "mask"))
        _check_mask(images)
    return images


async def _read_image(form: dict, name: str):
    from PIL import Image, UnidentifiedImageError
    from PIL.Image import DecompressionBombError

    upload = form.get(name)
    if upload is None or isinstance(upload, str):
        raise ApiError(400, f"{name} must be an image file (multipart file field {name!r})", param=name)
    data = await upload.read()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError, DecompressionBombError) as err:
        raise ApiError(400, f"{name} is not an image file PIL can read ({err})", param=name) from None


def _openai_mask(mask):
    """A mask with transparency is OpenAI's kind (transparent: edit here) and becomes FLUX's (white: repaint); any
    other is FLUX's already."""
    if mask.mode not in ("RGBA", "LA", "PA") and "transparency" not in mask.info:
        return mask
    from PIL import ImageOps

    return ImageOps.invert(mask.convert("RGBA").getchannel("A"))


def _check_mask(images: dict) -> None:
    from ..conditioning import check_mask_size

    try:
        check_mask_size(images["image"], images["mask_image"])
    except ValueError as err:
        raise ApiError(400, str(err), param="mask") from None


def _requests(body: dict, size: tuple[int, int], images: dict, lora_hotswap: bool) -> list[GenerationRequest]:
    """The n GenerationRequests of one HTTP request: seeds seed, seed + 1, ... (None: drawn)."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        got = "" if prompt is None else f", got {type(prompt).__name__}"
        raise ApiError(400, f"prompt is required: a string{got}", param="prompt")
    format_ = body.get("response_format") or "b64_json"
    if format_ != "b64_json":
        raise ApiError(400, f"response_format {format_!r} is not served: this server returns images inline only, as "
                            "response_format \"b64_json\" (base64 PNG)", param="response_format")
    loras = body.get("loras")
    if loras is not None and not (isinstance(loras, dict) and all(isinstance(k, str) for k in loras)):
        raise ApiError(400, f"loras must be an object {{name: scale}} of loaded LoRAs, got {loras!r}", param="loras")
    if loras is not None and not lora_hotswap:
        raise ApiError(400, "this server has no LoRAs to choose from (start it with --lora PATH)", param="loras")
    try:
        n = validation.check_images_per_prompt(body.get("n", 1), "n")
    except (TypeError, ValueError) as err:
        raise ApiError(400, str(err), param="n") from None
    try:
        seeds = validation.check_seeds(body.get("seed"), n, "seed")
    except (TypeError, ValueError) as err:
        raise ApiError(400, str(err), param="seed") from None
    common = dict(prompt=prompt, width=size[0], height=size[1],
                  num_steps=_one_of(body, ("steps", "num_inference_steps")),
                  guidance=_one_of(body, ("guidance", "guidance_scale")),
                  negative_prompt=body.get("negative_prompt"), true_cfg_scale=body.get("true_cfg_scale"),
                  loras=loras, strength=body.get("strength"), cache=body.get("cache"), **images)
    return [GenerationRequest(seed=seed, **common) for seed in seeds]


# ---- running ----


async def _serve(request: Request, engine, body: dict, size: tuple[int, int], images: dict) -> JSONResponse:
    jobs = _submit(engine, _requests(body, size, images, engine.pipe.lora_hotswap))
    try:
        await _wait(request, jobs)
    finally:  # a client that left, or any error: what is still queued or running is not wanted any more
        for job in jobs:
            job.cancel()
    results = [_result(job) for job in jobs]
    data = await run_in_threadpool(lambda: [_image_data(r) for r in results])
    return JSONResponse({"created": int(time.time()), "data": data})


def _image_data(result) -> dict:
    """One image's answer: the PNG, its seed, and with a step cache what it computed and skipped."""
    data = {"b64_json": png_base64(result.image), "revised_prompt": None, "seed": result.request.seed}
    if result.cache_stats is not None:
        data["cache_stats"] = result.cache_stats
    return data


def _submit(engine, requests: list[GenerationRequest]) -> list:
    try:
        return engine.submit_all(requests)
    except QueueFull as err:
        raise ApiError(429, str(err), code="queue_full", kind="rate_limit_error",
                       headers={"Retry-After": str(err.retry_after_s)}) from None
    except EngineFailed as err:
        raise ApiError(503, str(err), code="engine_failed", kind="server_error") from None
    except EngineDraining as err:
        raise ApiError(503, str(err), code="shutting_down", kind="server_error") from None
    except (TypeError, ValueError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) else str(err)
        raise ApiError(400, _in_api_words(message), code="invalid_request") from None


def _in_api_words(message: str) -> str:
    """The library's argument names (fluxrt.modes: "a Fill model needs mask_image="; fluxrt.validation: "num_steps
    must be ...") as the API's fields."""
    message = re.sub(r"\bnum_steps\b", "steps", message)
    return re.sub(r"\b(mask_image|control_image|image)=", lambda m: LIBRARY_ARGUMENTS[m[1]], message)


async def _wait(request: Request, jobs: list) -> None:
    """Until every job is done; a client that disconnects meanwhile cancels them (ClientGone)."""
    pending = {asyncio.wrap_future(job.future) for job in jobs}
    while pending:
        _, pending = await asyncio.wait(pending, timeout=DISCONNECT_POLL_S)
        if pending and await request.is_disconnected():
            raise ApiError(CLIENT_CLOSED_REQUEST, "the client disconnected; its request was cancelled",
                           code="client_disconnected")


def _result(job):
    """The job's GenerationResult, or the ApiError its future holds."""
    try:
        error = job.future.exception(timeout=0)
    except CancelledError:
        raise ApiError(CLIENT_CLOSED_REQUEST, "the request was cancelled", code="cancelled") from None
    if isinstance(error, JobTimeout):
        raise ApiError(504, str(error), code="timeout", kind="server_error")
    if error is not None:
        raise error
    result = job.future.result()
    if not result.ok:
        raise ApiError(500, f"the image could not be generated: {result.error}", code="generation_failed",
                       kind="server_error")
    return result


# ---- streaming ----


def _streamed(body: dict) -> bool:
    """Whether the answer is an event stream; the stream-only fields without it are refused."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {stream!r}", param="stream")
    for name in STREAM_FIELDS[1:]:
        if not stream and body.get(name) is not None:
            raise ApiError(400, f"{name} goes with \"stream\": true (previews and progress are streamed); add it or "
                                f"drop {name}", param=name)
    return stream


def _stream_settings(engine, body: dict, images: dict) -> tuple[int, int | None, bool]:
    """(partial_images, preview_every, progress) of a streamed request: preview_every None when no previews were
    asked for."""
    partial_images = body.get("partial_images")
    partial_images = 0 if partial_images is None else partial_images
    if isinstance(partial_images, bool) or not isinstance(partial_images, int) or not (
            0 <= partial_images <= MAX_PARTIAL_IMAGES):
        raise ApiError(400, f"partial_images must be an int from 0 to {MAX_PARTIAL_IMAGES}, got {partial_images!r}",
                       param="partial_images")
    every = body.get("preview_every")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ApiError(400, f"preview_every must be a positive int (denoising steps between previews), got {every!r}",
                       param="preview_every")
    progress = body.get("progress", False)
    if not isinstance(progress, bool):
        raise ApiError(400, f"progress must be true or false (a {PROGRESS_EVENT} event after each step), got "
                            f"{progress!r}", param="progress")
    if partial_images == 0:
        return 0, None, progress
    if every is None:  # the previews spread over the steps the job runs
        every = max(1, _denoising_steps(engine.pipe, body, images) // (partial_images + 1))
    return partial_images, every, progress


def _denoising_steps(pipe, body: dict, images: dict) -> int:
    """The steps a request's job runs: its steps (or its mode's default), of which img2img, inpainting and Fill run
    the strength's tail. 1 for a request whose steps or images are wrong: submit refuses it in its own words."""
    from ..conditioning import call_mode, strength_timesteps
    from ..modes import DEFAULT_STRENGTH

    try:
        mode = call_mode(pipe.mode, strength=body.get("strength"), **images)
        steps = pipe.resolve_steps(_one_of(body, ("steps", "num_inference_steps")), None, mode)[0]
        strength = body.get("strength", DEFAULT_STRENGTH.get(mode))
        return steps if strength is None else len(strength_timesteps(range(steps + 1), strength)) - 1
    except (TypeError, ValueError):
        return 1


async def _stream(request: Request, engine, body: dict, size: tuple[int, int], images: dict,
                  endpoint: str) -> StreamingResponse:
    """A streamed generation or edit (see the module docstring): every check and the submit happen before the stream
    starts, so their errors are ordinary JSON answers."""
    if body.get("n", 1) != 1:
        raise ApiError(400, f"a streamed request makes one image, got n {body.get('n')!r}: send n 1 (or leave it out), "
                            "or drop \"stream\" for n images in one answer", param="n")
    partial_images, every, progress = _stream_settings(engine, body, images)
    events: asyncio.Queue = asyncio.Queue()  # ("progress", step, total), ("preview", step, total, rgb); None: done
    post = functools.partial(_post, asyncio.get_running_loop(), events)
    generation, = _requests(body, size, images, engine.pipe.lora_hotswap)
    if partial_images:
        generation = replace(generation, preview_every=every, on_preview=lambda *preview: post(("preview", *preview)))
    if progress:
        generation = replace(generation, on_step=lambda step, total: post(("progress", step, total)))
    job, = _submit(engine, [generation])
    # the worker posts a job's previews before it sets its result, so the None comes after the last preview
    job.future.add_done_callback(lambda _: post(None))
    stream = _events(engine, job, events, partial_images, f"{size[0]}x{size[1]}", EVENT_PREFIXES[endpoint])
    return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-store"})


def _post(loop, events: asyncio.Queue, item) -> None:
    """Hand an item from the engine's worker thread to the request's event loop."""
    try:
        loop.call_soon_threadsafe(events.put_nowait, item)
    except RuntimeError:  # the event loop is closed: the server is stopping, nobody is left to send it to
        return


async def _events(engine, job, events: asyncio.Queue, partial_images: int, size: str, prefix: str):
    """The job's server-sent events, OpenAI's named `prefix`.partial_image and `prefix`.completed: progress and
    partial images as they come (the first partial_images of these), then the completed image or an error. Starlette
    cancels this generator when the client disconnects; the job is cancelled with it."""
    sent = 0
    try:
        while (item := await events.get()) is not None:
            kind, *payload = item
            if kind == "progress":
                step, total = payload
                yield _event(PROGRESS_EVENT, {"type": PROGRESS_EVENT, "step": step, "steps": total})
            elif sent < partial_images:
                yield await _partial_event(f"{prefix}.partial_image", payload, sent, size)
                sent += 1
        try:
            result = _result(job)
        except ApiError as err:
            engine.stats.count_error(err.code or f"http_{err.status}")
            yield _event("error", {"type": "error", "error": {"message": err.message, "type": err.kind,
                                                              "param": err.param, "code": err.code}})
            return
        completed = f"{prefix}.completed"
        yield _event(completed, {**_event_fields(completed, size),
                                 "b64_json": await run_in_threadpool(png_base64, result.image),
                                 "seed": result.request.seed})
    finally:  # done, failed, or the client left: nothing more is wanted
        job.cancel()


async def _partial_event(kind: str, preview: list, index: int, size: str) -> bytes:
    step, total, rgb = preview
    width, height = (int(side) for side in size.split("x"))

    def png() -> str:  # off the event loop: the upsampling and PNG encode are the preview's costliest part
        return png_base64(LatentPreview.image(rgb, height, width))

    return _event(kind, {**_event_fields(kind, size), "b64_json": await run_in_threadpool(png),
                         "partial_image_index": index, "step": step, "steps": total})


def _event_fields(kind: str, size: str) -> dict:
    """The fields OpenAI's image events carry besides the image (fluxrt: opaque PNG, one quality)."""
    fields = {"type": kind, "created_at": int(time.time()), "size": size, "output_format": "png",
              "background": "opaque", "quality": "auto"}
    if kind.endswith(".completed"):  # token counts are GPT image models' only
        fields["usage"] = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                           "output_tokens": 0, "total_tokens": 0}
    return fields


def _event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

