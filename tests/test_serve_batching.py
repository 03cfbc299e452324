"""fluxrt.serve.batching: every batcher gives each job the image pipe.generate gives it alone; the step batcher shares
transformer calls between jobs that join and leave at step boundaries (true CFG, per-row LoRAs, every image mode,
padded batches); drop; a failing job fails alone. benchmarks/bench_serve.py's dry run."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fluxrt.conditioning
from fluxrt import GenerationRequest
from fluxrt.serve.batching import KINDS, make_batcher
from fluxrt.serving import resolve
from fluxrt.tiny import tiny_random_pipeline

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_serve.py"
POISONED_GUIDANCE = 6.5  # rows run at this guidance get NaN velocities (poisoned_rows)
CRASHING_GUIDANCE = 7.25  # a transformer call with a row at this guidance raises


@pytest.fixture(scope="module")
def pipe():
    return tiny_random_pipeline(progress=False)


def request(pipe, prompt, seed, steps=2, width=64, height=48, **extra) -> GenerationRequest:
    return resolve(pipe, GenerationRequest(prompt, width=width, height=height, num_steps=steps, seed=seed, **extra))


def mixed_jobs(pipe) -> dict:
    """Different steps, guidance, seeds; true CFG on some; two sizes that cannot share a batch."""
    return {
        "cat": request(pipe, "a cat", 1, steps=2),
        "dog": request(pipe, "a dog", 2, steps=4, guidance=5.0),
        "fox": request(pipe, "a fox", 3, steps=3, negative_prompt="blurry", true_cfg_scale=2.5),
        "owl": request(pipe, "an owl", 5, steps=3, negative_prompt="", true_cfg_scale=1.5, guidance=2.0),
        "hen": request(pipe, "a hen", 4, steps=2, width=32, height=32),
    }


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(int)


def assert_as_alone(pipe, result, job: GenerationRequest) -> None:
    alone = pipe.generate([job])[0]
    assert result.ok, result.error
    assert result.request == job, "the result must carry the request as run"
    gap = np.abs(pixels(result.image) - pixels(alone.image)).max()
    assert gap <= 1, f"{job.prompt!r}: {gap} levels from the image it gets alone"


def drive(batcher, jobs: dict, joins_at: dict | None = None) -> tuple[dict, dict]:
    """The engine's loop: admit (in order) what may join, step, collect. joins_at: {key: the step before which it
    is first offered} (default 0). Returns ({key: result}, {key: the step (from 1) that returned it})."""
    joins_at = joins_at or {}
    waiting, results, finished_at, steps = list(jobs), {}, {}, 0
    while waiting or len(batcher):
        while waiting and joins_at.get(waiting[0], 0) <= steps and batcher.admits(jobs[waiting[0]]):
            key = waiting.pop(0)
            batcher.admit(key, jobs[key])
        steps += 1
        for key, result in batcher.step().items():
            results[key], finished_at[key] = result, steps
        assert steps < 100, "the batcher does not finish its jobs"
    return results, finished_at


class TransformerBatches:
    """Records the batch size of each transformer call (a forward pre-hook)."""

    def __init__(self, pipe):
        self.module, self.sizes = pipe.transformer, []

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(
            lambda module, args, kwargs: self.sizes.append(kwargs["img"].shape[0]), with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


class poisoned_rows:
    """Makes the transformer's output NaN in every row run at POISONED_GUIDANCE, wherever that row is batched."""

    def __init__(self, pipe):
        self.module = pipe.transformer

    def __enter__(self):
        def poison(module, args, kwargs, output):
            bad = kwargs["guidance"] == POISONED_GUIDANCE
            return torch.where(bad[:, None, None], torch.full_like(output, float("nan")), output)

        self.handle = self.module.register_forward_hook(poison, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_gives_each_job_its_image_alone(pipe, kind):
    jobs = mixed_jobs(pipe)
    results, _ = drive(make_batcher(kind, pipe, max_batch=4), jobs)
    assert set(results) == set(jobs)
    for key, job in jobs.items():
        assert_as_alone(pipe, results[key], job)


def expected_batches(steps: dict, cfg: set, joins: dict) -> list[int]:
    """Rows of each step's transformer call: a job in flight from its join step for its own steps, twice with CFG."""
    last = max(joins.get(k, 0) + n for k, n in steps.items())
    return [sum(1 + (k in cfg) for k, n in steps.items() if joins.get(k, 0) < s <= joins.get(k, 0) + n)
            for s in range(1, last + 1)]


def test_step_batching_shares_each_step_between_joining_and_leaving_jobs(pipe):
    jobs = {key: job for key, job in mixed_jobs(pipe).items() if key != "hen"}  # one size
    joins = {"owl": 1}  # joins after the first step, while the others run
    with TransformerBatches(pipe) as calls:
        results, finished_at = drive(make_batcher("step", pipe, max_batch=4), jobs, joins)
    steps = {key: job.num_steps for key, job in jobs.items()}
    cfg = {key for key, job in jobs.items() if job.negative_prompt is not None}
    assert calls.sizes == expected_batches(steps, cfg, joins)
    assert finished_at == {key: joins.get(key, 0) + steps[key] for key in jobs}, "each job leaves after its own steps"
    for key, job in jobs.items():
        assert_as_alone(pipe, results[key], job)


def test_request_batching_runs_a_compatible_group_as_one_batch(pipe):
    jobs = {"a": request(pipe, "a cat", 1, steps=2), "b": request(pipe, "a dog", 2, steps=2),
            "c": request(pipe, "a fox", 3, steps=3)}  # other steps: its own batch
    with TransformerBatches(pipe) as calls:
        results, finished_at = drive(make_batcher("request", pipe, max_batch=4), jobs)
    assert calls.sizes == [2, 2, 1, 1, 1]
    assert finished_at == {"a": 1, "b": 1, "c": 2}
    for key, job in jobs.items():
        assert_as_alone(pipe, results[key], job)


def test_serial_runs_one_job_at_a_time(pipe):
    batcher = make_batcher("serial", pipe, max_batch=4)
    first, second = request(pipe, "a cat", 1), request(pipe, "a dog", 2)
    batcher.admit("a", first)
    assert not batcher.admits(second), "serial takes a second job only when the first is done"
    with TransformerBatches(pipe) as calls:
        assert set(batcher.step()) == {"a"}
    assert calls.sizes == [1, 1] and len(batcher) == 0 and batcher.admits(second)


def test_step_batcher_admits_one_size_up_to_max_batch(pipe):
    batcher = make_batcher("step", pipe, max_batch=2)
    batcher.admit("a", request(pipe, "a cat", 1))
    assert not batcher.admits(request(pipe, "a hen", 2, width=32, height=32)), "another size cannot join"
    assert batcher.admits(request(pipe, "a dog", 3))
    batcher.admit("b", request(pipe, "a dog", 3))
    assert not batcher.admits(request(pipe, "a fox", 4)), "max_batch jobs are in flight"
    with pytest.raises(ValueError, match="cannot join now"):
        batcher.admit("c", request(pipe, "a fox", 4))

    fresh = make_batcher("step", pipe, max_batch=2)
    fresh.admit("a", request(pipe, "a cat", 1))
    with pytest.raises(ValueError, match="in flight already"):
        fresh.admit("a", request(pipe, "a dog", 2))


@pytest.mark.parametrize("kind", KINDS)
def test_bad_arguments_are_refused_clearly(pipe, kind):
    batcher = make_batcher(kind, pipe, max_batch=2)
    with pytest.raises(ValueError, match="resolved by fluxrt.serving.resolve"):
        batcher.admit("a", GenerationRequest("a cat", width=64, height=48))
    with pytest.raises(ValueError, match="batching must be one of"):
        make_batcher("continuous", pipe, 2)
    with pytest.raises(ValueError):
        make_batcher(kind, pipe, 0)
    assert len(batcher) == 0 and batcher.step() == {}


def test_drop_leaves_at_the_next_step_boundary(pipe):
    batcher = make_batcher("step", pipe, max_batch=4)
    jobs = {"keep": request(pipe, "a cat", 1, steps=3), "gone": request(pipe, "a dog", 2, steps=3),
            "never": request(pipe, "a fox", 3, steps=3)}
    for key, job in jobs.items():
        batcher.admit(key, job)
    batcher.drop("never")  # dropped before it joined: never runs
    with TransformerBatches(pipe) as calls:
        results = batcher.step()
        batcher.drop("gone")
        batcher.drop("unknown")  # not in flight (a job that finished, say): nothing to do
        while len(batcher):
            results.update(batcher.step())
    assert calls.sizes == [2, 1, 1], "the dropped job leaves the batch at the next step"
    assert set(results) == {"keep"}
    assert_as_alone(pipe, results["keep"], jobs["keep"])


@pytest.mark.parametrize("kind", KINDS)
def test_a_failing_job_fails_alone(pipe, kind):
    jobs = {"ok": request(pipe, "a cat", 1, steps=2), "bad": request(pipe, "a dog", 2, steps=3,
                                                                       guidance=POISONED_GUIDANCE),
            "ok2": request(pipe, "a fox", 3, steps=2, negative_prompt="", true_cfg_scale=2.0)}
    with poisoned_rows(pipe):
        results, _ = drive(make_batcher(kind, pipe, max_batch=4), jobs)
        alone = pipe.generate([jobs["bad"]])[0]
    assert not alone.ok and alone.error.startswith("NonFiniteError: ")
    assert not results["bad"].ok and results["bad"].image is None
    assert results["bad"].error == alone.error, "the failing job reports what it reports alone"
    for key in ("ok", "ok2"):
        assert_as_alone(pipe, results[key], jobs[key])


def picture(seed: int, width: int = 32, height: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def half_mask(width: int = 32, height: int = 32) -> Image.Image:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, width // 2 :] = 255
    return Image.fromarray(mask)


@pytest.fixture
def small_kontext_references(monkeypatch):
    """Kontext resizes references to ~1 megapixel resolutions: small ones here keep the CPU's work small (the
    batcher and the job alone both read this table)."""
    monkeypatch.setattr(fluxrt.conditioning, "PREFERRED_KONTEXT_RESOLUTIONS", ((32, 32), (48, 32), (32, 48)))


@pytest.fixture(scope="module")
def mode_pipes(pipe):
    return {"text-to-image": pipe, **{mode: tiny_random_pipeline(progress=False, mode=mode)
                                      for mode in ("fill", "control", "kontext")}}


def image_mode_jobs(pipe, mode: str) -> dict:
    """Jobs of one image mode (on a text-to-image model: text-to-image, img2img and inpainting together) that may
    share each step, with different strengths, steps, seeds and true CFG."""
    small = dict(width=32, height=32)
    if mode == "text-to-image":
        return {"plain": request(pipe, "a cat", 1, steps=2, **small),
                "img2img": request(pipe, "a dog", 2, steps=4, image=picture(0), strength=0.6, **small),
                "inpaint": request(pipe, "a fox", 3, steps=3, image=picture(1), mask_image=half_mask(), strength=0.9,
                                   negative_prompt="", true_cfg_scale=2.0, **small)}
    if mode == "fill":
        return {"a": request(pipe, "a cat", 1, steps=2, image=picture(0), mask_image=half_mask(), **small),
                "b": request(pipe, "a dog", 2, steps=3, image=picture(1), mask_image=half_mask(), strength=0.8,
                             negative_prompt="", true_cfg_scale=2.0, **small)}
    if mode == "control":
        return {"a": request(pipe, "a cat", 1, steps=2, control_image=picture(0), **small),
                "b": request(pipe, "a dog", 2, steps=3, control_image=picture(1), guidance=5.0, **small)}
    return {"a": request(pipe, "a cat", 1, steps=2, image=picture(0), **small),  # kontext: one reference size
            "b": request(pipe, "a dog", 2, steps=3, image=picture(1), negative_prompt="", true_cfg_scale=2.0,
                         **small)}


@pytest.mark.parametrize("mode", ["text-to-image", "fill", "control", "kontext"])
def test_step_batcher_runs_image_modes_as_rows(mode_pipes, mode, small_kontext_references):
    pipe = mode_pipes[mode]
    jobs = image_mode_jobs(pipe, mode)
    with TransformerBatches(pipe) as calls:
        results, _ = drive(make_batcher("step", pipe, max_batch=4), jobs)
    rows = len(jobs) + sum(job.negative_prompt is not None for job in jobs.values())
    assert calls.sizes[0] == rows, f"every job's first step in one call: {calls.sizes}"
    for key, job in jobs.items():
        assert_as_alone(pipe, results[key], job)


def test_kontext_rows_share_only_one_reference_size(mode_pipes, small_kontext_references):
    pipe = mode_pipes["kontext"]
    batcher = make_batcher("step", pipe, max_batch=4)
    batcher.admit("a", request(pipe, "a cat", 1, width=32, height=32, image=picture(0)))
    assert batcher.admits(request(pipe, "a dog", 2, width=32, height=32, image=picture(1)))
    assert not batcher.admits(request(pipe, "a fox", 3, width=32, height=32, image=picture(2, 48, 32))), \
        "another reference size cannot share the call"


def test_last_step_reports_the_transformer_rows(pipe):
    batcher = make_batcher("step", pipe, max_batch=4)
    batcher.admit("a", request(pipe, "a cat", 1))
    batcher.admit("b", request(pipe, "a dog", 2, negative_prompt="", true_cfg_scale=2.0))
    batcher.step()
    rows, seconds = batcher.last_step
    assert rows == 3 and seconds > 0, batcher.last_step


def test_a_step_that_raises_is_retried_row_by_row(pipe):
    def refuse_crashing_rows(module, args, kwargs):
        if (kwargs["guidance"] == CRASHING_GUIDANCE).any():
            raise RuntimeError("out of memory (a test's)")

    jobs = {"ok": request(pipe, "a cat", 1, steps=2), "crash": request(pipe, "a dog", 2, steps=2,
                                                                         guidance=CRASHING_GUIDANCE)}
    handle = pipe.transformer.register_forward_pre_hook(refuse_crashing_rows, with_kwargs=True)
    try:
        results, finished_at = drive(make_batcher("step", pipe, max_batch=4), jobs)
        alone = pipe.generate([jobs["crash"]])[0]
    finally:
        handle.remove()
    assert results["crash"].error == alone.error == "RuntimeError: out of memory (a test's)"
    assert finished_at["crash"] == 1, "the failing row leaves at once"
    assert_as_alone(pipe, results["ok"], jobs["ok"])


def test_bench_serve_dry_run_compares_every_kind_and_checks_the_images(tmp_path):
    out = tmp_path / "serve.json"
    run = subprocess.run([sys.executable, str(BENCH), "--dry-run", "--out", str(out)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {(r["kind"], r["concurrency"]) for r in rows} == {(k, c) for k in KINDS for c in (1, 4)}
    assert all(r["verified"] and r["images_per_s"] > 0 and r["latency_p99_s"] >= r["latency_p50_s"] > 0
               for r in rows), rows
    assert report["meta"]["label"].endswith("not a GPU claim") and "no HTTP" in report["meta"]["transport"]
    assert "| step | 4 |" in out.with_suffix(".md").read_text()


def test_bench_serve_bad_flags_are_one_line(tmp_path):
    run = subprocess.run([sys.executable, str(BENCH), "--steps", "0,2", "--out", str(tmp_path / "x.json")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--steps takes positive ints" in run.stderr.strip().splitlines()[-1], run.stderr
    assert not (tmp_path / "x.json").exists()


@torch.no_grad()
def test_step_rows_run_their_own_loras(tmp_path):
    from test_pipeline_lora import write_lora

    hot = tiny_random_pipeline(device="cpu", compile=True, backend="torch", progress=False)
    hot.enable_lora_hotswap(max_rank=16, max_adapters=2)
    hot.load_lora(write_lora(tmp_path / "a.safetensors", seed=0))
    hot.load_lora(write_lora(tmp_path / "b.safetensors", seed=1))
    small = dict(width=32, height=32)
    jobs = {"a": request(hot, "a red circle", 1, steps=2, loras={"a": 0.9}, **small),
            "ab": request(hot, "a blue star", 2, steps=3, loras={"b": 1.0, "a": 0.2}, negative_prompt="",
                          true_cfg_scale=2.0, **small),
            "loaded": request(hot, "a cat", 3, steps=2, **small)}  # the loaded scales
    with TransformerBatches(hot) as calls:
        results, _ = drive(make_batcher("step", hot, max_batch=4), jobs)
    assert calls.sizes[0] == 4, f"the jobs with different LoRAs share one call: {calls.sizes}"
    for key, job in jobs.items():
        assert_as_alone(hot, results[key], job)


def test_rows_padded_to_buckets_keep_each_image(pipe):
    """A CUDA-graphed transformer gets its rows padded to a few batch sizes (row_buckets); the padding rows' outputs
    are never read."""
    jobs = {key: job for key, job in mixed_jobs(pipe).items() if key != "hen"}
    batcher = make_batcher("step", pipe, max_batch=4)
    assert batcher.row_buckets is None, "no padding without CUDA graphs"
    batcher.row_buckets = (1, 2, 4, 8)
    with TransformerBatches(pipe) as calls:
        results, _ = drive(batcher, jobs)
    steps = {key: job.num_steps for key, job in jobs.items()}
    real = expected_batches(steps, {key for key, job in jobs.items() if job.negative_prompt is not None}, {})
    assert calls.sizes == [min(b for b in batcher.row_buckets if b >= rows) for rows in real]
    assert calls.sizes != real, "the test must pad some step"
    for key, job in jobs.items():
        assert_as_alone(pipe, results[key], job)
