"""Fused QK-RMSNorm + RoPE + layout change: the fused qkv projection output straight into attention layout.

    qkv [B, L, 3*H*D]  ->  out [3, B, H, L, D]   (out[0] = rope(rms(q)), out[1] = rope(rms(k)), out[2] = v)

qkv needs only a contiguous last dim, so the single block's qkv columns are read in place from linear1's
output [B, L, 3*H*D + mlp] (no split copy). For double blocks, rope_qk_norm_joint writes the txt and img
streams (each with its own norm scales) into one [3, B, H, T+L, D] buffer at their row offsets, so no concat
follows (one launch covers both streams). RoPE rotates interleaved pairs (x[2j], x[2j+1]) by per-token angles given as cos, sin [B|1, L, D/2].

Numerics mirror fluxrt.reference bit for bit in intent (BFL's cast order): RMS statistics in fp32, the
normalised value rounded to the activation dtype, multiplied by the scale and rounded again, then rotated in
fp32 and rounded once more. cos, sin come from the model's RoPE table via fluxrt.ops.rope_cos_sin. Design: one program per (token, block of heads); the pair partner x[d ^ 1] is a
second load of the same cache lines (L1), so HBM traffic is one read of qkv and one write of q, k, v.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import output


# ---- reference formulas (what fluxrt.reference's QKNorm + apply_rope compute) ----


def _rms_norm_ref(x: Tensor, scale: Tensor, eps: float) -> Tensor:
    rrms = torch.rsqrt(torch.mean(x.float() ** 2, dim=-1, keepdim=True) + eps)
    return (x.float() * rrms).to(x.dtype) * scale


def _rope_ref(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # [B, H, L, D/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, L, D/2]
    return torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1).reshape(x.shape).to(x.dtype)


def rope_qk_norm_ref(qkv: Tensor, q_scale: Tensor, k_scale: Tensor, cos: Tensor, sin: Tensor, num_heads: int,
                     eps: float = 1e-6) -> Tensor:
    B, L, _ = qkv.shape
    q, k, v = qkv[..., : qkv.shape[-1] // 3 * 3].reshape(B, L, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    q = _rope_ref(_rms_norm_ref(q, q_scale, eps).to(v.dtype), cos, sin)
    k = _rope_ref(_rms_norm_ref(k, k_scale, eps).to(v.dtype), cos, sin)
    return torch.stack([q, k, v])


def rope_qk_norm_joint_ref(txt_qkv, img_qkv, txt_q_scale, txt_k_scale, img_q_scale, img_k_scale, cos, sin,
                           num_heads: int, eps: float = 1e-6) -> Tensor:
    T = txt_qkv.shape[1]
    txt = rope_qk_norm_ref(txt_qkv, txt_q_scale, txt_k_scale, cos[:, :T], sin[:, :T], num_heads, eps)
    img = rope_qk_norm_ref(img_qkv, img_q_scale, img_k_scale, cos[:, T:], sin[:, T:], num_heads, eps)
    return torch.cat([txt, img], dim=3)


# ---- kernel ----


@triton.jit
def _norm_rope(src, partner_src, scale_ptr, d, cos, sin, eps, HEAD_DIM: tl.constexpr, DTYPE: tl.constexpr):
    """RMSNorm (BFL cast order) then RoPE of a [BLOCK_H, HEAD_DIM] tile; partner_src holds x[..., d ^ 1]."""
    x = src.to(tl.float32)
    xp = partner_src.to(tl.float32)
    rrms = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)
    scale = tl.load(scale_ptr + d).to(tl.float32)
    scale_p = tl.load(scale_ptr + (d ^ 1)).to(tl.float32)
    xn = ((x * rrms[:, None]).to(DTYPE).to(tl.float32) * scale[None, :]).to(DTYPE).to(tl.float32)
    xpn = ((xp * rrms[:, None]).to(DTYPE).to(tl.float32) * scale_p[None, :]).to(DTYPE).to(tl.float32)
    # even d: x0*cos - x1*sin; odd d: x0*sin + x1*cos, where xpn is the other element of the pair
    sign = tl.where(d % 2 == 0, -1.0, 1.0)
    return xn * cos[None, :] + sign[None, :] * xpn * sin[None, :]


@triton.jit
def _rope_qk_norm_kernel(
    TXT, IMG, TXT_Q_SCALE, TXT_K_SCALE, IMG_Q_SCALE, IMG_K_SCALE, COS, SIN, OUT, V_ABSMAX,
    T, S, H,
    stride_txt_b, stride_txt_l, stride_img_b, stride_img_l, stride_cos_b, stride_cos_l, stride_sin_b, stride_sin_l,
    stride_out_k, stride_out_b, stride_out_h, stride_out_l,
    eps,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, V_ABSMAX_SLOTS: tl.constexpr,
):
    # One launch for both streams: joint rows s < T come from TXT (with the txt norm scales), the rest from IMG.
    row = tl.program_id(0)
    b = row // S
    s = row % S
    if s < T:
        src = TXT + b * stride_txt_b + s * stride_txt_l
        q_scale = TXT_Q_SCALE
        k_scale = TXT_K_SCALE
    else:
        src = IMG + b * stride_img_b + (s - T) * stride_img_l
        q_scale = IMG_Q_SCALE
        k_scale = IMG_K_SCALE
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, HEAD_DIM)
    mask = (heads < H)[:, None]
    cols = heads[:, None] * HEAD_DIM + d[None, :]
    partner = heads[:, None] * HEAD_DIM + (d ^ 1)[None, :]
    dst = OUT + b * stride_out_b + heads[:, None] * stride_out_h + s * stride_out_l + d[None, :]
    dtype = OUT.dtype.element_ty
    cos = tl.load(COS + b * stride_cos_b + s * stride_cos_l + d // 2)
    sin = tl.load(SIN + b * stride_sin_b + s * stride_sin_l + d // 2)
    hd = H * HEAD_DIM

    q = _norm_rope(tl.load(src + cols, mask=mask, other=0.0), tl.load(src + partner, mask=mask, other=0.0),
                   q_scale, d, cos, sin, eps, HEAD_DIM, dtype)
    tl.store(dst, q.to(dtype), mask=mask)
    k = _norm_rope(tl.load(src + hd + cols, mask=mask, other=0.0), tl.load(src + hd + partner, mask=mask, other=0.0),
                   k_scale, d, cos, sin, eps, HEAD_DIM, dtype)
    tl.store(dst + stride_out_k, k.to(dtype), mask=mask)
    v = tl.load(src + 2 * hd + cols, mask=mask, other=0.0)
    tl.store(dst + 2 * stride_out_k, v.to(dtype), mask=mask)
    if V_ABSMAX_SLOTS > 0:  # max |v| of the batch item, for the attention kernel's fp8 output scale; spread
        # over slots by token so tens of thousands of programs do not all hit one address
        tl.atomic_max(V_ABSMAX + b * V_ABSMAX_SLOTS + s % V_ABSMAX_SLOTS, tl.max(tl.max(tl.abs(v.to(tl.float32)), 1), 0))


_CONFIGS = [triton.Config({"BLOCK_H": bh}, num_warps=w) for bh in (1, 2, 4, 8) for w in (1, 2, 4)]
# Autotune on the GPU only (the interpreter cannot run several configs), keyed by head count and head dim.
# No reset_to_zero for V_ABSMAX: a max is idempotent, so the autotuner's repeated runs leave the same value.
_rope_qk_norm_tuned = triton.autotune(_CONFIGS, key=["H", "HEAD_DIM"])(_rope_qk_norm_kernel)
V_ABSMAX_SLOTS = 32  # partial maxima per batch item (atomics spread by token, see the kernel)


def _check(qkv: Tensor, q_scale: Tensor, k_scale: Tensor, cos: Tensor, sin: Tensor, num_heads: int) -> int:
    if qkv.ndim != 3 or qkv.stride(-1) != 1:
        raise ValueError(f"qkv must be [B, L, 3*H*D] with a contiguous last dim, got {tuple(qkv.shape)} strides {qkv.stride()}")
    if qkv.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {qkv.dtype}; use float32, float16 or bfloat16")
    B, L, C = qkv.shape
    if num_heads <= 0 or C % (3 * num_heads):
        raise ValueError(f"qkv's last dim {C} is not 3 * num_heads ({num_heads}) * head_dim")
    head_dim = C // (3 * num_heads)
    if head_dim not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim {head_dim} unsupported; use a power of two from 16 to 256")
    for name, s in (("q_scale", q_scale), ("k_scale", k_scale)):
        if s.shape != (head_dim,) or s.device != qkv.device:
            raise ValueError(f"{name} must be [{head_dim}] on {qkv.device}, got {tuple(s.shape)} on {s.device}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.ndim != 3 or t.shape[0] not in (1, B) or t.shape[1:] != (L, head_dim // 2) or t.stride(-1) != 1:
            raise ValueError(f"{name} must be [{B} or 1, {L}, {head_dim // 2}] with a contiguous last dim, got {tuple(t.shape)}")
        if t.dtype != torch.float32 or t.device != qkv.device:
            raise ValueError(f"{name} must be float32 on {qkv.device}, got {t.dtype} on {t.device}")
    return head_dim


def _launch(txt, img, txt_scales, img_scales, cos, sin, num_heads, out, eps, v_absmax=None):
    """txt may be None (single stream); otherwise its T rows come first in out and in cos/sin. v_absmax: None or
    a zeroed [B, slots] fp32 tensor whose row max becomes max |v[b]|."""
    T = 0 if txt is None else txt.shape[1]
    txt, txt_scales = (img, img_scales) if txt is None else (txt, txt_scales)
    B, S = out.shape[1], out.shape[3]
    head_dim = out.shape[-1]
    batch_stride = lambda t: t.stride(0) if t.shape[0] > 1 else 0  # noqa: E731 (cos/sin broadcast over batch)
    args = (
        txt, img, *txt_scales, *img_scales, cos, sin, out, out if v_absmax is None else v_absmax, T, S, num_heads,
        txt.stride(0), txt.stride(1), img.stride(0), img.stride(1),
        batch_stride(cos), cos.stride(1), batch_stride(sin), sin.stride(1),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3), eps,
    )
    slots = 0 if v_absmax is None else v_absmax.shape[1]
    if img.is_cuda:
        grid = lambda meta: (B * S, triton.cdiv(num_heads, meta["BLOCK_H"]))  # noqa: E731
        _rope_qk_norm_tuned[grid](*args, HEAD_DIM=head_dim, V_ABSMAX_SLOTS=slots)
    else:  # Triton's interpreter: one fixed config
        block_h = min(4, triton.next_power_of_2(num_heads))
        _rope_qk_norm_kernel[(B * S, triton.cdiv(num_heads, block_h))](*args, HEAD_DIM=head_dim, BLOCK_H=block_h,
                                                                           V_ABSMAX_SLOTS=slots)


def rope_qk_norm(qkv: Tensor, q_scale: Tensor, k_scale: Tensor, cos: Tensor, sin: Tensor, num_heads: int,
                 eps: float = 1e-6, out: Tensor | None = None) -> Tensor:
    head_dim = _check(qkv, q_scale, k_scale, cos, sin, num_heads)
    B, L, _ = qkv.shape
    out = output(out, (3, B, num_heads, L, head_dim), qkv.dtype, qkv.device)
    _launch(None, qkv, None, (q_scale, k_scale), cos, sin, num_heads, out, eps)
    return out


def rope_qk_norm_joint(txt_qkv, img_qkv, txt_q_scale, txt_k_scale, img_q_scale, img_k_scale, cos, sin,
                       num_heads: int, eps: float = 1e-6, out: Tensor | None = None,
                       v_absmax: Tensor | None = None) -> Tensor:
    """v_absmax: optional zeroed [B, n] fp32 tensor; the kernel leaves max |v[b]| as the max of its row b (the bound
    joint_attention_fp8_rows needs), taken from the values already in registers instead of another pass over v."""
    T, L = txt_qkv.shape[1], img_qkv.shape[1]
    if txt_qkv.shape[0] != img_qkv.shape[0] or txt_qkv.shape[2] != img_qkv.shape[2] or txt_qkv.dtype != img_qkv.dtype:
        raise ValueError(f"txt_qkv {tuple(txt_qkv.shape)} {txt_qkv.dtype} and img_qkv {tuple(img_qkv.shape)} "
                         f"{img_qkv.dtype} must share batch, width and dtype")
    if cos.ndim != 3 or sin.ndim != 3 or cos.shape[1] != T + L or sin.shape[1] != T + L:
        raise ValueError(f"cos and sin must cover the {T} + {L} joint tokens, got {tuple(cos.shape)}, {tuple(sin.shape)}")
    head_dim = _check(txt_qkv, txt_q_scale, txt_k_scale, cos[:, :T], sin[:, :T], num_heads)
    _check(img_qkv, img_q_scale, img_k_scale, cos[:, T:], sin[:, T:], num_heads)
    out = output(out, (3, txt_qkv.shape[0], num_heads, T + L, head_dim), txt_qkv.dtype, txt_qkv.device)
    if v_absmax is not None and (v_absmax.ndim != 2 or v_absmax.shape[0] != txt_qkv.shape[0] or
                                 v_absmax.dtype != torch.float32 or not v_absmax.is_contiguous() or
                                 v_absmax.shape[1] & (v_absmax.shape[1] - 1)):
        raise ValueError(f"v_absmax must be a contiguous float32 [{txt_qkv.shape[0]}, n] tensor with n a power of two, "
                         f"got {tuple(v_absmax.shape)} {v_absmax.dtype}")
    _launch(txt_qkv, img_qkv, (txt_q_scale, txt_k_scale), (img_q_scale, img_k_scale), cos, sin, num_heads, out, eps,
            v_absmax)
    return out
