"""diffusers' LoRA surface on a compiled FLUX transformer (fluxrt.diffusers_adapter.FastFluxTransformer).

diffusers' FluxLoraLoaderMixin (pipe.load_lora_weights, set_adapters, disable_lora / enable_lora, delete_adapters,
unload_lora_weights, fuse_lora / unfuse_lora, get_active_adapters, get_list_adapters) converts the file and then
calls methods on the transformer, or walks its modules for peft's BaseTunerLayer. DiffusersLoraMixin implements
those methods with peft's meaning on fluxrt's own machinery:

- an adapter runs as a LoRA side branch (fluxrt.lora_branch, enabled at the first load: shapes never change, so a
  load, a swap or a new weight recompiles and recaptures nothing), at a scale that is peft's: its set_adapters
  weight while it is active and LoRAs are enabled, 0 otherwise; joint_attention_kwargs={"scale": s} multiplies
  every active adapter's scale for that call (peft's scale_lora_layers), through the forward's per-image scales;
- fuse_lora fuses into the weights with fluxrt.lora's fuse (unfuse_lora restores them bit for bit); lora_scale
  multiplies the active adapters' weights and stays, as in peft;
- one module, a BaseTunerLayer with no weights (PeftView), answers the pipeline's module walks: its active_adapters,
  merged_adapters and unmerge();
- peft's per-layer rules around merged adapters (a merged layer runs no unfused adapter; loading into a merged
  layer unmerges it) are followed where they apply to whole adapters; a call that would leave an adapter fused or
  running in part of its layers only raises NotImplementedError, changing nothing.

A LoRA loaded into the diffusers model before fluxrt.compile is read by peft_adapters_of (check phase: nothing
changes) and loaded the same way once the transformer is compiled (adopt_peft_adapters). Refused, with the model
as it was: DoRA, rsLoRA, LoRA biases, other peft tuners, block-wise set_adapters weights, Control LoRAs (FLUX.1
Canny/Depth LoRAs widen x_embedder and overwrite norms), a LoRA made for another model size, and (before compile)
adapters fused by diffusers' fuse_lora with their peft layers still loaded: unfuse_lora() before compile and
fuse_lora() after it does the same, with fluxrt's exact unfuse (fuse, then unload_lora_weights(), then compile
keeps working: no peft layers are left). The branches' padded rank is fixed at the first load (enough for the
adapters loaded then, at least MIN_RANK); a later LoRA that needs more is refused, naming fast.enable_lora_branches.
pipe.set_lora_device cannot move the transformer's adapters (they live in the branches, on the model's device).
Text-encoder parts of a file are diffusers' own: the text encoders are not compiled, and the pipeline loads, scales
and removes those parts as without fluxrt.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import FluxConfig
from .convert import CheckpointError
from .lora import FusedLora, Lora, fused_loras, load_lora

log = logging.getLogger("fluxrt")

MIN_RANK = 64  # the side branches' padded rank is at least this, so later loads of common LoRAs fit
MIN_ADAPTERS = 4


@dataclass
class Adapter:
    """One loaded adapter: the LoRA (BFL modules, alpha / rank folded in), its set_adapters weight, its peft config
    (what pipe.transformer.peft_config shows) and, while fused, the handle that unfuses it."""

    lora: Lora
    weight: float = 1.0
    config: object = None
    fused: FusedLora | None = None


@dataclass
class PeftAdapters:
    """The peft LoRA state of a diffusers transformer, read before compile (peft_adapters_of)."""

    adapters: dict[str, Adapter]
    active: list[str]
    enabled: bool


# ---- reading adapters: from a diffusers model's peft layers, or from the state dict a pipeline passes ----


def peft_adapters_of(model: nn.Module, config: FluxConfig) -> PeftAdapters | None:
    """The LoRA adapters peft put into a diffusers FluxTransformer2DModel (None: none), as fluxrt LoRAs with their
    weights, active list and enabled flag. CheckpointError for anything a compiled model would not run as peft
    does; reads only (the model is unchanged)."""
    from peft.tuners.lora import Linear as PeftLoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    if not layers:
        return None
    what = "this FluxTransformer2DModel"
    if getattr(model, "_overwritten_params", None) or getattr(model, "_transformer_norm_layers", None):
        raise CheckpointError(f"{what} holds a Control LoRA (FLUX.1 Canny/Depth LoRA: x_embedder widened, norms "
                              "overwritten), which fluxrt does not compile; call pipe.unload_lora_weights("
                              "reset_to_overwritten_params=True) first, or compile a FLUX.1 Canny/Depth model instead")
    other = [f"{n} ({type(m).__name__})" for n, m in layers.items() if not isinstance(m, PeftLoraLinear)]
    if other:
        raise CheckpointError(f"{what} holds peft adapter layers other than LoRA on linear layers "
                              f"({', '.join(other[:3])}): fluxrt runs plain LoRAs only; unload them "
                              "(pipe.unload_lora_weights()) first")
    merged = sorted({a for m in layers.values() for a in m.merged_adapters})
    if merged:
        raise CheckpointError(f"{what} has LoRA adapters fused by fuse_lora() with their peft layers still loaded "
                              f"({', '.join(merged)}): call pipe.unfuse_lora() before fluxrt.compile and "
                              "pipe.fuse_lora() after it (fluxrt's unfuse is exact), or pipe.unload_lora_weights() "
                              "after fuse_lora() to compile the fused weights alone")
    names = list(getattr(model, "peft_config", {}))
    adapters = {name: _adapter_from_layers(name, layers, config, model.peft_config[name]) for name in names}
    states = {(tuple(m.active_adapters), bool(m.disable_adapters)) for m in layers.values()}
    if len(states) != 1:
        raise CheckpointError(f"{what}'s LoRA layers disagree on the active adapters ({sorted(states)}): call "
                              "pipe.set_adapters([...]) for the whole model before fluxrt.compile")
    (active, disabled), = states
    return PeftAdapters(adapters, [a for a in active if a in adapters], not disabled)


def _adapter_from_layers(name: str, layers: Mapping[str, nn.Module], config: FluxConfig, peft_config) -> Adapter:
    what = f"LoRA adapter {name!r}"
    factors, weights = {}, set()
    for module_name, layer in layers.items():
        if name not in layer.lora_A:
            continue
        if layer.use_dora.get(name) or layer.use_rslora.get(name) or layer.lora_bias.get(name):
            raise CheckpointError(f"{what} uses DoRA, rsLoRA or LoRA biases ({module_name}), which fluxrt does not "
                                  "apply; unload it (pipe.delete_adapters) before fluxrt.compile")
        unit = layer.lora_alpha[name] / layer.r[name]  # peft's scaling at weight 1
        weights.add(round(layer.scaling[name] / unit, 12))
        factors[module_name] = (layer.lora_A[name].weight, layer.lora_B[name].weight, unit)
    if len(weights) > 1:
        raise CheckpointError(f"{what} has different set_adapters weights per layer ({sorted(weights)[:4]}): fluxrt "
                              "runs one weight per adapter; call pipe.set_adapters with one number per adapter")
    return Adapter(_lora_from_factors(factors, config, what), weights.pop() if weights else 1.0, peft_config)


def _lora_from_factors(factors: Mapping[str, tuple[Tensor, Tensor, float]], config: FluxConfig, what: str) -> Lora:
    """{diffusers module: (A, B, scale at weight 1)} -> a fluxrt Lora (alpha = scale * rank), checked against
    config. Control LoRAs (a wider x_embedder) are named as such; other misfits by fluxrt.load_lora."""
    embedder = factors.get("x_embedder")
    if embedder is not None and embedder[0].shape[1] != config.in_channels:
        raise CheckpointError(f"{what} is a Control LoRA (FLUX.1 Canny/Depth LoRA): its x_embedder reads "
                              f"{embedder[0].shape[1]} channels, the model {config.in_channels}, and diffusers would "
                              "widen the model for it, which a compiled model cannot; use a FLUX.1 Canny/Depth model")
    state_dict = {}
    for module, (down, up, unit) in factors.items():
        state_dict[f"transformer.{module}.lora_A.weight"] = down
        state_dict[f"transformer.{module}.lora_B.weight"] = up
        state_dict[f"transformer.{module}.alpha"] = torch.tensor(unit * down.shape[0], dtype=torch.float64)
    try:
        return load_lora(state_dict, config=config)
    except CheckpointError as err:
        raise CheckpointError(f"{what}: {err}") from None


def lora_from_diffusers_state_dict(state_dict: Mapping[str, Tensor], network_alphas, metadata, prefix: str | None,
                                   adapter_name: str, config: FluxConfig) -> tuple[Lora | None, object]:
    """What diffusers' load_lora_adapter makes of a state dict (its key conversion and its peft LoraConfig: ranks,
    alphas, alpha_pattern), as a fluxrt Lora and that config ((None, None): no transformer keys); CheckpointError
    for what fluxrt does not apply."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config
    from peft.utils.other import get_pattern_key

    what = f"LoRA adapter {adapter_name!r}"
    if prefix is not None:
        state_dict = {k.removeprefix(f"{prefix}."): v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
        if metadata is not None:
            metadata = {k.removeprefix(f"{prefix}."): v for k, v in metadata.items() if k.startswith(f"{prefix}.")}
    if not state_dict:
        return None, None  # a file for the text encoders only: diffusers loads nothing into the transformer either
    if any(".lokr_" in k for k in state_dict):
        raise CheckpointError(f"{what} is a LoKr adapter: fluxrt runs plain LoRAs only")
    if "lora_A" not in next(iter(state_dict)):
        state_dict = convert_unet_state_dict_to_peft(state_dict)
    if any("lora_magnitude_vector" in k or k.endswith(".lora_B.bias") for k in state_dict):
        raise CheckpointError(f"{what} uses DoRA or LoRA biases, which fluxrt does not apply")
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state_dict})
    wanted = {f"{m}.lora_{ab}.weight" for m in modules for ab in "AB"}
    if set(state_dict) != wanted:
        odd = sorted(set(state_dict) - wanted) + [f"{k} (missing)" for k in sorted(wanted - set(state_dict))]
        raise CheckpointError(f"{what} is not a complete LoRA (a lora_A and a lora_B per layer): "
                              f"{', '.join(odd[:6])}")
    ranks = {f"^{k}": v.shape[1] for k, v in state_dict.items() if "lora_B" in k and v.ndim > 1}
    if network_alphas:
        network_alphas = {k.removeprefix(f"{prefix}."): v for k, v in network_alphas.items()
                          if prefix is None or k.startswith(f"{prefix}.")}
    peft_config = _create_lora_config(state_dict, network_alphas, metadata or None, ranks, adapter_name=adapter_name)
    if peft_config.use_dora or peft_config.use_rslora or peft_config.lora_bias:
        raise CheckpointError(f"{what} uses DoRA, rsLoRA or LoRA biases, which fluxrt does not apply")
    factors = {}
    for module in modules:
        r = peft_config.rank_pattern.get(get_pattern_key(peft_config.rank_pattern, module), peft_config.r)
        alpha = peft_config.alpha_pattern.get(get_pattern_key(peft_config.alpha_pattern, module),
                                              peft_config.lora_alpha)
        factors[module] = (state_dict[f"{module}.lora_A.weight"], state_dict[f"{module}.lora_B.weight"], alpha / r)
    return _lora_from_factors(factors, config, what), peft_config


# ---- the module the pipeline's BaseTunerLayer walks find ----


class _Pinned:
    def to(self, *args, **kwargs):
        raise NotImplementedError("a compiled transformer keeps its LoRAs in side branches on the model's device, "
                                  "which cannot move on their own: delete_adapters() frees an adapter's share")


_PINNED = _Pinned()


@functools.cache
def _peft_view_class() -> type:
    from peft.tuners.tuners_utils import BaseTunerLayer

    class PeftView(nn.Module, BaseTunerLayer):
        """A weightless BaseTunerLayer standing for the compiled transformer's adapters in the pipeline's module
        walks (get_active_adapters, fuse_lora's merged names, unfuse_lora's unmerge)."""

        def __init__(self, owner: nn.Module):
            super().__init__()
            object.__setattr__(self, "_owner", owner)  # not a submodule: no cycle in modules()

        @property
        def _active_adapter(self):
            return list(self._owner._lora_active)

        @property
        def merged_adapters(self):
            return [name for name, a in self._owner._lora_adapters.items() if a.fused is not None]

        @property
        def _disable_adapters(self):
            return not self._owner._lora_enabled

        def unmerge(self) -> None:
            self._owner.unfuse_lora()

        @property
        def lora_A(self) -> dict:
            """What pipe.set_lora_device moves per adapter name (peft's lora_A modules): the transformer's adapters
            cannot move (text-encoder adapters still do)."""
            return {name: _PINNED for name in self._owner._lora_adapters}

        def forward(self, *args, **kwargs):
            raise RuntimeError("PeftView only answers diffusers' adapter queries; it is not called")

    return PeftView


# ---- the methods diffusers' pipeline calls on its transformer ----


class DiffusersLoraMixin:
    """peft's adapter methods for FastFluxTransformer (module docstring). Expects `self.fast` (a FastFlux) and
    `self.config` (diffusers' transformer config)."""

    def _init_lora(self) -> None:
        self._lora_adapters: dict[str, Adapter] = {}
        self._lora_active: list[str] = []
        self._lora_enabled = True

    @property
    def peft_config(self) -> dict:
        """{adapter name: its peft LoraConfig}; absent (AttributeError) with no adapter loaded, as in diffusers."""
        if not self._lora_adapters:
            raise AttributeError("no LoRA adapter is loaded")
        return {name: adapter.config for name, adapter in self._lora_adapters.items()}

    def _flux_config(self) -> FluxConfig:
        return FluxConfig.from_diffusers(dict(self.config))

    # ---- loading ----

    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict, prefix: str | None = "transformer",
                          hotswap: bool = False, **kwargs) -> None:
        """diffusers' load_lora_adapter: read the LoRA as diffusers does, then run it as a side branch under
        adapter_name (default_<n>), which becomes the only active adapter. hotswap=True replaces the adapter of
        that name in place. Nothing changes when it is refused."""
        from diffusers.loaders.lora_base import _fetch_state_dict

        adapter_name = kwargs.pop("adapter_name", None)
        network_alphas = kwargs.pop("network_alphas", None)
        metadata = kwargs.pop("metadata", None)
        for ignored in ("_pipeline", "low_cpu_mem_usage"):
            kwargs.pop(ignored, None)
        state_dict, metadata = _fetch_state_dict(
            pretrained_model_name_or_path_or_dict=pretrained_model_name_or_path_or_dict,
            weight_name=kwargs.pop("weight_name", None), use_safetensors=kwargs.pop("use_safetensors", None),
            local_files_only=kwargs.pop("local_files_only", None), cache_dir=kwargs.pop("cache_dir", None),
            force_download=kwargs.pop("force_download", False), proxies=kwargs.pop("proxies", None),
            token=kwargs.pop("token", None), revision=kwargs.pop("revision", None),
            subfolder=kwargs.pop("subfolder", None), user_agent={"file_type": "attn_procs_weights"},
            allow_pickle=False, metadata=metadata)
        if kwargs:
            raise TypeError(f"load_lora_adapter got unexpected arguments {sorted(kwargs)}")
        if adapter_name is None:
            adapter_name = f"default_{len(self._lora_adapters)}"  # peft's get_adapter_name
        if hotswap and adapter_name not in self._lora_adapters:
            raise ValueError(f"cannot hotswap LoRA adapter {adapter_name!r}: no adapter of that name is loaded")
        if not hotswap and adapter_name in self._lora_adapters:
            raise ValueError(f"Adapter name {adapter_name} already in use in the model - please select a new "
                             "adapter name.")
        lora, peft_config = lora_from_diffusers_state_dict(state_dict, network_alphas, metadata, prefix,
                                                           adapter_name, self._flux_config())
        if lora is None:
            log.warning("no LoRA keys for the transformer%s: it is left as it was",
                        f" under prefix {prefix!r}" if prefix else "")
            return
        if hotswap:
            self._hotswap(adapter_name, lora, peft_config)
        else:
            unfused = self._unfuse_for(adapter_name, lora)
            try:
                self._add_adapter(adapter_name, Adapter(lora, 1.0, peft_config))
            except BaseException:
                self._fuse_again(unfused)
                raise
            self._lora_active = [adapter_name]  # peft activates the adapter it just loaded, alone
        self._apply_scales()

    def adopt_peft_adapters(self, peft: PeftAdapters) -> None:
        """Load the adapters read from the diffusers model before compile (peft_adapters_of), with their weights,
        active list and enabled flag; the branches are sized for all of them."""
        self._enable_branches(list(peft.adapters.values()))
        for name, adapter in peft.adapters.items():
            self._add_adapter(name, adapter)
        self._lora_active, self._lora_enabled = list(peft.active), peft.enabled
        self._apply_scales()

    def _enable_branches(self, adapters: list[Adapter]) -> None:
        """At the first load, unless the caller reserved them (fast.enable_lora_branches): every linear's side branch,
        padded to the rank all `adapters` need together in any one layer (at least MIN_RANK), with at least
        MIN_ADAPTERS slots."""
        if self.fast.lora is None:
            need: dict[str, int] = {}
            for adapter in adapters:
                for layer in adapter.lora.layers:
                    need[layer.module] = need.get(layer.module, 0) + layer.rank
            max_rank = max([MIN_RANK, *need.values()])
            self.fast.enable_lora_branches(max_rank=max_rank, max_adapters=max(MIN_ADAPTERS, len(adapters)))
        if "peft_view" not in self._modules:
            self.add_module("peft_view", _peft_view_class()(self))

    def _add_adapter(self, name: str, adapter: Adapter) -> None:
        self._enable_branches([adapter])
        try:
            self.fast.lora.load(name, adapter.lora, scale=0.0)  # _apply_scales sets its scale
        except ValueError as err:
            raise ValueError(f"{err}. The side branches were reserved at the first LoRA load; to reserve more, "
                             "compile again and call pipe.transformer.fast.enable_lora_branches(max_rank=..., "
                             "max_adapters=...) before loading LoRAs") from None
        self._lora_adapters[name] = adapter

    def _unfuse_for(self, name: str, lora: Lora) -> list[str]:
        """peft unmerges the adapters merged into the layers a new adapter is loaded into: the fused adapters, all
        unfused when the new one has all of their layers (returned in fusing order, for _fuse_again); refused,
        changing nothing, when it has only some (peft would leave them fused in the other layers only)."""
        fused = self._fused_in_order()
        keys = {layer.key for layer in lora.layers}
        partial = [n for n in fused if not {layer.key for layer in self._lora_adapters[n].lora.layers} <= keys]
        if partial:
            raise NotImplementedError(f"loading LoRA adapter {name!r} would unfuse {partial} in part of their layers "
                                      "only (peft unmerges the layers it loads into): call unfuse_lora() first")
        if fused:
            self.unfuse_lora()
        return fused

    def _fuse_again(self, names: list[str]) -> None:
        """Fuse `names` back, in that order, at the weights they were fused with (the same bits: fuse computes from
        the exact originals)."""
        for name in names:
            adapter = self._lora_adapters[name]
            adapter.fused = adapter.lora.fuse(self.fast.model, adapter.weight)
        self._apply_scales()

    def _fused_in_order(self) -> list[str]:
        stack = fused_loras(self.fast.model)
        fused = [n for n, a in self._lora_adapters.items() if a.fused is not None]
        return sorted(fused, key=lambda n: stack.index(self._lora_adapters[n].fused))

    def _hotswap(self, name: str, lora: Lora, peft_config) -> None:
        old = self._lora_adapters[name]
        if old.fused is not None:
            raise ValueError(f"LoRA adapter {name!r} is fused: call unfuse_lora() before hotswapping it")
        self._check_merged_cover(self._lora_active, new={name: lora})
        self.fast.lora.unload(name)
        try:
            self.fast.lora.load(name, lora, scale=0.0)
        except ValueError:
            self.fast.lora.load(name, old.lora, scale=0.0)  # it fitted before: put it back
            raise
        old.lora, old.config = lora, peft_config

    # ---- choosing and scaling ----

    def set_adapters(self, adapter_names, weights=None) -> None:
        """The named adapters become the active ones, at their weights (None: 1.0), the others inactive."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = weights if isinstance(weights, list) else [weights] * len(names)
        if len(names) != len(weights):
            raise ValueError(f"Length of adapter names {len(names)} is not equal to the length of their weights "
                             f"{len(weights)}.")
        weights = [1.0 if w is None else w for w in weights]
        block_wise = [n for n, w in zip(names, weights) if isinstance(w, Mapping)]
        if block_wise:
            raise NotImplementedError(f"block-wise LoRA weights (a dict per adapter: {', '.join(block_wise)}) are not "
                                      "supported by fluxrt's compiled transformer: give one number per adapter")
        bad = [(n, w) for n, w in zip(names, weights) if isinstance(w, bool) or not isinstance(w, numbers.Real)
               or not math.isfinite(w)]
        if bad:
            raise ValueError(f"LoRA adapter weights must be finite numbers, got {bad}")
        self._known(names)
        self._check_merged_cover(names)
        for name, weight in zip(names, weights):
            self._lora_adapters[name].weight = float(weight)
        self._lora_active = names
        self._apply_scales()

    def active_adapters(self) -> list[str]:
        return list(self._lora_active)

    def disable_lora(self) -> None:
        """Base weights only. A fused adapter is unfused (peft unmerges a disabled layer at its next call)."""
        if any(a.fused is not None for a in self._lora_adapters.values()):
            self.unfuse_lora()
        self._lora_enabled = False
        self._apply_scales()

    def enable_lora(self) -> None:
        self._lora_enabled = True
        self._apply_scales()

    def _apply_scales(self) -> None:
        """Each adapter's side-branch scale, peft's rule: its weight while active and enabled; 0 when inactive,
        disabled or fused (its delta is in the weights), and 0 for every unfused adapter while any is fused (peft
        runs a layer holding a merged adapter as its base layer alone; _check_merged_cover keeps that exact)."""
        if self.fast.lora is None:
            return
        any_fused = any(a.fused is not None for a in self._lora_adapters.values())
        self.fast.lora.set_scales({
            name: adapter.weight if (self._lora_enabled and name in self._lora_active and not any_fused) else 0.0
            for name, adapter in self._lora_adapters.items()})

    def _check_merged_cover(self, active: list[str], fused: set[str] | None = None,
                            new: Mapping[str, Lora] | None = None) -> None:
        """NotImplementedError if an active unfused adapter (one of the loaded ones, or `new`, a hotswap) has
        layers no fused adapter has: peft would run it in those layers only (a merged layer skips every unfused
        adapter), which one scale per adapter cannot say."""
        fused = {n for n, a in self._lora_adapters.items() if a.fused is not None} if fused is None else fused
        if not fused:
            return
        loras = {**{n: a.lora for n, a in self._lora_adapters.items()}, **(new or {})}
        covered = {layer.key for n in fused for layer in loras[n].layers}
        partial = [n for n in active if n not in fused and any(layer.key not in covered for layer in loras[n].layers)]
        if partial:
            raise NotImplementedError(f"LoRA adapters {partial} would run unfused beside fused ones "
                                      f"({sorted(fused)}) in part of their layers only (peft's rule); fluxrt runs "
                                      "either all of an adapter or none: fuse them too, or unfuse_lora() first")

    def lora_scales_for_call(self, batch: int, scale: float) -> Tensor | None:
        """joint_attention_kwargs' scale as the forward's per-image adapter scales (None: the loaded ones)."""
        if scale == 1.0 or self.fast.lora is None:
            return None
        return (self.fast.lora.scales[:-1] * float(scale)).expand(batch, -1).contiguous()

    # ---- removing ----

    def delete_adapters(self, adapter_names) -> None:
        names = self._known([adapter_names] if isinstance(adapter_names, str) else list(adapter_names))
        fused = [n for n in names if self._lora_adapters[n].fused is not None]
        if fused:
            raise ValueError(f"LoRA adapters {fused} are fused: call unfuse_lora() before deleting them")
        for name in names:
            self.fast.lora.unload(name)
            del self._lora_adapters[name]
        remaining = [n for n in self._lora_active if n not in names]
        # peft: the remaining active ones, else the first adapter left
        self._lora_active = remaining or ([next(iter(self._lora_adapters))] if self._lora_adapters else [])
        self._apply_scales()

    def unload_lora(self) -> None:
        """Remove every adapter; fused ones stay in the weights (diffusers: fuse_lora then unload_lora_weights keeps
        the fused model), and their originals are released."""
        if self.fast.lora is not None:
            self.fast.lora.unload()
        for adapter in self._lora_adapters.values():
            if adapter.fused is not None and adapter.fused.fused:
                adapter.fused.keep()  # permanent now: nobody will unfuse it, so free its host copy
        self._init_lora()

    # ---- fusing ----

    def fuse_lora(self, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names=None) -> None:
        """peft's merge: the active adapters' weights are multiplied by lora_scale (and stay so), then the named
        adapters (default: the active ones) not fused yet are fused into the weights at their weights. safe_fusing
        is accepted: fluxrt refuses non-finite LoRA factors when it loads them."""
        if isinstance(lora_scale, bool) or not isinstance(lora_scale, numbers.Real) or not math.isfinite(lora_scale):
            raise ValueError(f"lora_scale must be a finite number, got {lora_scale!r}")
        names = self._known(list(self._lora_active) if adapter_names is None else (
            [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)))
        targets = [n for n in names if self._lora_adapters[n].fused is None]
        fused_after = {n for n, a in self._lora_adapters.items() if a.fused is not None} | set(targets)
        self._check_merged_cover(self._lora_active, fused_after)
        weights = {n: self._lora_adapters[n].weight * (lora_scale if n in self._lora_active else 1.0)
                   for n in self._lora_adapters}
        done = []
        try:
            for name in targets:
                self._lora_adapters[name].fused = self._lora_adapters[name].lora.fuse(self.fast.model, weights[name])
                done.append(name)
        except BaseException:
            for name in reversed(done):  # as it was: nothing fused by this call
                self._lora_adapters[name].fused.unfuse()
                self._lora_adapters[name].fused = None
            raise
        for name, weight in weights.items():
            self._lora_adapters[name].weight = weight
        self._apply_scales()

    def unfuse_lora(self) -> None:
        """Every fused adapter out of the weights (bit for bit), in the reverse order of fusing; they run unfused
        again at their weights."""
        for adapter in reversed([self._lora_adapters[n] for n in self._fused_in_order()]):
            adapter.fused.unfuse()
            adapter.fused = None
        self._apply_scales()

    def _known(self, names: list[str]) -> list[str]:
        missing = [n for n in names if n not in self._lora_adapters]
        if missing:
            raise ValueError(f"Adapter name(s) {missing} not in the list of present adapters: "
                             f"{set(self._lora_adapters)}.")
        return names
