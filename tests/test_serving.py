"""pipe.generate: per-request errors, batching of compatible requests, results in order, thread safety."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fluxrt import GenerationRequest, GenerationResult
from fluxrt.tiny import tiny_random_pipeline

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
    assert results[5].error == "num_steps must be an int >= 1, got 0"
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
    with pytest.raises(ValueError, match="max_batch_size must be an int >= 1"):
        pipe.generate([], max_batch_size=0)
    assert pipe.generate([]) == []

