"""The seam between the FLUX blocks and the math they call (BFL's math.py): RoPE tables, RoPE, attention.

An accelerated transformer replaces exactly these three functions with kernels; the reference keeps them in
plain PyTorch, in the precision BFL uses (rotations applied in fp32, then cast back).
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """Joint attention with RoPE. q, k, v: [B, H, L, D]; pe: [B, 1, L, D/2, 2, 2]. Returns [B, L, H*D]."""
    q, k = apply_rope(q, k, pe)
    x = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(D), no mask
    return rearrange(x, "B H L D -> B L (H D)")


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation matrices for one position axis. pos: [..., L] -> [..., L, dim/2, 2, 2] (fp32).

    The angles are computed in fp64 and rounded once to fp32 (diffusers does the same; BFL's fp32 angles
    differ by ~1e-6 rad at position 128). The table is [L, head_dim/2] per forward, so this costs nothing.
    """
    if dim % 2:
        raise ValueError(f"RoPE axis dim must be even, got {dim}")
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
    angles = pos.to(torch.float64)[..., None] * omega  # [..., L, dim/2]
    cos, sin = angles.cos(), angles.sin()
    out = torch.stack([cos, -sin, sin, cos], dim=-1)
    return out.reshape(*angles.shape, 2, 2).float()


def apply_rope(xq: Tensor, xk: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate interleaved pairs (x[2j], x[2j+1]) of q and k in fp32; cast back to their dtype."""
    xq_ = xq.float().reshape(*xq.shape[:-1], -1, 1, 2)
    xk_ = xk.float().reshape(*xk.shape[:-1], -1, 1, 2)
    xq_out = freqs_cis[..., 0] * xq_[..., 0] + freqs_cis[..., 1] * xq_[..., 1]
    xk_out = freqs_cis[..., 0] * xk_[..., 0] + freqs_cis[..., 1] * xk_[..., 1]
    return xq_out.reshape(*xq.shape).type_as(xq), xk_out.reshape(*xk.shape).type_as(xk)
