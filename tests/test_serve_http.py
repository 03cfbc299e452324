"""`fluxrt serve` as a subprocess on loopback, driven by real clients: the openai package for the round trips,
httpx for the error paths, a bounded load test, cancellation on disconnect, the queue bound, timeouts and SIGTERM.

Every server is started with --port 0 and read back from its ready line; every test bounds its own waits, and each
fixture kills its process at the end. The images are compared with the same requests run alone in process
(tiny_random_pipeline is seeded, so the server's random weights are these)."""

import base64
import io
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from fluxrt import GenerationRequest
from fluxrt.tiny import TINY_RANDOM_MODELS, tiny_random_pipeline
from test_serve_engine import metric as metric_in
from test_serve_engine import wait_until

API_KEY = "test-key"
START_S = 120  # a server's start, import to ready line, on a loaded 2-core box
WAIT_S = 60
STEPS_IN_FLIGHT = 50  # seconds of work on a CPU: still running when SIGTERM comes
SLOW = dict(size="256x256", steps=1000)  # a request that runs far longer than any test waits for it


class ServerProcess:
    """`python -m fluxrt serve --port 0 ARGS` with its URL read from the ready line."""

    def __init__(self, *args: str):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        command = [sys.executable, "-m", "fluxrt", "serve", "--port", "0", *args]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._ready_url()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _ready_url(self) -> str:
        deadline, seen = time.monotonic() + START_S, []
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            seen.append(line)
            if line.startswith("fluxrt serve: listening on "):
                return line.split()[-1]
        self.stop()
        raise AssertionError(f"the server did not print its ready line; its output:\n{''.join(seen)}")

    def output(self) -> str:
        lines = []
        while not self.lines.empty():
            line = self.lines.get()
            if line is not None:
                lines.append(line)
        return "".join(lines)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT_S)


@pytest.fixture(scope="module")
def server():
    process = ServerProcess("--model", "tiny-random", "--max-batch", "4", "--api-key", API_KEY)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def pipe():
    return tiny_random_pipeline(progress=False)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=WAIT_S) as client:
        yield client


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=WAIT_S)


def decoded(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB")).astype(int)


def alone(pipe, **request) -> np.ndarray:
    result, = pipe.generate([GenerationRequest(**request)])
    assert result.ok, result.error
    return np.asarray(result.image).astype(int)


def assert_same(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert got.shape == expected.shape, f"{what}: shape {got.shape}, expected {expected.shape}"
    difference = np.abs(got - expected).max()
    assert difference <= 1, f"{what}: differs from the request run alone by {difference} levels"


def assert_error(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    for word in words:
        assert word in error["message"], f"{word!r} not in {error['message']!r}"
    return error


def metric(http: httpx.Client, name: str, **labels) -> float:
    """A sample of the server's /metrics (test_serve_engine's reader)."""
    return metric_in(http.get("/metrics").text, name, **labels)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---- the openai client ----


def test_openai_generate_round_trip(server, pipe):
    response = client(server).images.generate(model="tiny-random", prompt="a red star", n=2, size="64x64",
                                              response_format="b64_json", extra_body={"steps": 2, "seed": 5})
    assert isinstance(response.created, int) and len(response.data) == 2
    for k, item in enumerate(response.data):
        assert item.to_dict()["seed"] == 5 + k
        assert item.revised_prompt is None
        expected = alone(pipe, prompt="a red star", width=64, height=64, num_steps=2, seed=5 + k)
        assert_same(decoded(item.b64_json), expected, f"image {k}")


def test_a_missing_seed_is_drawn_and_reported(server, pipe):
    item, = client(server).images.generate(prompt="a blue circle", size="48x64", extra_body={"steps": 2}).data
    seed = item.to_dict()["seed"]
    assert_same(decoded(item.b64_json), alone(pipe, prompt="a blue circle", width=48, height=64, num_steps=2,
                                              seed=seed), "a drawn seed's image")


def test_openai_edit_inpaint_and_img2img(server, pipe):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.fromarray(np.where(np.arange(64)[None, :].repeat(64, 0) < 32, 255, 0).astype(np.uint8))
    image_png, mask_png = png_bytes(image), png_bytes(mask)
    extras = {"steps": 2, "seed": 9, "strength": 0.8}
    common = dict(prompt="a green square", size="64x64", response_format="b64_json", extra_body=extras)
    inpainted = client(server).images.edit(image=("in.png", image_png), mask=("mask.png", mask_png), **common)
    img2img = client(server).images.edit(image=("in.png", image_png), **common)
    as_sent = {name: Image.open(io.BytesIO(data)) for name, data in (("image", image_png), ("mask", mask_png))}
    request = dict(prompt="a green square", width=64, height=64, num_steps=2, seed=9, strength=0.8,
                   image=as_sent["image"])
    assert_same(decoded(inpainted.data[0].b64_json), alone(pipe, mask_image=as_sent["mask"], **request), "inpainting")
    assert_same(decoded(img2img.data[0].b64_json), alone(pipe, **request), "img2img")
    assert np.abs(decoded(inpainted.data[0].b64_json) - decoded(img2img.data[0].b64_json)).max() > 0, \
        "the mask made no difference: was it ignored?"
    # OpenAI's kind of mask: transparent where to repaint, i.e. alpha = 255 - FLUX's mask
    openai_mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    openai_mask.putalpha(Image.fromarray(255 - np.asarray(mask)))
    transparent = client(server).images.edit(image=("in.png", image_png), mask=("m.png", png_bytes(openai_mask)),
                                             **common)
    assert_same(decoded(transparent.data[0].b64_json), decoded(inpainted.data[0].b64_json), "an RGBA mask")


# ---- the error paths ----


def test_bad_requests_get_400_with_openai_error_body(http):
    ok = dict(prompt="x", size="64x64", steps=2, seed=1)
    cases = [
        (dict(ok, size="65x64"), "size", "multiple of 16"),
        (dict(ok, size="big"), "size", "WIDTHxHEIGHT"),
        (dict(ok, size="4096x4096"), "size", "pixels"),
        (dict(ok, steps=1001), None, "steps must be between 1 and 1000"),  # the API's name, not num_steps
        (dict(ok, n=65), "n", "n must be between 1 and 64"),
        (dict(ok, response_format="url"), "response_format", "b64_json"),
        (dict(ok, quality="hd"), "quality", "unknown field quality"),
        (dict(ok, steps=2, num_inference_steps=3), "num_inference_steps", "disagree"),
        ({"size": "64x64"}, "prompt", "prompt is required"),
        (dict(ok, prompt=["a", "b"]), "prompt", "a string, got list"),
        (dict(ok, seed=-1), "seed", "seed must be an int in [0, 2**63)"),
        (dict(ok, n="2"), "n", "n must be an int"),
        (dict(ok, loras=["style"]), "loras", "loras must be an object"),
        (dict(ok, loras={"style": 1.0}), "loras", "no LoRAs to choose from (start it with --lora PATH)"),
    ]
    for body, param, words in cases:
        error = assert_error(http.post("/v1/images/generations", json=body), 400, words)
        assert "num_steps" not in error["message"], error
        assert error["param"] == param, (body, error)
        assert error["type"] == "invalid_request_error"
    assert_error(http.post("/v1/images/generations", content=b"{not json", headers={"content-type":
                                                                                    "application/json"}), 400, "JSON")
    assert_error(http.post("/v1/images/generations", json=["a list"]), 400, "JSON object")
    assert metric(http, "fluxrt_errors_total", kind="invalid_size") == 3


def test_wrong_model_and_unknown_paths_get_404(http):
    error = assert_error(http.post("/v1/images/generations", json={"prompt": "x", "model": "dall-e-3"}), 404,
                         "'dall-e-3' is not served", "tiny-random")
    assert error["code"] == "model_not_found"
    assert_error(http.get("/v1/nothing"), 404, "/v1/images/generations")


def test_api_key(server, http):
    body = {"prompt": "x", "size": "64x64", "steps": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.post(server.url + "/v1/images/generations", json=body, headers=headers, timeout=WAIT_S)
        assert assert_error(response, 401, "Bearer")["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models", timeout=WAIT_S).status_code == 401
    assert httpx.get(server.url + "/health", timeout=WAIT_S).status_code == 200, "probes need no key"
    models = http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny-random"]
    assert http.get("/ready").json() == {"status": "ready"}


def test_edits_need_an_image_file(http):
    files = {"image": ("x.png", b"not a png", "image/png")}
    assert_error(http.post("/v1/images/edits", data={"prompt": "x"}, files=files), 400, "not an image file")
    assert_error(http.post("/v1/images/edits", json={"prompt": "x"}), 400, "multipart/form-data")
    image = png_bytes(Image.new("RGB", (64, 64)))
    mask = png_bytes(Image.new("L", (32, 32)))
    files = {"image": ("x.png", image, "image/png"), "mask": ("m.png", mask, "image/png")}
    assert_error(http.post("/v1/images/edits", data={"prompt": "x"}, files=files), 400, "the mask is 32x32")
    files = {"image": ("x.png", png_bytes(Image.new("RGB", (60, 64))), "image/png")}
    assert_error(http.post("/v1/images/edits", data={"prompt": "x"}, files=files), 400, "the image's size")


def test_a_client_that_disconnects_cancels_its_job(http, server):
    cancelled = metric(http, "fluxrt_jobs_total", outcome="cancelled")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/images/generations", json=dict(prompt="slow", **SLOW),
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=httpx.Timeout(WAIT_S, read=1.0))
    wait_until(lambda: metric(http, "fluxrt_jobs_total", outcome="cancelled") == cancelled + 1, "the cancellation")
    wait_until(lambda: metric(http, "fluxrt_jobs_running") == 0, "the job to leave the batch")
    assert metric(http, "fluxrt_errors_total", kind="client_disconnected") >= 1
    response = http.post("/v1/images/generations", json={"prompt": "after", "size": "64x64", "steps": 2})
    assert response.status_code == 200, "the worker stopped after a cancellation"


def test_load_64_requests_from_16_clients(server, http, pipe):
    """Nothing lost or mixed up: each answer is its own request's image, as if it ran alone."""
    requests = [dict(prompt=f"shape {i}", size=("64x64", "48x64")[i % 2], steps=2 + i % 2, seed=1000 + i)
                for i in range(64)]

    def send(body):
        start = time.perf_counter()
        response = http.post("/v1/images/generations", json=body)
        return response, time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(send, requests))
    elapsed = time.perf_counter() - start
    latencies = sorted(seconds for _, seconds in answers)
    for body, (response, _) in zip(requests, answers):
        assert response.status_code == 200, response.text
        item, = response.json()["data"]
        assert item["seed"] == body["seed"]
        width, height = map(int, body["size"].split("x"))
        expected = alone(pipe, prompt=body["prompt"], width=width, height=height, num_steps=body["steps"],
                         seed=body["seed"])
        assert_same(decoded(item["b64_json"]), expected, body["prompt"])
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(f"\nload test (CPU, tiny-random model, 64x64 / 48x64, 2-3 steps, 16 clients, 64 requests): latency p50 "
          f"{statistics.median(latencies) * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms, {64 / elapsed:.1f} images/s")


# ---- the queue bound, timeouts, shutdown: servers of their own ----


@pytest.fixture(scope="module")
def small_server():
    process = ServerProcess("--model", "tiny-random", "--max-batch", "1", "--max-queue", "2", "--timeout", "4",
                            "--warmup", "64x64,48x64")
    yield process
    process.stop()


def test_overload_gets_429_and_slow_requests_504(small_server):
    url = small_server.url + "/v1/images/generations"
    with httpx.Client(base_url=small_server.url, timeout=WAIT_S) as http, ThreadPoolExecutor(2) as pool:
        assert metric(http, "fluxrt_jobs_total", outcome="completed") == 2, "--warmup 64x64,48x64: two images"
        running = pool.submit(httpx.post, url, json=dict(prompt="runs", **SLOW), timeout=WAIT_S)
        wait_until(lambda: metric(http, "fluxrt_jobs_running") == 1, "the first job to run")
        queued = pool.submit(httpx.post, url, json=dict(prompt="waits", n=2, **SLOW), timeout=WAIT_S)
        wait_until(lambda: metric(http, "fluxrt_queue_depth") == 2, "the queue to fill")
        response = http.post(url, json={"prompt": "one too many", "size": "64x64", "steps": 2})
        assert assert_error(response, 429, "the queue is full")["code"] == "queue_full"
        assert int(response.headers["Retry-After"]) >= 1
        for future in (running, queued):
            assert assert_error(future.result(WAIT_S), 504, "timeout of 4 s")["code"] == "timeout"
        wait_until(lambda: metric(http, "fluxrt_jobs_running") == 0, "the timed-out job to leave the batch")
        assert metric(http, "fluxrt_jobs_total", outcome="timeout") == 3
        ok = http.post(url, json={"prompt": "after", "size": "64x64", "steps": 2})
        assert ok.status_code == 200, "the worker stopped after the timeouts"


def test_sigterm_finishes_requests_in_flight_then_exits_0(pipe):
    process = ServerProcess("--model", "tiny-random", "--max-batch", "4")
    try:
        url = process.url + "/v1/images/generations"
        bodies = [dict(prompt=f"in flight {i}", size="64x64", steps=STEPS_IN_FLIGHT, seed=i) for i in range(3)]
        with httpx.Client(base_url=process.url, timeout=WAIT_S) as http, ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(httpx.post, url, json=body, timeout=WAIT_S) for body in bodies]
            wait_until(lambda: metric(http, "fluxrt_jobs_running") == 3, "the requests to run")
            process.proc.send_signal(signal.SIGTERM)
            for body, future in zip(bodies, futures):
                response = future.result(WAIT_S)
                assert response.status_code == 200, response.text
                expected = alone(pipe, prompt=body["prompt"], width=64, height=64, num_steps=STEPS_IN_FLIGHT,
                                 seed=body["seed"])
                assert_same(decoded(response.json()["data"][0]["b64_json"]), expected, body["prompt"])
        assert process.proc.wait(WAIT_S) == 0, process.output()
        assert "fluxrt serve: stopped" in process.output()
    finally:
        process.stop()


# ---- edits on the tools models: routed by the loaded model ----


EDIT_CASES = {  # --model: (what runs with a mask, without one), an expected error's words instead of an image
    "tiny-random-fill": ("image", "a Fill model needs a mask"),
    "tiny-random-kontext": ("a mask needs a text-to-image model", "image"),
}  # a Canny/Depth model's edits (its image is the control image): tests/test_serve_edits_stream.py


@pytest.mark.parametrize("model", sorted(EDIT_CASES))
def test_edits_are_routed_by_the_loaded_model(model):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.fromarray(np.where(rng.random((64, 64)) < 0.5, 255, 0).astype(np.uint8))
    files = {"image": ("in.png", png_bytes(image), "image/png"), "mask": ("m.png", png_bytes(mask), "image/png")}
    form = {"prompt": "a red star", "size": "64x64", "steps": "2", "seed": "3"}
    process = ServerProcess("--model", model)
    try:
        with httpx.Client(base_url=process.url, timeout=WAIT_S) as http:
            answers = {"with a mask": http.post("/v1/images/edits", data=form, files=files),
                       "without": http.post("/v1/images/edits", data=form, files={"image": files["image"]})}
    finally:
        process.stop()
    pipe = None
    for (case, response), outcome in zip(answers.items(), EDIT_CASES[model]):
        if outcome != "image":
            assert_error(response, 400, outcome)
            continue
        assert response.status_code == 200, response.text
        pipe = pipe or tiny_random_pipeline(progress=False, mode=TINY_RANDOM_MODELS[model])
        request = dict(prompt="a red star", width=64, height=64, num_steps=2, seed=3, image=image)
        expected = alone(pipe, **request, **({"mask_image": mask} if case == "with a mask" else {}))
        assert_same(decoded(response.json()["data"][0]["b64_json"]), expected, f"{model} {case}")


# ---- in process: the command's arguments, draining ----


@pytest.fixture
def never_serves(monkeypatch):
    """main(["serve", ...]) in process must fail before it serves: should it get that far, it fails, not hangs."""
    import fluxrt.cli

    def refuse(app, sock):
        raise AssertionError("the server started: the bad argument was not refused")

    monkeypatch.setattr(fluxrt.cli, "_run_uvicorn", refuse)


@pytest.mark.parametrize("args, words", [
    (["--port", "70000"], "--port must be between 0 and 65535"),
    (["--max-queue", "0"], "--max-queue must be at least 1"),
    (["--max-batch", "65"], "--max-batch must be between 1 and 64"),
    (["--timeout", "0"], "--timeout must be a positive number"),
    (["--warmup", "64x64,64x65"], "--warmup '64x65': height must be a multiple of 16"),
    (["--warmup", "big"], "--warmup 'big' must be WIDTHxHEIGHT"),
    (["--api-key", " "], "--api-key is empty"),
    (["--model", "/no/such/model"], "does not exist"),
    (["--lora", "/no/such.safetensors"], "--lora '/no/such.safetensors' does not exist"),
    (["--lora", __file__, "--no-compile"], "drop --no-compile"),
])
def test_bad_serve_arguments_are_one_line_before_anything_loads(capsys, never_serves, args, words):
    from fluxrt.cli import main

    assert main(["serve", "--port", "0", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fluxrt: error: ") and words in err and err.count("\n") == 1, err


def test_a_busy_port_is_refused_before_the_model_loads(capsys, never_serves):
    import socket

    from fluxrt.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", "tiny-random", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_a_draining_engine_answers_503_and_is_not_ready(pipe):
    from starlette.testclient import TestClient

    from fluxrt.serve.app import create_app
    from fluxrt.serve.engine import Engine

    engine = Engine(pipe).start()
    try:
        with TestClient(create_app(engine, "tiny-random")) as http:
            assert http.get("/ready").status_code == 200
            engine.stop_accepting()
            assert_error(http.get("/ready"), 503, "shutting down")
            error = assert_error(http.post("/v1/images/generations", json={"prompt": "late", "size": "64x64"}), 503,
                                 "shutting down")
            assert error["code"] == "shutting_down"
            assert http.get("/health").status_code == 200, "the process is still up"
    finally:
        assert engine.shutdown(timeout_s=WAIT_S)


def test_ctrl_c_stops_the_server_with_130():
    process = ServerProcess("--model", "tiny")  # the embedded trained model: served under its name
    try:
        models = httpx.get(process.url + "/v1/models", timeout=WAIT_S).json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
        process.proc.send_signal(signal.SIGINT)
        assert process.proc.wait(WAIT_S) == 130
        assert "fluxrt: interrupted" in process.output()
    finally:
        process.stop()


class Broken:
    """A batcher whose every step fails."""

    def __init__(self, kind, pipe, max_batch):
        self.max_batch, self.last_step, self.jobs = max_batch, None, set()

    def admits(self, request):
        return not self.jobs

    def admit(self, key, request):
        self.jobs.add(key)

    def drop(self, key):
        self.jobs.discard(key)

    def __len__(self):
        return len(self.jobs)

    def step(self):
        raise RuntimeError("out of memory")


def test_a_failed_generation_gets_500(pipe, monkeypatch):
    from starlette.testclient import TestClient

    import fluxrt.serve.engine as engine_module
    from fluxrt.serve.app import create_app
    from fluxrt.serve.engine import Engine

    monkeypatch.setattr(engine_module, "make_batcher", Broken)
    engine = Engine(pipe).start()
    try:
        with TestClient(create_app(engine, "tiny-random")) as http:
            response = http.post("/v1/images/generations", json={"prompt": "x", "size": "64x64", "steps": 2})
            error = assert_error(response, 500, "RuntimeError: out of memory")
            assert error["code"] == "generation_failed" and error["type"] == "server_error"
    finally:
        assert engine.shutdown(timeout_s=WAIT_S)


def test_requests_pick_hot_swapped_loras(tmp_path):
    from test_pipeline_lora import write_lora

    paths = [write_lora(tmp_path / f"{name}.safetensors", seed=k) for k, name in enumerate(("style", "light"))]
    process = ServerProcess("--model", "tiny-random", "--backend", "torch", "--lora", paths[0], "--lora",
                            f"{paths[1]}:0.5")
    bodies = {"loaded scales": {}, "style only": {"loras": {"style": 0.8}}, "none": {"loras": {}}}
    try:
        with httpx.Client(base_url=process.url, timeout=WAIT_S) as http:
            answers = {case: http.post("/v1/images/generations", json={"prompt": "a red star", "size": "32x32",
                                                                     "steps": 2, "seed": 4, **extra})
                       for case, extra in bodies.items()}
            unknown = http.post("/v1/images/generations", json={"prompt": "x", "loras": {"anime": 1.0}})
    finally:
        process.stop()
    assert_error(unknown, 400, "anime")
    pipe = tiny_random_pipeline(compile=True, backend="torch", progress=False)
    pipe.enable_lora_hotswap()
    pipe.load_lora(paths[0])
    pipe.load_lora(paths[1], scale=0.5)
    images = {}
    for case, extra in bodies.items():
        assert answers[case].status_code == 200, answers[case].text
        images[case] = decoded(answers[case].json()["data"][0]["b64_json"])
        expected = alone(pipe, prompt="a red star", width=32, height=32, num_steps=2, seed=4, **extra)
        assert_same(images[case], expected, case)
    assert np.abs(images["loaded scales"] - images["none"]).max() > 0, "the LoRAs changed nothing: not applied?"


def test_a_warmup_that_cannot_run_stops_the_start(capsys, monkeypatch, never_serves):
    import fluxrt.serve.engine as engine_module
    from fluxrt.cli import main

    assert main(["serve", "--model", "tiny-random-fill", "--port", "0", "--warmup", "64x64"]) == 2
    assert "--warmup 64x64: a Fill model needs image= and mask_image= (--warmup generates from text alone" in \
        capsys.readouterr().err
    monkeypatch.setattr(engine_module, "make_batcher", Broken)
    assert main(["serve", "--model", "tiny-random", "--port", "0", "--warmup", "64x64"]) == 2
    assert "--warmup 64x64 failed: RuntimeError: out of memory" in capsys.readouterr().err
