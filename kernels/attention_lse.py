"""Attention of queries over one K/V block, with the log-sum-exp of each query row (FlashAttention-2 forward).

    q [B, H, Sq, D], k, v [B, H, Sk, D] (any strides with a contiguous last dim)
        ->  out [B, H, Sq, D] float32 = softmax(q k^T / sqrt(D)) v
            lse [B, H, Sq]    float32 = logsumexp over keys of q k^T / sqrt(D)   (natural log)

The building block of ring attention (fluxrt.parallel): each rank attends its queries to one K/V block at a time
and merges the partial results exactly by log-sum-exp,
    lse = logaddexp(lse_a, lse_b),  out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse),
which needs each block's output unnormalised by the others and its lse, both in fp32 (a bf16 partial output
would add one rounding per ring step). Sq and Sk differ freely: Ulysses drops padding keys by compacting K/V.

Why not kernels/joint_attention.py: that kernel serves the single-device forward, where the output feeds the
projection. It writes the projection's [B, S, H*D] layout in the input dtype (or e4m3 rows), has TMA and fp8
variants, assumes one S for q and k, and keeps no statistics. Ring attention needs the opposite: fp32 partial
outputs in [B, H, Sq, D] and the lse. The two kernels share the inner step (joint_attention._online_softmax_step:
exp2 with the scale folded into one FMA, fp32 running max / sum / accumulator) and the same conventions
(autotune keyed by power-of-two buckets of the lengths, never the exact lengths, so new resolutions do not
re-tune; one fixed config for fp32 inputs and under the interpreter, where autotune cannot run).

Design: one program per (BLOCK_M query rows, batch*head); consecutive programs share a head, so its K/V stay in
L2. The K/V loop runs unmasked over full BLOCK_N tiles and once masked over the tail (any Sk, no padding copies);
query rows past Sq are loaded as zeros and never stored. The running max m_i is kept in scaled log2 units, so
lse = (m_i + log2(l_i)) * ln 2.

Later, fused: the epilogue could read the running (out, lse) of the previous ring steps and write the merged
pair instead of this block's, saving one fp32 read-modify-write of [B, H, Sq, D] per ring step (the torch merge
reads both outputs and writes one); the last step could also write the final dtype and layout directly.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import output
from .joint_attention import _FP32_CONFIG, HEAD_DIMS, LOG2E, _online_softmax_step

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LN2 = math.log(2.0)
_LN2 = tl.constexpr(LN2)  # the kernel's copy (a plain float global compiles only in the interpreter: _common.py)
SCORE_BUDGET = 2**27  # fp32 scores (512 MB) the torch formula holds at once; it chunks query rows to stay below


def check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    """The contract of every backend: one ValueError that says what is wrong and what to do."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be 4-d: q [B, H, Sq, D], k and v [B, H, Sk, D]; got shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)} (reshape or permute them to that layout)")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape [B, H, Sk, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    B, H, Sq, D = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (B, H, D):
        raise ValueError(f"q [B, H, Sq, D] and k, v [B, H, Sk, D] must agree on B, H and D; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if q.numel() == 0 or k.numel() == 0:
        raise ValueError(f"q, k, v must not be empty (B, H, Sq, Sk, D >= 1); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}: skip the call when there are no queries or no keys")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in DTYPES:
            raise ValueError(f"{name} is {t.dtype}; attention_lse takes float32, bfloat16 or float16 "
                             "(convert with .to(torch.bfloat16))")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; convert them to one")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}; move them with "
                         ".to(device)")


def attention_lse_ref(q: Tensor, k: Tensor, v: Tensor, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """The torch formula in fp32 math (any D): (out [B, H, Sq, D], lse [B, H, Sq]), both float32.

    Query rows go in chunks so the fp32 score matrix stays below SCORE_BUDGET elements (B=1, H=24, Sq=Sk=16896
    unchunked: 27 GB); `chunk` overrides the row count (tests)."""
    check_inputs(q, k, v)
    B, H, Sq, D = q.shape
    k, v = k.float(), v.float()
    chunk = chunk or max(1, SCORE_BUDGET // (B * H * k.shape[2]))
    out = torch.empty(B, H, Sq, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
    for start in range(0, Sq, chunk):
        rows = slice(start, start + chunk)
        scores = torch.einsum("bhsd,bhtd->bhst", q[:, :, rows].float(), k) / math.sqrt(D)
        lse[:, :, rows] = scores.logsumexp(dim=-1)
        out[:, :, rows] = torch.einsum("bhst,bhtd->bhsd", torch.exp(scores - lse[:, :, rows, None]), v)
    return out, lse


@triton.jit
def _attention_lse_kernel(
    Q, K, V, OUT, LSE,
    qk_scale, SQ, SK, H,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    SQ_BUCKET, SK_BUCKET,  # autotune keys only
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_ok = offs_m < SQ
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=rows_ok[:, None], other=0.0)
    kt_ptrs = K + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_ks + offs_d[:, None]  # [D, BLOCK_N]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :]  # [BLOCK_N, D]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    n_full = (SK // BLOCK_N) * BLOCK_N
    for _ in range(0, n_full, BLOCK_N):
        k = tl.load(kt_ptrs)
        v = tl.load(v_ptrs)
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, False, 0, offs_n, DOT_PRECISION,
                                             False)
        kt_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
    if n_full < SK:  # the tail tile: masked loads, the missing keys get -inf scores
        n_valid = SK - n_full
        k = tl.load(kt_ptrs, mask=offs_n[None, :] < n_valid, other=0.0)
        v = tl.load(v_ptrs, mask=offs_n[:, None] < n_valid, other=0.0)
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, True, n_valid, offs_n, DOT_PRECISION,
                                             False)

    # Sk >= 1, so every row has l_i >= 1 (its max term is exp2(0)): no 0/0
    o_ptrs = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, acc / l_i[:, None], mask=rows_ok[:, None])
    # m_i is the max of the scores times log2(e), so m_i + log2(l_i) is the lse in log2 units
    tl.store(LSE + b * stride_lb + h * stride_lh + offs_m, (m_i + tl.math.log2(l_i)) * _LN2, mask=rows_ok)


# Hopper-oriented and small (each config is a compile): the joint kernel's measured shapes (128-row query tiles,
# 64/128-wide K/V tiles; 8 warps only on 128x128) plus 64-row query tiles, which keep the SMs busy when a ring block
# or a head-sharded rank has few query tiles (Sq = 576 at H = 6: 27 programs of 128 rows for 132 SMs).
_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s, num_warps=w)
    for bm, bn, w in ((128, 64, 4), (128, 128, 8), (64, 64, 4), (64, 128, 4)) for s in (2, 3)
]
_TUNED = triton.autotune(_CONFIGS, key=["SQ_BUCKET", "SK_BUCKET", "HEAD_DIM"])(_attention_lse_kernel)
_INTERPRETER_CONFIG = dict(BLOCK_M=32, BLOCK_N=16)  # autotune cannot run in Triton's interpreter (DESIGN.md §4)


def _check_triton(q: Tensor, k: Tensor, v: Tensor) -> None:
    D = q.shape[-1]
    if D not in HEAD_DIMS:
        raise ValueError(f"head_dim {D} is not supported by the Triton kernel (supported: {HEAD_DIMS}); "
                         "use backend='torch'")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError(f"the Triton kernel needs q, k, v with a contiguous last dim, got strides {q.stride()}, "
                         f"{k.stride()}, {v.stride()}; call .contiguous() or use backend='torch'")


def attention_lse(q: Tensor, k: Tensor, v: Tensor, out: Tensor | None = None,
                  lse: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The Triton kernel (see the module docstring): (out [B, H, Sq, D], lse [B, H, Sq]), float32. `out` and `lse`
    may be given (float32 of those shapes, contiguous last dim) to be written in place."""
    check_inputs(q, k, v)
    _check_triton(q, k, v)
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    out = output(out, (B, H, Sq, D), torch.float32, q.device)
    lse = output(lse, (B, H, Sq), torch.float32, q.device, name="lse")
    args = (
        q, k, v, out, lse, LOG2E / math.sqrt(D), Sq, Sk, H,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        triton.next_power_of_2(Sq), triton.next_power_of_2(Sk),
    )
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 stays fp32; 16-bit dots ignore it
    if q.is_cuda and q.dtype != torch.float32:
        grid = lambda meta: (triton.cdiv(Sq, meta["BLOCK_M"]), B * H)  # noqa: E731
        _TUNED[grid](*args, HEAD_DIM=D, DOT_PRECISION=precision)
    else:  # fp32 on a GPU (tests, debugging) and the interpreter: one fixed config
        config = _FP32_CONFIG if q.is_cuda else _INTERPRETER_CONFIG
        grid = (triton.cdiv(Sq, config["BLOCK_M"]), B * H)
        _attention_lse_kernel[grid](*args, HEAD_DIM=D, DOT_PRECISION=precision, **config)
    return out, lse
