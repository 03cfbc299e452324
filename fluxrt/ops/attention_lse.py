"""torch.library op for kernels/attention_lse.py: attention over one K/V block with the log-sum-exp of each row.

The building block of ring attention (fluxrt.parallel): partial outputs and their lse merge exactly. The torch
backend is the fp32 formula attention_lse_ref (any head dim). Both backends and the fake impl check their inputs the
same way (kernels/attention_lse.check_inputs); the Triton backend also needs D in (64, 128). Inference only: no autograd
formula is registered (a backward through this op raises).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backend import kernel_module, ran, use_triton


@torch.library.custom_op("fluxrt::attention_lse", mutates_args=())
def attention_lse(q: Tensor, k: Tensor, v: Tensor, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """q [B, H, Sq, D], k, v [B, H, Sk, D] (one dtype: float32, bfloat16 or float16) -> (out [B, H, Sq, D],
    lse [B, H, Sq]), both float32: out = softmax(q k^T / sqrt(D)) v, lse = logsumexp(q k^T / sqrt(D)) over keys."""
    kern = kernel_module("attention_lse")
    if use_triton(backend, q, kern):
        return ran("attention_lse", "triton", kern.attention_lse(q, k, v))
    return ran("attention_lse", "torch", kern.attention_lse_ref(q, k, v))


@attention_lse.register_fake
def _(q, k, v, backend="auto"):
    # the same checks, so a traced call (torch.compile) or one with a meta tensor fails as an eager one does
    kernel_module("attention_lse").check_inputs(q, k, v)
    B, H, Sq, D = q.shape
    return (torch.empty(B, H, Sq, D, dtype=torch.float32, device=q.device),
            torch.empty(B, H, Sq, dtype=torch.float32, device=q.device))
