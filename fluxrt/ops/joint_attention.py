"""torch.library op for kernels/joint_attention.py: attention over the joint txt+img sequence.

The torch backend is scaled_dot_product_attention (+ the layout change). Inference only: no autograd formula
is registered (a backward through this op raises).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backend import kernel_module, ran, use_triton


@torch.library.custom_op("fluxrt::joint_attention", mutates_args=())
def joint_attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "auto") -> Tensor:
    """q, k, v [B, H, S, D] -> [B, S, H*D], softmax(q k^T / sqrt(D)) v, no mask."""
    kern = kernel_module("joint_attention")
    if use_triton(backend, q, kern):
        return ran("joint_attention", "triton", kern.joint_attention(q, k, v))
    return ran("joint_attention", "torch", kern.sdpa_attention(q, k, v).contiguous())


@joint_attention.register_fake
def _(q, k, v, backend="auto"):
    B, H, S, D = q.shape
    return torch.empty(B, S, H * D, dtype=q.dtype, device=q.device)


def quantize_qkv_fp8(q: Tensor, k: Tensor, v: Tensor):
    """Per-(batch, head) absmax e4m3 quantization for joint_attention_fp8: (q8, k8 [B, H, S, D], vt8 [B, H, D, S],
    q_scale, k_scale, v_scale [B, H] fp32). Plain torch ops: separate passes in eager (benchmarks/NOTES.md has
    their cost), fused under torch.compile."""
    return kernel_module("joint_attention").quantize_qkv_fp8(q, k, v)


@torch.library.custom_op("fluxrt::joint_attention_fp8", mutates_args=())
def joint_attention_fp8(q8: Tensor, k8: Tensor, vt8: Tensor, q_scale: Tensor, k_scale: Tensor, v_scale: Tensor,
                        out_dtype: torch.dtype = torch.bfloat16, backend: str = "auto") -> Tensor:
    """FP8 attention on quantize_qkv_fp8's outputs (q8, k8 [B, H, S, D], vt8 [B, H, D, S], scales [B, H]).

    Off by default in fluxrt; the torch backend dequantizes and runs SDPA in out_dtype."""
    kern = kernel_module("joint_attention")
    if use_triton(backend, q8, kern):
        return ran("joint_attention_fp8", "triton",
                   kern.joint_attention_fp8(q8, k8, vt8, q_scale, k_scale, v_scale, out_dtype))
    deq = lambda x, s: (x.float() * s[:, :, None, None]).to(out_dtype)  # noqa: E731
    return ran("joint_attention_fp8", "torch", kern.sdpa_attention(deq(q8, q_scale), deq(k8, k_scale),
                                                                   deq(vt8.transpose(2, 3), v_scale)).contiguous())


@joint_attention_fp8.register_fake
def _(q8, k8, vt8, q_scale, k_scale, v_scale, out_dtype=torch.bfloat16, backend="auto"):
    B, H, S, D = q8.shape
    return torch.empty(B, S, H * D, dtype=out_dtype, device=q8.device)


@torch.library.custom_op("fluxrt::joint_attention_fp8_out", mutates_args=())
def joint_attention_fp8_out(q: Tensor, k: Tensor, v: Tensor, v_absmax: Tensor,
                            backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Attention written as e4m3 rows for a W8A8 projection: q, k, v [B, H, S, D], v_absmax [B, n] (row b's max
    bounds |v[b]|) -> (out8 [B, S, H*D] e4m3fn, row_scale [B, S] fp32) with row_scale = max |v[b]| / 448.
    The torch backend is the fp32 formula (joint_attention_fp8_out_ref)."""
    kern = kernel_module("joint_attention")
    if use_triton(backend, q, kern):
        return ran("joint_attention_fp8_out", "triton", kern.joint_attention_fp8_out(q, k, v, v_absmax))
    kern._check_v_absmax(v_absmax, q.shape[0], q.device)
    return ran("joint_attention_fp8_out", "torch", kern.joint_attention_fp8_out_ref(q, k, v, v_absmax))


@joint_attention_fp8_out.register_fake
def _(q, k, v, v_absmax, backend="auto"):
    B, H, S, D = q.shape
    return (torch.empty(B, S, H * D, dtype=torch.float8_e4m3fn, device=q.device),
            torch.empty(B, S, dtype=torch.float32, device=q.device))
