"""FLUX transformer checkpoint keys: BFL naming <-> diffusers naming, both directions, from one table.

BFL fuses what diffusers keeps apart (img_attn.qkv = to_q|to_k|to_v, single-block linear1 =
to_q|to_k|to_v|proj_mlp) and orders the final AdaLN as (shift, scale) where diffusers has (scale, shift).
The functions accept any Mapping of tensors and read each entry once, so a lazy mapping over safetensors
files converts with about one copy of the weights in memory (and a mapping of meta tensors converts shapes
without reading anything).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor


class CheckpointError(ValueError):
    """A checkpoint cannot be used as asked: what was wrong and what to do is in the message."""


class _Entry(NamedTuple):
    bfl: str
    diffusers: tuple[str, ...]
    op: str  # "copy" | "cat" (fused in BFL along dim 0) | "swap" (halves swapped along dim 0)


def _linear(bfl: str, diffusers: str | tuple[str, ...], op: str = "copy") -> list[_Entry]:
    parts = (diffusers,) if isinstance(diffusers, str) else diffusers
    return [_Entry(f"{bfl}.{p}", tuple(f"{d}.{p}" for d in parts), op) for p in ("weight", "bias")]


def _table(double: list[int], single: list[int]) -> list[_Entry]:
    t: list[_Entry] = []
    for bfl, dif in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"), ("guidance_in", "guidance_embedder")):
        t += _linear(f"{bfl}.in_layer", f"time_text_embed.{dif}.linear_1")
        t += _linear(f"{bfl}.out_layer", f"time_text_embed.{dif}.linear_2")
    t += _linear("txt_in", "context_embedder")
    t += _linear("img_in", "x_embedder")
    t += _linear("final_layer.linear", "proj_out")
    t += _linear("final_layer.adaLN_modulation.1", "norm_out.linear", op="swap")
    for i in double:
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        t += _linear(f"{b}.img_mod.lin", f"{d}.norm1.linear")
        t += _linear(f"{b}.txt_mod.lin", f"{d}.norm1_context.linear")
        t += _linear(f"{b}.img_attn.qkv", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"), op="cat")
        t += _linear(f"{b}.txt_attn.qkv", (f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"), op="cat")
        t += _linear(f"{b}.img_attn.proj", f"{d}.attn.to_out.0")
        t += _linear(f"{b}.txt_attn.proj", f"{d}.attn.to_add_out")
        t += _linear(f"{b}.img_mlp.0", f"{d}.ff.net.0.proj")
        t += _linear(f"{b}.img_mlp.2", f"{d}.ff.net.2")
        t += _linear(f"{b}.txt_mlp.0", f"{d}.ff_context.net.0.proj")
        t += _linear(f"{b}.txt_mlp.2", f"{d}.ff_context.net.2")
        for stream, prefix in (("img", ""), ("txt", "added_")):
            for bfl_norm, dif_norm in (("query", "q"), ("key", "k")):
                t.append(_Entry(f"{b}.{stream}_attn.norm.{bfl_norm}_norm.scale", (f"{d}.attn.norm_{prefix}{dif_norm}.weight",), "copy"))
    for i in single:
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        t += _linear(f"{b}.modulation.lin", f"{d}.norm.linear")
        t += _linear(f"{b}.linear1", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"), op="cat")
        t += _linear(f"{b}.linear2", f"{d}.proj_out")
        t.append(_Entry(f"{b}.norm.query_norm.scale", (f"{d}.attn.norm_q.weight",), "copy"))
        t.append(_Entry(f"{b}.norm.key_norm.scale", (f"{d}.attn.norm_k.weight",), "copy"))
    return t


def _block_indices(keys, prefix: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})


def _swap_halves(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _unrecognized(keys, naming: str) -> CheckpointError:
    keys = sorted(keys)
    shown = ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")
    return CheckpointError(f"unrecognized {naming} FLUX transformer keys: {shown}")


def _partial(entry_keys, present, naming: str) -> CheckpointError:
    missing = [k for k in entry_keys if k not in present]
    return CheckpointError(
        f"{naming} checkpoint has {sorted(set(entry_keys) - set(missing))} but is missing {missing}, "
        "which belong to the same fused weight"
    )


def _check_fusable(keys: tuple[str, ...], parts: list[Tensor]) -> None:
    """The q|k|v(|mlp) parts BFL fuses must stack along dim 0: same rank, same trailing dims."""
    shapes = [tuple(p.shape) for p in parts]
    if len(shapes[0]) == 0 or any(len(s) != len(shapes[0]) or s[1:] != shapes[0][1:] for s in shapes):
        shown = ", ".join(f"{k} {s}" for k, s in zip(keys, shapes))
        raise CheckpointError(f"the parts of one fused weight do not fit together: {shown}; the checkpoint is "
                              "damaged or not a FLUX transformer")


def _check_halves(key: str, x: Tensor) -> None:
    if x.ndim == 0 or x.shape[0] % 2:
        raise CheckpointError(f"{key} has shape {tuple(x.shape)}; it must have an even number of rows (shift and "
                              "scale halves): the checkpoint is damaged or not a FLUX transformer")


def diffusers_to_bfl(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Convert a diffusers FluxTransformer2DModel state dict to BFL names (fusing q|k|v, swapping norm_out)."""
    keys = set(state_dict.keys())
    table = _table(_block_indices(keys, "transformer_blocks"), _block_indices(keys, "single_transformer_blocks"))
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for entry in table:
        present = [k for k in entry.diffusers if k in keys]
        if not present:
            continue  # absent (e.g. no guidance_in in schnell); the loader's strict check names what it needs
        if len(present) != len(entry.diffusers):
            raise _partial(entry.diffusers, keys, "diffusers")
        parts = [state_dict[k] for k in entry.diffusers]
        used.update(entry.diffusers)
        if entry.op == "cat":
            _check_fusable(entry.diffusers, parts)
            out[entry.bfl] = torch.cat(parts, dim=0)
        elif entry.op == "swap":
            _check_halves(entry.diffusers[0], parts[0])
            out[entry.bfl] = _swap_halves(parts[0])
        else:
            out[entry.bfl] = parts[0]
    if keys - used:
        raise _unrecognized(keys - used, "diffusers")
    return out


def bfl_to_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Convert a BFL Flux state dict to diffusers FluxTransformer2DModel names (splitting the fused weights)."""
    keys = set(state_dict.keys())
    table = _table(_block_indices(keys, "double_blocks"), _block_indices(keys, "single_blocks"))
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for entry in table:
        if entry.bfl not in keys:
            continue
        x = state_dict[entry.bfl]
        used.add(entry.bfl)
        if entry.op == "cat":
            # q, k, v are hidden_size rows each (hidden = the layer's in_features); a 4th part takes the rest.
            weight_key = entry.bfl.rsplit(".", 1)[0] + ".weight"
            if weight_key not in keys:
                raise CheckpointError(f"BFL checkpoint has {entry.bfl} but not {weight_key}")
            weight = x if weight_key == entry.bfl else state_dict[weight_key]
            if weight.ndim != 2 or x.ndim == 0:
                raise CheckpointError(f"{weight_key} has shape {tuple(weight.shape)} and {entry.bfl} "
                                      f"{tuple(x.shape)}; a fused linear has a 2-dim weight")
            hidden = weight.shape[1]
            sizes = [hidden] * 3 + ([x.shape[0] - 3 * hidden] if len(entry.diffusers) == 4 else [])
            if sum(sizes) != x.shape[0] or min(sizes) <= 0:
                raise CheckpointError(f"{entry.bfl} has {x.shape[0]} rows, which cannot split into {len(sizes)} parts of hidden size {hidden}")
            for name, part in zip(entry.diffusers, torch.split(x, sizes, dim=0)):
                out[name] = part.clone()  # own storage, so the result can be saved with safetensors
        elif entry.op == "swap":
            _check_halves(entry.bfl, x)
            out[entry.diffusers[0]] = _swap_halves(x)
        else:
            out[entry.diffusers[0]] = x
    if keys - used:
        raise _unrecognized(keys - used, "BFL")
    return out


# ---- FLUX autoencoder: BFL (LDM) naming <-> diffusers AutoencoderKL naming ----


def _vae_module_pairs(levels: int) -> list[tuple[str, str]]:
    """(BFL module path, diffusers module path), one table for both directions. Decoder levels run in opposite
    orders (BFL up[0] is the highest resolution, diffusers up_blocks[0] the lowest). Block indices are matched
    as path segments, so the table needs no block counts."""
    pairs = []
    for side in ("encoder", "decoder"):
        pairs += [(f"{side}.mid.block_{j + 1}.", f"{side}.mid_block.resnets.{j}.") for j in range(2)]
        pairs += [(f"{side}.mid.attn_1.norm.", f"{side}.mid_block.attentions.0.group_norm."),
                  (f"{side}.mid.attn_1.proj_out.", f"{side}.mid_block.attentions.0.to_out.0."),
                  (f"{side}.norm_out.", f"{side}.conv_norm_out."),
                  (f"{side}.conv_in.", f"{side}.conv_in."), (f"{side}.conv_out.", f"{side}.conv_out.")]
        pairs += [(f"{side}.mid.attn_1.{x}.", f"{side}.mid_block.attentions.0.to_{x}.") for x in "qkv"]
    for i in range(levels):
        pairs += [(f"encoder.down.{i}.block.", f"encoder.down_blocks.{i}.resnets."),
                  (f"encoder.down.{i}.downsample.conv.", f"encoder.down_blocks.{i}.downsamplers.0.conv."),
                  (f"decoder.up.{i}.block.", f"decoder.up_blocks.{levels - 1 - i}.resnets."),
                  (f"decoder.up.{i}.upsample.conv.", f"decoder.up_blocks.{levels - 1 - i}.upsamplers.0.conv.")]
    return pairs


def _is_attn_matrix(bfl_key: str) -> bool:
    return re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", bfl_key) is not None


def _vae_convert(state_dict: Mapping[str, Tensor], to_diffusers: bool) -> dict[str, Tensor]:
    keys = list(state_dict.keys())
    levels = len(_block_indices(keys, "decoder.up" if to_diffusers else "decoder.up_blocks"))
    pairs = [(b, d) if to_diffusers else (d, b) for b, d in _vae_module_pairs(levels)]
    shortcut = (".nin_shortcut.", ".conv_shortcut.") if to_diffusers else (".conv_shortcut.", ".nin_shortcut.")
    out, unknown = {}, []
    for key in keys:
        match = next(((src, dst) for src, dst in pairs if key.startswith(src)), None)
        if match is None:
            unknown.append(key)
            continue
        name = (match[1] + key[len(match[0]):]).replace(*shortcut)
        value = state_dict[key]
        if _is_attn_matrix(name if not to_diffusers else key):  # 1x1 conv (BFL) <-> linear (diffusers)
            value = value[:, :, 0, 0] if to_diffusers and value.ndim == 4 else value
            value = value[:, :, None, None] if not to_diffusers and value.ndim == 2 else value
        out[name] = value
    if unknown:
        raise _unrecognized(unknown, "BFL autoencoder" if to_diffusers else "diffusers autoencoder")
    return out


def vae_bfl_to_diffusers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """BFL ae.safetensors keys -> diffusers AutoencoderKL keys (1x1-conv attention weights become linear)."""
    return _vae_convert(state_dict, to_diffusers=True)


def vae_diffusers_to_bfl(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers AutoencoderKL keys (FLUX: no quant convs) -> BFL ae keys (attention weights as 1x1 convs)."""
    return _vae_convert(state_dict, to_diffusers=False)
