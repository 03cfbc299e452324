"""load_transformer / load_autoencoder: FLUX.1 checkpoints from safetensors in the formats people actually hold.

Formats (detected from the keys, never from file names):
  BFL single file        flux1-dev.safetensors: double_blocks.*, single_blocks.*, ...
  diffusers              a transformer folder (config.json + shards + index) or one diffusers-named file
  Comfy all-in-one       BFL keys under model.diffusion_model.; VAE / text-encoder keys ignored and reported
  FP8 e4m3fn / e5m2      any of the above stored in fp8, with per-tensor or per-channel `scale_weight` /
                         `weight_scale`: e4m3fn linear weights in BFL naming stay FP8 (fluxrt.quantize.FP8Linear),
                         everything else is upcast to `dtype` (or all: fp8="upcast", which also takes plain-cast
                         fp8 files that have no scales at all)

Order of work, so that a bad input costs nothing and leaves nothing behind:
  1. the arguments (path type, device, dtype, config, fp8 mode), before any file is opened;
  2. the files' headers: readable safetensors, index and shard names, format, tensor dtypes, fp8 scales, and the
     keys and shapes converted as meta tensors against a meta-device model; any problem is one CheckpointError;
  3. the weights, read straight onto `device` and converted (no second copy, no random init), then checked for
     NaN/inf with one device sync for the whole checkpoint before the model is returned.
Pickles are never loaded.

Which model a transformer is (detect_mode: text-to-image, Fill, Canny/Depth, Kontext) comes from its input channels;
Kontext, which has dev's shapes, from its folder's model_index.json or its BFL file name.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .config import FluxConfig, default_axes_dim
from .convert import CheckpointError, diffusers_to_bfl, vae_diffusers_to_bfl
from .devices import resolve_device, resolve_dtype
from .reference import AutoEncoder, AutoEncoderParams, Flux

log = logging.getLogger("fluxrt")

COMFY_PREFIX = "model.diffusion_model."
_FP8_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")  # Comfy "scaled fp8" (old and new names)
_IGNORED_SUFFIXES = (".scale_input", ".input_scale")  # activation scales: meaningful only for FP8 matmuls
_IGNORED_KEYS = ("scaled_fp8", "_quantization_metadata")  # format markers
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")  # safetensors header names
_FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
_FP8_MODES = ("keep", "upcast")
_BFL_MARKERS = ("double_blocks.", "single_blocks.", "img_in.", "final_layer.")
_DIFFUSERS_MARKERS = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder.", "proj_out.")
_VAE_MARKERS = ("encoder.", "decoder.")
_VAE_PREFIXES = ("first_stage_model.", "vae.")  # LDM/Comfy all-in-one files
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_BFL_AE_FILE = "ae.safetensors"  # BFL's repos keep the autoencoder beside flux1-*.safetensors


class _Kind(NamedTuple):
    name: str  # for messages
    subfolder: str  # its folder in a diffusers pipeline folder
    config_class: str  # the diffusers class its config.json names


_TRANSFORMER = _Kind("transformer", "transformer", "FluxTransformer2DModel")
_AUTOENCODER = _Kind("autoencoder", "vae", "AutoencoderKL")


class _Checkpoint(NamedTuple):
    files: list[Path]
    config: dict | None = None  # the diffusers config.json beside the weights
    config_file: Path | None = None
    index: Path | None = None
    weight_map: dict[str, str] = {}  # the index's tensor key -> shard file name


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
                    f"{f} is not a readable safetensors file ({err}): empty, cut short or not safetensors; download "
                    "it again. fluxrt reads weights only from safetensors and never unpickles .ckpt/.pt/.bin files; "
                    "convert those with safetensors.torch.save_file."
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


# ---- 1. arguments ----


def _check_arguments(what: str, path, device, dtype) -> tuple[Path, torch.device, torch.dtype]:
    """The loaders' common arguments, checked and resolved before any file is opened."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{what}: path must be a file or folder path (str or os.PathLike), got "
                         f"{type(path).__name__} {path!r}")
    device = resolve_device(device, f"{what}: device")
    if device.type == "meta":
        raise ValueError(f"{what}: device 'meta' holds no data; load onto 'cpu' or 'cuda'")
    return Path(path), device, resolve_dtype(dtype, device, f"{what}: dtype")


def _check_config_argument(config) -> None:
    if config is not None and not isinstance(config, FluxConfig):
        hint = " (the second positional argument is config; pass dtype= by keyword)" \
            if isinstance(config, (torch.dtype, str, torch.device)) else ""
        raise ValueError(f"load_transformer: config must be a fluxrt.FluxConfig or None, got "
                         f"{type(config).__name__} {config!r}{hint}")


# ---- 2. files, headers, keys, shapes ----


def _resolve(path: Path, kind: _Kind) -> _Checkpoint:
    """The safetensors files of a checkpoint path, with the diffusers config.json and index beside them if any."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist")
    if path.is_dir():
        path = _locate(path, kind)
    if path.is_dir():
        return _folder(path, kind)
    if path.suffix in _PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path} looks like a pickle checkpoint ({path.suffix}); fluxrt loads only safetensors and never "
            "unpickles (arbitrary code). Convert it to .safetensors first."
        )
    return _Checkpoint([path])


def _locate(folder: Path, kind: _Kind) -> Path:
    """In a diffusers pipeline folder or a BFL repo folder, where `kind` lives: its subfolder (transformer/, vae/),
    else BFL's ae.safetensors for the autoencoder, else the folder itself."""
    if (folder / kind.subfolder).is_dir():
        return folder / kind.subfolder
    if kind is _AUTOENCODER and (folder / _BFL_AE_FILE).is_file():
        return folder / _BFL_AE_FILE
    return folder


def _folder(folder: Path, kind: _Kind) -> _Checkpoint:
    config_file = folder / "config.json" if (folder / "config.json").is_file() else None
    config = _read_config(config_file, kind) if config_file is not None else None
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{folder} holds several safetensors indexes {[i.name for i in indexes]}; keep one")
    if indexes:
        weight_map = _read_weight_map(indexes[0])
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{indexes[0]} lists shards that are not in {folder}: {missing}")
        return _Checkpoint(files, config, config_file, indexes[0], weight_map)
    files = sorted(folder.glob("*.safetensors"))
    if kind is _TRANSFORMER and len(files) > 1:
        files = [f for f in files if f.name != _BFL_AE_FILE]  # BFL folder: flux1-dev.safetensors + ae.safetensors
    if not files:
        pickles = [f.name for f in folder.iterdir() if f.suffix in _PICKLE_SUFFIXES]
        hint = f" (found pickle files {pickles}, which fluxrt never loads)" if pickles else ""
        raise CheckpointError(f"no .safetensors files in folder {folder}{hint}")
    return _Checkpoint(files, config, config_file)


def _read_json(file: Path):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{file} is not valid JSON ({err}); fix the file or download it again") from None


def _read_config(file: Path, kind: _Kind) -> dict:
    config = _read_json(file)
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} must hold a JSON object of config fields, got a JSON {type(config).__name__}")
    class_name = config.get("_class_name", kind.config_class)
    if class_name != kind.config_class:
        raise CheckpointError(f"{file} describes a {class_name}, not a {kind.config_class}; pass the {kind.name}'s "
                              "own folder")
    return config


def _read_weight_map(index: Path) -> dict[str, str]:
    """The index's weight_map, refused unless it maps tensor names to .safetensors file names in its own folder
    (a name such as ../../x or /abs/x would make the loader read files outside the model folder)."""
    data = _read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no \"weight_map\" object (tensor name -> shard file name); fix the index "
                              "or download the folder again")
    for key, name in weight_map.items():
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
            raise CheckpointError(f"{index} maps {key!r} to {name!r}, which is not the name of a .safetensors file "
                                  f"in {index.parent}; an index may only name shard files in its own folder")
    return weight_map


def _check_index(source: _Source, ckpt: _Checkpoint) -> None:
    """Every tensor the index places must be in the shard it names (else the download is incomplete or mixed)."""
    for key, name in ckpt.weight_map.items():
        found = source.where.get(key)
        if found is None or found.name != name:
            where = f"it is in {found.name}" if found is not None else "no shard has it"
            raise CheckpointError(f"{ckpt.index} puts {key!r} in {name}, but {where}: the shards do not match their "
                                  "index (an incomplete or mixed download?); download the folder again")


def _check_dtypes(source: _Source, keys: list[str], allowed: tuple[str, ...], what: str) -> None:
    """Header dtypes, before anything is read: an int or bool tensor is a damaged file or not a checkpoint."""
    bad = [k for k in keys if source.dtype_name(k) not in allowed]
    if bad:
        shown = "; ".join(f"{k} ({source.dtype_name(k)}) in {source.where[k]}" for k in bad[:5])
        more = f"; ... ({len(bad)} in all)" if len(bad) > 5 else ""
        raise CheckpointError(f"{what} tensors must be floating point ({', '.join(allowed)}), but these are not: "
                              f"{shown}{more}. The file is damaged or not a FLUX checkpoint; export it again.")


def _detect(keys: list[str], path: Path) -> str:
    if any(k.startswith(COMFY_PREFIX) for k in keys):
        return "comfy"
    if any(k.startswith(_BFL_MARKERS) for k in keys) and not any(k.startswith("transformer_blocks.") for k in keys):
        return "bfl"
    if any(k.startswith(_DIFFUSERS_MARKERS) for k in keys):
        return "diffusers"
    if any(k.startswith(_VAE_MARKERS + _VAE_PREFIXES) for k in keys):
        raise CheckpointError(
            f"{path} is a FLUX autoencoder (VAE) checkpoint, not a transformer (keys like {sorted(keys)[:3]}); pass "
            "the transformer file (e.g. flux1-dev.safetensors) or the transformer/ folder, and give this one to "
            "fluxrt.load_autoencoder"
        )
    raise CheckpointError(
        f"unrecognized checkpoint layout in {path}: expected a FLUX transformer in BFL (double_blocks.*), diffusers "
        f"(transformer_blocks.*) or Comfy (model.diffusion_model.*) naming; found keys like {sorted(keys)[:5]}"
    )


def _shape_reader(shapes: Mapping[str, tuple[int, ...]], what: str, fix: str) -> Callable[[str, int], tuple]:
    """shape(key, rank): a tensor's shape, refused unless it has `rank` dims, none of them zero."""

    def shape(key: str, rank: int) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"cannot infer the {what} config: missing key {key!r}; {fix}")
        found = tuple(shapes[key])
        if len(found) != rank or 0 in found:
            raise CheckpointError(f"cannot infer the {what} config: {key!r} has shape {found}, expected {rank} "
                                  f"non-zero dims; {fix}")
        return found

    return shape


def infer_config(shapes: Mapping[str, tuple[int, ...]]) -> FluxConfig:
    """A FluxConfig from the shapes of a BFL-named state dict (axes_dim by FLUX's rule for the head dim)."""
    shape = _shape_reader(shapes, "model", "the checkpoint is damaged or not a FLUX.1 transformer (or pass config=)")
    keys = list(shapes)
    depth = len({int(m.group(1)) for k in keys if (m := re.match(r"double_blocks\.(\d+)\.", k))})
    depth_single = len({int(m.group(1)) for k in keys if (m := re.match(r"single_blocks\.(\d+)\.", k))})
    hidden, in_channels = shape("img_in.weight", 2)
    if depth:
        (head_dim,) = shape("double_blocks.0.img_attn.norm.query_norm.scale", 1)
        mlp_hidden = shape("double_blocks.0.img_mlp.0.weight", 2)[0]
        qkv_bias = "double_blocks.0.img_attn.qkv.bias" in shapes
    elif depth_single:
        (head_dim,) = shape("single_blocks.0.norm.query_norm.scale", 1)
        mlp_hidden = shape("single_blocks.0.linear1.weight", 2)[0] - 3 * hidden
        qkv_bias = True
    else:
        raise CheckpointError("cannot infer the model config: the checkpoint has no double or single blocks")
    if hidden % head_dim:
        raise CheckpointError(f"hidden size {hidden} is not a multiple of the QK-norm head dim {head_dim}")
    try:
        return FluxConfig(
            in_channels=in_channels,
            out_channels=shape("final_layer.linear.weight", 2)[0],
            vec_in_dim=shape("vector_in.in_layer.weight", 2)[1],
            context_in_dim=shape("txt_in.weight", 2)[1],
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


# ---- 3. weights: read, converted, checked for NaN/inf ----


def _all_finite(x: Tensor) -> Tensor:
    """A 0-dim bool tensor on x's device (no host sync). torch has no isfinite for e4m3fn; its only non-finite
    value is NaN: every exponent and mantissa bit set."""
    if x.dtype == torch.float8_e4m3fn:
        return ((x.view(torch.uint8) & 0x7F) != 0x7F).all()
    return torch.isfinite(x).all()


class _FiniteCheck:
    """Records an all-finite flag per loaded tensor and looks at them once at the end: one device sync for the
    whole checkpoint instead of one per tensor."""

    def __init__(self, source: _Source):
        self.source, self.keys, self.flags = source, [], []

    def add(self, key: str, x: Tensor) -> Tensor:
        self.keys.append(key)
        self.flags.append(_all_finite(x))
        return x

    def raise_if_any(self, dtype: torch.dtype) -> None:
        if not self.flags:
            return
        ok = torch.stack(self.flags).cpu()
        if bool(ok.all()):
            return
        key = self.keys[int(ok.logical_not().nonzero()[0, 0])]  # the first bad one in load order
        hint = " (or its values overflow float16: load with dtype=torch.bfloat16)" if dtype == torch.float16 else ""
        raise CheckpointError(f"{key!r} in {self.source.where[key]} has NaN or infinite values as loaded ({dtype}): "
                              f"the file is damaged{hint}; download or export it again")


# ---- load_transformer ----


def load_transformer(
    path: str | os.PathLike,
    config: FluxConfig | None = None,
    dtype: torch.dtype | str | None = torch.bfloat16,
    device: torch.device | str | None = "cpu",
    fp8: str = "keep",
) -> Flux:
    """Load a FLUX.1 transformer (BFL file, diffusers folder/file, Comfy file, FP8 file) as a reference Flux.

    The config comes from `config=`, else a fluxrt file's metadata, else config.json (diffusers folders),
    else the tensor shapes. The model is returned in eval mode with requires_grad off, on `device`, with its
    floating tensors in `dtype` (a torch dtype or a name such as "bf16"; None: bf16 on CUDA, fp32 on the CPU) —
    except fp8 e4m3fn linear weights of a BFL/Comfy-named file, which stay in FP8 as fluxrt.quantize.FP8Linear
    layers with their scales (`*.scale_weight` / `*.weight_scale`) unless fp8="upcast". fp8 weights in diffusers
    naming are always upcast. An fp8 file without scales is refused, unless fp8="upcast" says it is a plain cast
    (values stored as they are). A folder may be a diffusers pipeline (its transformer/ is used) or a BFL folder
    (ae.safetensors beside the transformer is left out).
    """
    path, device, dtype = _check_arguments("load_transformer", path, device, dtype)
    _check_config_argument(config)
    if fp8 not in _FP8_MODES:
        raise ValueError(f"load_transformer: fp8 must be 'keep' or 'upcast', got {fp8!r}")
    ckpt = _resolve(path, _TRANSFORMER)
    source = _Source(ckpt.files, device)
    _check_index(source, ckpt)
    fmt = _detect(list(source.where), path)
    prefix = COMFY_PREFIX if fmt == "comfy" else ""
    keys, scales = _transformer_keys(source, prefix, path)
    if fmt == "comfy":
        fmt = "bfl" if not any(k.startswith("transformer_blocks.") for k in keys) else "diffusers"
    _check_dtypes(source, [prefix + k for k in keys], _FLOAT_DTYPES + _FP8_DTYPES, "transformer")
    _check_dtypes(source, list(scales.values()), _FLOAT_DTYPES, "fp8 scale")
    kept = _plan_fp8(source, prefix, keys, scales, fp8 == "keep" and fmt != "diffusers", fp8, path, dtype)
    scale_keys = {k[: -len("weight")] + "weight_scale": k for k in kept}  # FP8Linear's scale -> its weight
    finite = _FiniteCheck(source)

    def meta(name: str) -> Tensor:
        if name in scale_keys:
            return torch.empty(source.shape(prefix + scale_keys[name])[0], device="meta")
        return torch.empty(source.shape(prefix + name), device="meta")

    def real(name: str) -> Tensor:
        if name in scale_keys:
            weight = scale_keys[name]
            scale = _scale_vector(source.read(scales[weight]), source.shape(prefix + weight)[0])
            return finite.add(scales[weight], scale)
        x = source.read(prefix + name)
        if name in kept:
            return finite.add(prefix + name, x)
        if name in scales:
            s = source.read(scales[name]).float()
            x = x.float() * (s.reshape(-1, 1) if s.numel() > 1 else s.reshape(()))  # per-row or per-tensor
        return finite.add(prefix + name, x.to(dtype))

    names = keys + list(scale_keys)
    convert = diffusers_to_bfl if fmt == "diffusers" else dict
    shapes = {k: tuple(v.shape) for k, v in convert(_View(names, meta)).items()}
    if config is None:
        config = _checkpoint_config(source, ckpt, shapes)
    with torch.device("meta"):
        model = Flux(config)
        _swap_in_fp8_linears(model, kept, dtype)
    _check_against_model(model, shapes, fmt)

    state_dict = convert(_View(names, real))
    finite.raise_if_any(dtype)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.requires_grad_(False).eval()
    log.info("load_transformer: %s (%s format, %d files) -> %s", path, fmt, len(ckpt.files), config)
    return model


def _transformer_keys(source: _Source, prefix: str, path: Path) -> tuple[list[str], dict[str, str]]:
    """The transformer's tensor names (prefix removed) and its fp8 scales (weight name -> scale's file key);
    other keys (another model's in an all-in-one file, activation scales, format markers) are ignored, logged."""
    keys, ignored, scales = [], [], {}
    for k in source.where:
        name = k[len(prefix):]
        if not k.startswith(prefix) or name in _IGNORED_KEYS or name.endswith(_IGNORED_SUFFIXES):
            ignored.append(k)
        elif name.endswith(_FP8_SCALE_SUFFIXES):
            weight = name.rsplit(".", 1)[0] + ".weight"
            if weight in scales:
                raise CheckpointError(f"{path}: {weight!r} has two fp8 scales, {scales[weight]!r} and {k!r}; keep one")
            scales[weight] = k
        else:
            keys.append(name)
    if ignored:
        log.warning("load_transformer: ignored %d non-transformer keys in %s (e.g. %s)", len(ignored), path, ignored[:3])
    stray = sorted(set(scales) - set(keys))
    if stray:
        raise CheckpointError(f"fp8 scales without a weight: {[scales[k] for k in stray]}")
    return keys, scales


def _plan_fp8(source: _Source, prefix: str, keys: list[str], scales: dict[str, str], keep: bool, fp8: str,
              path: Path, dtype: torch.dtype) -> set[str]:
    """The e4m3fn weights that stay in FP8 (FP8Linear), after checking that every fp8 matrix has a scale that fits
    it. A missing scale is refused rather than taken as 1: a scaled file's weights are stored ~1000x too large
    (scales ~6e-4), and nothing in the header tells a lost scale from a plain cast, except fp8="upcast"."""
    for weight, scale_key in scales.items():
        shape = source.shape(prefix + weight)
        rows = shape[0] if len(shape) == 2 else 1
        if _numel(source.shape(scale_key)) not in (1, rows):
            raise CheckpointError(f"fp8 scale {scale_key!r} has shape {source.shape(scale_key)}, which fits neither "
                                  f"a per-tensor scale nor the {rows} rows of {prefix + weight} {shape}")
    fp8_keys = [k for k in keys if source.dtype_name(prefix + k) in _FP8_DTYPES]
    matrices = [k for k in fp8_keys if k.endswith(".weight") and len(source.shape(prefix + k)) == 2]
    unscaled = [prefix + k for k in matrices if k not in scales]
    if unscaled and scales:
        raise CheckpointError(f"{path}: fp8 weights {unscaled[:5]} ({len(unscaled)} in all) have no scale while "
                              f"{len(scales)} others have one: the file lost some of its scales; load the original "
                              "file")
    if unscaled and fp8 == "keep":
        raise CheckpointError(
            f"{path}: {len(unscaled)} fp8 weights have no scale (`<layer>.scale_weight` or `.weight_scale`), e.g. "
            f"{unscaled[:3]}. A scale of 1 is right only for a plain cast to fp8 (values stored as they are); for a "
            "scaled-fp8 file that lost its scales it is wrong by orders of magnitude. If this file is a plain cast, "
            "pass fp8=\"upcast\" (its fp8 tensors are upcast to dtype); else load the original file with its scales."
        )
    if unscaled:
        log.warning("load_transformer: %s has no fp8 scales; fp8=\"upcast\" reads its %d fp8 tensors as a plain cast "
                    "(scale 1)", path, len(fp8_keys))
    kept = {k for k in matrices if source.dtype_name(prefix + k) == "F8_E4M3"} if keep else set()
    if fp8_keys:
        log.info("load_transformer: %d fp8 tensors (%d with scales): %d kept in fp8, the rest upcast to %s",
                 len(fp8_keys), len(scales), len(kept), dtype)
    return kept


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _scale_vector(scale: Tensor, rows: int) -> Tensor:
    """A file's fp8 scale (scalar, [1] or per-channel [N] / [N, 1]; sizes checked in _plan_fp8) as the fp32 [N]
    FP8Linear stores."""
    scale = scale.float().reshape(-1)
    return scale.expand(rows).clone() if scale.numel() == 1 else scale


def _checkpoint_config(source: _Source, ckpt: _Checkpoint, shapes: Mapping[str, tuple[int, ...]]) -> FluxConfig:
    """Without config=: a fluxrt file's metadata, else the folder's config.json, else the tensor shapes."""
    config = _metadata_config(source)
    if config is not None:
        return config
    if ckpt.config is not None:
        try:
            return FluxConfig.from_diffusers(ckpt.config)
        except ValueError as err:
            raise CheckpointError(f"{ckpt.config_file}: {err}; fix the file or pass config=") from None
    return infer_config(shapes)


def _metadata_config(source: _Source) -> FluxConfig | None:
    """The FluxConfig a fluxrt-written file carries in its safetensors metadata (save_transformer)."""
    for file, handle in source.handles.items():
        text = (handle.metadata() or {}).get("fluxrt_config")
        if text:
            try:
                return FluxConfig(**json.loads(text))
            except (TypeError, ValueError) as err:
                raise CheckpointError(f"the fluxrt_config metadata of {file} is not a valid FluxConfig ({err}); "
                                      "pass config=") from None
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


# ---- load_autoencoder ----


def infer_autoencoder_params(shapes: Mapping[str, tuple[int, ...]], diffusers_config: Mapping | None,
                             config_source: str = "the diffusers AutoencoderKL config") -> AutoEncoderParams:
    """AutoEncoderParams from a BFL-named autoencoder state dict's shapes (scale/shift/groups from the diffusers
    config if any; `config_source` names it in errors)."""
    shape = _shape_reader(shapes, "autoencoder", "the checkpoint is damaged or not FLUX's autoencoder")
    ch, in_channels = shape("encoder.conv_in.weight", 4)[:2]
    levels = len({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    blocks = len({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    scale_factor, shift_factor, norm_groups = _vae_config_settings(diffusers_config or {}, config_source)
    return AutoEncoderParams(
        in_channels=in_channels,
        ch=ch,
        out_ch=shape("decoder.conv_out.weight", 4)[0],
        ch_mult=tuple(shape(f"encoder.down.{i}.block.0.conv1.weight", 4)[0] // ch for i in range(levels)),
        num_res_blocks=blocks,
        z_channels=shape("decoder.conv_in.weight", 4)[1],
        scale_factor=scale_factor,
        shift_factor=shift_factor,
        norm_groups=norm_groups,
    )


def _vae_config_settings(config: Mapping, source: str) -> tuple[float, float, int]:
    """(scaling_factor, shift_factor, norm_num_groups) from a diffusers AutoencoderKL config; a field left out or
    null takes FLUX's value (norm groups are not in the shapes: FLUX's 32)."""
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{source} must be a JSON object of config fields, got a {type(config).__name__}")

    def field(name: str, default, valid: Callable[[object], bool], want: str):
        value = config.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not valid(value):
            raise CheckpointError(f"{source}: field {name!r} must be {want}, got {value!r}; fix the file")
        return value

    def is_number(v) -> bool:
        return isinstance(v, (int, float)) and abs(v) < float("inf")

    return (
        field("scaling_factor", AutoEncoderParams.scale_factor, lambda v: is_number(v) and v > 0, "a number > 0"),
        field("shift_factor", AutoEncoderParams.shift_factor, is_number, "a finite number or null"),
        field("norm_num_groups", AutoEncoderParams.norm_groups, lambda v: isinstance(v, int) and v > 0,
              "a positive int"),
    )


def load_autoencoder(path: str | os.PathLike, dtype: torch.dtype | str | None = torch.bfloat16,
                     device: torch.device | str | None = "cpu") -> AutoEncoder:
    """Load the FLUX autoencoder: BFL ae.safetensors (or a BFL folder holding it), a diffusers AutoencoderKL
    folder/file or pipeline folder (16 latent channels, no quant convs), or an all-in-one file with
    `first_stage_model.` / `vae.` keys. Same checks as load_transformer: arguments first, then everything
    validated on meta tensors before weights are read, then NaN/inf."""
    path, device, dtype = _check_arguments("load_autoencoder", path, device, dtype)
    ckpt = _resolve(path, _AUTOENCODER)
    source = _Source(ckpt.files, device)
    _check_index(source, ckpt)
    all_keys = list(source.where)
    prefix = next((p for p in _VAE_PREFIXES if any(k.startswith(p) for k in all_keys)), "")
    keys = [k[len(prefix):] for k in all_keys if k.startswith(prefix)]
    if len(all_keys) > len(keys):
        log.warning("load_autoencoder: ignored %d non-autoencoder keys in %s", len(all_keys) - len(keys), path)
    convert, fmt = _autoencoder_format(keys, path)
    _check_dtypes(source, [prefix + k for k in keys], _FLOAT_DTYPES, "autoencoder")
    finite = _FiniteCheck(source)

    def meta(name: str) -> Tensor:
        return torch.empty(source.shape(prefix + name), device="meta")

    def real(name: str) -> Tensor:
        return finite.add(prefix + name, source.read(prefix + name).to(dtype))

    shapes = {k: tuple(v.shape) for k, v in convert(_View(keys, meta)).items()}
    params = infer_autoencoder_params(shapes, ckpt.config, str(ckpt.config_file or path))
    if params.z_channels != 16:
        raise CheckpointError(f"{path} has {params.z_channels} latent channels; FLUX's autoencoder has 16")
    try:
        with torch.device("meta"):
            model = AutoEncoder(params)
    except ValueError as err:  # e.g. GroupNorm: channels not divisible by norm_num_groups
        raise CheckpointError(f"{path}: the autoencoder config {params} does not build ({err})") from None
    _check_against_model(model, shapes, fmt)
    state_dict = convert(_View(keys, real))
    finite.raise_if_any(dtype)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.requires_grad_(False).eval()


def _autoencoder_format(keys: list[str], path: Path) -> tuple[Callable, str]:
    if any(k.startswith(("quant_conv.", "post_quant_conv.")) for k in keys):
        raise CheckpointError(f"{path} has quant_conv / post_quant_conv weights: an SD-style VAE, not FLUX's")
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys):
        return vae_diffusers_to_bfl, "diffusers"
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in keys):
        return dict, "bfl"
    if any(k.startswith(_BFL_MARKERS + _DIFFUSERS_MARKERS + (COMFY_PREFIX,)) for k in keys):
        raise CheckpointError(f"{path} is a FLUX transformer checkpoint, not an autoencoder; pass ae.safetensors or "
                              "the vae/ folder (and give this one to fluxrt.load_transformer)")
    raise CheckpointError(f"unrecognized autoencoder layout in {path}: expected BFL (encoder.down.*) or diffusers "
                          f"(encoder.down_blocks.*) naming; found keys like {sorted(keys)[:5]}")


# ---- which FLUX.1 model: text-to-image, Fill, Canny/Depth or Kontext ----

MODES = ("text-to-image", "fill", "control", "kontext")
# each mode's transformer input channels (latents 64 + Fill's masked image 64 and mask 256, or Control's image 64);
# every one outputs the 64 latent channels
MODE_IN_CHANNELS = {"text-to-image": 64, "fill": 384, "control": 128, "kontext": 64}
_MODE_BY_PIPELINE = {  # model_index.json's _class_name
    "FluxPipeline": "text-to-image", "FluxImg2ImgPipeline": "text-to-image", "FluxInpaintPipeline": "text-to-image",
    "FluxFillPipeline": "fill", "FluxControlPipeline": "control", "FluxControlImg2ImgPipeline": "control",
    "FluxControlInpaintPipeline": "control", "FluxKontextPipeline": "kontext", "FluxKontextInpaintPipeline": "kontext",
}


def detect_mode(config: FluxConfig, path: str | os.PathLike | None = None) -> str:
    """The model a FLUX.1 transformer is, one of MODES: "fill" (384 input channels: latents + masked image + mask),
    "control" (128: Canny / Depth), else "kontext" or "text-to-image" (dev, schnell, Krea), which have the same
    shapes: Kontext is told by its folder's model_index.json (_class_name FluxKontextPipeline, in the folder or the
    one above a transformer/ folder) or a BFL file name holding "kontext" (flux1-kontext-dev.safetensors).
    CheckpointError for channels no FLUX.1 model has, or a model_index.json that names another model."""
    by_channels = next((m for m, c in MODE_IN_CHANNELS.items() if c == config.in_channels), None)
    if by_channels is None or config.out_channels != 64:
        raise CheckpointError(
            f"a transformer with {config.in_channels} input and {config.out_channels} output channels is no FLUX.1 "
            "model fluxrt knows: text-to-image and Kontext take 64, Fill 384, Canny/Depth 128, and all output 64")
    index, named = _pipeline_class(Path(path)) if path is not None else (None, None)
    by_name = _MODE_BY_PIPELINE.get(named)
    if by_name is not None and by_name != by_channels and {by_name, by_channels} != {"kontext", "text-to-image"}:
        raise CheckpointError(f"{index} names a {named} ({by_name}), but its transformer takes {config.in_channels} "
                              f"input channels, a {by_channels} model's; the folder mixes two models")
    if by_channels == "text-to-image" and (by_name == "kontext" or (path is not None and _kontext_file(Path(path)))):
        return "kontext"
    return by_channels


def check_mode(mode, config: FluxConfig) -> str:
    """A mode named by the caller (FluxPipeline(mode=...)), checked against the transformer's channels: "kontext"
    and "text-to-image" share a dev's shapes, so either may be named for one; the others must fit."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    detected = detect_mode(config)
    if mode != detected and {mode, detected} != {"kontext", "text-to-image"}:
        raise ValueError(f"mode={mode!r} needs a transformer with {MODE_IN_CHANNELS[mode]} input channels; this one "
                         f"has {config.in_channels} (a {detected} model)")
    return mode


def _pipeline_class(path: Path) -> tuple[Path | None, str | None]:
    """(model_index.json, its _class_name) for a diffusers folder, its transformer/ folder, or a file in either."""
    folder = path if path.is_dir() else path.parent
    candidates = [folder / "model_index.json"]
    if folder.name == _TRANSFORMER.subfolder:
        candidates.append(folder.parent / "model_index.json")
    for candidate in candidates:
        if candidate.is_file():
            data = _read_json(candidate)
            name = data.get("_class_name") if isinstance(data, dict) else None
            return candidate, name if isinstance(name, str) else None
    return None, None


def _kontext_file(path: Path) -> bool:
    """A BFL Kontext file (flux1-kontext-dev.safetensors), or a BFL folder holding one."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    return any("kontext" in f.name.lower() for f in files)
