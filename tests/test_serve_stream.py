"""Streamed generations (`"stream": true`, OpenAI's image events) from a real `fluxrt serve` on loopback: the openai
client's stream, the raw event names, fluxrt.progress events, the errors before and during a stream, cancellation on
disconnect, and the preview's cost against a denoising step on this CPU; in process, the step batcher's and the
engine's side of previews and progress (GenerationRequest.on_preview, on_step). Streamed edits:
test_serve_edits_stream.py."""

import asyncio
import base64
import io
import json
import time
from concurrent.futures import Future

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from fluxrt import GenerationRequest
from fluxrt.preview import LatentPreview
from fluxrt.serve import app as serve_app
from fluxrt.serve.batching import StepBatcher
from fluxrt.serve.engine import Engine
from fluxrt.serving import GenerationResult, resolve
from fluxrt.tiny import tiny_random_pipeline
from test_serve_http import API_KEY, SLOW, WAIT_S, ServerProcess, assert_error, assert_same, client, decoded, metric
from test_serve_engine import wait_until

PARTIAL, COMPLETED, PROGRESS = "image_generation.partial_image", "image_generation.completed", "fluxrt.progress"
# A preview's projection costs [L, 16] x [16, 3] against a transformer step's full stack; on this shared CPU the
# tiny model's step is itself small (~33 ms at 256x256, where a preview measured 0.25 ms: 0.8 %), so the bound leaves
# a loaded CI box room: a preview under a tenth of a step
PREVIEW_COST_BOUND = 0.1


@pytest.fixture(scope="module")
def server():
    process = ServerProcess("--model", "tiny-random", "--max-batch", "4", "--api-key", API_KEY)
    yield process
    process.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=WAIT_S) as client_:
        yield client_


def png_size(b64: str) -> tuple[int, int]:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        assert image.format == "PNG", image.format
        return image.size


def sse_events(response: httpx.Response) -> list[tuple[str, dict]]:
    """(event name, data) of each server-sent event."""
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: "):])))
    return events


def test_openai_stream_partial_images_then_the_plain_image(server):
    openai_client = client(server)
    asked = dict(prompt="a red star", size="64x48", extra_body={"steps": 6, "seed": 11})
    events = list(openai_client.images.generate(stream=True, partial_images=2, **asked))
    kinds = [event.type for event in events]
    assert kinds == [PARTIAL, PARTIAL, COMPLETED], kinds
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    steps = [event.to_dict()["step"] for event in events[:2]]
    assert steps == [2, 4], f"previews at steps {steps}, expected 2 and 4 (6 steps spread over 2 previews)"
    for event in events:
        assert png_size(event.b64_json) == (64, 48), (event.type, png_size(event.b64_json))
        assert event.size == "64x48" and event.output_format == "png", event
    plain, = openai_client.images.generate(**asked).data
    assert_same(decoded(events[-1].b64_json), decoded(plain.b64_json), "the streamed final image")
    assert events[-1].to_dict()["seed"] == 11


def test_raw_event_names_and_steps(http):
    body = dict(prompt="a blue circle", size="32x32", steps=4, seed=3, stream=True, partial_images=2, preview_every=1)
    with http.stream("POST", "/v1/images/generations", json=body) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    names = [name for name, _ in events]
    assert names == [PARTIAL] * 2 + [COMPLETED], f"{names}: partial_images 2 caps the previews of steps 1, 2 and 3"
    assert all(data["type"] == name for name, data in events), events
    assert [data["step"] for _, data in events[:2]] == [1, 2], "a preview after each step, the first two sent"
    assert all(data["steps"] == 4 for _, data in events[:2])


def test_progress_events_come_before_each_steps_preview(http):
    body = dict(prompt="a green star", size="32x32", steps=4, seed=2, stream=True, partial_images=2, preview_every=1,
                progress=True)
    with http.stream("POST", "/v1/images/generations", json=body) as response:
        events = sse_events(response)
    names = [name for name, _ in events]
    assert names == [PROGRESS, PARTIAL, PROGRESS, PARTIAL, PROGRESS, PROGRESS, COMPLETED], names
    heard = [data for name, data in events if name == PROGRESS]
    assert heard == [{"type": PROGRESS, "step": k, "steps": 4} for k in (1, 2, 3, 4)], heard
    assert [data["step"] for name, data in events if name == PARTIAL] == [1, 2]


def test_progress_and_previews_need_step_batching():
    process = ServerProcess("--model", "tiny-random", "--batching", "request")
    body = dict(prompt="x", size="32x32", steps=2, seed=1, stream=True)
    try:
        with httpx.Client(base_url=process.url, timeout=WAIT_S) as http_:
            progress = http_.post("/v1/images/generations", json={**body, "progress": True})
            previews = http_.post("/v1/images/generations", json={**body, "partial_images": 1})
            with http_.stream("POST", "/v1/images/generations", json=body) as response:
                names = [name for name, _ in sse_events(response)]
    finally:
        process.stop()
    assert_error(progress, 400, "progress events need step-level batching", "--batching step")
    assert_error(previews, 400, "live previews need step-level batching", "--batching step")
    assert names == [COMPLETED], f"{names}: a stream without previews or progress runs on any batching"


def test_no_partial_images_by_default(http):
    body = dict(prompt="a cat", size="32x32", steps=2, seed=1, stream=True)
    with http.stream("POST", "/v1/images/generations", json=body) as response:
        names = [name for name, _ in sse_events(response)]
    assert names == [COMPLETED], names


@pytest.mark.parametrize("body, param, words", [
    (dict(size="30x30"), "size", ("multiple of 16",)),
    (dict(n=2), "n", ("one image",)),
    (dict(partial_images=4), "partial_images", ("0 to 3",)),
    (dict(preview_every=0), "preview_every", ("positive int",)),
    (dict(stream=False, partial_images=1), "partial_images", ("stream",)),
    (dict(stream="yes"), "stream", ("true or false",)),
    (dict(stream=False, partial_images=None, progress=True), "progress", ("stream",)),
    (dict(progress="yes"), "progress", ("true or false",)),
])
def test_bad_streamed_requests_get_json_errors(http, body, param, words):
    response = http.post("/v1/images/generations", json={"prompt": "x", "stream": True, "partial_images": 1, **body})
    assert response.headers["content-type"].startswith("application/json"), response.headers["content-type"]
    assert assert_error(response, 400, *words)["param"] == param


def test_a_client_that_leaves_cancels_its_stream(server, http):
    before = metric(http, "fluxrt_jobs_total", outcome="cancelled")
    body = dict(prompt="slow", seed=1, stream=True, partial_images=1, preview_every=1, **SLOW)
    with http.stream("POST", "/v1/images/generations", json=body) as response:
        assert next(response.iter_lines()).startswith("event: " + PARTIAL)
    wait_until(lambda: metric(http, "fluxrt_jobs_total", outcome="cancelled") > before, "the job's cancellation")


# ---- in process ----


class _DoneJob:
    """A finished job as _events sees it: its future and cancel."""

    def __init__(self, result: GenerationResult):
        self.future, self.cancelled = Future(), False
        self.future.set_result(result)

    def cancel(self) -> bool:
        self.cancelled = True
        return False


class _Stats:
    def __init__(self):
        self.errors = []

    def count_error(self, kind: str) -> None:
        self.errors.append(kind)


def test_a_failure_during_generation_ends_the_stream_with_an_error_event():
    engine = type("FakeEngine", (), {"stats": _Stats()})()
    job = _DoneJob(GenerationResult(GenerationRequest("x"), error="NonFiniteError: NaN at step 3"))

    async def collect():
        events = asyncio.Queue()
        events.put_nowait(None)  # the job is done
        return [chunk async for chunk in serve_app._events(engine, job, events, 0, "32x32", "image_generation")]

    chunks = asyncio.run(collect())
    assert len(chunks) == 1 and chunks[0].startswith(b"event: error\n"), chunks
    data = json.loads(chunks[0].split(b"data: ", 1)[1])
    assert data["type"] == "error" and "NaN at step 3" in data["error"]["message"], data
    assert data["error"]["code"] == "generation_failed" and engine.stats.errors == ["generation_failed"]
    assert job.cancelled, "the stream's end does not let go of its job"


def test_previews_queued_before_the_end_are_all_sent_first():
    """A fast job's previews may all wait in the queue when its result comes: each is still sent, in order."""
    engine = type("FakeEngine", (), {"stats": _Stats()})()
    job = _DoneJob(GenerationResult(GenerationRequest("x", seed=4), image=Image.new("RGB", (32, 16))))

    async def collect():
        events = asyncio.Queue()
        for step in (1, 2, 3):
            events.put_nowait(("preview", step, 4, torch.full((2, 4, 3), 40 * step, dtype=torch.uint8)))
        events.put_nowait(None)
        return [chunk async for chunk in serve_app._events(engine, job, events, 2, "32x16", "image_generation")]

    chunks = [json.loads(chunk.split(b"data: ", 1)[1]) for chunk in asyncio.run(collect())]
    assert [(data["type"], data.get("step")) for data in chunks] == [(PARTIAL, 1), (PARTIAL, 2), (COMPLETED, None)]
    preview = decoded(chunks[1]["b64_json"])
    assert preview.shape == (16, 32, 3) and (preview == 80).all(), "the second preview is not step 2's, upsampled"


@pytest.mark.parametrize("batching", ["request", "serial"])
@pytest.mark.parametrize("callback", [dict(preview_every=1, on_preview=lambda *args: None),
                                      dict(on_step=lambda *args: None)])
def test_previews_and_progress_need_step_batching(batching, callback):
    engine = Engine(tiny_random_pipeline(progress=False), batching=batching)
    with pytest.raises(ValueError, match="--batching step"):
        engine.submit(GenerationRequest("x", width=32, height=32, **callback))


@pytest.mark.parametrize("fields, error, words", [
    (dict(preview_every=0, on_preview=print), ValueError, "positive int"),
    (dict(preview_every=None, on_preview=print), ValueError, "positive int"),
    (dict(preview_every=2, on_preview="print"), TypeError, "must be a function"),
    (dict(on_step="print"), TypeError, "on_step must be a function"),
])
def test_the_engine_checks_preview_requests(fields, error, words):
    engine = Engine(tiny_random_pipeline(progress=False), batching="step")  # checked before the queue: not started
    with pytest.raises(error, match=words):
        engine.submit(GenerationRequest("x", width=32, height=32, **fields))


def test_preview_cost_against_a_step():
    """Seconds of one preview against one denoising step of the step batcher at 256x256 on this CPU."""
    pipe = tiny_random_pipeline(progress=False)
    request = resolve(pipe, GenerationRequest("a cat", width=256, height=256, num_steps=50, seed=1))
    batcher = StepBatcher(pipe, 1)
    batcher.admit("job", request)
    batcher.step()  # the row joins (prompt encoding) and runs its first step
    preview = LatentPreview.of(pipe.autoencoder)
    row, = batcher._rows
    steps, previews = [], []
    for _ in range(5):
        started = time.perf_counter()
        batcher.step()
        steps.append(time.perf_counter() - started)
        started = time.perf_counter()
        preview.rgb(row.latents, 256, 256)
        previews.append(time.perf_counter() - started)
    step_s, preview_s = float(np.median(steps)), float(np.median(previews))
    print(f"preview {preview_s * 1e3:.3f} ms, step {step_s * 1e3:.1f} ms: {100 * preview_s / step_s:.2f} % (CPU)")
    assert preview_s < PREVIEW_COST_BOUND * step_s, f"a preview costs {preview_s / step_s:.0%} of a step"


def test_the_step_batcher_sends_previews_only_to_jobs_that_asked():
    pipe = tiny_random_pipeline(progress=False)
    seen = []
    batcher = StepBatcher(pipe, 2)
    asked = resolve(pipe, GenerationRequest("a", width=32, height=32, num_steps=6, seed=1, preview_every=2,
                                            on_preview=lambda step, total, rgb: seen.append((step, total, rgb.shape))))
    batcher.admit("asked", asked)
    batcher.admit("plain", resolve(pipe, GenerationRequest("b", width=32, height=32, num_steps=6, seed=2)))
    finished = {}
    while len(batcher):
        finished.update(batcher.step())
    assert seen == [(2, 6, (4, 4, 3)), (4, 6, (4, 4, 3))], f"{seen}: every 2 steps, not after the last (6)"
    assert all(result.ok for result in finished.values()), finished


def test_the_step_batcher_reports_each_step_before_its_preview_and_a_failing_callback_fails_its_job_alone():
    pipe = tiny_random_pipeline(progress=False)
    heard = []

    def fail_at_step_2(step, total):
        if step == 2:
            raise RuntimeError("the client's queue is gone")

    batcher = StepBatcher(pipe, 3)
    requests = {
        "asked": GenerationRequest("a", width=32, height=32, num_steps=3, seed=1, preview_every=1,
                                   on_step=lambda step, total: heard.append(("step", step, total)),
                                   on_preview=lambda step, total, rgb: heard.append(("preview", step, total))),
        "failing": GenerationRequest("b", width=32, height=32, num_steps=3, seed=2, on_step=fail_at_step_2),
        "plain": GenerationRequest("c", width=32, height=32, num_steps=3, seed=3),
    }
    for key, request in requests.items():
        batcher.admit(key, resolve(pipe, request))
    finished = {}
    while len(batcher):
        finished.update(batcher.step())
    assert heard == [("step", 1, 3), ("preview", 1, 3), ("step", 2, 3), ("preview", 2, 3), ("step", 3, 3)], \
        f"{heard}: each step's progress, then its preview (none after the last step, whose image follows)"
    assert "the progress callback failed: RuntimeError: the client's queue is gone" in finished["failing"].error
    assert finished["asked"].ok and finished["plain"].ok, finished
