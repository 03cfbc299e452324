"""FP8 weight-only linear: y = x @ (weight * weight_scale)^T (+ bias), then an optional fused epilogue.

    x [..., K] bf16/fp16/fp32 (rows may be strided, last dim contiguous); weight [N, K] float8_e4m3fn;
    weight_scale [N] fp32 (per output channel); bias [N]  ->  y [..., N] in x's dtype
    epilogue "none" | "gelu_tanh" (gelu(y, tanh)) | "gated_residual" (residual + gate * y, x [B, L, K],
    residual [B, L, N], gate [B, N] or [B, 1, N] broadcast over L: FLUX's `x + gate * proj(attn)`)

Weight-only: the activations stay in their dtype. Each fp8 weight tile is loaded (1 byte per weight: half
the bytes of bf16) and converted to the activation dtype in registers; e4m3 values are exact in
bf16/fp16/fp32, so the conversion adds no error. The dot accumulates in fp32; the per-channel scale, the bias
and the epilogue are applied once, in fp32, on the accumulator, and the result is rounded once.

Both kernels compute the transposed product, acc^T [BLOCK_N, BLOCK_M] = W [BLOCK_N, BLOCK_K] · x^T [BLOCK_K,
BLOCK_M] ("swap AB"): the converted weight tile is the dot's first operand, which MMA instructions may take
from registers (Hopper's wgmma takes only its first operand from registers), and the tiny token count of the
small-M path becomes the MMA's N dimension (16) instead of a padded M of 64+.

Two paths, chosen by M (the number of token rows):
  M > 16   tiled GEMM: one program per (BLOCK_M, BLOCK_N) output tile, grouped program order so GROUP_M row
           blocks reuse a weight column block from L2, unmasked loads over full K blocks (out-of-range rows
           and channels read row M-1 / channel N-1 instead; their results are never stored) and one masked
           tail block. BLOCK_M/N/K, warps and stages are autotuned on the GPU, keyed by N, K, the dtypes and a
           power-of-two bucket of M (never the exact M: new resolutions must not re-tune).
  M <= 16  split-K GEMV: at these sizes the op is a read of the weight, so the grid must cover the GPU with
           enough programs to keep ~all of HBM busy, which N / BLOCK_N alone does not (3072 / 64 = 48
           programs on 132 SMs). Program (n, s) owns a BLOCK_N slab of output channels and the s-th K slice
           (K_SPLIT columns, a multiple of 256) and writes its fp32 partial sums to a [SPLIT_K, M, N] buffer;
           a second small Triton kernel sums the SPLIT_K partials in a fixed order and applies scale, bias and
           the epilogue (no torch ops on the result in this path). SPLIT_K is picked on the host aiming at
           4 programs per SM (slices are whole 256-column chunks, so FLUX's shapes land at 2-5 per SM on an
           H100). Two stages instead of tl.atomic_add into one buffer: the result is deterministic (the same
           bits on every run, whatever the block schedule), the autotuner may re-run the first kernel freely
           (it overwrites, never accumulates), and no zero-fill launch is needed; the price is SPLIT_K x M x
           N x 4 bytes of partials written and read back (M = 16, N = K = 3072, 6 slices: 1.2 MB against the
           9.4 MB weight; M = 1: 74 kB) and a second launch (a few µs; a "last program of the slab reduces"
           semaphore would save it and is not done).

FP8 on GPUs without fp8 support (below sm_89): Triton refuses the fp8e4nv type there ("type fp8e4nv not
supported in this architecture": triton/backends/nvidia/compiler.py, read in triton 3.9), so the launcher passes
the weight as raw bytes (uint8) and the kernels decode e4m3fn with integer ops (exact, subnormals included;
the NaN code 0x7F/0xFF, which quantized weights never hold, decodes as +-480). Weight-only fp8 therefore
needs no fp8 hardware. The decoding path is tested in the interpreter; it has not run on an sm_80/86 GPU.
On sm_89+ the native fp8e4nv -> activation-dtype conversion is used.

Not proven on hardware: this file has only run in Triton's interpreter so far (DESIGN.md §6); the autotune
spaces, SPLIT_K heuristic and the swap-AB choice are Hopper-oriented guesses until measured.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import FP8_MIN_CAPABILITY, below_capability, gelu_tanh, gelu_tanh_ref, output, require_capability

EPILOGUES = {"none": 0, "gelu_tanh": 1, "gated_residual": 2}
ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SMALL_M = 16  # up to this many rows: the split-K GEMV path


# ---- reference formulas ----


def _per_batch(v: Tensor) -> Tensor:
    return v if v.ndim == 3 else v[:, None, :]  # [B, N] -> [B, 1, N]


def fp8_linear_ref(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None = None,
                   residual: Tensor | None = None, gate: Tensor | None = None, epilogue: str = "none") -> Tensor:
    """fp32 math: dequantize the weight, x @ w^T + bias, the epilogue; rounded once to x's dtype."""
    _check_args(x, weight, weight_scale, bias, residual, gate, epilogue)
    w = weight.float() * weight_scale[:, None]  # [N, K]
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    if epilogue == "gelu_tanh":
        y = gelu_tanh_ref(y)
    elif epilogue == "gated_residual":
        y = residual.float() + _per_batch(gate).float() * y
    return y.to(x.dtype)


def fp8_linear_eager(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None = None,
                     residual: Tensor | None = None, gate: Tensor | None = None, epilogue: str = "none") -> Tensor:
    """What plain PyTorch computes in x's dtype (dequantize to x.dtype, matmul, epilogue, each op rounded):
    the low-precision baseline of DESIGN.md §4's rule in tests and benchmarks, not a backend."""
    _check_args(x, weight, weight_scale, bias, residual, gate, epilogue)
    dt = x.dtype
    y = x @ (weight.to(dt) * weight_scale.to(dt)[:, None]).T
    if bias is not None:
        y = y + bias.to(dt)
    if epilogue == "gelu_tanh":
        y = gelu_tanh_ref(y)
    elif epilogue == "gated_residual":
        y = residual.to(dt) + _per_batch(gate).to(dt) * y
    return y


# ---- kernels ----


@triton.jit
def _load_weight(ptrs, mask, MASKED: tl.constexpr, DECODE_BITS: tl.constexpr, DTYPE: tl.constexpr):
    """A weight tile, converted to the activation dtype in registers (exact for e4m3 values)."""
    if MASKED:
        raw = tl.load(ptrs, mask=mask, other=0.0)
    else:
        raw = tl.load(ptrs)
    if DECODE_BITS:  # uint8 storage of e4m3fn (GPUs below sm_89): build the fp32 bits with integer ops
        b = raw.to(tl.uint32)
        mag = b & 0x7F
        sign = (b & 0x80) << 24
        # normal numbers: exponent field + (127 - 7), the 3 mantissa bits on top of fp32's 23
        normal = (((mag << 20) + (120 << 23)) | sign).to(tl.float32, bitcast=True)
        sub = (mag & 7).to(tl.float32) * 0.001953125  # subnormals: m/8 * 2^-6
        sub = tl.where(sign != 0, -sub, sub)
        return tl.where(mag < 8, sub, normal).to(DTYPE)
    else:
        return raw.to(DTYPE)


@triton.jit
def _epilogue_store(acc, offs_n, offs_m, M, N, L, SCALE, XSCALE, BIAS, RES, GATE, OUT, stride_om, stride_rm,
                    stride_gb, HAS_XSCALE: tl.constexpr, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] fp32 (transposed) -> scales, bias, epilogue in fp32 -> OUT[m, n], masked."""
    n_ok = offs_n < N
    mask = n_ok[:, None] & (offs_m[None, :] < M)
    rows = offs_m.to(tl.int64)
    y = acc * tl.load(SCALE + offs_n, mask=n_ok, other=0.0)[:, None]
    if HAS_XSCALE:  # W8A8: the per-row (token) activation scale
        y = y * tl.load(XSCALE + offs_m, mask=offs_m < M, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    if EPILOGUE == 1:
        y = gelu_tanh(y)
    elif EPILOGUE == 2:  # residual + gate * y, gate per batch (row // L)
        gate = tl.load(GATE + (rows // L)[None, :] * stride_gb + offs_n[:, None], mask=mask, other=0.0)
        res = tl.load(RES + rows[None, :] * stride_rm + offs_n[:, None], mask=mask, other=0.0)
        y = res.to(tl.float32) + gate.to(tl.float32) * y
    tl.store(OUT + rows[None, :] * stride_om + offs_n[:, None], y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _dot_over_k(w_ptrs, xt_ptrs, k_len, offs_k, DECODE_BITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc^T [BLOCK_N, BLOCK_M] = W tile · x^T tile over the k_len columns the pointers start at: unmasked full
    BLOCK_K steps, then one masked tail (shared by the tiled and the split-K kernels)."""
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    dtype = xt_ptrs.dtype.element_ty
    k_full = (k_len // BLOCK_K) * BLOCK_K
    for _ in range(0, k_full, BLOCK_K):
        w = _load_weight(w_ptrs, None, False, DECODE_BITS, dtype)
        acc = tl.dot(w, tl.load(xt_ptrs), acc, input_precision=DOT_PRECISION)
        w_ptrs += BLOCK_K
        xt_ptrs += BLOCK_K
    if k_full < k_len:
        k_ok = offs_k < k_len - k_full
        w = _load_weight(w_ptrs, k_ok[None, :], True, DECODE_BITS, dtype)
        acc = tl.dot(w, tl.load(xt_ptrs, mask=k_ok[:, None], other=0.0), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _fp8_gemm_kernel(
    X, W, SCALE, XSCALE, BIAS, RES, GATE, OUT,
    M, N, K, L,
    stride_xm, stride_wn, stride_om, stride_rm, stride_gb,
    M_BUCKET,  # autotune key only
    HAS_XSCALE: tl.constexpr, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, DECODE_BITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n  # GROUP_M row blocks walk the column blocks together (L2 reuse)
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (offs_m % M).to(tl.int64)  # in range, so the K loop needs no row/channel masks
    chans = (offs_n % N).to(tl.int64)
    xt_ptrs = X + rows[None, :] * stride_xm + offs_k[:, None]  # x^T tile [BLOCK_K, BLOCK_M]
    w_ptrs = W + chans[:, None] * stride_wn + offs_k[None, :]  # W tile [BLOCK_N, BLOCK_K]
    acc = _dot_over_k(w_ptrs, xt_ptrs, K, offs_k, DECODE_BITS, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    _epilogue_store(acc, offs_n, offs_m, M, N, L, SCALE, XSCALE, BIAS, RES, GATE, OUT, stride_om, stride_rm,
                    stride_gb, HAS_XSCALE, HAS_BIAS, EPILOGUE)


@triton.jit
def _splitk_partial_kernel(
    X, W, PART,
    M, N, K, K_SPLIT,
    stride_xm, stride_wn, stride_ps,
    M_BUCKET,  # autotune key only
    DECODE_BITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)  # all M <= BLOCK_M rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_start = pid_s * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)
    rows = (offs_m % M).to(tl.int64)
    chans = (offs_n % N).to(tl.int64)
    xt_ptrs = X + rows[None, :] * stride_xm + (k_start + offs_k)[:, None]  # [BLOCK_K, BLOCK_M]
    w_ptrs = W + chans[:, None] * stride_wn + (k_start + offs_k)[None, :]  # [BLOCK_N, BLOCK_K]
    acc = _dot_over_k(w_ptrs, xt_ptrs, k_end - k_start, offs_k, DECODE_BITS, DOT_PRECISION, BLOCK_M, BLOCK_N,
                      BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    tl.store(PART + pid_s * stride_ps + offs_m[None, :] * N + offs_n[:, None], acc, mask=mask)


@triton.jit
def _splitk_epilogue_kernel(
    PART, SCALE, BIAS, RES, GATE, OUT,
    M, N, L, SPLIT_K,
    stride_ps, stride_om, stride_rm, stride_gb,
    HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    ptrs = PART + offs_m[None, :] * N + offs_n[:, None]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for s in range(SPLIT_K):  # a fixed order: deterministic sums
        acc += tl.load(ptrs + s * stride_ps, mask=mask, other=0.0)
    _epilogue_store(acc, offs_n, offs_m, M, N, L, SCALE, SCALE, BIAS, RES, GATE, OUT, stride_om, stride_rm,
                    stride_gb, False, HAS_BIAS, EPILOGUE)


# Hopper-oriented, small (each config is a compile). Tiled: 128-wide weight tiles (the wgmma M side), 3-4
# stages; BLOCK_M 64-256 for the token side; 8 warps on the large tiles.
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (256, 128, 64, 8, 3), (128, 256, 64, 8, 3),
        (64, 128, 64, 4, 4), (128, 128, 128, 8, 3), (32, 128, 128, 4, 4), (64, 256, 64, 8, 4),
    ]
]
_fp8_gemm_tuned = triton.autotune(_GEMM_CONFIGS, key=["M_BUCKET", "N", "K"])(_fp8_gemm_kernel)
# Split-K: BLOCK_K must divide K_CHUNK (a K slice is a multiple of K_CHUNK columns).
_SPLITK_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in [(64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 4), (128, 256, 8, 3), (32, 256, 4, 4),
                         (64, 256, 8, 4)]
]
_splitk_partial_tuned = triton.autotune(_SPLITK_CONFIGS, key=["M_BUCKET", "N", "K"])(_splitk_partial_kernel)
K_CHUNK = 256
SPLITK_NOMINAL_BLOCK_N = 64  # for picking SPLIT_K before the autotuner picks BLOCK_N
PROGRAMS_PER_SM = 4
# fp32 activations (tests and debugging; FLUX runs bf16): one modest config each, exact "ieee" dots, no tuning.
_FP32_GEMM = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
_FP32_SPLITK = dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
# Triton's interpreter: one small config each (it cannot autotune) and a small grid (it runs programs one by one).
_INTERP_GEMM = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4)
_INTERP_SPLITK = dict(BLOCK_N=32, BLOCK_K=32, num_warps=4)
_INTERP_K_CHUNK, _INTERP_PROGRAMS = 32, 8


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _needs_bit_decode(device: torch.device) -> bool:
    """Below sm_89 Triton has no fp8e4nv type: the kernels decode the weight bytes themselves."""
    return below_capability(device, FP8_MIN_CAPABILITY)


def split_k_plan(N: int, K: int, device: torch.device) -> tuple[int, int]:
    """(SPLIT_K, K_SPLIT) of the small-M path: ~PROGRAMS_PER_SM programs per SM, K slices of whole K_CHUNKs."""
    if device.type == "cuda":
        chunk, nominal_n, programs = K_CHUNK, SPLITK_NOMINAL_BLOCK_N, PROGRAMS_PER_SM * _sm_count(device.index or 0)
    else:
        chunk, nominal_n, programs = _INTERP_K_CHUNK, _INTERP_SPLITK["BLOCK_N"], _INTERP_PROGRAMS
    chunks = max(1, triton.cdiv(K, chunk))
    split = min(chunks, max(1, triton.cdiv(programs, triton.cdiv(N, nominal_n))))
    k_split = triton.cdiv(chunks, split) * chunk
    return max(1, triton.cdiv(K, k_split)), k_split


# ---- launcher ----


def _check_args(x, weight, weight_scale, bias, residual, gate, epilogue, act_dtypes=ACT_DTYPES) -> None:
    """Checks shared by the reference and the kernel: dtypes, shapes, devices, epilogue inputs."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"unknown epilogue {epilogue!r}; expected one of {tuple(EPILOGUES)}")
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"weight must be torch.float8_e4m3fn, got {weight.dtype} (quantize it first, e.g. "
                         "fluxrt.quantize.quantize_weight)")
    if x.dtype not in act_dtypes:
        raise ValueError(f"unsupported activation dtype {x.dtype}; use one of {[str(d) for d in act_dtypes]}")
    if weight.ndim != 2 or x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x [..., K] and weight [N, K] disagree: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    N = weight.shape[0]
    if weight_scale.shape != (N,) or weight_scale.dtype != torch.float32:
        raise ValueError(f"weight_scale must be float32 [{N}] (one per output channel of weight "
                         f"{tuple(weight.shape)}), got {weight_scale.dtype} {tuple(weight_scale.shape)}")
    if bias is not None and (bias.shape != (N,) or bias.dtype not in ACT_DTYPES):
        raise ValueError(f"bias must be [{N}] float32/float16/bfloat16 (weight {tuple(weight.shape)}), "
                         f"got {bias.dtype} {tuple(bias.shape)}")
    if epilogue == "gated_residual":
        if residual is None or gate is None:
            raise ValueError("epilogue='gated_residual' needs both residual and gate")
        if x.ndim != 3:
            raise ValueError(f"epilogue='gated_residual' needs x [B, L, K], got {tuple(x.shape)}")
        B, L, _ = x.shape
        if residual.shape != (B, L, N) or residual.dtype not in ACT_DTYPES:
            raise ValueError(f"residual must be [{B}, {L}, {N}] like the output (x {tuple(x.shape)}, weight "
                             f"{tuple(weight.shape)}), got {residual.dtype} {tuple(residual.shape)}")
        if tuple(gate.shape) not in ((B, N), (B, 1, N)) or gate.dtype not in ACT_DTYPES:
            raise ValueError(f"gate must be [{B}, {N}] or [{B}, 1, {N}] (x {tuple(x.shape)}, weight "
                             f"{tuple(weight.shape)}), got {gate.dtype} {tuple(gate.shape)}")
    elif residual is not None or gate is not None:
        raise ValueError(f"residual and gate are only used by epilogue='gated_residual' (epilogue is {epilogue!r})")
    tensors = [t for t in (weight, weight_scale, bias, residual, gate) if t is not None]
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"all inputs must be on x's device {x.device}, got {[str(t.device) for t in tensors]}")


def _rows(out: Tensor) -> Tensor:
    """out [..., N] as the [M, N] matrix the kernels address with one row stride."""
    try:
        return out.view(-1, out.shape[-1])
    except RuntimeError:
        raise ValueError(f"out's leading dims must merge into one row stride (a view [M, {out.shape[-1]}]); strides "
                         f"{out.stride()}") from None


def fp8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None = None,
               residual: Tensor | None = None, gate: Tensor | None = None, epilogue: str = "none",
               out: Tensor | None = None) -> Tensor:
    """FP8 weight-only linear with a fused epilogue (see the module docstring); returns out [..., N]."""
    _check_args(x, weight, weight_scale, bias, residual, gate, epilogue)
    named = {"x": x, "weight": weight, "residual": residual, "gate": gate}
    bad = [name for name, t in named.items() if t is not None and t.ndim and t.stride(-1) != 1]
    if bad:
        raise ValueError(f"{', '.join(bad)} must have a contiguous last dim (rows may be strided)")
    N, K = weight.shape
    out = output(out, (*x.shape[:-1], N), x.dtype, x.device)
    out2 = _rows(out)
    x2 = x.reshape(-1, K)  # a view whenever the leading dims merge (strided rows included)
    M = x2.shape[0]
    if M == 0 or N == 0:
        return out
    if any(t is not None and t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
           for t in (x, residual)):
        raise ValueError("out must not share memory with x or residual (the autotuner re-runs the kernel)")
    res2 = residual.reshape(-1, N) if residual is not None else None
    L = x.shape[1] if epilogue == "gated_residual" else 1
    dummy = out2  # unused pointer arguments (constexpr flags keep them unread)
    scale, b = weight_scale.contiguous(), (bias.contiguous() if bias is not None else dummy)
    res2, gate = (res2 if res2 is not None else dummy), (gate if gate is not None else dummy)
    w = weight.view(torch.uint8) if _needs_bit_decode(x.device) else weight
    flags = dict(DECODE_BITS=w.dtype == torch.uint8, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    epi = dict(HAS_BIAS=bias is not None, EPILOGUE=EPILOGUES[epilogue])
    bucket = triton.next_power_of_2(M)
    if M > SMALL_M:
        epi["HAS_XSCALE"] = False
        args = (x2, w, scale, scale, b, res2, gate, out2, M, N, K, L,
                x2.stride(0), w.stride(0), out2.stride(0), res2.stride(0), gate.stride(0), bucket)
        if x.is_cuda and x.dtype != torch.float32:
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
            _fp8_gemm_tuned[grid](*args, **flags, **epi)
        else:
            cfg = _FP32_GEMM if x.is_cuda else _INTERP_GEMM
            grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
            _fp8_gemm_kernel[grid](*args, **flags, **epi, **cfg)
        return out
    split_k, k_split = split_k_plan(N, K, x.device)
    part = torch.empty(split_k, M, N, dtype=torch.float32, device=x.device)  # [SPLIT_K, M, N] partial sums
    args = (x2, w, part, M, N, K, k_split, x2.stride(0), w.stride(0), part.stride(0), bucket)
    if x.is_cuda and x.dtype != torch.float32:
        _splitk_partial_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), split_k)](
            *args, **flags, BLOCK_M=SMALL_M)
    else:
        cfg = _FP32_SPLITK if x.is_cuda else _INTERP_SPLITK
        _splitk_partial_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), split_k)](*args, **flags, BLOCK_M=SMALL_M, **cfg)
    block_n = 128 if x.is_cuda else 32
    _splitk_epilogue_kernel[(triton.cdiv(N, block_n),)](
        part, scale, b, res2, gate, out2, M, N, L, split_k,
        part.stride(0), out2.stride(0), res2.stride(0), gate.stride(0),
        **epi, BLOCK_M=SMALL_M, BLOCK_N=block_n, num_warps=4)
    return out


# ---- W8A8: fp8 activations (per-row scales) x fp8 weights (per-channel scales) on the fp8 tensor cores ----
#
# The same tiled kernel with X in e4m3fn: the weight "conversion" is then a no-op, tl.dot multiplies fp8 x fp8
# into fp32 (Hopper's fp8 wgmma; both operands are K-major here, W [N, K] and x^T read from x [M, K], which is
# the layout fp8 MMA requires), and the epilogue applies x_scale[m] * w_scale[n], the bias and the same fused
# epilogues. The alternative is torch._scaled_mm (cuBLASLt) with rowwise scales, which has no GELU / gated
# residual epilogue; which one the runtime uses is chosen by measurement (benchmarks/bench_fp8_gemm.py).


def w8a8_linear_ref(x8: Tensor, x_scale: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None = None,
                    residual: Tensor | None = None, gate: Tensor | None = None, epilogue: str = "none",
                    out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """fp32 math: dequantize both operands, x @ w^T + bias, the epilogue; rounded once to out_dtype."""
    _check_w8a8_args(x8, x_scale, weight, weight_scale, bias, residual, gate, epilogue, out_dtype)
    x = x8.float() * x_scale.float()[..., None]
    return fp8_linear_ref(x, weight, weight_scale, bias, residual, gate, epilogue).to(out_dtype)


def _check_w8a8_args(x8, x_scale, weight, weight_scale, bias, residual, gate, epilogue, out_dtype) -> None:
    if x8.dtype != torch.float8_e4m3fn:
        raise ValueError(f"x8 must be torch.float8_e4m3fn (quantized activations), got {x8.dtype}")
    if x_scale.shape != x8.shape[:-1] or x_scale.dtype != torch.float32 or x_scale.device != x8.device:
        raise ValueError(f"x_scale must be float32 {tuple(x8.shape[:-1])} (one per row of x8 {tuple(x8.shape)}) on "
                         f"{x8.device}, got {x_scale.dtype} {tuple(x_scale.shape)} on {x_scale.device}")
    if out_dtype not in ACT_DTYPES:
        raise ValueError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    _check_args(x8, weight, weight_scale, bias, residual, gate, epilogue, act_dtypes=(torch.float8_e4m3fn,))


def w8a8_linear(x8: Tensor, x_scale: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None = None,
                residual: Tensor | None = None, gate: Tensor | None = None, epilogue: str = "none",
                out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """(x8 * x_scale) @ (weight * weight_scale)^T + bias, then the epilogue; fp8 x fp8 dots, fp32 accumulation.

    x8 [..., K] e4m3fn, x_scale [...] fp32 (per row); weight [N, K] e4m3fn, weight_scale [N] fp32 -> [..., N]
    in out_dtype. Needs fp8 tensor cores on a GPU (sm_89+); runs anywhere in Triton's interpreter."""
    _check_w8a8_args(x8, x_scale, weight, weight_scale, bias, residual, gate, epilogue, out_dtype)
    require_capability(x8.device, FP8_MIN_CAPABILITY, "W8A8 (fp8 tensor cores)", "use the weight-only fp8_linear")
    if x8.ndim and x8.stride(-1) != 1:
        raise ValueError("x8 must have a contiguous last dim (rows may be strided)")
    N, K = weight.shape
    out = torch.empty((*x8.shape[:-1], N), dtype=out_dtype, device=x8.device)
    out2, x2 = out.view(-1, N), x8.reshape(-1, K)
    M = x2.shape[0]
    if M == 0 or N == 0:
        return out
    xs = x_scale.reshape(-1).contiguous()
    res2 = residual.reshape(-1, N) if residual is not None else out2
    gate = gate if gate is not None else out2
    b = bias.contiguous() if bias is not None else out2
    args = (x2, weight, weight_scale.contiguous(), xs, b, res2, gate, out2, M, N, K,
            x8.shape[1] if epilogue == "gated_residual" else 1,
            x2.stride(0), weight.stride(0), out2.stride(0), res2.stride(0), gate.stride(0), triton.next_power_of_2(M))
    flags = dict(HAS_XSCALE=True, HAS_BIAS=bias is not None, EPILOGUE=EPILOGUES[epilogue], DECODE_BITS=False,
                 DOT_PRECISION="tf32")
    if x8.is_cuda:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        _fp8_gemm_tuned[grid](*args, **flags)
    else:
        cfg = _INTERP_GEMM
        _fp8_gemm_kernel[(triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)](*args, **flags, **cfg)
    return out
