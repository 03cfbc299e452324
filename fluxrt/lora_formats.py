"""FLUX.1 LoRA file key naming: every format in use, mapped onto fluxrt.reference.Flux's BFL module names.

One table of the transformer's linear layers (BFL name, diffusers name, and which rows of a fused BFL weight a
diffusers layer is) drives every format; a format only says how a key is spelled:

- diffusers / PEFT     `transformer.transformer_blocks.0.attn.to_q.lora_A.weight` (`lora_B`, optional `.alpha`)
- kohya / sd-scripts   `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight` (`lora_up`, `.alpha`)
- kohya, diffusers names `lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight` (OneTrainer's)
- BFL / ComfyUI        `diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight` (or `.lora_down`, `.alpha`)
- XLabs                `double_blocks.0.processor.qkv_lora1.down.weight` (`up`; lora1 = image, lora2 = text)

parse_keys turns a state dict into RawLayers (module, part, down, up, alpha) and consumes every key or raises
CheckpointError naming the ones it could not place; fluxrt.lora checks shapes and builds the LoRA.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor

from .convert import CheckpointError

# BFL linear layers, per double block, per single block, and outside the blocks.
_BFL_DOUBLE = ("img_mod.lin", "txt_mod.lin", "img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj",
               "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2")
_BFL_SINGLE = ("linear1", "linear2", "modulation.lin")
_BFL_GLOBAL = ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer",
               "vector_in.out_layer", "guidance_in.in_layer", "guidance_in.out_layer", "final_layer.linear",
               "final_layer.adaLN_modulation.1")

# diffusers module -> (BFL module, part). A part is a row slice of a fused BFL weight: q, k, v (hidden rows each),
# mlp (the rest of single-block linear1); "swap" is diffusers' norm_out, whose (scale, shift) halves BFL stores
# as (shift, scale).
_DIFFUSERS_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", "q"), "attn.to_k": ("img_attn.qkv", "k"), "attn.to_v": ("img_attn.qkv", "v"),
    "attn.add_q_proj": ("txt_attn.qkv", "q"), "attn.add_k_proj": ("txt_attn.qkv", "k"),
    "attn.add_v_proj": ("txt_attn.qkv", "v"),
    "attn.to_out.0": ("img_attn.proj", None), "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None), "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None), "ff_context.net.2": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None), "norm1_context.linear": ("txt_mod.lin", None),
}
_DIFFUSERS_SINGLE = {
    "attn.to_q": ("linear1", "q"), "attn.to_k": ("linear1", "k"), "attn.to_v": ("linear1", "v"),
    "proj_mlp": ("linear1", "mlp"), "proj_out": ("linear2", None), "norm.linear": ("modulation.lin", None),
}
_DIFFUSERS_GLOBAL = {
    "x_embedder": ("img_in", None), "context_embedder": ("txt_in", None),
    "time_text_embed.timestep_embedder.linear_1": ("time_in.in_layer", None),
    "time_text_embed.timestep_embedder.linear_2": ("time_in.out_layer", None),
    "time_text_embed.text_embedder.linear_1": ("vector_in.in_layer", None),
    "time_text_embed.text_embedder.linear_2": ("vector_in.out_layer", None),
    "time_text_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", None),
    "time_text_embed.guidance_embedder.linear_2": ("guidance_in.out_layer", None),
    "proj_out": ("final_layer.linear", None), "norm_out.linear": ("final_layer.adaLN_modulation.1", "swap"),
}
# XLabs' processors: (block kind, name) -> (BFL module, part). Its single-block proj_lora adds B A applied to the
# block's output, which no FLUX linear computes, so it has no entry (refused by name in parse_keys).
_XLABS = {
    ("double", "qkv_lora1"): ("img_attn.qkv", None), ("double", "qkv_lora2"): ("txt_attn.qkv", None),
    ("double", "proj_lora1"): ("img_attn.proj", None), ("double", "proj_lora2"): ("txt_attn.proj", None),
    ("single", "qkv_lora"): ("linear1", "qkv"),
}

# Key endings: (suffix, role). Longest first, so ".lora_A.weight" is not read as XLabs' ".down.weight" family.
_ROLES = ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_down.weight", "down"),
          (".lora_up.weight", "up"), (".down.weight", "down"), (".up.weight", "up"), (".alpha", "alpha"))
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder")  # kohya lora_te1_/lora_te2_, diffusers, ComfyUI text_encoders.
_DORA_MARKERS = ("dora_scale", "lora_magnitude_vector")


@dataclass
class RawLayer:
    """One LoRA layer as the file has it, placed on a BFL module (shapes not yet checked)."""

    module: str
    part: str | None
    key: str  # the file's name for the layer (its keys without the role suffix), for messages
    down: Tensor | None = None
    up: Tensor | None = None
    alpha: Tensor | None = None
    roles_seen: list[str] = field(default_factory=list)


def _block_lookup(per_block: Mapping, underscored: bool) -> dict[str, object]:
    return {(k.replace(".", "_") if underscored else k): v for k, v in per_block.items()}


def _bfl_target(name: str, underscored: bool) -> tuple[str, str | None] | None:
    """A BFL module name (dotted, or kohya's underscored form) -> (module, None)."""
    sep = "_" if underscored else r"\."
    m = re.fullmatch(rf"(double_blocks|single_blocks){sep}(\d+){sep}(.+)", name)
    if m:
        kind, index, rest = m.groups()
        names = _BFL_DOUBLE if kind == "double_blocks" else _BFL_SINGLE
        lookup = _block_lookup({n: n for n in names}, underscored)
        return (f"{kind}.{index}.{lookup[rest]}", None) if rest in lookup else None
    lookup = _block_lookup({n: n for n in _BFL_GLOBAL}, underscored)
    return (lookup[name], None) if name in lookup else None


def _diffusers_target(name: str, underscored: bool) -> tuple[str, str | None] | None:
    """A diffusers module name (dotted, or underscored as in `lora_transformer_...`) -> (BFL module, part)."""
    sep = "_" if underscored else r"\."
    m = re.fullmatch(rf"(transformer_blocks|single_transformer_blocks){sep}(\d+){sep}(.+)", name)
    if m:
        kind, index, rest = m.groups()
        double = kind == "transformer_blocks"
        lookup = _block_lookup(_DIFFUSERS_DOUBLE if double else _DIFFUSERS_SINGLE, underscored)
        if rest not in lookup:
            return None
        module, part = lookup[rest]
        return f"{'double_blocks' if double else 'single_blocks'}.{index}.{module}", part
    return _block_lookup(_DIFFUSERS_GLOBAL, underscored).get(name)


def _xlabs_target(name: str) -> tuple[str, str | None] | None:
    m = re.fullmatch(r"(?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\.(\w+)", name)
    if not m or (m.group(1), m.group(3)) not in _XLABS:
        return None
    module, part = _XLABS[(m.group(1), m.group(3))]
    return f"{m.group(1)}_blocks.{m.group(2)}.{module}", part


def _family_and_target(name: str) -> tuple[str, tuple[str, str | None] | None]:
    """(naming family, target or None) of a layer name (a key without its role suffix)."""
    if ".processor." in name:
        return "xlabs", _xlabs_target(name)
    if name.startswith("transformer."):
        return "diffusers", _diffusers_target(name[len("transformer."):], underscored=False)
    if name.startswith("lora_unet_"):
        return "kohya", _bfl_target(name[len("lora_unet_"):], underscored=True)
    if name.startswith("lora_transformer_"):
        return "kohya (diffusers names)", _diffusers_target(name[len("lora_transformer_"):], underscored=True)
    bfl_name = name[len("diffusion_model."):] if name.startswith("diffusion_model.") else name
    target = _bfl_target(bfl_name, underscored=False)
    if target is not None or name.startswith("diffusion_model."):
        return "bfl", target
    return "diffusers", _diffusers_target(name, underscored=False)  # diffusers names without "transformer."


def _split_role(key: str) -> tuple[str, str] | None:
    for suffix, role in _ROLES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _listing(keys: list[str], limit: int = 6) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)} in all)" if len(keys) > limit else f" ({len(keys)})")


def _refuse_kinds_fluxrt_cannot_apply(keys: list[str]) -> None:
    text = [k for k in keys if k.startswith(_TEXT_ENCODER_PREFIXES)]
    if text:
        raise CheckpointError(
            f"this LoRA has text-encoder parts: {_listing(text)}; fluxrt applies transformer LoRAs only, for now. "
            "Use a file without the text-encoder parts, or load this one with diffusers")
    dora = [k for k in keys if any(m in k for m in _DORA_MARKERS)]
    if dora:
        raise CheckpointError(f"this is a DoRA file ({_listing(dora)}); fluxrt applies plain LoRAs only")
    xlabs_out = [k for k in keys if re.search(r"single_blocks\.\d+\.processor\.proj_lora\.", k)]
    if xlabs_out:
        raise CheckpointError(
            f"XLabs single-block proj_lora keys ({_listing(xlabs_out)}) act on the block's output, which no FLUX "
            "linear layer computes, so they cannot be applied as a LoRA; use a file with double-block layers only")


def parse_keys(state_dict: Mapping[str, Tensor]) -> tuple[str, list[RawLayer]]:
    """(format, layers) of a LoRA state dict; CheckpointError unless every key is placed on a FLUX linear."""
    keys = list(state_dict.keys())
    _refuse_kinds_fluxrt_cannot_apply(keys)
    layers: dict[str, RawLayer] = {}
    families: dict[str, str] = {}
    unknown: list[str] = []
    for key in keys:
        split = _split_role(key)
        family, target = _family_and_target(split[0]) if split else (None, None)
        if target is None:
            unknown.append(key)
            continue
        name, role = split
        layer = layers.setdefault(name, RawLayer(module=target[0], part=target[1], key=name))
        if role in layer.roles_seen:
            raise CheckpointError(f"{key} repeats the {role} of layer {name} (another key already gave it)")
        layer.roles_seen.append(role)
        setattr(layer, role, state_dict[key])
        families.setdefault(family, key)
    if unknown:
        raise CheckpointError(f"unknown keys, not a FLUX.1 transformer LoRA in a format fluxrt reads "
                              f"(diffusers/PEFT, kohya, BFL/ComfyUI, XLabs): {_listing(unknown)}")
    if len(families) > 1:
        shown = "; ".join(f"{f} (e.g. {k})" for f, k in families.items())
        raise CheckpointError(f"this file mixes LoRA namings: {shown}; one file must use one naming, or the same "
                              "layer could be applied twice. Split it into one file per naming")
    if not layers:
        raise CheckpointError("this LoRA holds no tensors")
    return next(iter(families)), list(layers.values())
