"""Edits from a real `fluxrt serve` on loopback: streamed (`stream` "true": OpenAI's image_edit events, from the openai
client and as raw multipart with fluxrt.progress), LoRAs chosen per edit (loras as JSON text), the multipart fields'
errors, and a Canny/Depth model, whose one image is the control image. The images are compared with the same
requests run alone in process (the tiny-random models are seeded, so the servers' weights are these)."""

import json

import httpx
import numpy as np
import pytest
from PIL import Image

from fluxrt.tiny import TINY_RANDOM_MODELS, tiny_random_pipeline
from test_pipeline_lora import write_lora
from test_serve_http import WAIT_S, ServerProcess, alone, assert_error, assert_same, client, decoded, png_bytes
from test_serve_stream import png_size, sse_events

PARTIAL, COMPLETED, PROGRESS = "image_edit.partial_image", "image_edit.completed", "fluxrt.progress"
LORA = "style"


@pytest.fixture(scope="module")
def lora_path(tmp_path_factory):
    return write_lora(tmp_path_factory.mktemp("loras") / f"{LORA}.safetensors", seed=0)


@pytest.fixture(scope="module")
def server(lora_path):
    # --backend torch: the LoRA's side branch on the torch formulas, as test_serve_http's LoRA server
    process = ServerProcess("--model", "tiny-random", "--backend", "torch", "--max-batch", "4", "--lora", lora_path)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def lora_pipe(lora_path):
    """The server's pipeline in process: the same model with the same LoRA hot-swapped at its loaded scale."""
    pipe = tiny_random_pipeline(compile=True, backend="torch", progress=False)
    pipe.enable_lora_hotswap()
    pipe.load_lora(lora_path)
    return pipe


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=WAIT_S) as client_:
        yield client_


def random_image(seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def image_file(image: Image.Image) -> dict:
    return {"image": ("in.png", png_bytes(image), "image/png")}


def streamed_edit(http: httpx.Client, form: dict, files: dict) -> list[tuple[str, dict]]:
    """(event name, data) of a streamed edit's answer."""
    with http.stream("POST", "/v1/images/edits", data={"stream": "true", **form}, files=files) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream"), response.headers["content-type"]
        return sse_events(response)


def assert_progress_order(events: list[tuple[str, dict]], steps: int) -> None:
    """A progress event for each step 1 .. steps in order, each partial image right after its step's progress, the
    last step's progress right before the completed image."""
    names = [name for name, _ in events]
    heard = [data for name, data in events if name == PROGRESS]
    assert heard == [{"type": PROGRESS, "step": k, "steps": steps} for k in range(1, steps + 1)], heard
    for k, (name, data) in enumerate(events):
        if name == PARTIAL:
            assert events[k - 1] == (PROGRESS, {"type": PROGRESS, "step": data["step"], "steps": steps}), \
                f"partial image of step {data['step']} not right after its progress: {names}"
    assert names[-2:] == [PROGRESS, COMPLETED], names


def test_openai_edit_stream_partial_images_then_the_plain_edit(server):
    openai_client = client(server)
    image = png_bytes(random_image(0))
    # img2img at the default strength 0.6 runs the last 4 of 6 steps: 2 previews spread over them, at steps 1 and 2
    asked = dict(image=("in.png", image), prompt="a red star", size="32x32", extra_body={"steps": 6, "seed": 7})
    events = list(openai_client.images.edit(stream=True, partial_images=2, **asked))
    kinds = [event.type for event in events]
    assert kinds == [PARTIAL, PARTIAL, COMPLETED], f"{kinds}: no fluxrt.progress unless asked"
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    assert [(event.to_dict()["step"], event.to_dict()["steps"]) for event in events[:2]] == [(1, 4), (2, 4)]
    for event in events:
        assert png_size(event.b64_json) == (32, 32), (event.type, png_size(event.b64_json))
        assert event.size == "32x32" and event.output_format == "png", event
    plain, = openai_client.images.edit(**asked).data
    assert_same(decoded(events[-1].b64_json), decoded(plain.b64_json), "the streamed edit's final image")
    assert events[-1].to_dict()["seed"] == 7


def test_raw_edit_stream_with_progress_spreads_previews_over_the_strengths_steps(http):
    # strength 0.5 of 6 steps runs 3: partial_images 2 by default every 3 // 3 = 1 step (after steps 1 and 2)
    form = {"prompt": "a blue square", "size": "32x32", "steps": "6", "seed": "2", "strength": "0.5",
            "partial_images": "2", "progress": "true"}
    events = streamed_edit(http, form, image_file(random_image(1)))
    assert [data["step"] for name, data in events if name == PARTIAL] == [1, 2], [name for name, _ in events]
    assert all(data["type"] == name for name, data in events), events
    assert_progress_order(events, steps=3)


def test_loras_in_an_edit(http, lora_pipe):
    """As in generations: no loras runs the loaded scales, {} none, {name: scale} that scale."""
    image = random_image(2)
    form = {"prompt": "a red star", "size": "32x32", "steps": "2", "seed": "4", "strength": "0.9"}
    choices = {"loaded scales": None, "style at 0.5": {LORA: 0.5}, "none": {}}
    images = {}
    for case, choice in choices.items():
        loras = {} if choice is None else {"loras": json.dumps(choice)}
        response = http.post("/v1/images/edits", data={**form, **loras}, files=image_file(image))
        assert response.status_code == 200, response.text
        images[case] = decoded(response.json()["data"][0]["b64_json"])
        expected = alone(lora_pipe, prompt="a red star", width=32, height=32, num_steps=2, seed=4, strength=0.9,
                         image=image, loras=choice)
        assert_same(images[case], expected, case)
    assert np.abs(images["loaded scales"] - images["none"]).max() > 0, "the LoRA changed nothing: not applied?"
    assert np.abs(images["style at 0.5"] - images["none"]).max() > 0, "loras {style: 0.5} changed nothing"


@pytest.mark.parametrize("form, param, words", [
    ({"loras": "{style: 1}"}, "loras", ("JSON text", "not JSON")),
    ({"loras": '["style"]'}, "loras", ("loras must be an object",)),
    ({"loras": '{"anime": 1.0}'}, None, ("anime",)),
    ({"loras[style]": "1.0"}, "loras", ("one multipart field of JSON text", "loras[style]")),
    ({"stream": "yes"}, "stream", ('"true" or "false"',)),
    ({"stream": "true", "progress": "1"}, "progress", ('"true" or "false"',)),
    ({"stream": "true", "partial_images": "two"}, "partial_images", ("an int",)),
    ({"stream": "true", "partial_images": "4"}, "partial_images", ("0 to 3",)),
    ({"stream": "true", "preview_every": "0"}, "preview_every", ("positive int",)),
    ({"stream": "true", "n": "2"}, "n", ("one image",)),
    ({"partial_images": "1"}, "partial_images", ("stream",)),
    ({"stream": "false", "progress": "true"}, "progress", ("stream",)),
])
def test_bad_edit_fields_get_json_errors(http, form, param, words):
    response = http.post("/v1/images/edits", data={"prompt": "x", "size": "32x32", "steps": "2", **form},
                         files=image_file(random_image(3)))
    assert response.headers["content-type"].startswith("application/json"), response.headers["content-type"]
    assert assert_error(response, 400, *words)["param"] == param


# ---- a Canny/Depth model: the edit's one image is its control image ----


@pytest.fixture(scope="module")
def control_http():
    process = ServerProcess("--model", "tiny-random-canny")
    try:
        with httpx.Client(base_url=process.url, timeout=WAIT_S) as http_:
            yield http_
    finally:
        process.stop()


CONTROL_FORM = {"prompt": "a red star", "size": "32x32", "steps": "3", "seed": "5"}


def test_a_control_models_edit_is_guided_by_its_image(control_http):
    control = random_image(4)
    plain = control_http.post("/v1/images/edits", data=CONTROL_FORM, files=image_file(control))
    events = streamed_edit(control_http, {**CONTROL_FORM, "partial_images": "1", "progress": "true"},
                           image_file(control))
    assert plain.status_code == 200, plain.text
    pipe = tiny_random_pipeline(progress=False, mode=TINY_RANDOM_MODELS["tiny-random-canny"])
    expected = alone(pipe, prompt="a red star", width=32, height=32, num_steps=3, seed=5, control_image=control)
    assert_same(decoded(plain.json()["data"][0]["b64_json"]), expected, "the control model's edit")
    assert_progress_order(events, steps=3)
    assert_same(decoded(events[-1][1]["b64_json"]), expected, "the control model's streamed edit")


def test_a_control_model_refuses_a_mask_and_loras(control_http):
    control = image_file(random_image(5))
    mask = {"mask": ("m.png", png_bytes(Image.new("L", (32, 32), 255)), "image/png")}
    masked = control_http.post("/v1/images/edits", data=CONTROL_FORM, files={**control, **mask})
    assert assert_error(masked, 400, "takes no mask", "control image")["param"] == "mask"
    # as the generations endpoint, without --lora
    with_loras = control_http.post("/v1/images/edits", data={**CONTROL_FORM, "loras": '{"style": 1}'}, files=control)
    assert assert_error(with_loras, 400, "no LoRAs to choose from")["param"] == "loras"
