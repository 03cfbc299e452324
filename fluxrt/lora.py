"""FLUX.1 LoRAs: read every common file format into one structure, fuse into a model's weights, unfuse exactly.

    lora = fluxrt.load_lora("style.safetensors")        # diffusers/PEFT, kohya, BFL/ComfyUI or XLabs naming
    fused = lora.fuse(model, scale=0.8)                 # model: fluxrt.reference.Flux, bf16/fp16/fp32 weights
    fused.unfuse()                                      # the weights come back bit for bit

A Lora is a tuple of LoraLayers keyed by fluxrt.reference.Flux's BFL module names (`double_blocks.0.img_attn.qkv`,
`single_blocks.3.linear1`). Each layer has its own A [rank, in], B [rows, rank] and alpha (scale alpha / rank; no
alpha in the file: 1.0, as diffusers does) and updates rows [row_start, row_start + rows) of its module: all of
them, or one part of a fused BFL weight (q, k, v of qkv; q, k, v or mlp of linear1) when the LoRA was trained on
diffusers' split layers. Tensors stay as the file stores them; arithmetic is fp32.

Loading is all or nothing: every key is placed on a FLUX linear layer, or CheckpointError lists the ones that
are not (unknown names, an A without its B, mismatched ranks, shapes that do not fit the model's config,
non-finite values, text-encoder parts, which fluxrt does not apply for now). Files are read with safetensors
only, never unpickled.

Fusing keeps the original weights (on the host, so the accelerator holds no second copy) and writes
W + scale * alpha/rank * B A, computed in fp32 and rounded once to W's dtype; unfuse copies the originals back.
A fuse that cannot apply (a module missing, a shape that does not fit, FP8 weights, where fusing would add
requantization error) changes nothing.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from .convert import CheckpointError
from .lora_formats import RawLayer, parse_keys

_FUSABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' save_lora_weights writes the PEFT config here


@dataclass(frozen=True, eq=False)
class LoraLayer:
    """One low-rank update: rows [row_start, row_start + rows) of `module`'s weight += alpha/rank * up @ down."""

    module: str  # BFL module name, e.g. "double_blocks.0.img_attn.qkv"
    down: Tensor  # A [rank, in_features]
    up: Tensor  # B [rows, rank]
    alpha: float
    row_start: int = 0
    part: str | None = None  # "q" | "k" | "v" | "qkv" | "mlp": a row slice of a fused weight; None: every row
    key: str = ""  # the file's name for this layer, for messages

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def in_features(self) -> int:
        return self.down.shape[1]

    @property
    def rows(self) -> slice:
        return slice(self.row_start, self.row_start + self.up.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, device: torch.device | str | None = None) -> Tensor:
        """scale * B A in fp32: [rows, in_features]."""
        up, down = self.up.to(device, torch.float32), self.down.to(device, torch.float32)
        return self.scale * (up @ down)


@dataclass(frozen=True, eq=False)
class Lora:
    """A FLUX.1 transformer LoRA in BFL module names (see the module docstring)."""

    layers: tuple[LoraLayer, ...]
    format: str  # "diffusers" | "kohya" | "kohya (diffusers names)" | "bfl" | "xlabs"

    @property
    def modules(self) -> list[str]:
        return sorted({layer.module for layer in self.layers})

    def check(self, config) -> None:
        """CheckpointError unless every layer fits a fluxrt.reference.Flux built from `config` (a FluxConfig)."""
        what = (f"a FLUX model with hidden size {config.hidden_size}, {config.depth} double and "
                f"{config.depth_single_blocks} single blocks{'' if config.guidance_embed else ', no guidance_in'}")
        _check_fits(self.layers, _linear_shapes_of_config(config), what)

    def fuse(self, model: nn.Module, scale: float = 1.0) -> "FusedLora":
        """Add scale * this LoRA into `model`'s weights (a fluxrt.reference.Flux); returns the handle to unfuse."""
        return _fuse(self, model, scale)


class FusedLora:
    """A LoRA fused into a model: holds the original weights until unfuse() puts them back.

    The model keeps its fused LoRAs in a stack (attribute _fluxrt_fused_loras), so unfuse can insist on the reverse
    order of fusing, the only order in which each restore gives back exactly the weights the fuse below wrote."""

    def __init__(self, model: nn.Module, originals: dict[str, Tensor], versions: dict[str, int]):
        self._model = model
        self._originals = originals
        self._versions = versions  # each weight's version counter right after the last write this stack made
        self._stack().append(self)

    def _stack(self) -> list["FusedLora"]:
        if not hasattr(self._model, "_fluxrt_fused_loras"):
            self._model._fluxrt_fused_loras = []
        return self._model._fluxrt_fused_loras

    def unfuse(self) -> None:
        """Restore the weights this fuse changed, bit for bit. Refused, changing nothing, if another LoRA was fused
        on top and is still fused, if the weights were overwritten since (load_state_dict, a dtype change), or if
        this LoRA was unfused already."""
        if self._originals is None:
            raise RuntimeError("this LoRA was unfused already")
        stack = self._stack()
        if stack[-1] is not self:
            raise RuntimeError(f"cannot unfuse: {len(stack) - 1 - stack.index(self)} LoRA(s) fused after this one are "
                               "still fused; unfuse LoRAs in the reverse order of fusing")
        weights = {name: self._model.get_submodule(name).weight for name in self._originals}
        changed = [name for name, w in weights.items() if _version(w) != self._versions[name]
                   or w.shape != self._originals[name].shape or w.dtype != self._originals[name].dtype]
        if changed:
            raise RuntimeError(
                f"cannot unfuse: the weights of {changed[:4]}{' ...' if len(changed) > 4 else ''} changed after this "
                "LoRA was fused (a load_state_dict, a dtype change); the originals it holds no longer describe them")
        with torch.no_grad():
            for name, weight in weights.items():
                weight.copy_(self._originals[name])
        stack.pop()
        for name, weight in weights.items():  # the fuse below now owns these exact bits again
            below = next((f for f in reversed(stack) if name in f._versions), None)
            if below is not None:
                below._versions[name] = _version(weight)
        self._originals = None

    @property
    def fused(self) -> bool:
        """Whether this LoRA is still fused and can be unfused (not unfused, not kept)."""
        return self._originals is not None

    def keep(self) -> None:
        """Make this fuse permanent: the originals it holds (a host copy of every weight it changed) are released and
        it can no longer be unfused. LoRAs fused after it unfuse as before (their originals include this one)."""
        if self._originals is None:
            raise RuntimeError("this LoRA was unfused or kept already")
        self._stack().remove(self)
        self._originals = None


def fused_loras(model: nn.Module) -> list[FusedLora]:
    """The LoRAs fused into `model` that can still be unfused, in the order they were fused."""
    return list(getattr(model, "_fluxrt_fused_loras", []))


def load_lora(path_or_state_dict: str | os.PathLike | Mapping[str, Tensor], config=None) -> Lora:
    """Read a FLUX.1 LoRA (a .safetensors file, a folder holding one, or a state dict) into a Lora.

    config (a FluxConfig): also check that every layer fits that model. CheckpointError on anything not applied."""
    state_dict, metadata = _read(path_or_state_dict)
    fmt, raw_layers = parse_keys(state_dict)
    alphas = _metadata_alphas(metadata, fmt, raw_layers)
    built = (_build_layer(raw, alphas.get(raw.key)) for raw in raw_layers)
    layers = tuple(sorted((part for layer in built for part in _split_block_diagonal(layer)),
                          key=lambda layer: (layer.module, layer.row_start)))
    lora = Lora(layers=layers, format=fmt)
    if config is not None:
        lora.check(config)
    return lora


# ---- reading ----


def _read(source) -> tuple[Mapping[str, Tensor], dict[str, str]]:
    if isinstance(source, Mapping):
        bad = [k for k, v in source.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
        if bad:
            raise CheckpointError(f"a LoRA state dict maps names to tensors; these entries do not: {bad[:6]}")
        return source, {}
    if not isinstance(source, (str, os.PathLike)):
        raise CheckpointError(f"load_lora takes a path or a state dict, got a {type(source).__name__}")
    path = _safetensors_file(Path(source))
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); fluxrt reads LoRAs from "
                              "safetensors only (never pickle): convert the file to .safetensors") from None


def _safetensors_file(path: Path) -> Path:
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        preferred = path / "pytorch_lora_weights.safetensors"  # the name diffusers' save_lora_weights writes
        if preferred in files:
            return preferred
        if len(files) != 1:
            raise CheckpointError(f"{path} is a folder with {len(files)} .safetensors files; pass the LoRA file's "
                                  "path")
        return files[0]
    if not path.is_file():
        raise CheckpointError(f"no LoRA file at {path}")
    return path


def _metadata_alphas(metadata: Mapping[str, str], fmt: str, raw_layers: list[RawLayer]) -> dict[str, float]:
    """Per-layer alphas from diffusers' PEFT config metadata (lora_alpha, alpha_pattern), {} when there is none."""
    if _METADATA_KEY not in metadata or fmt != "diffusers":
        return {}
    try:
        packed = json.loads(metadata[_METADATA_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"the file's {_METADATA_KEY} metadata is not valid JSON ({e})") from None
    config = {k[len("transformer."):]: v for k, v in packed.items() if k.startswith("transformer.")}
    if not config:
        return {}
    for flag in ("use_dora", "use_rslora"):
        if config.get(flag):
            raise CheckpointError(f"this LoRA was trained with {flag}=True, which fluxrt does not apply")
    if any(raw.alpha is not None for raw in raw_layers):
        raise CheckpointError(f"this LoRA gives alphas twice, as .alpha keys and in its {_METADATA_KEY} metadata")
    default = config.get("lora_alpha", config.get("r"))
    patterns = config.get("alpha_pattern") or {}
    alphas = {}
    for raw in raw_layers:
        module = raw.key[len("transformer."):] if raw.key.startswith("transformer.") else raw.key
        # PEFT's rule (peft.utils.other.get_pattern_key): a pattern matches a module name's dotted tail.
        match = next((p for p in patterns if _pattern_matches(p, module)), None)
        alpha = patterns[match] if match is not None else default
        if alpha is not None:
            alphas[raw.key] = float(alpha)
    return alphas


def _pattern_matches(pattern: str, module: str) -> bool:
    return re.match(rf"(.*\.)?({pattern})$", module) is not None


# ---- building and checking layers ----


def _build_layer(raw: RawLayer, metadata_alpha: float | None) -> LoraLayer:
    roles = {"an alpha": raw.alpha, "A (down)": raw.down, "B (up)": raw.up}
    missing = [role for role in ("A (down)", "B (up)") if roles[role] is None]
    if missing:
        present = " and ".join(role for role, t in roles.items() if t is not None)
        raise CheckpointError(f"layer {raw.key} has {present} but no {', '.join(missing)}: the file is incomplete")
    for role, t in (("A", raw.down), ("B", raw.up)):
        if t.ndim != 2 or not t.is_floating_point():
            raise CheckpointError(f"{raw.key}'s {role} is a {t.dtype} tensor of shape {tuple(t.shape)}; a LoRA "
                                  "factor is a 2-dim floating-point matrix")
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{raw.key}'s {role} holds NaN or infinite values: the file is damaged")
    rank = raw.down.shape[0]
    if raw.up.shape[1] != rank or rank == 0:
        raise CheckpointError(f"{raw.key}: A is {tuple(raw.down.shape)} and B {tuple(raw.up.shape)}; B's columns "
                              "must equal A's rows (the rank), which must be at least 1")
    up = _swap_halves(raw) if raw.part == "swap" else raw.up
    part = None if raw.part == "swap" else raw.part
    return LoraLayer(module=raw.module, down=raw.down, up=up, alpha=_alpha(raw, metadata_alpha, rank),
                     row_start=_row_start(raw, part), part=part, key=raw.key)


def _split_block_diagonal(layer: LoraLayer) -> tuple[LoraLayer, ...]:
    """sd-scripts' split_qkv training saves the q, k, v (and mlp) LoRAs of a fused weight as one layer of rank n*r
    whose B is block-diagonal (part i's rows use only columns i*r:(i+1)*r). Kept as n row-sliced layers of rank r
    (alpha / n keeps alpha / rank), the update is the same and costs a side branch n times less; a B with anything
    off the diagonal blocks stays one layer."""
    parts = {"qkv": ("q", "k", "v"), "linear1": ("q", "k", "v", "mlp")}.get(layer.module.rsplit(".", 1)[-1])
    if layer.part is not None or parts is None or layer.rank % len(parts):
        return (layer,)
    hidden, rows = layer.in_features, layer.up.shape[0]
    if rows != 3 * hidden if len(parts) == 3 else rows <= 3 * hidden:
        return (layer,)  # not a fused weight's shape: the fit check names the problem
    r = layer.rank // len(parts)
    starts = [i * hidden for i in range(len(parts))] + [rows]
    diagonal = torch.zeros(layer.up.shape, dtype=torch.bool)
    for i in range(len(parts)):
        diagonal[starts[i]:starts[i + 1], i * r:(i + 1) * r] = True
    if layer.up[~diagonal.to(layer.up.device)].any():
        return (layer,)
    return tuple(
        LoraLayer(module=layer.module, down=layer.down[i * r:(i + 1) * r], up=layer.up[starts[i]:starts[i + 1],
                  i * r:(i + 1) * r], alpha=layer.alpha / len(parts), row_start=starts[i], part=part, key=layer.key)
        for i, part in enumerate(parts))


def _alpha(raw: RawLayer, metadata_alpha: float | None, rank: int) -> float:
    if raw.alpha is None:
        return float(rank) if metadata_alpha is None else metadata_alpha  # no alpha: scale 1.0, as diffusers does
    is_number = raw.alpha.is_floating_point() or raw.alpha.dtype in (torch.int32, torch.int64)
    if raw.alpha.numel() != 1 or not is_number:
        raise CheckpointError(f"{raw.key}.alpha is a {raw.alpha.dtype} tensor of shape {tuple(raw.alpha.shape)}; "
                              "an alpha is one number")
    alpha = float(raw.alpha.reshape(()).item())
    if not math.isfinite(alpha):
        raise CheckpointError(f"{raw.key}.alpha is {alpha}: the file is damaged")
    return alpha


def _swap_halves(raw: RawLayer) -> Tensor:
    if raw.up.shape[0] % 2:
        raise CheckpointError(f"{raw.key}'s B has {raw.up.shape[0]} rows; diffusers' norm_out has (scale, shift) "
                              "halves, so it must be even")
    scale, shift = raw.up.chunk(2, dim=0)
    return torch.cat([shift, scale], dim=0)


def _row_start(raw: RawLayer, part: str | None) -> int:
    """Where a part sits in its fused BFL weight: q, k, v are hidden rows each (hidden = the layer's in_features),
    mlp follows them; a part's own row count is checked here, the fused total against the model later."""
    hidden, rows = raw.down.shape[1], raw.up.shape[0]
    expected = {"q": hidden, "k": hidden, "v": hidden, "qkv": 3 * hidden}.get(part)
    if expected is not None and rows != expected:
        raise CheckpointError(f"{raw.key} updates {rows} rows, but the {part} part of {raw.module} has {expected} "
                              f"(its input width {hidden} x {expected // hidden})")
    return {"k": hidden, "v": 2 * hidden, "mlp": 3 * hidden}.get(part, 0)


def _linear_shapes_of_config(config) -> dict[str, tuple[int, int]]:
    from .reference import Flux

    with torch.device("meta"):  # shapes only: builds no weights
        model = Flux(config)
    return _linear_shapes(model)


def _linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _check_fits(layers, shapes: Mapping[str, tuple[int, int]], what: str) -> None:
    problems = []
    for layer in layers:
        if layer.module not in shapes:
            problems.append(f"{layer.key} targets {layer.module}, which {what} does not have")
            continue
        out_features, in_features = shapes[layer.module]
        rows = layer.rows
        fits_rows = (rows.stop == out_features if layer.part in (None, "mlp") else rows.stop <= out_features)
        if layer.in_features != in_features or not fits_rows or (layer.part is None and rows.start != 0):
            problems.append(f"{layer.key} ({layer.module} rows {rows.start}:{rows.stop}, input {layer.in_features}) "
                            f"does not fit its weight [{out_features}, {in_features}]")
    if problems:
        more = f" ... ({len(problems)} in all)" if len(problems) > 4 else ""
        raise CheckpointError(f"this LoRA does not fit {what}: " + "; ".join(problems[:4]) + more
                              + ". It was made for another FLUX model")


# ---- fusing ----


def _version(t: Tensor) -> int:
    return t._version  # bumped by every in-place write (copy_, load_state_dict), so unfuse can see overwrites


def _fuse(lora: Lora, model: nn.Module, scale: float) -> FusedLora:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse needs a fluxrt.reference.Flux (an nn.Module), got a {type(model).__name__}")
    _check_fusable(lora, model)
    targets = {name: model.get_submodule(name).weight for name in lora.modules}
    # Check everything first, then write; a failure while writing (out of memory) puts back what was written.
    originals: dict[str, Tensor] = {}
    try:
        with torch.no_grad():
            for name, weight in targets.items():
                originals[name] = weight.detach().to("cpu", copy=True)
                weight.copy_(_fused_weight(weight, [la for la in lora.layers if la.module == name], scale))
    except BaseException:
        with torch.no_grad():
            for name, original in originals.items():
                targets[name].copy_(original)
        raise
    return FusedLora(model, originals, {name: _version(w) for name, w in targets.items()})


def _check_fusable(lora: Lora, model: nn.Module) -> None:
    modules = dict(model.named_modules())
    not_linear = [n for n in lora.modules if n in modules and not isinstance(modules[n], nn.Linear)]
    if not_linear:
        kinds = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in not_linear[:4])
        raise TypeError(f"cannot fuse into {kinds}: fuse needs nn.Linear layers with bf16/fp16/fp32 weights (a "
                        "fluxrt.reference.Flux before compile or quantization; fusing into FP8 weights would add "
                        "requantization error): fuse first, then quantize or compile")
    _check_fits(lora.layers, _linear_shapes(model), f"this {type(model).__name__}")
    bad = sorted({str(modules[n].weight.dtype) for n in lora.modules if modules[n].weight.dtype not in _FUSABLE_DTYPES})
    if bad:
        raise TypeError(f"cannot fuse into {', '.join(bad)} weights: fusing a LoRA into FP8 weights would add "
                        "requantization error; fuse into the bf16/fp32 model before quantizing")


def _fused_weight(weight: Tensor, layers: list[LoraLayer], scale: float) -> Tensor:
    fused = weight.detach().to(torch.float32, copy=True)
    for layer in layers:
        fused[layer.rows] += scale * layer.delta(weight.device)
    return fused.to(weight.dtype)
