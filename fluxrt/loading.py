"""load_transformer: a FLUX.1 transformer from safetensors in any of the formats people actually hold.

Formats (detected from the keys, never from file names):
  BFL single file        flux1-dev.safetensors: double_blocks.*, single_blocks.*, ...
  diffusers              a transformer folder (config.json + shards + index) or one diffusers-named file
  Comfy all-in-one       BFL keys under model.diffusion_model.; VAE / text-encoder keys ignored and reported
  FP8 e4m3fn / e5m2      any of the above stored in fp8, with per-tensor or per-channel `scale_weight` /
                         `weight_scale` when the file has them: e4m3fn linear weights in BFL naming stay FP8
                         (fluxrt.quantize.FP8Linear), everything else is upcast to `dtype` (or all: fp8="upcast")

Everything is checked before a byte of weights is read: the keys and shapes are converted as meta tensors,
compared with a meta-device model, and any problem raises one CheckpointError. Then each tensor is read
straight onto `device`, converted, and assigned into the model (no second copy, no random init).
Pickles are never loaded.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .config import FluxConfig, default_axes_dim
from .convert import CheckpointError, diffusers_to_bfl, vae_diffusers_to_bfl
from .reference import AutoEncoder, AutoEncoderParams, Flux

log = logging.getLogger("fluxrt")

COMFY_PREFIX = "model.diffusion_model."
_FP8_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # Comfy "scaled fp8" (old and new names)
_IGNORED_SUFFIXES = (".scale_input", ".input_scale")  # activation scales: meaningful only for FP8 matmuls
_IGNORED_KEYS = ("scaled_fp8", "_quantization_metadata")  # format markers
_FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
_BFL_MARKERS = ("double_blocks.", "single_blocks.", "img_in.", "final_layer.")
_DIFFUSERS_MARKERS = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder.", "proj_out.")
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


class _Source:
    """Tensor key -> (file, header info) over one or more safetensors files, opened lazily."""

    def __init__(self, files: list[Path], device: torch.device):
        self.device = device
        self.handles = {}
        self.where: dict[str, Path] = {}
        for f in files:
            try:
                handle = safe_open(str(f), framework="pt", device=_safetensors_device(device))
                keys = list(handle.keys())
            except (SafetensorError, OSError, ValueError) as err:
                raise CheckpointError(
                    f"{f} is not a readable safetensors file ({err}). fluxrt reads weights only from safetensors "
                    "and never unpickles .ckpt/.pt/.bin files; convert it with safetensors.torch.save_file."
                ) from None
            self.handles[f] = handle
            for k in keys:
                if k in self.where:
                    raise CheckpointError(f"key {k!r} appears in both {self.where[k]} and {f}")
                self.where[k] = f

    def shape(self, key: str) -> list[int]:
        return self.handles[self.where[key]].get_slice(key).get_shape()

    def dtype_name(self, key: str) -> str:
        return self.handles[self.where[key]].get_slice(key).get_dtype()

    def read(self, key: str) -> Tensor:
        try:
            return self.handles[self.where[key]].get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise CheckpointError(f"cannot read {key!r} from {self.where[key]}: {err}") from None


class _View(Mapping):
    """A read-only mapping of transformer keys whose values are produced on access (meta tensors or real ones)."""

    def __init__(self, keys: list[str], make: Callable[[str], Tensor]):
        self._keys, self._keyset, self._make = keys, set(keys), make

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._keyset:
            raise KeyError(key)
        return self._make(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._keyset


def _safetensors_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return device.type


def _resolve(path: str | os.PathLike, subfolder: str = "transformer",
             config_class: str = "FluxTransformer2DModel") -> tuple[list[Path], dict | None]:
    """The safetensors files of a checkpoint path, and the diffusers config.json next to them if any."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {str(p)!r} does not exist")
    if p.is_file():
        if p.suffix in _PICKLE_SUFFIXES:
            raise CheckpointError(
                f"{p} looks like a pickle checkpoint ({p.suffix}); fluxrt loads only safetensors and never "
                "unpickles (arbitrary code). Convert it to .safetensors first."
            )
        return [p], None
    if (p / subfolder).is_dir() and not list(p.glob("*.safetensors")):
        p = p / subfolder  # a whole diffusers pipeline folder
    config = None
    if (p / "config.json").is_file():
        config = json.loads((p / "config.json").read_text())
        cls = config.get("_class_name", config_class)
        if cls != config_class:
            raise CheckpointError(f"{p / 'config.json'} describes a {cls}, not a {config_class}")
    indexes = sorted(p.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{p} holds several safetensors indexes {[i.name for i in indexes]}; keep one")
    if indexes:
        weight_map = json.loads(indexes[0].read_text()).get("weight_map", {})
        files = [p / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{indexes[0]} lists shards that are not in {p}: {missing}")
    else:
        files = sorted(p.glob("*.safetensors"))
    if not files:
        pickles = [f.name for f in p.iterdir() if f.suffix in _PICKLE_SUFFIXES]
        hint = f" (found pickle files {pickles}, which fluxrt never loads)" if pickles else ""
        raise CheckpointError(f"no .safetensors files in folder {p}{hint}")
    return files, config


def _detect(keys: list[str]) -> str:
    if any(k.startswith(COMFY_PREFIX) for k in keys):
        return "comfy"
    if any(k.startswith(_BFL_MARKERS) for k in keys) and not any(k.startswith("transformer_blocks.") for k in keys):
        return "bfl"
    if any(k.startswith(_DIFFUSERS_MARKERS) for k in keys):
        return "diffusers"
    raise CheckpointError(
        "unrecognized checkpoint layout: expected a FLUX transformer in BFL (double_blocks.*), diffusers "
        f"(transformer_blocks.*) or Comfy (model.diffusion_model.*) naming; found keys like {sorted(keys)[:5]}"
    )


def infer_config(shapes: Mapping[str, tuple[int, ...]]) -> FluxConfig:
    """A FluxConfig from the shapes of a BFL-named state dict (axes_dim by FLUX's rule for the head dim)."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"cannot infer the model config: missing key {key!r}")
        return tuple(shapes[key])

    keys = list(shapes)
    depth = len({int(m.group(1)) for k in keys if (m := re.match(r"double_blocks\.(\d+)\.", k))})
    depth_single = len({int(m.group(1)) for k in keys if (m := re.match(r"single_blocks\.(\d+)\.", k))})
    hidden, in_channels = shape("img_in.weight")
    if depth:
        head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
        mlp_hidden = shape("double_blocks.0.img_mlp.0.weight")[0]
        qkv_bias = "double_blocks.0.img_attn.qkv.bias" in shapes
    elif depth_single:
        head_dim = shape("single_blocks.0.norm.query_norm.scale")[0]
        mlp_hidden = shape("single_blocks.0.linear1.weight")[0] - 3 * hidden
        qkv_bias = True
    else:
        raise CheckpointError("cannot infer the model config: the checkpoint has no double or single blocks")
    if hidden % head_dim:
        raise CheckpointError(f"hidden size {hidden} is not a multiple of the QK-norm head dim {head_dim}")
    try:
        return FluxConfig(
            in_channels=in_channels,
            out_channels=shape("final_layer.linear.weight")[0],
            vec_in_dim=shape("vector_in.in_layer.weight")[1],
            context_in_dim=shape("txt_in.weight")[1],
            hidden_size=hidden,
            mlp_ratio=mlp_hidden / hidden,
            num_heads=hidden // head_dim,
            depth=depth,
            depth_single_blocks=depth_single,
            axes_dim=default_axes_dim(head_dim),
            theta=10000,
            qkv_bias=qkv_bias,
            guidance_embed="guidance_in.in_layer.weight" in shapes,
        )
    except ValueError as err:
        raise CheckpointError(f"cannot infer the model config from the checkpoint ({err}); pass config=") from None


def _check_against_model(model: torch.nn.Module, shapes: Mapping[str, tuple[int, ...]], fmt: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(shapes[k])} vs model {expected[k]}" for k in expected
             if k in shapes and tuple(shapes[k]) != expected[k]]
    problems = []
    for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)):
        if items:
            shown = "; ".join(items[:10]) + (f"; ... ({len(items)} in all)" if len(items) > 10 else "")
            problems.append(f"{what}: {shown}")
    if problems:
        raise CheckpointError(
            f"checkpoint ({fmt} format, keys in BFL naming) does not fit the model config: " + " | ".join(problems)
            + ". Check that this is a FLUX.1 transformer checkpoint, or pass the matching config=."
        )


def _scale_vector(scale: Tensor, rows: int, key: str) -> Tensor:
    """A file's fp8 scale (scalar, [1] or per-channel [N] / [N, 1]) as the fp32 [N] FP8Linear stores."""
    scale = scale.float().reshape(-1)
    if scale.numel() == 1:
        return scale.expand(rows).clone()
    if scale.numel() != rows:
        raise CheckpointError(f"fp8 scale {key!r} has {scale.numel()} values for a weight of {rows} rows")
    return scale


def load_transformer(
    path: str | os.PathLike,
    config: FluxConfig | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    fp8: str = "keep",
) -> Flux:
    """Load a FLUX.1 transformer (BFL file, diffusers folder/file, Comfy file, FP8 file) as a reference Flux.

    The config comes from `config=`, else a fluxrt file's metadata, else config.json (diffusers folders),
    else the tensor shapes. The model is returned in eval mode with requires_grad off, on `device`, with its
    floating tensors in `dtype` — except fp8 e4m3fn linear weights of a BFL/Comfy-named file, which stay in
    FP8 as fluxrt.quantize.FP8Linear layers (their scales from `*.scale_weight` / `*.weight_scale`, else 1)
    unless fp8="upcast". fp8 weights in diffusers naming are always upcast.
    """
    if fp8 not in ("keep", "upcast"):
        raise ValueError(f"fp8 must be 'keep' or 'upcast', got {fp8!r}")
    device = torch.device(device)
    files, diffusers_config = _resolve(path)
    source = _Source(files, device)
    all_keys = list(source.where)
    fmt = _detect(all_keys)

    keys, ignored, scales = [], [], {}
    prefix = COMFY_PREFIX if fmt == "comfy" else ""
    for k in all_keys:
        if not k.startswith(prefix):
            ignored.append(k)
            continue
        name = k[len(prefix):]
        if name in _IGNORED_KEYS or name.endswith(_IGNORED_SUFFIXES):
            ignored.append(k)
        elif name.endswith(_FP8_SCALE_SUFFIXES):
            scales[name.rsplit(".", 1)[0] + ".weight"] = k
        else:
            keys.append(name)
    if fmt == "comfy":
        fmt = "bfl" if not any(k.startswith("transformer_blocks.") for k in keys) else "diffusers"
    if ignored:
        log.warning("load_transformer: ignored %d non-transformer keys in %s (e.g. %s)", len(ignored), path, ignored[:3])
    stray = sorted(set(scales) - set(keys))
    if stray:
        raise CheckpointError(f"fp8 scales without a weight: {[scales[k] for k in stray]}")
    fp8_keys = [k for k in keys if source.dtype_name(prefix + k) in _FP8_DTYPES]
    # kept in FP8: e4m3fn matrices named like a Linear's weight, in BFL naming (fused q|k|v need no re-scaling)
    kept = set() if fp8 == "upcast" or fmt == "diffusers" else {
        k for k in fp8_keys
        if k.endswith(".weight") and len(source.shape(prefix + k)) == 2 and source.dtype_name(prefix + k) == "F8_E4M3"
    }
    if fp8_keys:
        log.info("load_transformer: %d fp8 tensors (%d with scales): %d kept in fp8, the rest upcast to %s",
                 len(fp8_keys), len(scales), len(kept), dtype)
    scale_keys = {k[: -len("weight")] + "weight_scale": k for k in kept}  # FP8Linear's scale -> its weight

    def meta(name: str) -> Tensor:
        if name in scale_keys:
            return torch.empty(source.shape(prefix + scale_keys[name])[0], device="meta")
        return torch.empty(source.shape(prefix + name), device="meta")

    def real(name: str) -> Tensor:
        if name in scale_keys:
            weight = scale_keys[name]
            rows = source.shape(prefix + weight)[0]
            if weight in scales:
                return _scale_vector(source.read(scales[weight]), rows, scales[weight])
            return torch.ones(rows, dtype=torch.float32, device=device)
        x = source.read(prefix + name)
        if name in kept:
            return x
        if name in scales:
            s = source.read(scales[name]).float()
            if s.ndim == 1 and s.numel() == x.shape[0] and x.ndim == 2:
                s = s[:, None]  # per-output-channel scale
            x = x.float() * s
        return x.to(dtype) if x.is_floating_point() else x

    all_names = keys + list(scale_keys)
    convert = diffusers_to_bfl if fmt == "diffusers" else dict
    shapes = {k: tuple(v.shape) for k, v in convert(_View(all_names, meta)).items()}
    if config is None:
        config = (_metadata_config(source) or
                  (FluxConfig.from_diffusers(diffusers_config) if diffusers_config else infer_config(shapes)))
    with torch.device("meta"):
        model = Flux(config)
        _swap_in_fp8_linears(model, kept, dtype)
    _check_against_model(model, shapes, fmt)

    state_dict = convert(_View(all_names, real))
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.requires_grad_(False).eval()
    log.info("load_transformer: %s (%s format, %d files) -> %s", path, fmt, len(files), config)
    return model


def _metadata_config(source: _Source) -> FluxConfig | None:
    """The FluxConfig a fluxrt-written file carries in its safetensors metadata (save_transformer)."""
    for handle in source.handles.values():
        text = (handle.metadata() or {}).get("fluxrt_config")
        if text:
            try:
                return FluxConfig(**json.loads(text))
            except (TypeError, ValueError) as err:
                raise CheckpointError(f"the file's fluxrt_config metadata is not a valid FluxConfig: {err}") from None
    return None


def _swap_in_fp8_linears(model: torch.nn.Module, weight_keys: set[str], bias_dtype: torch.dtype) -> None:
    from .quantize import FP8Linear

    for key in sorted(weight_keys):
        name = key[: -len(".weight")]
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            continue  # not a module of this model: the strict key check names it
        if isinstance(linear, torch.nn.Linear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, FP8Linear(linear.in_features, linear.out_features, linear.bias is not None,
                                             bias_dtype=bias_dtype))


_VAE_PREFIXES = ("first_stage_model.", "vae.")  # LDM/Comfy all-in-one files


def infer_autoencoder_params(shapes: Mapping[str, tuple[int, ...]], diffusers_config: dict | None) -> AutoEncoderParams:
    """AutoEncoderParams from a BFL-named autoencoder state dict's shapes (scale/shift from config.json if any)."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"cannot infer the autoencoder config: missing key {key!r}")
        return tuple(shapes[key])

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = len({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    blocks = len({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    config = diffusers_config or {}
    return AutoEncoderParams(
        in_channels=in_channels,
        ch=ch,
        out_ch=shape("decoder.conv_out.weight")[0],
        ch_mult=tuple(shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(levels)),
        num_res_blocks=blocks,
        z_channels=shape("decoder.conv_in.weight")[1],
        scale_factor=config.get("scaling_factor") or AutoEncoderParams.scale_factor,
        shift_factor=config.get("shift_factor") if config.get("shift_factor") is not None else AutoEncoderParams.shift_factor,
        norm_groups=config.get("norm_num_groups") or AutoEncoderParams.norm_groups,  # not in the shapes: FLUX's 32
    )


def load_autoencoder(path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                     device: torch.device | str = "cpu") -> AutoEncoder:
    """Load the FLUX autoencoder: BFL ae.safetensors, a diffusers AutoencoderKL folder/file (16 latent channels,
    no quant convs), or an all-in-one file with `first_stage_model.` / `vae.` keys. Same checks as
    load_transformer: everything validated on meta tensors before weights are read."""
    device = torch.device(device)
    files, diffusers_config = _resolve(path, subfolder="vae", config_class="AutoencoderKL")
    source = _Source(files, device)
    all_keys = list(source.where)
    prefix = next((p for p in _VAE_PREFIXES if any(k.startswith(p) for k in all_keys)), "")
    keys = [k[len(prefix):] for k in all_keys if k.startswith(prefix)]
    ignored = len(all_keys) - len(keys)
    if ignored:
        log.warning("load_autoencoder: ignored %d non-autoencoder keys in %s", ignored, path)
    if any(k.startswith(("quant_conv.", "post_quant_conv.")) for k in keys):
        raise CheckpointError(f"{path} has quant_conv / post_quant_conv weights: an SD-style VAE, not FLUX's")
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys):
        convert, fmt = vae_diffusers_to_bfl, "diffusers"
    elif any(k.startswith(("encoder.down.", "decoder.up.")) for k in keys):
        convert, fmt = dict, "bfl"
    else:
        raise CheckpointError(f"unrecognized autoencoder layout in {path}: expected BFL (encoder.down.*) or diffusers "
                              f"(encoder.down_blocks.*) naming; found keys like {sorted(keys)[:5]}")

    def meta(name: str) -> Tensor:
        return torch.empty(source.shape(prefix + name), device="meta")

    def real(name: str) -> Tensor:
        x = source.read(prefix + name)
        return x.to(dtype) if x.is_floating_point() else x

    shapes = {k: tuple(v.shape) for k, v in convert(_View(keys, meta)).items()}
    params = infer_autoencoder_params(shapes, diffusers_config)
    if params.z_channels != 16:
        raise CheckpointError(f"{path} has {params.z_channels} latent channels; FLUX's autoencoder has 16")
    with torch.device("meta"):
        model = AutoEncoder(params)
    _check_against_model(model, shapes, fmt)
    model.load_state_dict(convert(_View(keys, real)), strict=True, assign=True)
    return model.requires_grad_(False).eval()
