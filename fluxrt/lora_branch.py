"""LoRAs as an unfused side branch of a compiled transformer: hot-swapped, FP8-safe, several per batch.

    fast.enable_lora_branches(max_rank=64, max_adapters=4)   # once: reserves every linear's padded buffers
    fast.lora.load("style", fluxrt.load_lora("style.safetensors"), scale=0.8)
    fast.lora.set_scales({"style": 0.5}); fast.lora.unload("style")
    fast(img, ..., lora_scales=torch.tensor([[0.8, 0.0], [0.0, 1.0]]))  # per image: [B, max_adapters]

Each FLUX linear gets a LoraBranch: down [R, in] and up [out, R] buffers of a fixed padded rank R (max_rank), and
owner [R], the adapter slot each rank column belongs to. A loaded LoRA takes free columns in every layer it
updates (its alpha / rank folded into up; a LoRA of q, k, v parts of a fused weight takes columns per part, its up
zero outside the part's rows). The linear then computes

    y = W x + b + ((x down^T) * row_scales[b, owner]) up^T        (fluxrt.ops.lora_add)

where row_scales [B, max_adapters + 1] is each image's scale per adapter slot (the last slot, owned by free columns,
is always 0). Loading, unloading and scale changes write into these buffers in place: shapes and addresses never
change, so torch.compile does not recompile and captured CUDA graphs stay valid (fluxrt.graphs leaves these
buffers out of its weights key: a replay reads their current contents). And because the scales are per image, one
batch can mix images that use different LoRAs (fluxrt.serving), which fusing cannot do.

The base weights are never touched, so FP8 weights keep their quantization (the branch runs in the activations'
dtype, reading FP8 rows through their scales where the base linear reads them).

Everything is checked before anything is written: a load that does not fit (a module the model lacks, a layer
whose free rank is too small, all adapter slots taken) changes nothing.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .lora import Lora, _check_fits
from .quantize import BlockLinear, FP8Linear, FP8Rows

ATTRIBUTE = "_fluxrt_lora_branch"  # set on each branched linear module: its LoraBranch (not a submodule)


class LoraBranch(nn.Module):
    """One linear's padded side-branch buffers (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, max_rank: int, pad_slot: int, dtype, device):
        super().__init__()
        self.pad_slot = pad_slot
        # not persistent: a compiled model's state_dict stays the model's weights; LoRAs are loaded from their files
        self.register_buffer("down", torch.zeros(max_rank, in_features, dtype=dtype, device=device), persistent=False)
        self.register_buffer("up", torch.zeros(out_features, max_rank, dtype=dtype, device=device), persistent=False)
        self.register_buffer("owner", torch.full((max_rank,), pad_slot, dtype=torch.int32, device=device),
                             persistent=False)
        # owner's host copy: which columns are free or whose is read here, never from the device (no sync per layer)
        self.owner_host = torch.full((max_rank,), pad_slot, dtype=torch.int32)

    def columns_of(self, slot: int) -> Tensor:
        """The (host) indices of the columns `slot` owns; slot pad_slot: the free ones."""
        return torch.nonzero(self.owner_host == slot).flatten()

    def free_columns(self) -> int:
        return len(self.columns_of(self.pad_slot))

    def write(self, columns: Tensor, down: Tensor, up: Tensor, slot: int) -> None:
        """Columns `columns` (host indices) <- down rows [r, in] and up columns [out, r], owned by `slot`."""
        index = columns.to(self.owner.device)
        self.down.index_copy_(0, index, down.to(self.down))
        self.up.index_copy_(1, index, up.to(self.up))
        self.owner.index_fill_(0, index, slot)
        self.owner_host[columns] = slot

    def clear(self, slot: int) -> None:
        columns = self.columns_of(slot)
        if len(columns):
            index = columns.to(self.owner.device)
            self.down.index_fill_(0, index, 0)
            self.up.index_fill_(1, index, 0)
            self.owner.index_fill_(0, index, self.pad_slot)
            self.owner_host[columns] = self.pad_slot

    def add(self, y: Tensor, x: Tensor | FP8Rows, row_scales: Tensor, backend: str) -> Tensor:
        if isinstance(x, FP8Rows):
            return ops.lora_add(y, x.x8, self.down, self.up, self.owner, row_scales, x.scale, backend=backend)
        return ops.lora_add(y, x, self.down, self.up, self.owner, row_scales, backend=backend)


class LoraBranches(nn.Module):
    """Every branched linear of one model and the adapter slots (a FastFlux's `lora`; see the module docstring)."""

    def __init__(self, linears: Mapping[str, nn.Module], max_rank: int, max_adapters: int, dtype, device):
        super().__init__()
        self.max_rank, self.max_adapters = _positive_int(max_rank, "max_rank"), _positive_int(max_adapters,
                                                                                              "max_adapters")
        self.shapes = {name: (m.out_features, m.in_features) for name, m in linears.items()}
        self.branches = nn.ModuleDict({
            _key(name): LoraBranch(m.in_features, m.out_features, max_rank, max_adapters, dtype, device)
            for name, m in linears.items()})
        # the default scale of each adapter slot; the last one (free columns') stays 0
        self.register_buffer("scales", torch.zeros(max_adapters + 1, dtype=torch.float32, device=device),
                             persistent=False)
        self.adapters: dict[str, int] = {}  # name -> slot, in load order

    def branch(self, module_name: str) -> LoraBranch:
        return self.branches[_key(module_name)]

    # ---- what the forward reads ----

    def row_scales(self, batch: int, per_image: Tensor | None) -> Tensor:
        """[batch, max_adapters + 1] fp32: per_image ([batch, max_adapters], one scale per slot) with the free
        columns' 0 appended, or the loaded scales for every image. A view of `scales` when per_image is None, so a
        captured CUDA graph reads the scales as they are at replay."""
        if per_image is None:  # .float(): a module-wide .to(dtype) casts this buffer too; a no-op in fp32
            return self.scales.expand(batch, -1).float()
        return F.pad(per_image.to(torch.float32), (0, 1))

    def check_per_image(self, per_image: Tensor, batch: int) -> None:
        want = (batch, self.max_adapters)
        if not isinstance(per_image, Tensor) or tuple(per_image.shape) != want or not per_image.is_floating_point():
            got = tuple(per_image.shape) if isinstance(per_image, Tensor) else type(per_image).__name__
            raise ValueError(f"lora_scales must be a float tensor [batch, max_adapters] = {list(want)} (one scale per "
                             f"image and adapter slot: lora.per_image_scales), got {got}")
        if per_image.device != self.scales.device or not torch.isfinite(per_image).all():
            raise ValueError(f"lora_scales must be finite and on {self.scales.device}")

    def per_image_scales(self, choices: list[Mapping[str, float] | None]) -> Tensor:
        """[len(choices), max_adapters] for the forward's lora_scales: image i runs the LoRAs choices[i] names at
        their scales and no other ({} none; None: the loaded scales)."""
        rows = []
        for choice in choices:
            if choice is None:
                rows.append(self.scales[:-1].clone())
                continue
            row = torch.zeros(self.max_adapters, dtype=torch.float32, device=self.scales.device)
            for name, scale in choice.items():
                row[self._slot(name)] = check_scale(scale, f"the scale of LoRA {name!r}")
            rows.append(row)
        return torch.stack(rows)

    # ---- loading ----

    def load(self, name: str, lora: Lora, scale: float = 1.0) -> None:
        """Write `lora` into free columns of its layers under `name`, at `scale` by default; changes nothing when
        anything does not fit."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"a LoRA's name must be a non-empty string, got {name!r}")
        if name in self.adapters:
            raise ValueError(f"a LoRA named {name!r} is loaded already: unload it first, or pick another name")
        scale = check_scale(scale, "scale")
        if len(self.adapters) >= self.max_adapters:
            raise ValueError(f"all {self.max_adapters} LoRA slots are in use ({', '.join(self.adapters)}): unload one "
                             "first, or enable the branches with a larger max_adapters")
        _check_fits(lora.layers, self.shapes, "this compiled transformer")
        placements = self._placements(lora)
        slot = next(s for s in range(self.max_adapters) if s not in self.adapters.values())
        with torch.no_grad():
            for layer, branch, columns in placements:
                up = torch.zeros(branch.up.shape[0], layer.rank, dtype=torch.float32, device=branch.up.device)
                up[layer.rows] = layer.scale * layer.up.to(up)
                branch.write(columns, layer.down, up, slot)
            self.scales[slot] = scale
        self.adapters[name] = slot

    def _placements(self, lora: Lora) -> list:
        """(layer, branch, column indices) for every layer of `lora`; ValueError, before any write, if a branch
        lacks the free rank."""
        taken: dict[str, int] = {}
        for layer in lora.layers:
            taken[layer.module] = taken.get(layer.module, 0) + layer.rank
        short = [f"{module} (needs rank {need}, {self.branch(module).free_columns()} free)"
                 for module, need in taken.items() if need > self.branch(module).free_columns()]
        if short:
            raise ValueError(f"this LoRA does not fit the side branches' free rank (max_rank={self.max_rank} per "
                             f"layer, shared by the loaded LoRAs): {'; '.join(short[:4])}. Unload a LoRA, or enable "
                             "the branches with a larger max_rank")
        placements, next_free = [], {}
        for layer in lora.layers:
            branch = self.branch(layer.module)
            free = next_free.setdefault(layer.module, branch.columns_of(branch.pad_slot))
            placements.append((layer, branch, free[: layer.rank]))
            next_free[layer.module] = free[layer.rank:]
        return placements

    def unload(self, name: str | None = None) -> None:
        """Free one LoRA's columns (every LoRA's with name=None); the branch then adds exactly 0 for it."""
        names = list(self.adapters) if name is None else [self._known(name)]
        with torch.no_grad():
            for gone in names:
                slot = self.adapters.pop(gone)
                for branch in self.branches.values():
                    branch.clear(slot)
                self.scales[slot] = 0

    def set_scales(self, scales: Mapping[str, float]) -> None:
        if not isinstance(scales, Mapping):
            raise TypeError(f"scales must be a dict {{name: scale}}, got {type(scales).__name__}")
        checked = {self._slot(name): check_scale(value, f"scales[{name!r}]") for name, value in scales.items()}
        with torch.no_grad():
            for slot, value in checked.items():
                self.scales[slot] = value

    def loaded(self) -> dict[str, float]:
        """{name: scale} in load order."""
        return {name: float(self.scales[slot]) for name, slot in self.adapters.items()}

    def _known(self, name) -> str:
        if name not in self.adapters:
            raise KeyError(f"no LoRA named {name!r} is loaded (loaded: {sorted(self.adapters) or 'none'})")
        return name

    def _slot(self, name) -> int:
        return self.adapters[self._known(name)]


class LoraLinear(BlockLinear):
    """A block linear with its side branch, as the fast blocks call it: the base linear's output plus the branch,
    then the step's epilogue (GELU, gated residual) applied after the sum. The base still reads FP8 rows from the
    norm or attention kernels where it would without the branch, and the branch reads the same rows."""

    def __init__(self, base: BlockLinear, branch: LoraBranch, row_scales: Tensor, backend: str):
        self.base, self.branch, self.row_scales, self.backend = base, branch, row_scales, backend

    def __call__(self, x: Tensor | FP8Rows) -> Tensor:
        return self.branch.add(self.base(x), x, self.row_scales, self.backend)

    def reads_fp8_rows(self, x: Tensor) -> bool:
        return self.base.reads_fp8_rows(x)

    def after_norm(self, x: Tensor, scale: Tensor, shift: Tensor, backend: str) -> Tensor:
        if self.base.reads_fp8_rows(x):
            return self(FP8Rows(*ops.modulated_layer_norm_fp8(x, scale, shift, backend=backend), x.dtype))
        return super().after_norm(x, scale, shift, backend)

    def after_residual_norm(self, h: Tensor, gate: Tensor, y: Tensor, scale: Tensor, shift: Tensor,
                            backend: str) -> tuple[Tensor, Tensor | FP8Rows]:
        if self.base.reads_fp8_rows(h):
            h, x8, x_scale = ops.gated_residual_norm_fp8(h, gate, y, scale, shift, backend=backend)
            return h, FP8Rows(x8, x_scale, h.dtype)
        return super().after_residual_norm(h, gate, y, scale, shift, backend)


def branched_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear of a fluxrt.reference.Flux a LoRA may update (nn.Linear or FP8Linear), by BFL name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, FP8Linear))}


def attach(model: nn.Module, branches: LoraBranches) -> None:
    """Point each branched linear at its branch (a plain attribute: the model's state_dict keys do not change)."""
    for name in branches.shapes:
        object.__setattr__(model.get_submodule(name), ATTRIBUTE, branches.branch(name))


def branch_of(module: nn.Module) -> LoraBranch | None:
    return getattr(module, ATTRIBUTE, None)


def call_linear(module: nn.Module, x: Tensor, row_scales: Tensor | None, backend: str) -> Tensor:
    """module(x), plus its side branch when it has one and LoRA scales are in play."""
    branch = branch_of(module)
    y = module(x)
    return y if branch is None or row_scales is None else branch.add(y, x, row_scales, backend)


def check_scale(scale, what: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"{what} must be a finite number (a LoRA's scale), got {scale!r}")
    return float(scale)


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
        raise ValueError(f"{what} must be an int in [1, 4096], got {value!r}")
    return value


def _key(module_name: str) -> str:
    return module_name.replace(".", "/")  # ModuleDict keys may not contain dots
