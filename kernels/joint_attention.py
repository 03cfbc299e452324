"""Joint text+image attention forward (FlashAttention-2 style), straight into the projection's layout.

    q, k, v [B, H, S, D] (any strides with a contiguous last dim: e.g. the three slices of rope_qk_norm's
    [3, B, H, S, D] output)  ->  out [B, S, H*D] (text rows first, as the joint sequence is ordered)

Non-causal, no mask, scale 1/sqrt(D), online softmax in exp2 with fp32 statistics and accumulator. Writing
[B, S, H*D] directly removes the transpose copy that follows SDPA ([B, H, S, D] -> [B, S, H*D]).

Design: one program per (BLOCK_M query rows, batch*head); consecutive programs share a head, so its K/V stay
in L2. The K/V loop runs unmasked over full blocks and once masked over the tail (any S works, no padding
copies). Block shapes, warps and pipeline stages are autotuned on the GPU, keyed by head_dim, dtype and a
power-of-two bucket of S (never the exact length: new resolutions must not re-tune).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

HEAD_DIMS = (64, 128)
LOG2E = 1.4426950408889634


def joint_attention_ref(q: Tensor, k: Tensor, v: Tensor, chunk: int = 2048) -> Tensor:
    """softmax(q k^T / sqrt(D)) v in fp32 math, as [B, S, H*D] in q's dtype.

    Query rows go in chunks so the fp32 score matrix stays small at FLUX lengths (S 16896: 27 GB unchunked).
    """
    B, H, S, D = q.shape
    k, v = k.float(), v.float()
    out = torch.empty(B, S, H, D, dtype=q.dtype, device=q.device)
    for start in range(0, S, chunk):
        scores = torch.einsum("bhsd,bhtd->bhst", q[:, :, start : start + chunk].float(), k) / math.sqrt(D)
        part = torch.einsum("bhst,bhtd->bhsd", scores.softmax(dim=-1), v)
        out[:, start : start + chunk] = part.transpose(1, 2).to(q.dtype)
    return out.reshape(B, S, H * D)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The torch backend: scaled_dot_product_attention in the input dtype, then the layout change."""
    B, H, S, D = q.shape
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, S, H * D)


@triton.jit
def _online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, mask_cols, n_valid, offs_n,
                         DOT_PRECISION: tl.constexpr):
    qk = tl.dot(q, k, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N], fp32
    qk = qk * qk_scale  # in log2 units: scale * log2(e)
    if mask_cols:
        qk = tl.where(offs_n[None, :] < n_valid, qk, float("-inf"))
    m_ij = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_ij[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_ij


@triton.jit
def _joint_attention_kernel(
    Q, K, V, OUT,
    qk_scale, S, H,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ob, stride_os,
    S_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_ok = offs_m[:, None] < S
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :], mask=rows_ok,
                other=0.0)
    kt_ptrs = K + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_ks + offs_d[:, None]  # [D, BLOCK_N]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :]  # [BLOCK_N, D]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    n_full = (S // BLOCK_N) * BLOCK_N
    for _ in range(0, n_full, BLOCK_N):
        k = tl.load(kt_ptrs)
        v = tl.load(v_ptrs)
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, False, 0, offs_n, DOT_PRECISION)
        kt_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
    if n_full < S:  # the tail block: masked loads, padded columns get -inf scores
        n_valid = S - n_full
        k = tl.load(kt_ptrs, mask=offs_n[None, :] < n_valid, other=0.0)
        v = tl.load(v_ptrs, mask=offs_n[:, None] < n_valid, other=0.0)
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, True, n_valid, offs_n, DOT_PRECISION)

    out = acc / l_i[:, None]
    o_ptrs = OUT + b * stride_ob + h * HEAD_DIM + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=rows_ok)


# Hopper-oriented search space, kept small (each config is a compile): 128-row query tiles, 64/128-wide K/V
# tiles, 2-4 stages; 8 warps only on 128x128 tiles. One 64x64 config for short sequences.
_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": bn}, num_stages=s, num_warps=w)
    for bn in (64, 128) for s in (2, 3, 4) for w in (4, 8) if w == 4 or bn == 128
] + [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_stages=3, num_warps=4)]
_joint_attention_tuned = triton.autotune(_CONFIGS, key=["S_BUCKET", "HEAD_DIM"])(_joint_attention_kernel)
# fp32 (tests and debugging only; FLUX runs bf16/fp16): one modest config, exact "ieee" dots, no tuning.
_FP32_CONFIG = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)


def joint_attention(q: Tensor, k: Tensor, v: Tensor, out: Tensor | None = None) -> Tensor:
    """Attention over the joint sequence; q, k, v [B, H, S, D] -> [B, S, H*D] (see the module docstring)."""
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must all be [B, H, S, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, S, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"head_dim {D} is not supported by the Triton kernel (supported: {HEAD_DIMS}); "
                         "use backend='torch'")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of float16/bfloat16/float32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if any(t.stride(-1) != 1 for t in (q, k, v)) or not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device with a contiguous last dim")
    if out is None:
        out = torch.empty(B, S, H * D, dtype=q.dtype, device=q.device)
    elif out.shape != (B, S, H * D) or out.dtype != q.dtype or out.stride(-1) != 1 or out.stride(1) < H * D:
        raise ValueError(f"out must be [{B}, {S}, {H * D}] {q.dtype} with a contiguous last dim")
    args = (
        q, k, v, out, LOG2E / math.sqrt(D), S, H,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
        triton.next_power_of_2(S),
    )
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 stays fp32; 16-bit dots ignore it
    if q.is_cuda and q.dtype != torch.float32:
        grid = lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * H)  # noqa: E731
        _joint_attention_tuned[grid](*args, HEAD_DIM=D, DOT_PRECISION=precision)
    elif q.is_cuda:
        grid = (triton.cdiv(S, _FP32_CONFIG["BLOCK_M"]), B * H)
        _joint_attention_kernel[grid](*args, HEAD_DIM=D, DOT_PRECISION=precision, **_FP32_CONFIG)
    else:  # Triton's interpreter: one fixed config
        _joint_attention_kernel[(triton.cdiv(S, 32), B * H)](*args, HEAD_DIM=D, BLOCK_M=32, BLOCK_N=16,
                                                              DOT_PRECISION=precision)
    return out
