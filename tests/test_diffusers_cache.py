"""diffusers' enable_cache on a FLUX transformer runs as fluxrt.cache once compiled (fluxrt.diffusers_state,
fluxrt.diffusers_adapter.DiffusersCacheMixin): FirstBlockCacheConfig -> FirstBlockCache, TaylorSeerCacheConfig ->
TaylorSeer, field by field; the compiled diffusers FluxPipeline keeps diffusers' per-context states ("cond" and
"uncond" of true CFG apart) and takes the same skip decisions as diffusers' own hooks; every other cache config, and
anything that does not map, is refused with the model untouched."""

import copy

import pytest
import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    SeaCacheConfig,
    TaylorSeerCacheConfig,
    TextKVCacheConfig,
)
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from test_compile_atomic import assert_as_before, diffusers_flux, diffusers_inputs, snapshot

import fluxrt
from fluxrt.cache import FirstBlockCache, TaylorSeer
from fluxrt.diffusers_state import step_cache_from_diffusers

STEPS = 6
CALL = dict(prompt="a red apple", height=32, width=32, num_inference_steps=STEPS, guidance_scale=3.5,
            max_sequence_length=16, output_type="pt")
TRUE_CFG = dict(true_cfg_scale=3.0, negative_prompt="blurry")
PARITY = dict(atol=1e-4, rtol=0)  # compiled vs plain diffusers pipeline (tests/test_compile_pipelines.py)
# On this tiny random pipeline the first block's residual changes by 0.33-0.51 (relative L1) from step to step, so
# 0.49 skips some steps and computes others, with every change at least 0.004 away from it (the same decisions in
# fluxrt and in diffusers, whose arithmetic differs in the last bits).
SKIPPING = 0.49


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from tiny_pipeline import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny_flux_cache"), seed=3)


def fresh(base, cache_config=None, compiled=False):
    """A FluxPipeline with its own copies of the transformer and VAE (compile consumes them), the diffusers cache
    enabled first when given, compiled when asked."""
    pipe = copy.copy(base)
    pipe.transformer, pipe.vae = copy.deepcopy(base.transformer), copy.deepcopy(base.vae)
    if cache_config is not None:
        pipe.transformer.enable_cache(cache_config)
    if compiled:
        assert fluxrt.compile(pipe, backend="torch") is pipe
    return pipe


@torch.no_grad()
def run(pipe, **arguments) -> torch.Tensor:
    return pipe(**CALL, **arguments, generator=torch.Generator().manual_seed(0)).images


# ---- the mapping ----

MAPPINGS = {
    "fbc": (FirstBlockCacheConfig(threshold=0.07), FirstBlockCache(0.07)),
    "taylorseer defaults": (TaylorSeerCacheConfig(), TaylorSeer(order=1, interval=5, warmup=3, cooldown=None)),
    "taylorseer every field": (TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=2,
                                                     disable_cache_after_step=9, max_order=2,
                                                     taylor_factors_dtype=torch.float32, skip_predict_identifiers=[],
                                                     cache_identifiers=[]),
                               TaylorSeer(order=2, interval=3, warmup=2, cooldown=9)),
}


@pytest.mark.parametrize("case", list(MAPPINGS))
@torch.no_grad()
def test_each_field_maps_and_the_compiled_model_runs_it(case):
    """The mapping, and the compile carrying it: the compiled model's cache is the mapped config, and the emptied
    diffusers model's cache hooks are gone (they would hold their states and run on meta parameters)."""
    config, expected = MAPPINGS[case]
    assert step_cache_from_diffusers(config) == expected
    model = diffusers_flux(seed=7)
    model.enable_cache(config)
    fast = fluxrt.compile(model, backend="torch")
    assert fast.is_cache_enabled and fast.fast.cache == expected and fast.plan["cache"] == expected.spec()
    assert not model.is_cache_enabled
    assert not [name for name, module in model.named_modules() if getattr(module, "_diffusers_hook", None)
                and module._diffusers_hook.hooks], "the diffusers model kept cache hooks"


@torch.no_grad()
def test_threshold_zero_is_the_uncached_compiled_pipeline_bit_for_bit(base):
    expected = run(fresh(base))
    uncached = run(fresh(base, compiled=True))
    pipe = fresh(base, FirstBlockCacheConfig(threshold=0.0), compiled=True)
    got = run(pipe)
    assert pipe.transformer.cache_stats == {"cond": [{"computed": STEPS, "skipped": 0}]}, "the cache did not run"
    assert torch.equal(got, uncached)
    torch.testing.assert_close(got, expected, **PARITY)


@torch.no_grad()
def test_a_skipping_threshold_skips_stays_close_and_takes_diffusers_own_decisions(base):
    """The same rule as diffusers' FirstBlockCache hook: the compiled pipeline gives the plain pipeline's cached image
    within the uncached parity tolerance. Against the uncached image: measured max 0.0112, mean 0.0014 (pixels in
    [0, 1]); bounded at 0.03 and 0.005."""
    uncached = run(fresh(base, compiled=True))
    diffusers_cached = run(fresh(base, FirstBlockCacheConfig(threshold=SKIPPING)))
    pipe = fresh(base, FirstBlockCacheConfig(threshold=SKIPPING), compiled=True)
    got = run(pipe)
    (stats,) = pipe.transformer.cache_stats["cond"]
    assert stats["skipped"] > 0 and stats["computed"] + stats["skipped"] == STEPS, stats
    torch.testing.assert_close(got, diffusers_cached, **PARITY)
    difference = (got - uncached).abs()
    assert difference.max() > 1e-3, "a skipped step should change the image"
    assert difference.max() < 0.03 and difference.mean() < 0.005, (difference.max(), difference.mean())


@torch.no_grad()
def test_true_cfg_runs_cond_and_uncond_on_their_own_states(base):
    """diffusers keeps one state per cache_context name; so does the compiled transformer. Here the two passes'
    residuals move differently, so their skip counts differ, and the image is diffusers' own cached one."""
    diffusers_cached = run(fresh(base, FirstBlockCacheConfig(threshold=SKIPPING)), **TRUE_CFG)
    pipe = fresh(base, FirstBlockCacheConfig(threshold=SKIPPING), compiled=True)
    got = run(pipe, **TRUE_CFG)
    stats = pipe.transformer.cache_stats
    assert sorted(stats) == ["cond", "uncond"], stats
    assert all(s[0]["computed"] + s[0]["skipped"] == STEPS for s in stats.values()), stats
    assert stats["cond"] != stats["uncond"], stats
    torch.testing.assert_close(got, diffusers_cached, **PARITY)


class CountingProcessor(FluxAttnProcessor):
    """FLUX's attention, counting its calls: diffusers' TaylorSeer hook runs a module's forward on its full steps."""

    calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return super().__call__(*args, **kwargs)


@torch.no_grad()
def test_taylorseer_runs_the_schedule_of_diffusers_hooks(base):
    """Full steps: warmup, every interval after it, and from the cooldown on; counted in diffusers (its attention
    processor's calls) and in fluxrt (cache_stats) for a config whose schedule fields all matter (steps 0, 2, 4, 5
    of 6: 0 by warmup, 2 and 5 by the interval, 4 by the cooldown alone)."""
    config = dict(cache_interval=3, disable_cache_before_step=1, disable_cache_after_step=4, max_order=2)
    plain = fresh(base)
    counter = CountingProcessor()
    plain.transformer.transformer_blocks[0].attn.set_processor(counter)
    plain.transformer.enable_cache(TaylorSeerCacheConfig(**config))
    run(plain)
    pipe = fresh(base, TaylorSeerCacheConfig(**config), compiled=True)
    got = run(pipe)
    assert pipe.transformer.cache_stats == {"cond": [{"computed": counter.calls, "skipped": STEPS - counter.calls}]}
    assert 0 < counter.calls < STEPS and torch.isfinite(got).all()


# ---- the CacheMixin surface of the compiled transformer ----


@torch.no_grad()
def test_contexts_keep_their_own_states_and_start_over_on_a_new_trajectory():
    fast = fluxrt.compile(diffusers_flux(seed=8), backend="torch", cache="fbc:0")

    def call(t: float, batch: int = 1, context: str | None = "cond"):
        x = diffusers_inputs(B=batch)
        x["timestep"] = torch.full((batch,), t)
        if context is None:
            return fast(**x)
        with fast.cache_context(context):
            return fast(**x)

    def computed(context="cond"):
        return [image["computed"] for image in fast.cache_stats[context]]

    assert fast.cache_stats == {}
    call(0.9), call(0.8), call(0.7, context="uncond")
    assert computed() == [2] and computed("uncond") == [1]
    call(0.95)  # the timestep went back up: a new trajectory
    assert computed() == [1]
    call(0.5, batch=2)  # another batch: new states
    assert computed() == [1, 1]
    call(0.5, context=None)  # outside any context
    assert computed(None) == [1]
    fast._reset_stateful_cache()  # a diffusers pipeline's call ended: the stats stay readable
    assert computed() == [1, 1] and computed("uncond") == [1]
    call(0.2)  # a lower timestep, but the reset started new states
    assert fast.cache_stats == {"cond": [{"computed": 1, "skipped": 0}]}


@torch.no_grad()
def test_enable_and_disable_cache_on_the_compiled_transformer(base):
    cached = run(fresh(base, FirstBlockCacheConfig(threshold=SKIPPING), compiled=True))
    pipe = fresh(base, compiled=True)
    uncached = run(pipe)
    transformer = pipe.transformer
    assert not transformer.is_cache_enabled and transformer.plan["cache"] is None
    for config in (FirstBlockCacheConfig(threshold=SKIPPING), f"fbc:{SKIPPING}", FirstBlockCache(SKIPPING)):
        transformer.enable_cache(config)
        assert transformer.is_cache_enabled and transformer.plan["cache"] == f"fbc:{SKIPPING:g}"
        assert torch.equal(run(pipe), cached)
        with pytest.raises(ValueError, match=r"already enabled \(fbc:0.49\): call disable_cache\(\) first"):
            transformer.enable_cache(TaylorSeerCacheConfig())
        transformer.disable_cache()
        assert not transformer.is_cache_enabled and transformer.plan["cache"] is None
        assert transformer.cache_stats == {}
        assert torch.equal(run(pipe), uncached)
    with pytest.raises(ValueError, match=r"FirstBlockCacheConfig and TaylorSeerCacheConfig .*MagCacheConfig has no "
                                         r"counterpart in fluxrt: use one of those two"):
        transformer.enable_cache(MagCacheConfig(calibrate=True))
    assert not transformer.is_cache_enabled


# ---- refusals: one clear error, the model untouched ----

UNMAPPED = {
    "MagCacheConfig": MagCacheConfig(calibrate=True),
    "SeaCacheConfig": SeaCacheConfig(),
    "TextKVCacheConfig": TextKVCacheConfig(),
    "PyramidAttentionBroadcastConfig": PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                                       current_timestep_callback=lambda: 500),
    "FasterCacheConfig": FasterCacheConfig(spatial_attention_block_skip_range=2, current_timestep_callback=lambda: 500),
}
UNMAPPED_HOW = r"fluxrt runs two of diffusers' caches, FirstBlockCacheConfig and TaylorSeerCacheConfig"
BAD_VALUES = {
    "skip_predict_identifiers": (TaylorSeerCacheConfig(skip_predict_identifiers=["^proj_out$"]),
                                 r"skip_predict_identifiers=\['\^proj_out\$'\]: these choose which modules"),
    "cache_identifiers": (TaylorSeerCacheConfig(cache_identifiers=["^proj_out$"]),
                          r"cache_identifiers=.*whole block stack's output; leave skip_predict_identifiers and "
                          r"cache_identifiers at None and use_lite_mode at False"),
    "use_lite_mode": (TaylorSeerCacheConfig(use_lite_mode=True), r"use_lite_mode=True: these choose"),
    "warmup 0": (TaylorSeerCacheConfig(disable_cache_before_step=0),
                 r"disable_cache_before_step -> warmup.*warmup must be an int >= 1, got 0"),
    "order 5": (TaylorSeerCacheConfig(max_order=5), r"max_order -> TaylorSeer order.*order 5 is past"),
    "negative threshold": (FirstBlockCacheConfig(threshold=-0.1),
                           r"threshold -> FirstBlockCache threshold\): FirstBlockCache threshold must be .*>= 0"),
}
REFUSED = {**{name: (config, rf"\({name}, enable_cache\).*{UNMAPPED_HOW}.*{name} has no counterpart")
              for name, config in UNMAPPED.items()},
           **BAD_VALUES}


@pytest.mark.parametrize("case", list(REFUSED))
@torch.no_grad()
def test_a_cache_that_does_not_map_is_refused_untouched(case):
    config, message = REFUSED[case]
    model = diffusers_flux(seed=9)
    model.enable_cache(config)
    before = snapshot(model)
    with pytest.raises(fluxrt.CheckpointError, match=rf"diffusers cache enabled .*{message}.*Call disable_cache\(\) "
                                                      r"on it before fluxrt.compile"):
        fluxrt.compile(model, backend="torch")
    assert_as_before(model, before)
    assert model._cache_config is config
    model.disable_cache()  # the advice works
    assert fluxrt.compile(model, backend="torch").fast.cache is None


@pytest.mark.parametrize("case", ["SeaCacheConfig", "use_lite_mode"])
def test_enable_cache_on_the_compiled_transformer_refuses_the_same(case):
    config, message = REFUSED[case]
    fast = fluxrt.compile(diffusers_flux(seed=10), backend="torch")
    with pytest.raises(ValueError, match=message.replace(rf"\({case}, enable_cache\).*", "")):
        fast.enable_cache(config)
    assert not fast.is_cache_enabled


@torch.no_grad()
def test_compile_cache_and_an_enabled_diffusers_cache_must_agree(base):
    pipe = fresh(base, FirstBlockCacheConfig(threshold=0.2))
    before = {name: snapshot(getattr(pipe, name)) for name in ("transformer", "vae")}
    with pytest.raises(ValueError, match=r"compile\(cache='fbc:0.1'\) and the transformer's enabled diffusers cache "
                                         r"\(FirstBlockCacheConfig, which maps to 'fbc:0.2'\) disagree: pass only one"):
        fluxrt.compile(pipe, backend="torch", cache="fbc:0.1")
    for name, snap in before.items():
        assert_as_before(getattr(pipe, name), snap)
    assert type(pipe.transformer).__name__ == "FluxTransformer2DModel" and pipe.transformer.is_cache_enabled
    fluxrt.compile(pipe, backend="torch", cache=FirstBlockCache(0.2))  # the same config: fine
    assert pipe.transformer.plan["cache"] == "fbc:0.2"


@torch.no_grad()
def test_other_hooks_beside_a_mapped_cache_are_still_refused():
    model = diffusers_flux(seed=11)
    model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    model.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    before = snapshot(model)
    with pytest.raises(fluxrt.CheckpointError, match=r"diffusers hooks \(layerwise_casting\) on "):
        fluxrt.compile(model, backend="torch")
    assert_as_before(model, before)


@torch.no_grad()
def test_cache_hooks_applied_without_enable_cache_are_refused_with_the_way_that_maps():
    """apply_first_block_cache sets the hooks but no _cache_config: nothing says what to map, so it is refused."""
    from diffusers.hooks import apply_first_block_cache

    model = diffusers_flux(seed=13)
    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=0.1))
    before = snapshot(model)
    with pytest.raises(fluxrt.CheckpointError, match=r"diffusers hooks \(fbc_block_hook, fbc_leader_block_hook\) on "
                                                      r".*applied without enable_cache, and turn the cache on with "
                                                      r"transformer.enable_cache\(FirstBlockCacheConfig"):
        fluxrt.compile(model, backend="torch")
    assert_as_before(model, before)


def test_an_enabled_diffusers_cache_and_parallel_are_refused_untouched(monkeypatch):
    from ranks import free_port

    from fluxrt import parallel

    monkeypatch.delenv("RANK", raising=False)
    parallel.init(0, 1, backend="gloo", master_port=free_port(), timeout_s=10)
    try:
        model = diffusers_flux(seed=12)
        model.enable_cache(FirstBlockCacheConfig(threshold=0.1))
        before = snapshot(model)
        with pytest.raises(ValueError, match=r"diffusers cache \(enable_cache\) and parallel= do not combine yet: "
                                             r"call transformer.disable_cache\(\) first"):
            fluxrt.compile(model, backend="torch", parallel="ring")
        assert_as_before(model, before)
    finally:
        parallel.destroy()
