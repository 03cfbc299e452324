"""torch.library ops for kernels/modulated_norm.py: modulated LayerNorm, gated residual (+ next norm).

Inference only: no autograd formula is registered (a backward through these ops raises).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backend import kernel_module, ran, use_triton


def _kernels():
    return kernel_module("modulated_norm")


@torch.library.custom_op("fluxrt::modulated_layer_norm", mutates_args=())
def modulated_layer_norm(x: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-6, backend: str = "auto") -> Tensor:
    """LN(x) * (1 + scale) + shift; x [B, L, D], scale/shift [B, D] or [B, 1, D]."""
    k = _kernels()
    if use_triton(backend, x, k):
        return ran("modulated_layer_norm", "triton", k.modulated_layer_norm(x, scale, shift, eps))
    return ran("modulated_layer_norm", "torch", k.modulated_layer_norm_ref(x, scale, shift, eps).contiguous())


@modulated_layer_norm.register_fake
def _(x, scale, shift, eps=1e-6, backend="auto"):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("fluxrt::gated_residual_norm", mutates_args=())
def gated_residual_norm(x: Tensor, gate: Tensor, y: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-6,
                        backend: str = "auto") -> tuple[Tensor, Tensor]:
    """h = x + gate * y and LN(h) * (1 + scale) + shift in one pass; returns (h, normed)."""
    k = _kernels()
    if use_triton(backend, x, k):
        return ran("gated_residual_norm", "triton", k.gated_residual_norm(x, gate, y, scale, shift, eps))
    h, out = k.gated_residual_norm_ref(x, gate, y, scale, shift, eps)
    return ran("gated_residual_norm", "torch", (h.contiguous(), out.contiguous()))


@gated_residual_norm.register_fake
def _(x, gate, y, scale, shift, eps=1e-6, backend="auto"):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("fluxrt::gated_residual", mutates_args=())
def gated_residual(x: Tensor, gate: Tensor, y: Tensor, backend: str = "auto") -> Tensor:
    """x + gate * y; x, y [B, L, D], gate [B, D] or [B, 1, D]."""
    k = _kernels()
    if use_triton(backend, x, k):
        return ran("gated_residual", "triton", k.gated_residual(x, gate, y))
    return ran("gated_residual", "torch", k.gated_residual_ref(x, gate, y).contiguous())


@gated_residual.register_fake
def _(x, gate, y, backend="auto"):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# ---- W8A8: the normalised rows leave the kernel as e4m3fn with per-row scales ----


def _fp8_fakes(x):
    B, L, D = x.shape
    return (torch.empty(B, L, D, dtype=torch.float8_e4m3fn, device=x.device),
            torch.empty(B, L, dtype=torch.float32, device=x.device))


@torch.library.custom_op("fluxrt::modulated_layer_norm_fp8", mutates_args=())
def modulated_layer_norm_fp8(x: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-6,
                             backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(LN(x) * (1 + scale) + shift) quantized per row: (out8 e4m3fn [B, L, D], row scale fp32 [B, L])."""
    k = _kernels()
    if use_triton(backend, x, k):
        return ran("modulated_layer_norm_fp8", "triton", k.modulated_layer_norm_fp8(x, scale, shift, eps))
    return ran("modulated_layer_norm_fp8", "torch", k.modulated_layer_norm_fp8_ref(x, scale, shift, eps))


@modulated_layer_norm_fp8.register_fake
def _(x, scale, shift, eps=1e-6, backend="auto"):
    return _fp8_fakes(x)


@torch.library.custom_op("fluxrt::gated_residual_norm_fp8", mutates_args=())
def gated_residual_norm_fp8(x: Tensor, gate: Tensor, y: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-6,
                            backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """h = x + gate * y and LN(h) * (1 + scale) + shift quantized per row: (h, out8, row scale)."""
    k = _kernels()
    if use_triton(backend, x, k):
        return ran("gated_residual_norm_fp8", "triton", k.gated_residual_norm_fp8(x, gate, y, scale, shift, eps))
    h, out8, row_scale = k.gated_residual_norm_fp8_ref(x, gate, y, scale, shift, eps)
    return ran("gated_residual_norm_fp8", "torch", (h.contiguous(), out8, row_scale))


@gated_residual_norm_fp8.register_fake
def _(x, gate, y, scale, shift, eps=1e-6, backend="auto"):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device), *_fp8_fakes(x))
