"""Joint text+image attention forward (FlashAttention-2 style), straight into the projection's layout.

    q, k, v [B, H, S, D] (any strides with a contiguous last dim: e.g. the three slices of rope_qk_norm's
    [3, B, H, S, D] output)  ->  out [B, S, H*D] (text rows first, as the joint sequence is ordered)

Non-causal, no mask, scale 1/sqrt(D), online softmax in exp2 with fp32 statistics and accumulator. Writing
[B, S, H*D] directly removes the transpose copy that follows SDPA ([B, H, S, D] -> [B, S, H*D]).

Design: one program per (BLOCK_M query rows, batch*head); consecutive programs share a head, so its K/V stay
in L2. The K/V loop runs unmasked over full blocks and once masked over the tail (any S works, no padding
copies). Block shapes, warps and pipeline stages are autotuned on the GPU, keyed by head_dim, dtype and a
power-of-two bucket of S (never the exact length: new resolutions must not re-tune).

FP8 output rows (joint_attention_fp8_out), for a W8A8 projection: the output is written as e4m3 rows with a scale
per row, what quantize_rows would make of it, without the bf16 round trip. A per-token absmax spans all heads,
each owned by another program, so the scale comes from a bound instead: every output row of a head is a convex
combination of that head's v rows, so |out[b]| <= max |v[b]| elementwise, and scale = max |v[b]| / 448 (one
value per batch item, stored for each of its rows) can never overflow e4m3. Since e4m3 is floating point, a row
smaller than the bound keeps its 3 mantissa bits (down to 2^-6 of 448); on random data the loss vs exact
per-token scales is ~0.5-1 dB (NOTES.md). max |v[b]| comes from rope_qk_norm_joint(v_absmax=...), which holds
v in registers anyway.

FP8 variant (joint_attention_fp8, off by default): e4m3 q, k, v with per-(batch, head) scales, fp32 scores,
softmax and accumulator; the probabilities are scaled by 448 into e4m3 for the P·V product.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime import _allocation

from ._common import (
    FP8_MIN_CAPABILITY,
    TMA_MIN_CAPABILITY,
    e4m3_clamp,
    e4m3_scale,
    e4m3_scale_ref,
    from_e4m3_range,
    output,
    require_capability,
    to_e4m3_range,
    to_e4m3_ref,
)

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
                         DOT_PRECISION: tl.constexpr, IS_FP8: tl.constexpr):
    qk = tl.dot(q, k, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N], fp32, unscaled
    if mask_cols:
        qk = tl.where(offs_n[None, :] < n_valid, qk, float("-inf"))
    # The scale (1/sqrt(D) * log2(e) > 0, so it commutes with max) is applied inside the exponent's argument:
    # qk * scale - m is one FMA per score instead of a multiply and a subtract (as Triton's fused-attention
    # tutorial does); the running max m is kept in scaled (log2) units.
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if IS_FP8:  # p in (0, 1] spread over e4m3's range; the epilogue takes the factor back out
        acc = tl.dot(to_e4m3_range(p).to(v.dtype), v, acc)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_ij


@triton.jit
def _joint_attention_kernel(
    Q, K, V, OUT, Q_SCALE, K_SCALE, V_SCALE, V_ABSMAX, ROW_SCALE,
    qk_scale, S, H,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_os,
    S_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    IS_FP8: tl.constexpr, V_ABSMAX_SLOTS: tl.constexpr,  # > 0: fp8 output rows scaled by the max |v| bound
    USE_TMA: tl.constexpr = False, WARP_SPECIALIZE: tl.constexpr = False,  # the "tma" / "tma_ws" variants
):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_ok = offs_m[:, None] < S
    if IS_FP8:  # per-(batch, head) dequantization scales of q and k fold into the score scale
        qk_scale = qk_scale * tl.load(Q_SCALE + bh) * tl.load(K_SCALE + bh)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_full = (S // BLOCK_N) * BLOCK_N

    if USE_TMA:
        # On-device TMA descriptors over this (batch, head)'s [S, D] slices: the copy engine fetches whole tiles
        # into shared memory asynchronously (no address math in the loop) and fills rows past S with zeros, so the
        # tail needs only its score mask. Device-side (not host) descriptors: Triton's Hopper warp specialization
        # works only with those (triton-lang/triton#7658).
        tl.static_assert(not IS_FP8, "the fp8 path reads its transposed V through pointers")
        desc_q = tl.make_tensor_descriptor(Q + b * stride_qb + h * stride_qh, shape=[S, HEAD_DIM],
                                           strides=[stride_qs, 1], block_shape=[BLOCK_M, HEAD_DIM])
        desc_k = tl.make_tensor_descriptor(K + b * stride_kb + h * stride_kh, shape=[S, HEAD_DIM],
                                           strides=[stride_ks, 1], block_shape=[BLOCK_N, HEAD_DIM])
        desc_v = tl.make_tensor_descriptor(V + b * stride_vb + h * stride_vh, shape=[S, HEAD_DIM],
                                           strides=[stride_vs, 1], block_shape=[BLOCK_N, HEAD_DIM])
        q = desc_q.load([start_m * BLOCK_M, 0])
        for start_n in tl.range(0, n_full, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
            k = desc_k.load([start_n, 0]).T
            v = desc_v.load([start_n, 0])
            acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, False, 0, offs_n, DOT_PRECISION,
                                                 IS_FP8)
        if n_full < S:
            k = desc_k.load([n_full, 0]).T
            v = desc_v.load([n_full, 0])
            acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, True, S - n_full, offs_n,
                                                 DOT_PRECISION, IS_FP8)
    else:
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :], mask=rows_ok,
                    other=0.0)
        kt_ptrs = K + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_ks + offs_d[:, None]  # [D, BLOCK_N]
        # [BLOCK_N, D]; fp8 V is stored transposed ([B, H, D, S], stride_vs = 1): Hopper's fp8 MMA wants K-major B
        v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd
        for _ in range(0, n_full, BLOCK_N):
            k = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
            acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, False, 0, offs_n, DOT_PRECISION,
                                                 IS_FP8)
            kt_ptrs += BLOCK_N * stride_ks
            v_ptrs += BLOCK_N * stride_vs
        if n_full < S:  # the tail block: masked loads, padded columns get -inf scores
            n_valid = S - n_full
            k = tl.load(kt_ptrs, mask=offs_n[None, :] < n_valid, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < n_valid, other=0.0)
            acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, q, k, v, qk_scale, True, n_valid, offs_n,
                                                 DOT_PRECISION, IS_FP8)

    out = acc / l_i[:, None]
    if IS_FP8:
        out = out * from_e4m3_range(tl.load(V_SCALE + bh))
    if V_ABSMAX_SLOTS > 0:
        v_absmax = tl.max(tl.load(V_ABSMAX + b * V_ABSMAX_SLOTS + tl.arange(0, V_ABSMAX_SLOTS)), 0)
        row_scale = e4m3_scale(v_absmax)
        # the clamp only catches rounding: |out| <= max |v| holds up to the last bit of the fp32 normalisation
        out = e4m3_clamp(out * (1.0 / row_scale))
        if h == 0:  # one head's programs write the rows' scales
            tl.store(ROW_SCALE + b * S + offs_m, tl.zeros([BLOCK_M], tl.float32) + row_scale, mask=offs_m < S)
    o_ptrs = OUT + b * stride_ob + h * HEAD_DIM + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=rows_ok)


# Hopper-oriented search space, kept small (each config is a compile): 128-row query tiles, 64/128-wide K/V
# tiles, 2-4 stages; 8 warps only on 128x128 tiles. One 64x64 config for short sequences.
_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": bn}, num_stages=s, num_warps=w)
    for bn in (64, 128) for s in (2, 3, 4) for w in (4, 8) if w == 4 or bn == 128
] + [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_stages=3, num_warps=4)]
# How K/V tiles reach shared memory (kernel flags USE_TMA, WARP_SPECIALIZE), each autotuned on its own:
#   "pointer"  computed addresses, software-pipelined loads (the measured default: NOTES.md)
#   "tma"      on-device TMA tensor descriptors
#   "tma_ws"   TMA + Triton's warp specialization of the K/V loop (producer warps load, consumers compute)
# benchmarks/bench_joint_attention.py checks and times all three; DEFAULT_VARIANT moves only on a measurement.
VARIANTS = {"pointer": (False, False), "tma": (True, False), "tma_ws": (True, True)}
DEFAULT_VARIANT = "pointer"
_TUNED = {name: triton.autotune(_CONFIGS, key=["S_BUCKET", "HEAD_DIM"])(_joint_attention_kernel) for name in VARIANTS}
# fp32 (tests and debugging only; FLUX runs bf16/fp16): one modest config, exact "ieee" dots, no tuning.
_FP32_CONFIG = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)


class _TorchScratch:
    """Global scratch for on-device TMA descriptors (Triton asks for it at launch; from torch's caching allocator,
    so CUDA-graph capture takes it from the graph's pool)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, size: int, alignment: int, stream) -> Tensor:
        return torch.empty(size, dtype=torch.int8, device=self.device)


@contextlib.contextmanager
def _scratch_allocator(device: torch.device) -> Iterator[None]:
    """An allocator for one TMA launch, without taking over Triton's: triton.set_allocator sets one for the whole
    context (a ContextVar, triton/runtime/_allocation.py in triton 3.6-3.9) that the user or another library may
    have set. Theirs stays and serves this launch too; only when none is set is ours installed, and none is put
    back after."""
    if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        yield
        return
    token = _allocation._allocator.set(_TorchScratch(device))
    try:
        yield
    finally:
        _allocation._allocator.reset(token)


def _check_variant(variant: str, q: Tensor, k: Tensor, v: Tensor) -> tuple[bool, bool]:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    use_tma, warp_specialize = VARIANTS[variant]
    if use_tma:
        require_capability(q.device, TMA_MIN_CAPABILITY, f"variant {variant!r} (TMA)", "use variant='pointer'")
        # TMA: each (batch, head) slice starts 16-byte aligned and its row stride is a multiple of 16 bytes
        for name, t in (("q", q), ("k", k), ("v", v)):
            size = t.element_size()
            if t.data_ptr() % 16 or any(st * size % 16 for st in t.stride()[:3]):
                raise ValueError(f"variant {variant!r}: {name} must be 16-byte aligned with strides that are "
                                 f"multiples of 16 bytes (got strides {t.stride()}); use variant='pointer'")
    return use_tma, warp_specialize


def _launch(q, k, v, v_stride_s, v_stride_d, out, scales, is_fp8, v_absmax=None, row_scale=None,
            variant: str = "pointer"):
    B, H, S, D = q.shape
    if D not in HEAD_DIMS:
        raise ValueError(f"head_dim {D} is not supported by the Triton kernel (supported: {HEAD_DIMS}); "
                         "use backend='torch'")
    use_tma, warp_specialize = _check_variant(variant, q, k, v)
    dummy = out  # scale pointers are read only when IS_FP8
    args = (
        q, k, v, out, *(scales or (dummy, dummy, dummy)), dummy if v_absmax is None else v_absmax,
        dummy if row_scale is None else row_scale, LOG2E / math.sqrt(D), S, H,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v_stride_s, v_stride_d, out.stride(0), out.stride(1),
        triton.next_power_of_2(S),
    )
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 stays fp32; 8/16-bit dots ignore it
    flags = dict(IS_FP8=is_fp8, V_ABSMAX_SLOTS=0 if v_absmax is None else v_absmax.shape[1], USE_TMA=use_tma,
                 WARP_SPECIALIZE=warp_specialize)
    with _scratch_allocator(q.device) if use_tma else contextlib.nullcontext():
        if q.is_cuda and q.dtype != torch.float32:
            grid = lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * H)  # noqa: E731
            _TUNED[variant][grid](*args, HEAD_DIM=D, DOT_PRECISION=precision, **flags)
        elif q.is_cuda:
            grid = (triton.cdiv(S, _FP32_CONFIG["BLOCK_M"]), B * H)
            _joint_attention_kernel[grid](*args, HEAD_DIM=D, DOT_PRECISION=precision, **flags, **_FP32_CONFIG)
        else:  # Triton's interpreter: one fixed config
            _joint_attention_kernel[(triton.cdiv(S, 32), B * H)](*args, HEAD_DIM=D, BLOCK_M=32, BLOCK_N=16,
                                                                  DOT_PRECISION=precision, **flags)
    return out


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must all be [B, H, S, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of float16/bfloat16/float32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if any(t.stride(-1) != 1 for t in (q, k, v)) or not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device with a contiguous last dim")


def joint_attention(q: Tensor, k: Tensor, v: Tensor, out: Tensor | None = None, variant: str | None = None) -> Tensor:
    """Attention over the joint sequence; q, k, v [B, H, S, D] -> [B, S, H*D] (see the module docstring).
    variant: one of VARIANTS (how K/V tiles are loaded), DEFAULT_VARIANT when None."""
    _check_qkv(q, k, v)
    B, H, S, D = q.shape
    out = output(out, (B, S, H * D), q.dtype, q.device)
    return _launch(q, k, v, v.stride(2), 1, out, None, is_fp8=False, variant=variant or DEFAULT_VARIANT)


# ---- attention with e4m3 output rows for a W8A8 projection (see the module docstring) ----


def _check_v_absmax(v_absmax: Tensor, B: int, device) -> None:
    n = v_absmax.shape[-1] if v_absmax.ndim == 2 else 0
    if v_absmax.shape != (B, n) or n < 1 or n & (n - 1) or v_absmax.dtype != torch.float32 \
            or not v_absmax.is_contiguous() or v_absmax.device != device:
        raise ValueError(f"v_absmax must be a contiguous float32 [{B}, n] tensor on {device} (n a power of two) "
                         f"whose row b bounds |v[b]|, got {tuple(v_absmax.shape)} {v_absmax.dtype}")


def joint_attention_fp8_out_ref(q: Tensor, k: Tensor, v: Tensor, v_absmax: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 attention, then each row of batch item b quantized with scale max(v_absmax[b]) / 448."""
    B, H, S, D = q.shape
    out = joint_attention_ref(q.float(), k.float(), v.float())
    row_scale = e4m3_scale_ref(v_absmax.float().amax(dim=1))[:, None].expand(B, S).contiguous()
    return to_e4m3_ref(out, row_scale[..., None]), row_scale


def joint_attention_fp8_out(q: Tensor, k: Tensor, v: Tensor, v_absmax: Tensor, out: Tensor | None = None,
                            variant: str | None = None) -> tuple[Tensor, Tensor]:
    """Attention -> (out8 [B, S, H*D] e4m3fn, row_scale [B, S] fp32), out ~ out8 * row_scale; v_absmax [B, n]
    fp32 with max(v_absmax[b]) >= max |v[b]| (rope_qk_norm_joint's, or v.abs().amax((1, 2, 3))[:, None])."""
    _check_qkv(q, k, v)
    B, H, S, D = q.shape
    _check_v_absmax(v_absmax, B, q.device)
    out = output(out, (B, S, H * D), torch.float8_e4m3fn, q.device)
    row_scale = torch.empty(B, S, dtype=torch.float32, device=q.device)
    _launch(q, k, v, v.stride(2), 1, out, None, is_fp8=False, v_absmax=v_absmax, row_scale=row_scale,
            variant=variant or DEFAULT_VARIANT)
    return out, row_scale


# ---- FP8 (e4m3) attention: off by default; selectable on GPUs with fp8 tensor cores (sm_89+) ----


def quantize_qkv_fp8(q: Tensor, k: Tensor, v: Tensor):
    """Per-(batch, head) absmax e4m3 quantization: returns q8, k8 [B, H, S, D], vt8 [B, H, D, S] (V transposed
    for Hopper's fp8 MMA) and the fp32 dequantization scales q_scale, k_scale, v_scale [B, H]."""
    def quantize(x: Tensor):
        scale = e4m3_scale_ref(x.float().abs().amax(dim=(2, 3)))
        return to_e4m3_ref(x.float(), scale[:, :, None, None]), scale

    (q8, qs), (k8, ks), (v8, vs) = quantize(q), quantize(k), quantize(v)
    return q8, k8, v8.transpose(2, 3).contiguous(), qs, ks, vs


def joint_attention_fp8_ref(q8, k8, vt8, q_scale, k_scale, v_scale, out_dtype=torch.bfloat16) -> Tensor:
    """The fp32 reference of the fp8 path: dequantize, then joint_attention_ref."""
    deq = lambda x, s: x.float() * s[:, :, None, None]  # noqa: E731
    return joint_attention_ref(deq(q8, q_scale), deq(k8, k_scale), deq(vt8.transpose(2, 3), v_scale)).to(out_dtype)


def joint_attention_fp8(q8: Tensor, k8: Tensor, vt8: Tensor, q_scale: Tensor, k_scale: Tensor, v_scale: Tensor,
                        out_dtype: torch.dtype = torch.bfloat16, out: Tensor | None = None) -> Tensor:
    """FP8 attention (inputs from quantize_qkv_fp8), fp32 softmax and accumulation -> [B, S, H*D] out_dtype."""
    if q8.ndim != 4 or k8.shape != q8.shape or vt8.shape != (*q8.shape[:2], q8.shape[3], q8.shape[2]):
        raise ValueError(f"expected q8, k8 [B, H, S, D] and vt8 [B, H, D, S], got {tuple(q8.shape)}, "
                         f"{tuple(k8.shape)}, {tuple(vt8.shape)}")
    if any(t.dtype != torch.float8_e4m3fn for t in (q8, k8, vt8)):
        raise ValueError("q8, k8, vt8 must be float8_e4m3fn (use quantize_qkv_fp8)")
    B, H, S, D = q8.shape
    for name, sc in (("q_scale", q_scale), ("k_scale", k_scale), ("v_scale", v_scale)):
        if sc.shape != (B, H) or sc.dtype != torch.float32 or not sc.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 [{B}, {H}] tensor")
    require_capability(q8.device, FP8_MIN_CAPABILITY, "FP8 attention (fp8 tensor cores)", "use the bf16 path")
    if any(t.stride(-1) != 1 for t in (q8, k8, vt8)):
        raise ValueError("q8, k8, vt8 must have a contiguous last dim")
    out = output(out, (B, S, H * D), out_dtype, q8.device)
    return _launch(q8, k8, vt8, 1, vt8.stride(2), out, (q_scale, k_scale, v_scale), is_fp8=True)
