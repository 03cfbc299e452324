"""pipe.generate: per-request errors, batching of compatible requests, results in order, thread safety."""

import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import fluxrt
from fluxrt import GenerationRequest, GenerationResult
from fluxrt.tiny import tiny_random_pipeline
from fluxrt.validation import MAX_IMAGES_PER_CALL, MAX_PIXELS, MAX_STEPS

SMALL = dict(width=64, height=48, num_steps=2)


@pytest.fixture(scope="module")
def pipe():
    return tiny_random_pipeline(progress=False)


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(int)


def expected_image(pipe, request: GenerationRequest) -> np.ndarray:
    """The request run alone through the plain call."""
    return pixels(pipe(request.prompt, width=request.width, height=request.height, num_steps=request.num_steps,
                       guidance=request.guidance, seed=request.seed)[0])


def assert_same_image(result: GenerationResult, expected: np.ndarray) -> None:
    assert result.ok, result.error
    # batched vs alone differs only in summation order: at most one level at a rounding edge
    assert np.abs(pixels(result.image) - expected).max() <= 1


class BatchSizes:
    """Wraps the pipeline's transformer (a plain callable to the sampler) to record each call's batch size."""

    def __init__(self, pipe, fail_batches_over: int | None = None):
        self.pipe, self.inner, self.sizes, self.fail_over = pipe, pipe.transformer, [], fail_batches_over

    def __enter__(self):
        self.pipe.transformer = self
        return self

    def __exit__(self, *exc):
        self.pipe.transformer = self.inner

    def __call__(self, **kwargs):
        batch = kwargs["img"].shape[0]
        self.sizes.append(batch)
        if self.fail_over is not None and batch > self.fail_over:
            raise RuntimeError(f"out of memory at batch {batch}")
        return self.inner(**kwargs)


def test_mixed_batch_with_bad_requests(pipe):
    requests = [
        GenerationRequest("a cat", seed=1, **SMALL),
        GenerationRequest("a dog", seed=2, width=100, height=48, num_steps=2),  # not a multiple of 16
        GenerationRequest("a bird", seed=3, **SMALL),
        GenerationRequest("a fox", seed=4, width=32, height=32, num_steps=2),  # another size: its own batch
        "a cat",  # not a request
        GenerationRequest("a cow", seed=5, width=64, height=48, num_steps=0),
        GenerationRequest("a hen", seed=6, **SMALL),
    ]
    with BatchSizes(pipe) as calls:
        results = pipe.generate(requests, max_batch_size=2)
    assert [r.ok for r in results] == [True, False, True, True, False, False, True]
    assert results[1].error == "width must be a multiple of 16 between 16 and 4096, got 100"
    assert results[4].error == "expected a fluxrt.GenerationRequest, got str"
    assert results[5].error == f"num_steps must be between 1 and {MAX_STEPS} (fluxrt.validation.MAX_STEPS), got 0"
    assert all(r.image is None for r in results if not r.ok)
    # 64x48: cat + bird, then hen (max_batch_size 2); 32x32: fox. Two steps each.
    assert calls.sizes == [2, 2, 1, 1, 1, 1]
    for i in (0, 2, 3, 6):
        assert results[i].request.prompt == requests[i].prompt and results[i].image.size == (requests[i].width,
                                                                                              requests[i].height)
        assert_same_image(results[i], expected_image(pipe, results[i].request))
    assert results[0].request.guidance == 3.5  # defaults are filled in and reported


def test_a_batch_that_fails_is_retried_one_by_one(pipe):
    requests = [GenerationRequest(p, seed=s, **SMALL) for p, s in (("a cat", 1), ("a dog", 2))]
    with BatchSizes(pipe, fail_batches_over=1) as calls:
        results = pipe.generate(requests)
    assert calls.sizes == [2, 1, 1, 1, 1]  # the batch fails at its first step; each request then runs alone
    for result in results:
        assert_same_image(result, expected_image(pipe, result.request))
    with BatchSizes(pipe, fail_batches_over=0):
        results = pipe.generate(requests)
    assert [r.error for r in results] == ["RuntimeError: out of memory at batch 1"] * 2


def test_missing_seed_is_drawn_and_reported(pipe):
    (result,) = pipe.generate([GenerationRequest("a cat", **SMALL)])
    assert isinstance(result.request.seed, int) and 0 <= result.request.seed < 2**63
    assert_same_image(result, expected_image(pipe, result.request))


def test_concurrent_callers_get_their_own_results(pipe):
    def requests_of(caller: int) -> list[GenerationRequest]:
        return [GenerationRequest(f"caller {caller} image {k}", seed=10 * caller + k, **SMALL) for k in range(2)]

    expected = {c: [expected_image(pipe, r) for r in requests_of(c)] for c in range(4)}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {c: pool.submit(pipe.generate, requests_of(c)) for c in range(4)}
        answers = {c: f.result(timeout=300) for c, f in futures.items()}
    for c, results in answers.items():
        assert [r.request.prompt for r in results] == [r.prompt for r in requests_of(c)]
        for result, image in zip(results, expected[c]):
            assert_same_image(result, image)
    assert not np.array_equal(expected[0][0], expected[1][0])  # the callers' images differ, so a mix-up would show


def test_rejects_a_bad_batch_size(pipe):
    for size in (0, MAX_IMAGES_PER_CALL + 1):
        with pytest.raises(ValueError, match=f"max_batch_size must be between 1 and {MAX_IMAGES_PER_CALL}"):
            pipe.generate([], max_batch_size=size)
    with pytest.raises(TypeError, match="max_batch_size must be an int, got bool"):
        pipe.generate([], max_batch_size=True)
    assert pipe.generate([]) == []


@pytest.mark.parametrize("requests, message", [
    ("abc", r"generate takes a list of fluxrt.GenerationRequest, got a str; wrap a prompt as \[fluxrt"),
    (GenerationRequest("a cat", **SMALL), r"generate takes a list of requests: pass \[request\]"),
    ({GenerationRequest("a cat", **SMALL)}, r"results come back in its order\), got set"),
    ({"a cat": GenerationRequest("a cat", **SMALL)}, r"results come back in its order\), got dict"),
    (5, r"results come back in its order\), got int"),
])
def test_generate_refuses_what_is_not_a_list_of_requests(pipe, requests, message):
    with BatchSizes(pipe) as calls, pytest.raises(TypeError, match=message):
        pipe.generate(requests)
    assert calls.sizes == []


def test_request_fields_are_checked_before_any_work(pipe):
    bad = [
        (GenerationRequest("a cat", width=64, height=48, num_steps=10**9), f"between 1 and {MAX_STEPS}"),
        (GenerationRequest("a cat", width=4096, height=4096, num_steps=1), f"the limit is {MAX_PIXELS:,}"),
        (GenerationRequest(None, **SMALL), "prompt must be a string, got NoneType"),
        (GenerationRequest("a cat", seed=True, **SMALL), "seed must be an int, got bool True"),
        (GenerationRequest("a cat", seed=2**63, **SMALL), r"seed must be an int in \[0, 2\*\*63\)"),
        (GenerationRequest("a cat", guidance="high", **SMALL), "guidance must be a number, got str 'high'"),
        (GenerationRequest("a cat", width=64.0, height=48, num_steps=2), "width must be an int, got float 64.0"),
    ]
    with BatchSizes(pipe) as calls:
        results = pipe.generate([request for request, _ in bad])
    assert calls.sizes == []  # nothing ran: every request was refused up front
    for result, (request, message) in zip(results, bad):
        assert not result.ok and result.request is request and result.image is None
        assert re.search(message, result.error), (message, result.error)


def test_numpy_seeds_and_sizes_are_accepted_as_ints(pipe):
    (result,) = pipe.generate([GenerationRequest("a cat", width=np.int64(64), height=48, num_steps=np.int32(2),
                                                 seed=np.int64(7))])
    assert result.ok, result.error
    assert (type(result.request.seed), result.request.seed, type(result.request.width)) == (int, 7, int)
    assert_same_image(result, expected_image(pipe, GenerationRequest("a cat", seed=7, **SMALL)))


def nan_token(pipe, bad_prompt: str, good_prompts: list[str]) -> int:
    """A T5 token id that `bad_prompt` has and none of `good_prompts` (nor padding) has."""
    ids = lambda prompt: set(pipe.t5_tokenizer(prompt).input_ids)  # noqa: E731
    shared = set().union(*map(ids, good_prompts)) | {pipe.t5_tokenizer.pad_token_id}
    (token, *_) = sorted(ids(bad_prompt) - shared)
    return token


def test_a_request_that_turns_non_finite_fails_alone():
    pipe = tiny_random_pipeline(progress=False)
    good = ["a cat", "a dog"]
    token = nan_token(pipe, "a dragon flying over a castle", good)
    with torch.no_grad():  # a corrupt embedding row: only prompts holding that token go NaN
        pipe.t5_encoder.get_input_embeddings().weight[token] = float("nan")
    requests = [GenerationRequest(p, seed=s, **SMALL) for p, s in ((good[0], 1), ("a dragon flying over a castle", 2),
                                                                   (good[1], 3))]
    with BatchSizes(pipe) as calls:
        results = pipe.generate(requests)
    assert calls.sizes == [3, 3, 1, 1, 1, 1, 1, 1]  # the batch of three fails at the end, then each runs alone
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].error.startswith("NonFiniteError: the latents hold NaN or inf after denoising step 1 of 2")
    for i in (0, 2):
        assert_same_image(results[i], expected_image(pipe, results[i].request))
    with pytest.raises(fluxrt.NonFiniteError):  # the plain call refuses that prompt too
        pipe(requests[1].prompt, **SMALL)



def test_true_cfg_requests_batch_by_scale_and_match_the_plain_call(pipe):
    requests = [GenerationRequest("a red circle", negative_prompt="", true_cfg_scale=3.0, seed=1, **SMALL),
                GenerationRequest("a blue star", negative_prompt="a circle", true_cfg_scale=3.0, seed=2, **SMALL),
                GenerationRequest("a blue star", seed=3, **SMALL),  # no CFG: its own batch
                GenerationRequest("a cat", true_cfg_scale=3.0, seed=4, **SMALL),  # no negative prompt: its own error
                GenerationRequest("a cat", negative_prompt=["x"], true_cfg_scale=3.0, seed=5, **SMALL)]
    with BatchSizes(pipe) as calls:
        results = pipe.generate(requests)
    assert calls.sizes == [2] * 4 + [1] * 2  # 2 steps x (prompt, negative) for the CFG pair; 2 plain steps
    for result in results[:3]:
        request = result.request
        expected = pixels(pipe(request.prompt, width=request.width, height=request.height, num_steps=2,
                               seed=request.seed, negative_prompt=request.negative_prompt,
                               true_cfg_scale=request.true_cfg_scale)[0])
        assert_same_image(result, expected)
    assert results[2].request.negative_prompt is None and results[2].request.true_cfg_scale == 1.0
    assert "true_cfg_scale=3 needs a negative_prompt" in results[3].error
    assert "negative_prompt must be a string, got list" in results[4].error
