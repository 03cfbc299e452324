"""torch.library op for kernels/joint_attention.py: attention over the joint txt+img sequence.

The torch backend is scaled_dot_product_attention (+ the layout change). Inference only: no autograd formula
is registered (a backward through this op raises).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backend import kernel_module, use_triton


@torch.library.custom_op("fluxrt::joint_attention", mutates_args=())
def joint_attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "auto") -> Tensor:
    """q, k, v [B, H, S, D] -> [B, S, H*D], softmax(q k^T / sqrt(D)) v, no mask."""
    kern = kernel_module("joint_attention")
    if use_triton(backend, q, kern):
        return kern.joint_attention(q, k, v)
    return kern.sdpa_attention(q, k, v).contiguous()


@joint_attention.register_fake
def _(q, k, v, backend="auto"):
    B, H, S, D = q.shape
    return torch.empty(B, S, H * D, dtype=q.dtype, device=q.device)
