"""torch.library op for kernels/quantize_rows.py: dynamic per-row e4m3fn quantization (optionally GELU-tanh first
on columns [gelu_from, K)) of W8A8 GEMM inputs that no norm kernel emitted already.

Inference only: no autograd formula is registered (a backward through this op raises).
"""

from __future__ import annotations

from typing import Optional  # not `int | None`: torch.library schema inference across torch 2.11-2.13

import torch
from torch import Tensor

from ._backend import kernel_module, ran, use_triton


@torch.library.custom_op("fluxrt::quantize_rows", mutates_args=())
def quantize_rows(x: Tensor, gelu_from: Optional[int] = None, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """x [..., K] -> (x8 e4m3fn [..., K], scale fp32 [...]) with x ~ x8 * scale (GELU'd columns: gelu(x))."""
    k = kernel_module("quantize_rows")
    if use_triton(backend, x, k):
        return ran("quantize_rows", "triton", k.quantize_rows(x, gelu_from))
    return ran("quantize_rows", "torch", k.quantize_rows_ref(x, gelu_from))


@quantize_rows.register_fake
def _(x, gelu_from=None, backend="auto"):
    return (torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device),
            torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device))
