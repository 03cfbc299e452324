"""fluxrt.compile for a diffusers FluxTransformer2DModel: the same call, kwargs and return type back.

Check, then move. check_flux_conversion runs the whole diffusers -> BFL conversion on meta tensors first (every
parameter and buffer accounted for, nothing unknown: extra parameters or modules, adapter layers other than the
plain peft LoRAs fluxrt.diffusers_lora reads and runs as side branches; one floating dtype, one device, shapes that
fit the config) and raises CheckpointError with the model untouched. Layers fused by fuse_qkv_projections() are
converted from the fused weights, which are what the model's forward runs; a peft LoRA layer's base weight is
converted under the linear's own name. Only then are the weights moved: renames keep the storage, q|k|v are fused
into one new tensor and their sources are released at once, so peak memory stays about one copy of the weights, and
the diffusers model is left with empty (meta) parameters (its LoRA factors stay: the compiled model's adapters hold
them, for fuse_lora). The move phase allocates only the fused q|k|v tensors:
running out of memory there is the one failure that can interrupt it. check_conversion does the same for any
diffusers model holding a FLUX trunk beside layers of its own (a ControlNet: fluxrt.controlnet).

The compiled transformer takes a ControlNet's residuals (controlnet_block_samples, controlnet_single_block_samples,
controlnet_blocks_repeat) with diffusers' meaning: fluxrt.transformer.controlnet_residuals. A diffusers cache enabled
before compile (FirstBlockCacheConfig, TaylorSeerCacheConfig: fluxrt.diffusers_state) runs as fluxrt.cache on it, with
diffusers' CacheMixin calls (cache_context per pass, enable_cache / disable_cache after compile): DiffusersCacheMixin.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from . import cache
from .config import FluxConfig
from .convert import CheckpointError, diffusers_to_bfl
from .diffusers_lora import DiffusersLoraMixin, PeftAdapters, peft_adapters_of
from .diffusers_save import DiffusersStandIn, save_transformer
from .diffusers_state import check_module_state, release_diffusers_cache, step_cache_from_diffusers
from .reference import Flux

log = logging.getLogger("fluxrt")

# Names that only adapter libraries put into a diffusers model: peft's LoRA layers wrap a linear as `base_layer`
# beside `lora_A` / `lora_B` (and `lora_embedding_*`, `lora_magnitude_vector` for DoRA).
_LORA_MARKERS = (".base_layer.", ".lora_A.", ".lora_B.", ".lora_embedding_", ".lora_magnitude_vector")
_PEFT_FACTORS = (".lora_A.", ".lora_B.")  # a plain LoRA's factors: read by peft_adapters_of, not converted
# diffusers' fuse_qkv_projections(): each fused layer (the one the model's forward then runs) and the layers whose
# rows it stacks, which stay in the model beside it
_FUSED_QKV = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


def fused_qkv_parts(keys) -> dict[str, tuple[str, int]]:
    """{unfused key: (fused key, row third)} for the layers fuse_qkv_projections() fused, e.g.
    "t.0.attn.to_k.weight" -> ("t.0.attn.to_qkv.weight", 1)."""
    parts = {}
    for key in keys:
        module, _, leaf = key.rpartition(".")
        owner, _, name = module.rpartition(".")
        for index, split in enumerate(_FUSED_QKV.get(name, ())):
            parts[f"{owner}.{split}.{leaf}" if owner else f"{split}.{leaf}"] = (key, index)
    return parts


def _without_fused_qkv(meta: dict[str, Tensor], what: str) -> dict[str, Tensor]:
    """The meta state dict as if fuse_qkv_projections() had not been called (the fused layers' keys dropped, the
    unfused keys kept: the move reads their values from the fused layers), after checking each fused layer stacks
    exactly its three unfused layers' rows."""
    parts = fused_qkv_parts(meta)
    fused = {fused_key for fused_key, _ in parts.values()}
    for fused_key in sorted(fused):
        splits = [key for key, (source, _) in parts.items() if source == fused_key]
        missing = [key for key in splits if key not in meta]
        rows = sum(meta[key].shape[0] for key in splits if key in meta)
        if missing or meta[fused_key].shape[0] != rows or any(meta[key].shape[1:] != meta[fused_key].shape[1:]
                                                              for key in splits):
            raise CheckpointError(f"this {what}'s fused projection {fused_key} does not stack "
                                  f"{', '.join(splits)} ({'missing ' + ', '.join(missing) if missing else 'shapes differ'}"
                                  "): call unfuse_qkv_projections(), or rebuild the model, before fluxrt.compile")
    return {key: value for key, value in meta.items() if key not in fused}


def base_weight_paths(keys, peft: bool) -> dict[str, str]:
    """{state-dict key as the model would have it without peft's LoRA layers: its real key}. peft wraps a linear
    `x` as `x.base_layer` beside its factors `x.lora_A.<adapter>`; with peft=False the keys are returned as they are."""
    if not peft:
        return {key: key for key in keys}
    return {key.replace(".base_layer.", "."): key for key in keys
            if not any(marker in f".{key}" for marker in _PEFT_FACTORS)}


def check_diffusers_parameters(model: nn.Module, what: str, peft: bool = False) -> dict[str, Tensor]:
    """The model's state dict as meta tensors (shape, dtype) after the checks every diffusers conversion needs:
    not consumed already, no adapter layers (peft=True: plain peft LoRA layers are left out, their base weights
    kept under the linear's own names; fluxrt.diffusers_lora reads the adapters), every tensor a parameter of one
    floating dtype on one device. Layers fused by fuse_qkv_projections() are kept: their keys are left out, and the
    move reads the unfused layers' values from them (_Consuming). Raises CheckpointError naming what is wrong and what
    to do; nothing is changed."""
    check_module_state(model, what)  # processors, hooks, IP-Adapter, per-layer offload: what compile would drop
    paths = base_weight_paths(model.state_dict(keep_vars=True), peft)
    all_params = dict(model.named_parameters(remove_duplicate=False))
    params = {key: all_params[real] for key, real in paths.items() if real in all_params}
    full_state = model.state_dict(keep_vars=True)
    state = {key: full_state[real] for key, real in paths.items()}
    keys = [f".{k}" for k in paths]  # a leading dot, so markers match at the top level too
    if any(marker in key for key in keys for marker in _LORA_MARKERS):
        raise CheckpointError(f"an unfused LoRA (peft adapter layers) is loaded into this {what}, which fluxrt.compile "
                              "does not convert: unload it (pipe.unload_lora_weights()) first, or fuse it "
                              "(pipe.fuse_lora(); pipe.unload_lora_weights())")
    buffers = sorted(set(state) - set(params))
    if buffers:
        raise CheckpointError(f"this {what} has buffers fluxrt does not know ({', '.join(buffers[:5])}): it is not a "
                              "FLUX model as diffusers builds it")
    if any(p.is_meta for p in params.values()):
        raise CheckpointError(f"this {what} has meta (empty) parameters: an earlier fluxrt.compile consumed it (keep "
                              "using the model it returned) or its weights were never loaded")
    dtypes = sorted({str(p.dtype) for p in params.values()})
    if len(dtypes) != 1 or not next(iter(params.values())).is_floating_point():
        raise CheckpointError(f"this {what} mixes parameter dtypes ({', '.join(dtypes)}): cast it to one floating "
                              "dtype (model.to(torch.bfloat16)) before fluxrt.compile")
    devices = sorted({str(p.device) for p in params.values()})
    if len(devices) != 1:
        raise CheckpointError(f"this {what} has parameters on several devices ({', '.join(devices)}): move it to one "
                              "(model.to(device)) before fluxrt.compile")
    meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}
    return _without_fused_qkv(meta, what)


def check_fits(model: nn.Module, converted: Mapping[str, Tensor], what: str) -> None:
    """CheckpointError unless the converted (meta) state dict has exactly `model`'s keys and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in converted.items()}
    problems = [f"missing {k}" for k in sorted(set(expected) - set(got))]
    problems += [f"unexpected {k}" for k in sorted(set(got) - set(expected))]
    problems += [f"{k}: {got[k]} vs {expected[k]}" for k in sorted(set(got) & set(expected)) if got[k] != expected[k]]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
        raise CheckpointError(f"this {what}'s weights do not fit its own config ({shown}): it has been modified "
                              "after diffusers built it; fluxrt.compile converts an unmodified FLUX model")


def _conversion_error(err: CheckpointError, what: str) -> CheckpointError:
    return CheckpointError(f"fluxrt.compile cannot convert this {what}: {err}. Remove the modules or parameters "
                           "added to it (fluxrt runs FLUX's own layers only)")


class _Consuming(Mapping):
    """A checked model's parameters by state-dict key (all of them but fuse_qkv_projections' fused layers, or
    `keys`); reading one detaches it from the model (the move phase). After fuse_qkv_projections() an unfused
    layer's value is its rows of the fused layer, which is what the model's forward ran; reading it releases the
    unfused duplicate, and the fused layer once its three parts are read."""

    def __init__(self, model: nn.Module, keys: list[str] | None = None, peft: bool = False):
        self._model = model
        self._paths = base_weight_paths(model.state_dict().keys(), peft)  # peft's base_layer: read under its own name
        state_keys = list(self._paths)
        self._fused_parts = fused_qkv_parts(state_keys)
        fused = {source for source, _ in self._fused_parts.values()}
        self._keys = [k for k in state_keys if k not in fused] if keys is None else list(keys)
        self._keyset = set(self._keys)
        # each unfused key's rows of its fused layer, from the shapes alone (nothing is read yet)
        full_state = model.state_dict(keep_vars=True)
        state = {key: full_state[real] for key, real in self._paths.items()}
        self._rows: dict[str, tuple[str, int, int]] = {}
        for key, (source, _) in sorted(self._fused_parts.items(), key=lambda item: item[1]):
            start = max((stop for src, _, stop in self._rows.values() if src == source), default=0)
            self._rows[key] = (source, start, start + state[key].shape[0])
        self._fused_read: dict[str, list] = {}  # fused key -> [its value, parts not read yet]

    def __getitem__(self, key: str) -> Tensor:
        value = self._detach(key)  # an unfused duplicate is released all the same
        if key not in self._rows:
            return value
        fused_key, start, stop = self._rows[key]
        if fused_key not in self._fused_read:
            parts = sum(source == fused_key for source, _, _ in self._rows.values())
            self._fused_read[fused_key] = [self._detach(fused_key), parts]
        entry = self._fused_read[fused_key]
        entry[1] -= 1
        if entry[1] == 0:
            del self._fused_read[fused_key]  # the last part read: only its views keep the fused storage alive
        return entry[0][start:stop]

    def _detach(self, key: str) -> Tensor:
        module_name, _, name = self._paths[key].rpartition(".")
        module = self._model.get_submodule(module_name)
        value = getattr(module, name).detach()
        setattr(module, name, nn.Parameter(torch.empty(0, device="meta"), requires_grad=False))
        return value

    def __contains__(self, key) -> bool:  # Mapping's default would read (and so consume) the entry
        return key in self._keyset

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def check_flux_conversion(model: nn.Module) -> tuple[Callable[[], Flux], PeftAdapters | None]:
    """Check the whole conversion of a diffusers FluxTransformer2DModel (on meta tensors; raises CheckpointError with
    the model untouched), and return the move (a call that converts it to a fluxrt.reference.Flux by moving its
    base tensors, leaving the diffusers model empty and its diffusers cache disabled: the compile maps that cache,
    fluxrt.diffusers_state.compile_step_cache) and the peft LoRA adapters loaded into it (None: none), for
    FastFluxTransformer.adopt_peft_adapters."""
    what = "FluxTransformer2DModel"
    try:
        config = FluxConfig.from_diffusers(dict(model.config))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"this {what}'s config is not a FLUX.1 transformer's: {err}") from None
    adapters = peft_adapters_of(model, config) if _has_peft_layers(model) else None
    move = check_conversion(model, config, what, peft=adapters is not None)

    def move_and_release() -> Flux:
        flux = move()
        release_diffusers_cache(model)  # an enabled cache now runs mapped on the compiled model
        return flux

    return move_and_release, adapters


def _has_peft_layers(model: nn.Module) -> bool:
    # by name, so that a model without adapters never imports peft
    return any(type(m).__module__.startswith("peft.") for m in model.modules())


def check_conversion(model: nn.Module, config: FluxConfig, what: str, kept: tuple[str, ...] = (),
                     final_layer: bool = True, peft: bool = False) -> Callable[[], Flux]:
    """check_flux_conversion for any diffusers model holding a FLUX transformer: the parameters under the `kept`
    prefixes are left out of the conversion (the model's own layers, which its compiled form calls as they are);
    final_layer=False converts a trunk without the output layer (a ControlNet's); peft=True converts the base
    weights of peft's LoRA layers (their adapters are read apart). Checked on meta tensors first; the move detaches
    only the converted parameters."""
    meta = check_diffusers_parameters(model, what, peft)
    keys = [k for k in meta if not k.startswith(kept)]
    try:
        converted = diffusers_to_bfl({k: meta[k] for k in keys})
    except CheckpointError as err:
        raise _conversion_error(err, what) from None
    check_fits(_meta_flux(config, final_layer), converted, what)
    dtype = next(iter(meta.values())).dtype

    def move() -> Flux:
        state_dict = diffusers_to_bfl(_Consuming(model, keys, peft))
        flux = _meta_flux(config, final_layer)
        flux.load_state_dict(state_dict, strict=True, assign=True)
        return flux.to(dtype).requires_grad_(False).eval()

    return move


def _meta_flux(config: FluxConfig, final_layer: bool) -> Flux:
    with torch.device("meta"):
        flux = Flux(config)
    if not final_layer:
        flux.final_layer = None  # a ControlNet's trunk: its blocks' outputs are its result
    return flux


def check_joint_attention_kwargs(joint_attention_kwargs: dict | None) -> float:
    """The LoRA scale in joint_attention_kwargs (1.0 when absent); NotImplementedError for what else diffusers passes
    to attention processors (fluxrt runs its own attention). 'scale' multiplies the unfused LoRA adapters, as peft's
    scale_lora_layers does (fluxrt.diffusers_lora); a fused LoRA ignores it, in diffusers too."""
    kwargs = dict(joint_attention_kwargs or {})
    scale = kwargs.pop("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"joint_attention_kwargs['scale'] (a LoRA scale) must be a number, got {scale!r}")
    if kwargs:
        raise NotImplementedError(f"joint_attention_kwargs {sorted(kwargs)} are not supported by fluxrt's compiled "
                                  "models (IP-Adapter and custom attention processors included)")
    return float(scale)


def per_sample(value: Tensor | None, batch: int) -> Tensor | None:
    """diffusers' timestep / guidance, which may be one value for the whole batch, as BFL's [B]."""
    if value is None or value.numel() != 1:
        return value
    return value.reshape(-1).expand(batch)


class DiffusersCacheMixin:
    """diffusers' CacheMixin surface on a compiled transformer (its FastFlux is self.fast): enable_cache /
    disable_cache / is_cache_enabled (the cache runs as fast.cache, a diffusers config mapped as fluxrt.compile maps
    it: fluxrt.diffusers_state.step_cache_from_diffusers); cache_context(name), under which calls run on that name's
    own per-image states (FluxPipeline's "cond" and "uncond" passes of true CFG do not share one; calls outside any
    context share the name None); _reset_stateful_cache, which a diffusers pipeline calls as its call ends (the next
    call starts new states); cache_stats. A context also starts new states when the batch changes or the timestep is
    not below its last call's (a new trajectory), so a call that raised half-way does not leak into the next."""

    def _init_cache(self) -> None:
        self._cache_context_name: str | None = None
        self._cache_runs: dict[str | None, cache.Trajectory] = {}
        self._ended_cache_stats: dict = {}  # cache_stats of the run _reset_stateful_cache ended

    @property
    def is_cache_enabled(self) -> bool:
        return self.fast.cache is not None

    def enable_cache(self, config) -> None:
        """Turn step caching on: a diffusers FirstBlockCacheConfig or TaylorSeerCacheConfig, or a fluxrt.cache config
        or spec ("fbc:0.08")."""
        if self.fast.cache is not None:
            raise ValueError(f"a cache is already enabled ({self.fast.cache.spec()}): call disable_cache() first")
        fluxrt_config = isinstance(config, (str, cache.FirstBlockCache, cache.TaylorSeer))
        self._set_step_cache(cache.parse(config) if fluxrt_config else step_cache_from_diffusers(config))

    def disable_cache(self) -> None:
        if self.fast.cache is None:
            log.warning("no cache is enabled on this transformer, so there is nothing to disable")
        self._set_step_cache(None)

    def _set_step_cache(self, config: cache.CacheConfig | None) -> None:
        self.fast.cache = config
        self.fast._refresh_plan()
        self._init_cache()

    @contextlib.contextmanager
    def cache_context(self, name: str, **loop):
        """The calls inside run on `name`'s own step-cache states. `loop` (step_index=, sigma=, ...) describes the
        denoising loop to diffusers' hooks; fluxrt's caches need none of it."""
        outer, self._cache_context_name = self._cache_context_name, name
        try:
            yield
        finally:
            self._cache_context_name = outer

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        """End the current run: the next call of every context starts new states (cache_stats keeps this run's)."""
        if self._cache_runs:
            self._ended_cache_stats = self.cache_stats
        self._cache_runs = {}

    @property
    def cache_stats(self) -> dict:
        """{cache_context name (None: calls outside any): per image {"computed": steps, "skipped": steps}} of the
        current run, or of the last one once the pipeline has ended it; {} before any cached call."""
        if not self._cache_runs:
            return dict(self._ended_cache_stats)
        return {name: [dict(state.stats) for state in run.states] for name, run in self._cache_runs.items()}

    def _context_cache_states(self, batch: int, timestep: Tensor) -> list | None:
        """The current context's states for a call (new ones for a new trajectory); None without a cache."""
        if self.fast.cache is None:
            return None
        run = self._cache_runs.setdefault(self._cache_context_name, cache.Trajectory())
        return run.states_for(self.fast.cache, batch, timestep)


class FastFluxTransformer(DiffusersStandIn, DiffusersLoraMixin, DiffusersCacheMixin, nn.Module):
    """Drop-in for diffusers' FluxTransformer2DModel (forward kwargs, return type, .config/.dtype/.device,
    save_pretrained, diffusers' LoRA methods: fluxrt.diffusers_lora, and its cache methods: DiffusersCacheMixin). A
    DiffusersStandIn: pipelines register and save it as a FluxTransformer2DModel."""

    diffusers_class_name = "FluxTransformer2DModel"

    def __init__(self, fast: nn.Module, config):
        super().__init__()
        self.fast = fast
        self.config = config
        self.plan = fast.plan
        self._init_lora()
        self._init_cache()

    def save_pretrained(self, save_directory, safe_serialization: bool = True, variant: str | None = None,
                        max_shard_size: int | str = "10GB") -> None:
        """Write the diffusers folder FluxTransformer2DModel.from_pretrained loads (fluxrt.diffusers_save)."""
        save_transformer(self, save_directory, safe_serialization, variant, max_shard_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.fast.model.img_in.bias.dtype

    @property
    def device(self) -> torch.device:
        return self.fast.model.img_in.bias.device

    def forward(self, hidden_states: Tensor, encoder_hidden_states: Tensor = None, pooled_projections: Tensor = None,
                timestep: Tensor = None, img_ids: Tensor = None, txt_ids: Tensor = None, guidance: Tensor = None,
                joint_attention_kwargs: dict | None = None, controlnet_block_samples=None,
                controlnet_single_block_samples=None, return_dict: bool = True, controlnet_blocks_repeat: bool = False):
        lora_scale = check_joint_attention_kwargs(joint_attention_kwargs)
        batch = hidden_states.shape[0]
        out = self.fast(
            img=hidden_states, img_ids=img_ids, txt=encoder_hidden_states, txt_ids=txt_ids,
            timesteps=per_sample(timestep, batch), y=pooled_projections,
            guidance=per_sample(guidance, batch) if self.fast.model.params.guidance_embed else None,
            controlnet_block_samples=controlnet_block_samples,
            controlnet_single_block_samples=controlnet_single_block_samples,
            controlnet_blocks_repeat=controlnet_blocks_repeat,
            lora_scales=self.lora_scales_for_call(batch, lora_scale),
            cache_states=self._context_cache_states(batch, timestep),
        )
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)


def is_diffusers_flux(obj) -> bool:
    return type(obj).__name__ == "FluxTransformer2DModel" and type(obj).__module__.startswith("diffusers")


def is_diffusers_controlnet(obj) -> bool:
    return type(obj).__name__ == "FluxControlNetModel" and type(obj).__module__.startswith("diffusers")


def is_diffusers_multi_controlnet(obj) -> bool:
    return type(obj).__name__ == "FluxMultiControlNetModel" and type(obj).__module__.startswith("diffusers")


def is_diffusers_pipeline(obj) -> bool:
    """Any diffusers DiffusionPipeline (by class, without importing diffusers): fluxrt.compile then decides by its
    components whether it is a FLUX pipeline it can compile."""
    return any(c.__name__ == "DiffusionPipeline" and c.__module__.startswith("diffusers") for c in type(obj).__mro__)
