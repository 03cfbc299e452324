"""torch.library op for kernels/lora.py: the LoRA side branch, y + ((x A^T) * per-row adapter scales) B^T.

The torch backend is lora_add_ref (fp32, one rounding to y's dtype). Inference only: no autograd formula.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._backend import kernel_module, ran, use_triton


@torch.library.custom_op("fluxrt::lora_add", mutates_args=())
def lora_add(y: Tensor, x: Tensor, down: Tensor, up: Tensor, owner: Tensor, row_scales: Tensor,
             x_scale: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """y [B, ..., N] + ((x [B, ..., K] @ down [R, K]^T) * row_scales[b, owner]) @ up [N, R]^T (kernels/lora.py)."""
    k = kernel_module("lora")
    if use_triton(backend, x, k):
        return ran("lora_add", "triton", k.lora_add(y, x, down, up, owner, row_scales, x_scale))
    return ran("lora_add", "torch", k.lora_add_ref(y, x, down, up, owner, row_scales, x_scale))


@lora_add.register_fake
def _(y, x, down, up, owner, row_scales, x_scale=None, backend="auto"):
    return torch.empty_like(y)
