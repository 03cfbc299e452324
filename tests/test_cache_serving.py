"""Step caching from the CLI and the server: `fluxrt generate --cache`, and a request's "cache" through pipe.generate,
the step batcher and a real `fluxrt serve` on loopback (the openai client)."""

import os
import subprocess
import sys

import numpy as np
import openai
import pytest
from PIL import Image

from fluxrt import GenerationRequest
from fluxrt.serve.engine import Engine
from fluxrt.tiny import tiny_random_pipeline
from test_serve_http import WAIT_S, ServerProcess, decoded

SIZE = dict(width=64, height=48, num_steps=8)
# Row 0 predicts some steps (TaylorSeer), row 1 has no cache, row 2 never skips (FBC at 0) and guides (true CFG).
REQUESTS = [GenerationRequest("a cat", seed=1, cache="taylorseer:1:3:2", **SIZE),
            GenerationRequest("a dog", seed=2, **SIZE),
            GenerationRequest("a cow", seed=3, cache="fbc:0", negative_prompt="", true_cfg_scale=2.0, **SIZE)]
WANT_STATS = [{"computed": 4, "skipped": 4}, None,
              {"computed": 8, "skipped": 0, "negative": {"computed": 8, "skipped": 0}}]


@pytest.fixture(scope="module")
def pipe():
    return tiny_random_pipeline(device="cpu", compile=True, backend="torch", progress=False)


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(int)


@pytest.fixture(scope="module")
def alone(pipe):
    """Each request run by itself through pipe.generate."""
    return [pipe.generate([request])[0] for request in REQUESTS]


def test_each_request_keeps_its_own_cache_in_a_request_batch(pipe, alone):
    together = pipe.generate(REQUESTS)
    assert [r.cache_stats for r in together] == [r.cache_stats for r in alone] == WANT_STATS
    for got, want in zip(together, alone):
        assert np.abs(pixels(got.image) - pixels(want.image)).max() <= 1


def test_the_step_batcher_mixes_cached_and_uncached_rows(pipe, alone):
    engine = Engine(pipe, max_batch=4, batching="step").start()
    try:
        results = [job.future.result(WAIT_S) for job in engine.submit_all(REQUESTS)]
    finally:
        engine.shutdown()
    assert [r.cache_stats for r in results] == WANT_STATS, [r.error for r in results]
    for got, want in zip(results, alone):
        assert np.abs(pixels(got.image) - pixels(want.image)).max() <= 1


def test_a_threshold_of_zero_gives_the_uncached_image(pipe):
    plain, cached = (pipe.generate([GenerationRequest("a cat", seed=5, cache=c, **SIZE)])[0] for c in (None, "fbc:0"))
    assert np.array_equal(pixels(plain.image), pixels(cached.image))


def test_a_bad_cache_spec_is_refused_before_anything_runs(pipe):
    result = pipe.generate([GenerationRequest("a cat", cache="fbc:-1", **SIZE)])[0]
    assert not result.ok and "threshold must be a finite number >= 0" in result.error


def test_cli_cache_flag(tmp_path):
    def generate(*flags):
        done = subprocess.run([sys.executable, "-m", "fluxrt", "generate", "--no-progress", "--steps", "8", *flags],
                              cwd=tmp_path, capture_output=True, text=True, timeout=WAIT_S)
        assert done.returncode == 0, done.stderr
        return done.stdout

    generate("--out", "plain.png")
    out = generate("--out", "zero.png", "--cache", "fbc:0")
    assert "step cache fbc:0: the transformer ran 8 of 8 steps in full (0 reused)" in out, out
    out = generate("--out", "seer.png", "--cache", "taylorseer:1:3:2")
    assert "the transformer ran 4 of 8 steps in full (4 reused)" in out, out
    plain, zero, seer = (pixels(Image.open(tmp_path / f"{name}.png")) for name in ("plain", "zero", "seer"))
    assert np.array_equal(plain, zero), "--cache fbc:0 must give the uncached image"
    assert not np.array_equal(plain, seer), "predicted steps must change the image"


def test_the_server_takes_a_cache_per_request(pipe, alone):
    server = ServerProcess("--model", "tiny-random", "--compile", "--backend", "torch", "--max-batch", "4")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=WAIT_S)
        answer = client.images.generate(prompt="a cat", size="64x48", response_format="b64_json",
                                        extra_body={"steps": 8, "seed": 1, "cache": "taylorseer:1:3:2"})
        assert answer.data[0].model_extra["cache_stats"] == {"computed": 4, "skipped": 4}
        assert np.abs(decoded(answer.data[0].b64_json) - pixels(alone[0].image)).max() <= 1
        with pytest.raises(openai.BadRequestError, match="is not a cache spec"):
            client.images.generate(prompt="a cat", size="64x48", extra_body={"cache": "lru:3"})
    finally:
        server.stop()


def test_an_uncompiled_server_refuses_a_cache_with_what_to_do():
    server = ServerProcess("--model", "tiny-random")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=WAIT_S)
        with pytest.raises(openai.BadRequestError, match="runs on the compiled transformer"):
            client.images.generate(prompt="a cat", size="64x48", extra_body={"cache": "fbc:0.1"})
    finally:
        server.stop()


def test_cache_with_context_parallel_or_an_uncompiled_cli_run_is_refused(tmp_path):
    launched = dict(os.environ, RANK="0", WORLD_SIZE="2")  # as torchrun's ranks see it: the flags are checked first
    for flags, message in ((["--no-compile"], "--cache needs the compiled transformer"),
                           (["--cp", "ring"], "does not combine with --cp")):
        done = subprocess.run([sys.executable, "-m", "fluxrt", "generate", "--out", "x.png", "--cache", "fbc:0.1", *flags],
                              cwd=tmp_path, capture_output=True, text=True, timeout=WAIT_S, env=launched)
        assert done.returncode == 2 and message in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []
