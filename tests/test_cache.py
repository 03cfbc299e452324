"""fluxrt.cache (issue 22) on the tiny model, CPU, fp32: step caching is bit-identical to no cache when it computes
every step; the First-Block-Cache skips match the rule computed independently on the plain reference model
(fluxrt.reference.Flux, not fluxrt.cache); TaylorSeer follows diffusers' schedule and predicts what a Taylor
extrapolation of the full steps' hidden states gives; rows with different caches in one batch give what each row
gives alone; a model compiled with cache= keeps its own states per trajectory; bad input gets one clear error."""

import copy
import functools
import math

import numpy as np
import PIL.Image
import pytest
import torch

import fluxrt
from fluxrt import FluxConfig, cache, parallel, sampling
from fluxrt.cache import FirstBlockCache, ImageCache, TaylorSeer
from fluxrt.testing import randomize_parameters_
from fluxrt.tiny import TINY_AUTOENCODER, tiny_random_pipeline
from ranks import free_port
from test_pipeline_lora import write_lora

TINY = FluxConfig.preset("tiny")
H = W = 32  # 4 image tokens: milliseconds a step
STEPS = 10
GUIDANCE = 3.5
PROMPTS = ["a red circle", "a blue star"]
CALL = dict(width=32, height=32, num_steps=8, seed=3, output_type="latent")  # decoding is no part of caching
MARGIN = 1e-4  # no observed change may sit this close to a threshold: the compiled and the plain model differ by ~1e-6


# ---- the tiny model, its inputs, a trajectory ----


def models(seed: int = 0, step_cache=None):
    """(the compiled tiny model, an independent plain reference Flux holding the same weights)."""
    model = randomize_parameters_(fluxrt.reference.Flux(TINY), seed=seed).eval().requires_grad_(False)
    reference = copy.deepcopy(model)
    return fluxrt.compile(model, backend="torch", cache=step_cache), reference


def inputs(batch: int, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return dict(img=sampling.pack(sampling.get_noise(batch, H, W, seed=[seed + k for k in range(batch)])),
                img_ids=sampling.prepare_img_ids(batch, H, W),
                txt=torch.randn(batch, 5, TINY.context_in_dim, generator=gen),
                txt_ids=sampling.prepare_txt_ids(batch, 5), y=torch.randn(batch, TINY.vec_in_dim, generator=gen))


def row(inp: dict, k: int) -> dict:
    return {name: x[k : k + 1] for name, x in inp.items()}


class Trajectory:
    """One Euler trajectory of the compiled model: its output, what every step fed the transformer (calls) and each
    row's stats after every step (stats: a list per step; a row without cache: None)."""

    def __init__(self, fast, inp: dict, states: list | None = None, steps: int = STEPS, true_cfg: tuple | None = None):
        self.calls, self.stats = [], []
        schedule = sampling.get_schedule(steps, inp["img"].shape[1])
        model = self._recording(fast, states)
        if true_cfg is not None:
            model = sampling.true_cfg(model, *true_cfg)
        with torch.no_grad():
            self.out = sampling.denoise(model, inp["img"], inp["img_ids"], inp["txt"], inp["txt_ids"], inp["y"],
                                        schedule, guidance=GUIDANCE)

    def _recording(self, fast, states):
        def model(**kwargs):
            self.calls.append(kwargs)
            out = fast(**kwargs) if states is None else fast(**kwargs, cache_states=states)
            self.stats.append(fast.cache_stats if states is None else
                              [None if s is None else dict(s.stats) for s in states])
            return out

        return model

    def decisions(self, k: int) -> list[str]:
        """Row k's step by step: "computed" or "skipped" (what its stats counted at that step)."""
        counts = [{"computed": 0, "skipped": 0}] + [stats[k] for stats in self.stats]
        return ["computed" if now["computed"] > before["computed"] else "skipped"
                for before, now in zip(counts, counts[1:])]


# ---- the First-Block-Cache rule, computed on the plain reference model ----


@torch.no_grad()
def first_block_residual(reference, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, **_) -> torch.Tensor:
    """r1 = the image stream after double block 0 - before it, [B, L, C], as fluxrt.reference.Flux.forward runs it."""
    if img_ids.ndim == 2:
        img_ids, txt_ids = (ids[None].expand(img.shape[0], -1, -1) for ids in (img_ids, txt_ids))
    before = reference.img_in(img)
    vec = reference.conditioning_vector(timesteps, y, guidance)
    pe = reference.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
    after, _ = reference.double_blocks[0](img=before, txt=reference.txt_in(txt), vec=vec, pe=pe)
    return after - before


def relative_change(now: torch.Tensor, before: torch.Tensor) -> float:
    return ((now.double() - before.double()).abs().mean() / before.double().abs().mean()).item()


def reference_rule(residuals: list[torch.Tensor], threshold: float) -> tuple[list[str], list[float]]:
    """ParaAttention's rule for one image's r1 per step: skip iff the relative L1 change since the last fully
    computed step is below the threshold. (decisions, the changes it compared)."""
    decisions, changes, last_full = [], [], None
    for r1 in residuals:
        change = None if last_full is None else relative_change(r1, last_full)
        skip = change is not None and change < threshold
        decisions.append("skipped" if skip else "computed")
        if change is not None:
            changes.append(change)
        if not skip:
            last_full = r1
    return decisions, changes


def residuals_per_row(reference, calls: list[dict]) -> list[list[torch.Tensor]]:
    per_call = [first_block_residual(reference, **call) for call in calls]
    return [[r1[k] for r1 in per_call] for k in range(per_call[0].shape[0])]


def threshold_between_observed(residuals: list[torch.Tensor]) -> float:
    """Halfway between the two middle step-to-step changes of an uncached trajectory: some steps skip, some not."""
    changes = sorted(relative_change(now, before) for before, now in zip(residuals, residuals[1:]))
    middle = len(changes) // 2
    return (changes[middle - 1] + changes[middle]) / 2


def assert_rule_matches(decisions: list[str], residuals: list[torch.Tensor], threshold: float, what: str) -> None:
    expected, changes = reference_rule(residuals, threshold)
    assert all(abs(change - threshold) > MARGIN for change in changes), \
        f"{what}: a change sits within {MARGIN} of the threshold {threshold}: the test needs another trajectory"
    assert decisions == expected, f"{what}: fluxrt computed/skipped {decisions}, the reference rule says {expected}"
    assert "skipped" in expected and expected.count("computed") > 1, \
        f"{what}: the threshold {threshold} must make both skipping and computing happen, got {expected}"


def test_first_block_cache_skips_exactly_where_the_reference_rule_says():
    fast, reference = models()
    inp = inputs(2)
    uncached = Trajectory(fast, inp)
    threshold = threshold_between_observed(residuals_per_row(reference, uncached.calls)[0])
    states = cache.states(FirstBlockCache(threshold), 2)
    cached = Trajectory(fast, inp, states)
    for k, residuals in enumerate(residuals_per_row(reference, cached.calls)):
        assert_rule_matches(cached.decisions(k), residuals, threshold, f"image {k}")
        decisions = cached.decisions(k)
        assert states[k].stats == {"computed": decisions.count("computed"), "skipped": decisions.count("skipped")}
    assert fast.cache_stats == [s.stats for s in states]
    assert (cached.out - uncached.out).abs().max() > 1e-3, "skipped steps must change the result"


class PipelineCalls:
    """Every call of a pipeline's compiled transformer: its inputs (calls) and fast.cache_stats after it (stats)."""

    def __init__(self, pipe):
        self.calls, self.stats = [], []
        pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: self.calls.append(dict(kwargs)),
                                                   with_kwargs=True)
        pipe.transformer.register_forward_hook(lambda module, args, out: self.stats.append(module.cache_stats))

    def clear(self):
        self.calls.clear()
        self.stats.clear()

    def decisions(self, k: int, calls: slice) -> list[str]:
        counts = [{"computed": 0, "skipped": 0}] + [stats[k] for stats in self.stats[calls]]
        return ["computed" if now["computed"] > before["computed"] else "skipped"
                for before, now in zip(counts, counts[1:])]


@torch.no_grad()
def test_the_pipelines_skips_match_the_reference_rule_for_each_image_and_each_true_cfg_pass():
    pipe = tiny_random_pipeline(device="cpu", compile=True, backend="torch", progress=False)
    reference = tiny_random_pipeline(device="cpu", compile=False, progress=False).transformer  # same seed, weights
    assert isinstance(reference, fluxrt.reference.Flux)
    recorded = PipelineCalls(pipe)
    cfg = dict(negative_prompt="", true_cfg_scale=2.0)
    pipe(PROMPTS, **CALL, **cfg)
    positive, negative = slice(0, None, 2), slice(1, None, 2)  # true_cfg runs the prompt's pass, then the negative
    threshold = threshold_between_observed(residuals_per_row(reference, recorded.calls[positive])[0])
    recorded.clear()
    pipe(PROMPTS, **CALL, **cfg, cache=FirstBlockCache(threshold))
    assert len(recorded.calls) == 2 * CALL["num_steps"]
    for name, passes in (("positive", positive), ("negative", negative)):
        for k, residuals in enumerate(residuals_per_row(reference, recorded.calls[passes])):
            decisions = recorded.decisions(k, passes)
            expected, changes = reference_rule(residuals, threshold)
            assert all(abs(change - threshold) > MARGIN for change in changes), "the threshold sits too close"
            assert decisions == expected, f"image {k}, {name} pass: fluxrt {decisions}, the reference rule {expected}"
            stats = dict(pipe.cache_stats[k])
            stats = stats["negative"] if name == "negative" else {n: stats[n] for n in ("computed", "skipped")}
            assert stats == {"computed": expected.count("computed"), "skipped": expected.count("skipped")}
    assert sum(s["skipped"] for s in pipe.cache_stats) > 0, "the threshold must make some steps skip"


# ---- exactness: a cache that computes every step is no cache ----


EXACT_STATES = {
    "no states": lambda batch: None,
    "rows without cache": lambda batch: [None] * batch,
    "FirstBlockCache(0)": lambda batch: cache.states(FirstBlockCache(0), batch),
    "fbc:0 and none mixed": lambda batch: cache.states(["fbc:0", None], batch),
    "TaylorSeer warmup >= steps": lambda batch: cache.states(TaylorSeer(order=2, interval=3, warmup=STEPS), batch),
    "TaylorSeer cooldown 0": lambda batch: cache.states(TaylorSeer(order=1, interval=4, warmup=1, cooldown=0), batch),
}


@pytest.mark.parametrize("name", EXACT_STATES)
def test_a_cache_that_computes_every_step_is_bit_identical_to_no_cache(name):
    fast, _ = models()
    inp = inputs(2)
    uncached = Trajectory(fast, inp)
    states = EXACT_STATES[name](2)
    cached = Trajectory(fast, inp, states)
    assert torch.equal(cached.out, uncached.out), f"{name}: the trajectory must be bit-identical to no cache"
    for state in states or ():
        assert state is None or state.stats == {"computed": STEPS, "skipped": 0}


def test_a_model_compiled_with_threshold_zero_is_bit_identical_to_one_without_cache():
    inp = inputs(2)
    plain, _ = models()
    fbc0, _ = models(step_cache="fbc:0")
    assert torch.equal(Trajectory(fbc0, inp).out, Trajectory(plain, inp).out)
    assert fbc0.cache_stats == [{"computed": STEPS, "skipped": 0}] * 2


@torch.no_grad()
def test_threshold_zero_never_skips_even_when_nothing_changed():
    """rel < 0 is never true: a step that repeats the last one exactly (rel = 0) still computes at threshold 0, while
    any positive threshold skips it."""
    fast, _ = models()
    step = dict(inputs(1), timesteps=torch.tensor([0.7]), guidance=torch.tensor([GUIDANCE]))
    expected = fast(**step)
    for threshold, second in ((0.0, "computed"), (1e-9, "skipped")):
        states = cache.states(FirstBlockCache(threshold), 1)
        outs = [fast(**step, cache_states=states) for _ in range(2)]
        assert states[0].stats == {"computed": 1 + (second == "computed"), "skipped": int(second == "skipped")}
        if threshold == 0:
            assert all(torch.equal(out, expected) for out in outs), "threshold 0 must be bit-identical to no cache"


def lora_pipeline(tmp_path):
    """A compiled pipeline with two hot-swapped LoRAs (per-image side branches)."""
    pipe = tiny_random_pipeline(device="cpu", compile=True, backend="torch", progress=False)
    pipe.enable_lora_hotswap(max_rank=8, max_adapters=2)
    pipe.load_lora(write_lora(tmp_path / "a.safetensors", seed=0))
    pipe.load_lora(write_lora(tmp_path / "b.safetensors", seed=1))
    return pipe


IMAGE = PIL.Image.fromarray((np.random.RandomState(5).rand(32, 32, 3) * 255).astype(np.uint8))
PIPELINE_CALLS = {
    "text-to-image": {},
    "true CFG": dict(negative_prompt="", true_cfg_scale=2.0),
    "per-image LoRAs": dict(loras=[{"a": 0.7}, {"b": 1.2}]),
    "img2img": dict(image=IMAGE, strength=0.6),
}


@pytest.mark.parametrize("name", PIPELINE_CALLS)
@torch.no_grad()
def test_a_pipeline_cache_that_computes_every_step_is_bit_identical(name, tmp_path):
    pipe = lora_pipeline(tmp_path) if name == "per-image LoRAs" else tiny_random_pipeline(
        device="cpu", compile=True, backend="torch", progress=False)
    call = dict(CALL, **PIPELINE_CALLS[name])
    recorded = PipelineCalls(pipe)
    expected = pipe(PROMPTS, **call)
    per_image_steps = len(recorded.calls) // (2 if "true_cfg_scale" in call else 1)
    assert pipe.cache_stats is None
    for step_cache in (None, "fbc:0", FirstBlockCache(0), TaylorSeer(order=1, interval=2, warmup=CALL["num_steps"])):
        got = pipe(PROMPTS, **call, cache=step_cache)
        assert torch.equal(got, expected), f"{name}, cache={step_cache!r}: the image must be bit-identical"
        if step_cache is None:
            assert pipe.cache_stats is None
            continue
        full = {"computed": per_image_steps, "skipped": 0}
        for stats in pipe.cache_stats:
            assert stats == (dict(full, negative=full) if "true_cfg_scale" in call else full), f"{name}: {stats}"


# ---- TaylorSeer ----


def diffusers_schedule(steps: int, interval: int, warmup: int, cooldown: int | None) -> list[str]:
    """diffusers' TaylorSeerCacheHook._measure_should_compute, enumerated: disable_cache_before_step = warmup,
    cache_interval = interval, disable_cache_after_step = cooldown."""
    schedule = []
    for step in range(steps):
        warmup_phase = step < warmup
        compute_interval = (step - warmup - 1) % interval == 0
        cooldown_phase = cooldown is not None and step >= cooldown
        schedule.append("computed" if warmup_phase or compute_interval or cooldown_phase else "skipped")
    return schedule


@pytest.mark.parametrize("order, interval, warmup, cooldown", [
    (1, 5, 3, None), (2, 3, 1, None), (1, 1, 2, None), (2, 4, 2, 9), (0, 2, 1, None), (1, 3, 12, None)])
def test_taylorseer_computes_on_diffusers_schedule(order, interval, warmup, cooldown):
    fast, _ = models()
    states = cache.states(TaylorSeer(order, interval, warmup, cooldown), 1)
    steps = 12
    run = Trajectory(fast, inputs(1), states, steps=steps)
    assert run.decisions(0) == diffusers_schedule(steps, interval, warmup, cooldown)


def hidden_before_final_layer(fast, states, steps: int) -> tuple[list[torch.Tensor], list[str]]:
    """One image's hidden states after the last block (what final_layer reads) at every step, and its decisions."""
    hidden = []
    hook = fast.model.final_layer.register_forward_pre_hook(lambda module, args: hidden.append(args[0][0].clone()))
    try:
        run = Trajectory(fast, inputs(1), states, steps=steps)
    finally:
        hook.remove()
    return hidden, run.decisions(0)


@pytest.mark.parametrize("order, interval, warmup", [(0, 3, 2), (1, 3, 2), (1, 4, 1)])
def test_taylorseer_predicts_the_polynomial_through_the_last_full_steps(order, interval, warmup):
    """Order 0 and 1: the finite-difference Taylor expansion is the polynomial through the last order + 1 full steps
    (fewer when fewer were run), evaluated at the predicted step (numpy.polyfit in the step index, float64)."""
    fast, _ = models()
    hidden, decisions = hidden_before_final_layer(fast, cache.states(TaylorSeer(order, interval, warmup), 1), 11)
    full = [step for step, d in enumerate(decisions) if d == "computed"]
    predicted = [step for step, d in enumerate(decisions) if d == "skipped"]
    assert predicted, f"the schedule {decisions} must predict some steps"
    for step in predicted:
        points = [s for s in full if s < step][-(order + 1):]
        values = np.stack([hidden[s].double().flatten().numpy() for s in points])
        coefficients = np.polyfit(np.array(points, dtype=np.float64), values, deg=len(points) - 1)
        expected = torch.from_numpy(np.stack([np.polyval(c, step) for c in coefficients.T])).view_as(hidden[step])
        torch.testing.assert_close(hidden[step].double(), expected, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"step {step} (full steps {points}): {m}")


def test_taylorseer_order_two_predicts_what_diffusers_and_the_paper_predict():
    """Order 2 (interval 3, warmup 1: full steps 0, 2, 5, 8, 11): every predicted step equals diffusers'
    TaylorSeerState fed the same full steps (fp32 factors); where the last three full steps are evenly spaced (N),
    it is arXiv 2503.06923's expansion sum_i Delta^i F / (i! N^i) k^i with backward differences Delta^i."""
    from diffusers.hooks.taylorseer_cache import TaylorSeerState

    fast, _ = models()
    hidden, decisions = hidden_before_final_layer(fast, cache.states(TaylorSeer(2, 3, 1), 1), 11)
    full = [step for step, d in enumerate(decisions) if d == "computed"]
    assert full == [0, 2, 5, 8], decisions
    theirs = TaylorSeerState(taylor_factors_dtype=torch.float32, max_order=2)
    for step, value in enumerate(hidden):
        theirs.current_step = step
        if decisions[step] == "computed":
            theirs.update((value,))
            continue
        torch.testing.assert_close(value, theirs.predict()[0], rtol=1e-5, atol=1e-5)
        f0, f1, f2 = (hidden[s].double() for s in reversed(full[-3:])) if step > full[-1] else (None,) * 3
        if f0 is not None:
            n, k = 3, step - full[-1]
            paper = f0 + (f0 - f1) / n * k + (f0 - 2 * f1 + f2) / (2 * n**2) * k**2
            torch.testing.assert_close(value.double(), paper, rtol=1e-5, atol=1e-5)
    assert [d for d in decisions[9:]] == ["skipped", "skipped"], "steps 9 and 10 must be predicted from 2, 5, 8"


# ---- mixed batches ----


def test_rows_with_different_caches_in_one_batch_match_each_row_alone():
    fast, reference = models()
    inp = inputs(5)
    residuals = residuals_per_row(reference, Trajectory(fast, inp).calls)
    configs = [FirstBlockCache(threshold_between_observed(residuals[0])), None,
               TaylorSeer(order=1, interval=2, warmup=2), FirstBlockCache(0),
               FirstBlockCache(threshold_between_observed(residuals[4]))]  # an FBC row after others in the sub-batch
    together = Trajectory(fast, inp, cache.states(configs, 5))
    for k, config in enumerate(configs):
        alone = Trajectory(fast, row(inp, k), cache.states(config, 1))
        torch.testing.assert_close(together.out[k : k + 1], alone.out, rtol=0, atol=1e-5,
                                   msg=lambda m: f"row {k} ({config}): {m}")
        assert together.stats[-1][k] == alone.stats[-1][0], f"row {k} ({config}): stats differ from the row alone"
    fbc, taylor, always, other = (together.decisions(k) for k in (0, 2, 3, 4))
    for decisions in (fbc, other):
        assert "skipped" in decisions and decisions.count("computed") > 1, f"FBC rows skip and compute: {decisions}"
    assert "skipped" in taylor and "skipped" not in always
    assert any(f != t for f, t in zip(fbc, taylor)), "some step must have one cached row skip while another computes"
    assert any(f != o for f, o in zip(fbc, other)), "the two FBC rows must skip at different steps"
    assert together.stats[-1][1] is None


@torch.no_grad()
def test_a_batch_where_some_rows_skip_computes_the_others_as_in_a_full_batch():
    """Row 0 repeats its last inputs (rel 0: it skips) while row 1 moves on (it computes): the stats show the split,
    row 1 is what the uncached model gives it, row 0 its cached result. Then row 1 repeats: it skips on its own
    residual (not row 0's)."""
    fast, _ = models()
    first = dict(inputs(2), timesteps=torch.tensor([0.9, 0.9]), guidance=torch.full((2,), GUIDANCE))
    states = cache.states(FirstBlockCache(0.5), 2)
    out_first = fast(**first, cache_states=states)
    moved = 3 * torch.randn(first["img"][1].shape, generator=torch.Generator().manual_seed(4))
    second = dict(first, img=torch.stack([first["img"][0], moved]))
    out_second = fast(**second, cache_states=states)
    assert fast.cache_stats == [{"computed": 1, "skipped": 1}, {"computed": 2, "skipped": 0}]
    torch.testing.assert_close(out_second[0], out_first[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out_second[1:], fast(**row(second, 1)), rtol=0, atol=1e-5)
    out_third = fast(**second, cache_states=states)
    assert fast.cache_stats == [{"computed": 1, "skipped": 2}, {"computed": 2, "skipped": 1}]
    torch.testing.assert_close(out_third, out_second, rtol=0, atol=1e-5)


@torch.no_grad()
def test_a_pipeline_call_with_one_cache_per_prompt_matches_each_prompt_alone(tmp_path):
    """Per-prompt caches (one skipping, one off) with per-image LoRAs: each image is what its prompt gives alone."""
    pipe = lora_pipeline(tmp_path)
    loras = [{"a": 0.7}, {"b": 1.2}]
    recorded = PipelineCalls(pipe)
    pipe(PROMPTS[0], **CALL, loras=loras[0])
    # a threshold among the changes the plain model (no LoRA) shows on that trajectory: the LoRA moves them a little
    reference = tiny_random_pipeline(device="cpu", compile=False, progress=False).transformer
    threshold = threshold_between_observed(residuals_per_row(reference, recorded.calls)[0])
    configs = [FirstBlockCache(threshold), None]
    together = pipe(PROMPTS, **CALL, loras=loras, cache=configs)
    stats = pipe.cache_stats
    assert stats[1] is None and stats[0]["skipped"] > 0 and stats[0]["computed"] > 1, stats
    for k, (prompt, config) in enumerate(zip(PROMPTS, configs)):
        alone = pipe(prompt, **dict(CALL, seed=CALL["seed"] + k), loras=loras[k], cache=config)
        torch.testing.assert_close(together[k : k + 1], alone, rtol=0, atol=1e-5)
        assert pipe.cache_stats == [stats[k]] or (config is None and pipe.cache_stats is None)


# ---- a model compiled with cache= ----


def test_a_model_compiled_with_cache_makes_states_per_trajectory():
    plain, reference = models()
    inp = inputs(2)
    threshold = round(threshold_between_observed(residuals_per_row(reference, Trajectory(plain, inp).calls)[0]), 4)
    fast, _ = models(step_cache=f"fbc:{threshold}")
    assert fast.plan["cache"] == f"fbc:{threshold:g}" and plain.plan["cache"] is None
    explicit = cache.states(FirstBlockCache(threshold), 2)
    expected = Trajectory(plain, inp, explicit)
    first, second = Trajectory(fast, inp), Trajectory(fast, inp)  # the timestep goes back up: a new trajectory
    for run in (first, second):
        assert torch.equal(run.out, expected.out)
        assert run.stats == expected.stats, "each image's stats, step by step, must be those of explicit states"
    assert fast.cache_stats == [s.stats for s in explicit] and any(s["skipped"] for s in fast.cache_stats)
    # a new batch size starts over even while the timestep keeps going down
    schedule = sampling.get_schedule(STEPS, inp["img"].shape[1])
    one = dict(row(inp, 0), timesteps=torch.tensor([schedule[-2] / 2]), guidance=torch.tensor([GUIDANCE]))
    with torch.no_grad():
        fast(**one)
    assert fast.cache_stats == [{"computed": 1, "skipped": 0}]


def test_a_model_compiled_with_taylorseer_names_it_and_predicts():
    fast, _ = models(step_cache="taylorseer:1:2")
    assert fast.plan["cache"] == TaylorSeer(1, 2).spec() == "taylorseer:1:2:5"
    Trajectory(fast, inputs(1))
    expected = diffusers_schedule(STEPS, interval=2, warmup=5, cooldown=None)
    assert fast.cache_stats == [{"computed": expected.count("computed"), "skipped": expected.count("skipped")}]


def test_a_model_compiled_with_cache_keeps_one_state_per_true_cfg_pass():
    plain, reference = models()
    inp = inputs(2)
    gen = torch.Generator().manual_seed(9)
    negative = (torch.randn(2, 5, TINY.context_in_dim, generator=gen), torch.randn(2, TINY.vec_in_dim, generator=gen))
    threshold = round(threshold_between_observed(residuals_per_row(reference, Trajectory(plain, inp).calls)[0]), 4)
    positive_states, negative_states = cache.states(f"fbc:{threshold}", 2), cache.states(f"fbc:{threshold}", 2)
    with torch.no_grad():
        explicit = sampling.denoise(
            sampling.true_cfg(functools.partial(plain, cache_states=positive_states), *negative, 2.0,
                              negative_model=functools.partial(plain, cache_states=negative_states)),
            inp["img"], inp["img_ids"], inp["txt"], inp["txt_ids"], inp["y"],
            sampling.get_schedule(STEPS, inp["img"].shape[1]), guidance=GUIDANCE)
    assert any(s.stats["skipped"] for s in positive_states + negative_states), "the threshold must skip some steps"
    fast, _ = models(step_cache=f"fbc:{threshold}")
    run = Trajectory(fast, inp, true_cfg=(*negative, 2.0))
    assert fast.cache_stats == [s.stats for s in negative_states], "the last call (negative pass) reports its states"
    torch.testing.assert_close(run.out, explicit, rtol=0, atol=1e-6)


# ---- bad input: one clear error each, nothing changed ----


@pytest.mark.parametrize("spec, error, message", [
    ("fbc", ValueError, "is not a cache spec: expected fbc:THRESHOLD"),
    ("fbc:", ValueError, "a field is not a number"),
    ("fbc:-1", ValueError, "threshold must be a finite number >= 0"),
    ("fbc:abc", ValueError, "'fbc:abc': a field is not a number; expected fbc:THRESHOLD"),
    ("fbc:nan", ValueError, "threshold must be a finite number >= 0"),
    ("fbc:inf", ValueError, "threshold must be a finite number >= 0"),
    ("fbc:0.1:2", ValueError, "is not a cache spec"),
    ("taylorseer:1:0", ValueError, "interval must be an int >= 1"),
    ("taylorseer:5:4", ValueError, "order 5 is past what finite differences"),
    ("taylorseer:2", ValueError, "is not a cache spec: expected .*taylorseer:ORDER:INTERVAL"),
    ("taylorseer:1:4:0", ValueError, "warmup must be an int >= 1"),
    ("taylorseer:1:4:3:-1", ValueError, "cooldown must be None or an int >= 0"),
    ("taylorseer:1:4:3:9:9", ValueError, "is not a cache spec"),
    ("taylorseer:x:4", ValueError, "a field is not a number"),
    ("lru:3", ValueError, "'lru:3' is not a cache spec"),
    ("", ValueError, "is not a cache spec"),
    (0.08, TypeError, "cache must be None, a spec string .* got float"),
    (3, TypeError, "got int"),
    (True, TypeError, "got bool"),
])
def test_a_bad_cache_spec_gets_one_clear_error(spec, error, message):
    with pytest.raises(error, match=message):
        cache.parse(spec)


def test_good_specs_parse_and_round_trip():
    assert cache.parse("none") is None and cache.parse(None) is None
    assert cache.parse(" FBC:0.08 ") == FirstBlockCache(0.08)
    assert cache.parse("taylorseer:2:4") == TaylorSeer(order=2, interval=4)
    for config in (FirstBlockCache(0.08), TaylorSeer(2, 4), TaylorSeer(1, 3, 2, 20), TaylorSeer(0, 2)):
        assert cache.parse(config.spec()) == config and cache.parse(config) is config


@pytest.mark.parametrize("make, message", [
    (lambda: FirstBlockCache(math.nan), "threshold must be a finite number >= 0"),
    (lambda: FirstBlockCache(math.inf), "threshold must be a finite number >= 0"),
    (lambda: FirstBlockCache(True), "got True"),
    (lambda: FirstBlockCache(-0.1), "got -0.1"),
    (lambda: FirstBlockCache("0.1"), "got '0.1'"),
    (lambda: TaylorSeer(order=5), "order 5 is past"),
    (lambda: TaylorSeer(order=-1), "order must be an int >= 0"),
    (lambda: TaylorSeer(order=1.5), "order must be an int >= 0, got 1.5"),
    (lambda: TaylorSeer(interval=0), "interval must be an int >= 1"),
    (lambda: TaylorSeer(warmup=0), "warmup must be an int >= 1"),
    (lambda: TaylorSeer(cooldown=-1), "cooldown must be None or an int >= 0"),
    (lambda: TaylorSeer(cooldown=True), "cooldown must be None or an int >= 0"),
])
def test_a_bad_cache_config_gets_one_clear_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("given", [
    lambda: cache.states("fbc:0.1", 1),  # one for a batch of two
    lambda: cache.states("fbc:0.1", 3),
    lambda: {0: ImageCache(FirstBlockCache(0.1))},
    lambda: [FirstBlockCache(0.1), FirstBlockCache(0.1)],  # configs, not states
    lambda: ["fbc:0.1", None],
    lambda: ImageCache(FirstBlockCache(0.1)),
])
@torch.no_grad()
def test_cache_states_of_the_wrong_length_or_type_are_refused_and_change_nothing(given):
    fast, _ = models()
    step = dict(inputs(2), timesteps=torch.tensor([0.9, 0.9]), guidance=torch.full((2,), GUIDANCE))
    states = cache.states("fbc:0.1", 2)
    fast(**step, cache_states=states)
    with pytest.raises(ValueError, match=r"cache_states must be a list of 2 fluxrt.cache.ImageCache .*fluxrt.cache"
                                         r".states\(config, batch\)"):
        fast(**step, cache_states=given())
    assert fast.cache_stats == [{"computed": 1, "skipped": 0}] * 2 and [s.step for s in states] == [0, 0]


def test_states_for_a_batch_refuse_a_list_of_the_wrong_length():
    with pytest.raises(ValueError, match="3 cache configs for a batch of 2 images: give one, or one per image"):
        cache.states(["fbc:0.1", None, "fbc:0"], 2)


@torch.no_grad()
def test_a_call_refused_for_its_inputs_leaves_the_cache_stats_as_they_were():
    fast, _ = models()
    step = dict(inputs(2), timesteps=torch.tensor([0.9, 0.9]), guidance=torch.full((2,), GUIDANCE))
    fast(**step, cache_states=cache.states("fbc:0.1", 2))
    with pytest.raises(ValueError, match="timesteps must be"):
        fast(**dict(step, timesteps=torch.tensor([0.8])), cache_states=cache.states("fbc:0.1", 2))
    assert fast.cache_stats == [{"computed": 1, "skipped": 0}] * 2


@torch.no_grad()
def test_pipeline_cache_errors_leave_the_last_stats():
    uncompiled = tiny_random_pipeline(device="cpu", compile=False, progress=False)
    with pytest.raises(ValueError, match="cache= runs on the compiled transformer: build the pipeline with "
                                         "compile=True"):
        uncompiled(PROMPTS[0], **CALL, cache="fbc:0.1")
    assert uncompiled.cache_stats is None
    pipe = tiny_random_pipeline(device="cpu", compile=True, backend="torch", progress=False)
    pipe(PROMPTS, **CALL, cache="fbc:0.3")
    before = pipe.cache_stats
    for spec, message in (("fbc:-1", "threshold must be a finite number"), ("lru:3", "is not a cache spec"),
                          (["fbc:0.1"], "cache has 1 entries for 2 prompts"), (0.1, "cache must be None")):
        with pytest.raises((ValueError, TypeError), match=message):
            pipe(PROMPTS, **CALL, cache=spec)
        assert pipe.cache_stats == before, f"a refused call (cache={spec!r}) must leave pipe.cache_stats"
    with pytest.raises(ValueError, match="width"):
        pipe(PROMPTS, **dict(CALL, width=33), cache="fbc:0.1")
    assert pipe.cache_stats == before


def unchanged(model: torch.nn.Module):
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    return lambda: all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and all(
        isinstance(m, torch.nn.Linear) for m in (model.img_in, model.double_blocks[0].img_attn.qkv))


@pytest.mark.parametrize("spec, message", [("fbc:abc", "a field is not a number"), ("lru", "is not a cache spec")])
def test_compile_refuses_a_bad_cache_and_leaves_the_model(spec, message):
    model = randomize_parameters_(fluxrt.reference.Flux(TINY), seed=0).eval()
    same = unchanged(model)
    with pytest.raises(ValueError, match=message):
        fluxrt.compile(model, backend="torch", cache=spec)
    assert same(), "a refused compile must leave the model as it was"


def test_cache_on_an_autoencoder_is_refused():
    ae = fluxrt.reference.AutoEncoder(TINY_AUTOENCODER)
    with pytest.raises(ValueError, match="cache= applies to a FLUX transformer .*not to a AutoEncoder"):
        fluxrt.compile(ae, backend="torch", cache="fbc:0.1")




def test_cache_with_parallel_is_refused_before_the_model_changes(monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.delenv("RANK", raising=False)
    parallel.init(0, 1, backend="gloo", master_port=free_port(), timeout_s=10)
    try:
        model = randomize_parameters_(fluxrt.reference.Flux(TINY), seed=0).eval()
        same = unchanged(model)
        with pytest.raises(ValueError, match="cache= and parallel= do not combine yet: choose one"):
            fluxrt.compile(model, backend="torch", parallel="ring", cache="fbc:0.1")
        assert same()
    finally:
        parallel.destroy()
