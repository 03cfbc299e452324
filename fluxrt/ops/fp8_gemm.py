"""torch.library op for kernels/fp8_gemm.py: FP8 weight-only linear with a fused epilogue.

The torch backend is fp8_linear_ref (dequantize, fp32 matmul, epilogue, one rounding to x's dtype).
Inference only: no autograd formula is registered (a backward through this op raises).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._backend import kernel_module, ran, use_triton


@torch.library.custom_op("fluxrt::fp8_linear", mutates_args=())
def fp8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor] = None,
               residual: Optional[Tensor] = None, gate: Optional[Tensor] = None, epilogue: str = "none",
               backend: str = "auto") -> Tensor:
    """x [..., K] @ (weight [N, K] e4m3fn * weight_scale [N])^T + bias, then epilogue "none" | "gelu_tanh" |
    "gated_residual" (residual + gate * y; x [B, L, K], residual [B, L, N], gate [B, N] or [B, 1, N])."""
    kern = kernel_module("fp8_gemm")
    if use_triton(backend, x, kern):
        return ran("fp8_linear", "triton", kern.fp8_linear(x, weight, weight_scale, bias, residual, gate, epilogue))
    return ran("fp8_linear", "torch",
               kern.fp8_linear_ref(x, weight, weight_scale, bias, residual, gate, epilogue).contiguous())


@fp8_linear.register_fake
def _(x, weight, weight_scale, bias=None, residual=None, gate=None, epilogue="none", backend="auto"):
    return torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device)


@torch.library.custom_op("fluxrt::w8a8_linear", mutates_args=())
def w8a8_linear(x8: Tensor, x_scale: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor] = None,
                residual: Optional[Tensor] = None, gate: Optional[Tensor] = None, epilogue: str = "none",
                out_dtype: torch.dtype = torch.bfloat16, backend: str = "auto") -> Tensor:
    """(x8 [..., K] e4m3fn * x_scale [...]) @ (weight [N, K] e4m3fn * weight_scale [N])^T + bias, then the epilogue
    (as fp8_linear's), in out_dtype: the Triton fp8 x fp8 GEMM; the torch backend is w8a8_linear_ref (fp32)."""
    kern = kernel_module("fp8_gemm")
    if use_triton(backend, x8, kern):
        return ran("w8a8_linear", "triton",
                   kern.w8a8_linear(x8, x_scale, weight, weight_scale, bias, residual, gate, epilogue, out_dtype))
    return ran("w8a8_linear", "torch", kern.w8a8_linear_ref(x8, x_scale, weight, weight_scale, bias, residual, gate,
                                                            epilogue, out_dtype).contiguous())


@w8a8_linear.register_fake
def _(x8, x_scale, weight, weight_scale, bias=None, residual=None, gate=None, epilogue="none",
      out_dtype=torch.bfloat16, backend="auto"):
    return torch.empty((*x8.shape[:-1], weight.shape[0]), dtype=out_dtype, device=x8.device)
