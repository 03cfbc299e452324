"""What a diffusers model carries beyond its weights and config, and whether fluxrt.compile can keep it.

fluxrt.compile runs FLUX's blocks on its own fused ops and reads the weights itself, so whatever a diffusers model
does in its forward beyond its weights would be skipped by the compiled model. check_module_state refuses such
state before anything moves, with one CheckpointError naming it, where it sits and what to do:

- a non-default attention processor (a custom one, or IP-Adapter's FluxIPAdapterAttnProcessor);
- an IP-Adapter image projection (`encoder_hid_proj`, set by load_ip_adapter);
- diffusers hooks (HookRegistry): the caches of `enable_cache` other than the two fluxrt maps (below), and cache hooks
  applied without it (apply_first_block_cache, ...), layerwise casting, group offloading, context parallelism, layer
  skipping;
- torch forward / backward hooks on the model or any of its modules;
- accelerate hooks on the model's modules: sequential CPU offload (`enable_sequential_cpu_offload`, which keeps each
  layer's weights on the meta device except during that layer's own forward: fluxrt, reading the weights directly,
  would read empty tensors) or a device map (`dispatch_model`).

Kept: the default processors (FluxAttnProcessor; AttnProcessor / AttnProcessor2_0 in the AutoencoderKL) whichever
attention backend they were set to (fluxrt runs its own exact attention instead), and accelerate's whole-model
offload hook (`enable_model_cpu_offload`, a CpuOffload on the model itself: it only moves the model with `.to`,
which a compiled model supports). For a pipeline, keep_model_offload returns the call that re-applies the model
offload to the compiled components once they replace the diffusers ones. A model compiled on its own cannot take
its hook along (the caller's handle from cpu_offload_with_hook points at the diffusers model, emptied by compile):
hook the compiled model after compiling it.

Mapped: a diffusers cache enabled on a FluxTransformer2DModel (`transformer.enable_cache(config)`) becomes the
compiled model's fluxrt.cache config (step_cache_from_diffusers): FirstBlockCacheConfig and TaylorSeerCacheConfig;
any other cache config is refused. compile_step_cache reconciles it with compile's own cache=; once the weights have
moved, release_diffusers_cache removes the emptied diffusers model's cache hooks (they would otherwise hold their
states' tensors and run on meta parameters).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from . import cache
from .convert import CheckpointError

_TORCH_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
# diffusers' HookRegistry hook names by what the user turned on, and how to turn it off
_DIFFUSERS_HOOK_ADVICE = (
    (("cache", "fbc_", "pyramid_attention_broadcast", "taylorseer"), "remove the cache hooks applied without "
     "enable_cache, and turn the cache on with transformer.enable_cache(FirstBlockCacheConfig(...)) or "
     "fluxrt.compile(..., cache=...) instead"),
    (("group_offloading",), "load it without enable_group_offload (pipe.enable_model_cpu_offload() works with fluxrt)"),
    (("layerwise_casting",), "load it without enable_layerwise_casting (fluxrt.compile(..., quantize='fp8-weight') "
     "stores FP8 weights)"),
)
_SHOWN = 3  # module paths named in an error; the rest are counted


def check_module_state(model: nn.Module, what: str) -> None:
    """CheckpointError if `model` (a diffusers FluxTransformer2DModel, AutoencoderKL or FLUX ControlNet) carries
    state fluxrt.compile would silently drop (the module docstring lists it). Nothing is changed."""
    _check_accelerate_hooks(model, what)
    _check_diffusers_hooks(model, what)
    _check_torch_hooks(model, what)
    _check_ip_adapter(model, what)
    _check_attention_processors(model, what)


def keep_model_offload(pipe) -> Callable[[], None]:
    """For a whole-pipeline compile: the call that re-applies `pipe.enable_model_cpu_offload()` (to the same device)
    after the compiled modules have replaced the diffusers ones, or a call that does nothing when model offload is
    off. The diffusers modules' own offload hooks cannot be moved: the pipeline chains them (each hook offloads the
    previous model), so the chain is rebuilt over the new components. Changes nothing itself."""
    if not getattr(pipe, "_all_hooks", None):
        return lambda: None
    device = pipe._offload_device
    return lambda: pipe.enable_model_cpu_offload(device=device)


_MAPPED = "FirstBlockCacheConfig and TaylorSeerCacheConfig (as fluxrt.cache.FirstBlockCache and TaylorSeer)"
# diffusers' TaylorSeerCacheConfig fields that choose which modules its hooks predict; fluxrt predicts the whole stack
_TAYLORSEER_MODULE_FIELDS = ("skip_predict_identifiers", "cache_identifiers", "use_lite_mode")


def step_cache_from_diffusers(config) -> cache.CacheConfig:
    """The fluxrt.cache config for a diffusers cache config (what enable_cache takes). ValueError, saying what maps,
    for any other config or for values fluxrt's counterpart does not take.

    FirstBlockCacheConfig(threshold) -> FirstBlockCache(threshold): the same rule (ParaAttention's: the relative L1
    change of the first double block's image residual against the last fully computed step), except at equality:
    fluxrt skips only below the threshold (so threshold 0 is exactly no cache).

    TaylorSeerCacheConfig(cache_interval, disable_cache_before_step, disable_cache_after_step, max_order) ->
    TaylorSeer(interval, warmup, cooldown, order): the same schedule of full and predicted steps. The predicted values
    differ: diffusers' hooks predict each attention module's output and still run the blocks' other layers, while
    fluxrt predicts the hidden states after the last block and runs no block on a predicted step (faster, and not the
    same numbers). Its module selection (skip_predict_identifiers, cache_identifiers, use_lite_mode) has no
    counterpart and is refused unless left at the defaults; taylor_factors_dtype is accepted and not used: fluxrt keeps
    its factors in fp32."""
    from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

    name = type(config).__name__
    if isinstance(config, FirstBlockCacheConfig):
        fields, make = "threshold -> FirstBlockCache threshold", partial(cache.FirstBlockCache, config.threshold)
    elif isinstance(config, TaylorSeerCacheConfig):
        _refuse_taylorseer_module_selection(config)
        fields = ("max_order -> TaylorSeer order, cache_interval -> interval, disable_cache_before_step -> warmup, "
                  "disable_cache_after_step -> cooldown")
        make = partial(cache.TaylorSeer, order=config.max_order, interval=config.cache_interval,
                       warmup=config.disable_cache_before_step, cooldown=config.disable_cache_after_step)
    else:
        raise ValueError(f"fluxrt runs two of diffusers' caches, {_MAPPED}; {name} has no counterpart in fluxrt: "
                         "use one of those two")
    try:
        return make()
    except ValueError as err:
        raise ValueError(f"{name} does not map to fluxrt.cache ({fields}): {err}") from None


def _refuse_taylorseer_module_selection(config) -> None:
    chosen = [f"{field}={getattr(config, field)!r}" for field in _TAYLORSEER_MODULE_FIELDS if getattr(config, field)]
    if chosen:
        raise ValueError(f"TaylorSeerCacheConfig {', '.join(chosen)}: these choose which modules diffusers' hooks "
                         "predict, and fluxrt's TaylorSeer predicts the whole block stack's output; leave "
                         "skip_predict_identifiers and cache_identifiers at None and use_lite_mode at False")


def enabled_step_cache(model: nn.Module, what: str) -> cache.CacheConfig | None:
    """The diffusers cache enabled on `model` (enable_cache), mapped (None: none); CheckpointError for one fluxrt
    cannot run, saying what to do."""
    config = getattr(model, "_cache_config", None)
    if config is None:
        return None
    try:
        return step_cache_from_diffusers(config)
    except ValueError as err:
        raise CheckpointError(
            f"this {what} has a diffusers cache enabled ({type(config).__name__}, enable_cache) that fluxrt.compile "
            f"cannot run: {err}. Call disable_cache() on it before fluxrt.compile (then enable_cache with a config "
            "that maps, or pass fluxrt.compile(..., cache=...))") from None


def compile_step_cache(model: nn.Module, requested: cache.CacheConfig | None) -> cache.CacheConfig | None:
    """The step cache compiling the diffusers FluxTransformer2DModel `model` runs: compile's cache= (`requested`,
    parsed) or the diffusers cache enabled on the model, mapped. Both: they must be the same config (ValueError).
    Changes nothing."""
    enabled = enabled_step_cache(model, "FluxTransformer2DModel")
    if enabled is not None and requested is not None and enabled != requested:
        raise ValueError(f"fluxrt.compile(cache={requested.spec()!r}) and the transformer's enabled diffusers cache "
                         f"({type(model._cache_config).__name__}, which maps to {enabled.spec()!r}) disagree: pass "
                         "only one (drop cache=, or call transformer.disable_cache() first)")
    return requested if requested is not None else enabled


def release_diffusers_cache(model: nn.Module) -> None:
    """After the move: disable the diffusers cache on the emptied model, so its hooks neither keep their states'
    tensors nor run on its meta parameters (the compiled model runs the mapped cache)."""
    if getattr(model, "_cache_config", None) is not None:
        model.disable_cache()


def _cache_hook_names(config) -> tuple[str, ...]:
    """The diffusers hooks enable_cache(config) registers, for one of the two configs fluxrt maps."""
    from diffusers.hooks import FirstBlockCacheConfig
    from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

    if isinstance(config, FirstBlockCacheConfig):
        return _FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK
    return (_TAYLORSEER_CACHE_HOOK,)


def _paths(names: list[str]) -> str:
    shown = ", ".join(name or "(the model itself)" for name in names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _check_accelerate_hooks(model: nn.Module, what: str) -> None:
    """accelerate's hooks replace a module's forward (module._hf_hook). Only a CpuOffload on the model itself (model
    offload) is kept; per-layer hooks are sequential offload or a device map, which fluxrt's direct reads bypass."""
    hooked = {name: module._hf_hook for name, module in model.named_modules() if hasattr(module, "_hf_hook")}
    if not hooked or (list(hooked) == [""] and type(hooked[""]).__name__ == "CpuOffload"):
        return
    names = [name for name in hooked if name or type(hooked[name]).__name__ != "CpuOffload"]
    kinds = sorted({type(hook).__name__ for hook in hooked.values()})
    offloaded = any(_offloads(hook) for hook in hooked.values())
    cause = ("sequential CPU offload (enable_sequential_cpu_offload / accelerate.cpu_offload)" if offloaded
             else "a device map (accelerate.dispatch_model / device_map=...)")
    raise CheckpointError(
        f"this {what} has accelerate hooks ({', '.join(kinds)}) on {_paths(names)}: {cause}. fluxrt reads the layers' "
        "weights directly, so per-layer hooks never fire. Remove them (pipe.remove_all_hooks(), or load the model "
        "onto one device) and use pipe.enable_model_cpu_offload() instead, before or after fluxrt.compile")


def _offloads(hook) -> bool:
    """An accelerate AlignDevicesHook that keeps weights off the device (offload=True), alone or in a chain."""
    return bool(getattr(hook, "offload", False)) or any(_offloads(h) for h in getattr(hook, "hooks", ()))


def _check_diffusers_hooks(model: nn.Module, what: str) -> None:
    """An enabled cache that maps is kept (the compile runs it: compile_step_cache); any other hook is refused."""
    cache_config = getattr(model, "_cache_config", None)
    enabled_step_cache(model, what)
    kept = _cache_hook_names(cache_config) if cache_config is not None else ()
    # cache_context() creates an empty registry on every model a pipeline runs, so only registered hooks count
    hooked = {name: [hook for hook in module._diffusers_hook.hooks if hook not in kept]
              for name, module in model.named_modules() if getattr(getattr(module, "_diffusers_hook", None), "hooks",
                                                                   None)}
    hooked = {name: hooks for name, hooks in hooked.items() if hooks}
    if not hooked:
        return
    hook_names = sorted({hook for hooks in hooked.values() for hook in hooks})
    advice = [text for markers, text in _DIFFUSERS_HOOK_ADVICE if any(m in h for m in markers for h in hook_names)]
    raise CheckpointError(
        f"this {what} has diffusers hooks ({', '.join(hook_names)}) on {_paths(list(hooked))}: fluxrt runs the blocks "
        f"itself and would skip them. {'; '.join(advice) or 'Remove them'} before fluxrt.compile")


def _check_torch_hooks(model: nn.Module, what: str) -> None:
    hooked = [name for name, module in model.named_modules() if any(getattr(module, kind) for kind in _TORCH_HOOKS)]
    if hooked:
        raise CheckpointError(
            f"this {what} has torch hooks (register_forward_hook / register_forward_pre_hook / backward hooks) on "
            f"{_paths(hooked)}: fluxrt runs the blocks on its own ops, so they would never fire. Remove them "
            "(handle.remove()) before fluxrt.compile, and hook the compiled model's inputs and outputs instead")


def _check_ip_adapter(model: nn.Module, what: str) -> None:
    if getattr(model, "encoder_hid_proj", None) is not None:
        raise CheckpointError(f"an IP-Adapter is loaded into this {what} (encoder_hid_proj, from load_ip_adapter): "
                              "fluxrt.compile does not run IP-Adapters. Call pipe.unload_ip_adapter() first")


def _check_attention_processors(model: nn.Module, what: str) -> None:
    plain = _plain_processors()
    custom: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        processor = getattr(module, "processor", None)
        if processor is None or not hasattr(module, "get_processor"):
            continue
        kind = type(processor)
        # diffusers' fused-projection processor belongs to the fused-QKV state, which the conversion handles
        fused = kind.__name__ == "FusedAttnProcessor2_0" and getattr(module, "fused_projections", False)
        if kind not in plain and not fused:
            custom.setdefault(kind.__name__, []).append(name)
    if not custom:
        return
    kinds = sorted(custom)
    names = [name for kind in kinds for name in custom[kind]]
    if any("IPAdapter" in kind for kind in kinds):
        raise CheckpointError(f"this {what} runs IP-Adapter attention processors ({', '.join(kinds)}) on "
                              f"{_paths(names)}: fluxrt.compile does not run IP-Adapters. Call "
                              "pipe.unload_ip_adapter() first")
    raise CheckpointError(
        f"this {what} has non-default attention processors ({', '.join(kinds)}) on {_paths(names)}: fluxrt runs its "
        "own attention and would skip what they do. Set the default back (set_default_attn_processor() or "
        "set_attn_processor(FluxAttnProcessor())) before fluxrt.compile")


def _plain_processors() -> tuple[type, ...]:
    """The processors diffusers 0.42 installs by default: exact softmax attention, nothing else. (Its older names,
    FluxAttnProcessor2_0 and FusedFluxAttnProcessor2_0, construct a FluxAttnProcessor.)"""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    return FluxAttnProcessor, AttnProcessor, AttnProcessor2_0
