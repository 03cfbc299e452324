"""torch.library ops for the VAE decoder's fused GroupNorm (+ SiLU) and residual add + GroupNorm (+ SiLU), run by
the C++/CUDA extension (csrc/group_norm_silu*, registered as torch.ops.fluxrt_C.*), with their references.

x is [N, C, H, W], contiguous NCHW or channels_last; outputs keep x's memory format (read as NCHW when x is both).
Statistics per (n, group) in fp32-or-better, y = (x - mean) * rstd * weight + bias, SiLU if `silu`, rounded once.

backend: "auto"  fluxrt._C where it has kernels for the tensor's device, else the torch formula. The fallback is
                 announced once (a log warning) and also taken for CUDA tensors with a CPU-only build (torch
                 without CUDA or no nvcc when it was built): the decoder still runs, and the log says why it is slow.
         "ext"   fluxrt._C, or a RuntimeError that says how to build it.
         "torch" the reference formula below, on any device.
Inference only: no autograd formula is registered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _extension
from ._backend import ran

BACKENDS = ("auto", "ext", "torch")


def group_norm_silu_ref(x: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float = 1e-6,
                        silu: bool = True) -> Tensor:
    """F.group_norm in fp32 (fp64 when x is fp64, for a truth to measure fp32 against), SiLU, one rounding."""
    compute = torch.promote_types(x.dtype, torch.float32)
    out = F.group_norm(x.to(compute), num_groups, weight.to(compute), bias.to(compute), eps)
    return (F.silu(out) if silu else out).to(x.dtype)


def add_group_norm_silu_ref(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float = 1e-6,
                            silu: bool = True) -> tuple[Tensor, Tensor]:
    """The unfused composition: s = x + y in x's dtype, then group_norm_silu_ref(s); returns (s, out)."""
    s = x + y
    return s, group_norm_silu_ref(s, weight, bias, num_groups, eps, silu)


def _memory_format(x: Tensor) -> torch.memory_format:
    # The extension's rule (csrc/group_norm_silu.cpp): NCHW when x is contiguous, else channels_last.
    return torch.contiguous_format if x.is_contiguous() else torch.channels_last


def _empty_like_layout(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))


def _use_extension(backend: str, x: Tensor) -> bool:
    """True to run fluxrt._C, False for the torch formula; raises on an impossible request."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if not _extension.available():
        if backend == "ext":
            _extension.require()
        _extension.announce_once(f"fluxrt group_norm_silu ops run as torch formulas: {_extension.missing_reason()}")
        return False
    if not _extension.has_kernels(x.device.type):
        reason = (f"fluxrt._C has no {x.device.type} kernels (CUDA kernels are built only against a CUDA torch with "
                  "nvcc present: rebuild there with `pip install --no-build-isolation -e .`)")
        if backend == "ext":
            raise RuntimeError(f"backend='ext': {reason}")
        _extension.announce_once(f"fluxrt group_norm_silu ops run as torch formulas on {x.device.type}: {reason}")
        return False
    return True


@torch.library.custom_op("fluxrt::group_norm_silu", mutates_args=())
def group_norm_silu(x: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float = 1e-6, silu: bool = True,
                    backend: str = "auto") -> Tensor:
    """SiLU(GroupNorm(x)) (no SiLU when silu=False); x [N, C, H, W], weight/bias [C] in x's dtype or fp32."""
    if _use_extension(backend, x):
        return ran("group_norm_silu", "ext", torch.ops.fluxrt_C.group_norm_silu(x, weight, bias, num_groups, eps, silu))
    out = group_norm_silu_ref(x, weight, bias, num_groups, eps, silu).contiguous(memory_format=_memory_format(x))
    return ran("group_norm_silu", "torch", out)


@group_norm_silu.register_fake
def _(x, weight, bias, num_groups, eps=1e-6, silu=True, backend="auto"):
    return _empty_like_layout(x)


@torch.library.custom_op("fluxrt::add_group_norm_silu", mutates_args=())
def add_group_norm_silu(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float = 1e-6,
                        silu: bool = True, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(s, SiLU(GroupNorm(s))) with s = x + y rounded to x's dtype: a ResNet block's residual add fused with the
    next block's norm, saving a re-read of s. x and y: same shape, dtype and memory format."""
    if _use_extension(backend, x):
        return ran("add_group_norm_silu", "ext",
                   torch.ops.fluxrt_C.add_group_norm_silu(x, y, weight, bias, num_groups, eps, silu))
    fmt = _memory_format(x)
    s, out = add_group_norm_silu_ref(x, y, weight, bias, num_groups, eps, silu)
    return ran("add_group_norm_silu", "torch", (s.contiguous(memory_format=fmt), out.contiguous(memory_format=fmt)))


@add_group_norm_silu.register_fake
def _(x, y, weight, bias, num_groups, eps=1e-6, silu=True, backend="auto"):
    return _empty_like_layout(x), _empty_like_layout(x)


def _register_extension_fakes() -> None:
    """The extension's own ops need fakes too (torch.compile / opcheck on torch.ops.fluxrt_C.*). csrc names this
    module as where they live (set_python_module), so they are registered here, when fluxrt._C is first loaded:
    the ops must exist first, and `import fluxrt` must not load the extension."""

    @torch.library.register_fake("fluxrt_C::group_norm_silu")
    def _(x, weight, bias, num_groups, eps, silu):
        return _empty_like_layout(x)

    @torch.library.register_fake("fluxrt_C::add_group_norm_silu")
    def _(x, y, weight, bias, num_groups, eps, silu):
        return _empty_like_layout(x), _empty_like_layout(x)


_extension.on_load(_register_extension_fakes)
