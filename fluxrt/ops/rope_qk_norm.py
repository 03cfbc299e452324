"""torch.library ops for kernels/rope_qk_norm.py: QK-RMSNorm + RoPE into attention layout [3, B, H, L, D].

Inference only: no autograd formula is registered (a backward through these ops raises).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backend import kernel_module, ran, use_triton


def _kernels():
    return kernel_module("rope_qk_norm")


def _fake_out(qkv: Tensor, num_heads: int, seq: int) -> Tensor:
    head_dim = qkv.shape[-1] // (3 * num_heads)
    return torch.empty(3, qkv.shape[0], num_heads, seq, head_dim, dtype=qkv.dtype, device=qkv.device)


@torch.library.custom_op("fluxrt::rope_qk_norm", mutates_args=())
def rope_qk_norm(qkv: Tensor, q_scale: Tensor, k_scale: Tensor, cos: Tensor, sin: Tensor, num_heads: int,
                 eps: float = 1e-6, backend: str = "auto") -> Tensor:
    """qkv [B, L, 3*H*D] (a column slice of a wider tensor is fine) -> [3, B, H, L, D] = rope(rms(q)), rope(rms(k)), v."""
    k = _kernels()
    if use_triton(backend, qkv, k):
        return ran("rope_qk_norm", "triton", k.rope_qk_norm(qkv, q_scale, k_scale, cos, sin, num_heads, eps))
    out = k.rope_qk_norm_ref(qkv, q_scale, k_scale, cos, sin, num_heads, eps).contiguous()
    return ran("rope_qk_norm", "torch", out)


@rope_qk_norm.register_fake
def _(qkv, q_scale, k_scale, cos, sin, num_heads, eps=1e-6, backend="auto"):
    return _fake_out(qkv, num_heads, qkv.shape[1])


@torch.library.custom_op("fluxrt::rope_qk_norm_joint", mutates_args=())
def rope_qk_norm_joint(txt_qkv: Tensor, img_qkv: Tensor, txt_q_scale: Tensor, txt_k_scale: Tensor,
                       img_q_scale: Tensor, img_k_scale: Tensor, cos: Tensor, sin: Tensor, num_heads: int,
                       eps: float = 1e-6, backend: str = "auto") -> Tensor:
    """Both streams of a double block into one joint [3, B, H, T+L, D] buffer (txt rows first), no concat."""
    k = _kernels()
    if use_triton(backend, txt_qkv, k):
        return ran("rope_qk_norm_joint", "triton", k.rope_qk_norm_joint(
            txt_qkv, img_qkv, txt_q_scale, txt_k_scale, img_q_scale, img_k_scale, cos, sin, num_heads, eps))
    return ran("rope_qk_norm_joint", "torch", k.rope_qk_norm_joint_ref(
        txt_qkv, img_qkv, txt_q_scale, txt_k_scale, img_q_scale, img_k_scale, cos, sin, num_heads, eps).contiguous())


@rope_qk_norm_joint.register_fake
def _(txt_qkv, img_qkv, txt_q_scale, txt_k_scale, img_q_scale, img_k_scale, cos, sin, num_heads, eps=1e-6,
      backend="auto"):
    return _fake_out(txt_qkv, num_heads, txt_qkv.shape[1] + img_qkv.shape[1])


@torch.library.custom_op("fluxrt::rope_qk_norm_joint_v_absmax", mutates_args=())
def rope_qk_norm_joint_v_absmax(txt_qkv: Tensor, img_qkv: Tensor, txt_q_scale: Tensor, txt_k_scale: Tensor,
                                img_q_scale: Tensor, img_k_scale: Tensor, cos: Tensor, sin: Tensor, num_heads: int,
                                eps: float = 1e-6, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """rope_qk_norm_joint, plus v_absmax [B, n] fp32 whose row b's max is max |v[b]|: the bound
    joint_attention_fp8_out scales its e4m3 output by (the Triton kernel takes it from v in registers)."""
    k = _kernels()
    v_absmax = torch.zeros(txt_qkv.shape[0], k.V_ABSMAX_SLOTS, dtype=torch.float32, device=txt_qkv.device)
    if use_triton(backend, txt_qkv, k):
        out = k.rope_qk_norm_joint(txt_qkv, img_qkv, txt_q_scale, txt_k_scale, img_q_scale, img_k_scale,
                                   cos, sin, num_heads, eps, v_absmax=v_absmax)
        return ran("rope_qk_norm_joint_v_absmax", "triton", (out, v_absmax))
    out = k.rope_qk_norm_joint_ref(txt_qkv, img_qkv, txt_q_scale, txt_k_scale, img_q_scale, img_k_scale,
                                   cos, sin, num_heads, eps).contiguous()
    v_absmax[:, 0] = out[2].float().abs().amax(dim=(1, 2, 3))
    return ran("rope_qk_norm_joint_v_absmax", "torch", (out, v_absmax))


@rope_qk_norm_joint_v_absmax.register_fake
def _(txt_qkv, img_qkv, txt_q_scale, txt_k_scale, img_q_scale, img_k_scale, cos, sin, num_heads, eps=1e-6,
      backend="auto"):
    return (_fake_out(txt_qkv, num_heads, txt_qkv.shape[1] + img_qkv.shape[1]),
            torch.empty(txt_qkv.shape[0], _kernels().V_ABSMAX_SLOTS, dtype=torch.float32, device=txt_qkv.device))


def rope_cos_sin(pe: Tensor) -> tuple[Tensor, Tensor]:
    """fluxrt.reference's RoPE table [B, 1, S, D/2, 2, 2] (rotation matrices) -> cos, sin [B, S, D/2], the form
    these ops take. Contiguous copies (a few hundred KB, once per forward) so the kernel reads them with unit
    stride. Plain tensor code, no kernel import: torch.compile traces it."""
    return pe[:, 0, :, :, 0, 0].contiguous(), pe[:, 0, :, :, 1, 0].contiguous()
