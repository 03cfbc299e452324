"""LoRA side branch with per-row adapter selection: y + ((x A^T) * s) B^T for every row of a batch at once.

    out = y + ((x @ down^T) * row_scales[b, owner]) @ up^T        (b: the batch index of each row)

x: [B, ..., K] dense (fp32/fp16/bf16), or e4m3fn rows with x_scale [B, ...] fp32 (x ~ x8 * x_scale, the FP8Rows
a W8A8 linear reads); y: [B, ..., N], the base linear's output. down [R, K], up [N, R]: every loaded LoRA's factors
for this layer side by side along the padded rank R (alpha / rank folded into up; unused columns zero). owner [R]
int: which adapter owns each rank column; row_scales [B, L] fp32: each batch row's scale per adapter. So one
launch serves a batch whose rows use different LoRAs at different scales (fluxrt.lora_branch), and swapping a
LoRA or a scale rewrites buffers, never shapes. Arithmetic is fp32; the result is rounded once to y's dtype.
The rows of batch element b are the contiguous block b of the flattened rows (M = B * rows_per_batch).
owner entries must lie in [0, L): checked on CPU tensors; on a GPU checking would synchronize the device at every
linear, so the kernel instead makes the scale of an out-of-range owner NaN (a loud output, never a wrong one).

Kernel (lora_add): two launches, punica-style ("shrink" then "expand"), with an fp32 [M, R] buffer h between:

  shrink  h[m, r] = (sum_k x[m, k] down[r, k]) * x_scale[m] * row_scales[b(m), owner[r]]
          one program per (BLOCK_M rows, BLOCK_R rank columns); BLOCK_R covers the whole padded rank (up to 256)
          when M is large, so x is read from memory exactly once, and is 16 for M <= 16 (the modulation GEMVs,
          M = batch) so that R / 16 programs share the work. fp8 x tiles are converted to down's dtype in
          registers (e4m3 values are exact in bf16/fp16/fp32); bf16 x with bf16 down is a bf16 tl.dot (exact
          products, fp32 accumulation); mixed dtypes are fp32 dots ("tf32x3" on a GPU: 3 TF32 MMAs, fp32-grade).
  expand  out[m, n] = y[m, n] + sum_r h[m, r] up[n, r], rounded once to y's dtype
          one program per (BLOCK_M, BLOCK_N) output tile, a loop over R in BLOCK_R steps. With bf16/fp16 up, h is
          split into hi + lo halves in up's dtype and both are multiplied on the tensor cores (h kept to ~16
          significant bits in bf16, ~22 in fp16; products exact, fp32 sums): far below out's one rounding, at
          twice a bf16 dot's cost where an fp32 dot would cost 3 TF32 MMAs (fp16 up: |h| must stay below
          fp16's 65504, as in any fp16 model). fp32 up: fp32 dots.

Why two kernels and not one: the expand needs a row's whole h (a reduction over all of K) before any of its N
outputs, while the shrink's natural tile is a row block over K and the expand's a row x column block; one kernel
would either recompute the shrink in every N tile (N / BLOCK_N times the x reads: ~100x at FLUX's N) or need a
grid-wide barrier. The h buffer is tiny (M x R x 4 bytes: 1.2 MB at M = 4608, R = 64) and stays in L2, so the
split costs one extra launch (a few us), not bandwidth.

What bounds the time: the branch is ~2 M R (K + N) flops, R / K + R / N of the base GEMM's 2 M K N (2.4-4.2 %
at R = 64 on FLUX's layers; 1.5 of a step's 59.5 linear TF), so it is bandwidth bound: the shrink reads x again
(2 K bytes a row in bf16, K in fp8) and the expand reads y and writes out (4 N bytes a row). Over a flux-dev
step at 1024² (19 double blocks with 4096 image and 512 text rows, 38 single blocks with 4608 rows; the block
linears only) that is 37 GB moved: ~8 ms at H200's ~4.8 TB/s, ~11 ms at H100's 3.35 TB/s, against ~85 ms of bf16
block linears (59.5 TF at ~700 TF/s). So this design predicts ~9-13 % of the linears, ~7-10 % of a bf16 step
and more of an FP8 step, whose linears are ~2x faster: above issue 18's 5 % goal. 72 % of those bytes are the
expand's y read + out write; fusing the expand into the base GEMM's epilogue (acc += h_tile @ up_tile^T before
its one store) removes them and leaves the shrink's x read, ~2-3 ms a step (~2-3 %). The shrink could in turn
fold into the kernel that produces x (the modulated norm or quantize_rows hold the row already). Measured
numbers: benchmarks/bench_lora.py.

Tiles: the shrink tunes BLOCK_M (16-128, so that M = 4608 gives 36-288 programs on 132 SMs) and BLOCK_K; the
expand tunes BLOCK_M x BLOCK_N (up to 128 x 256); both are keyed by a power-of-two bucket of M (a new resolution
does not re-tune). The autotuner may re-run either kernel freely: both overwrite their outputs.

Layouts: x and y may have strided rows (a column slice of a wider buffer) as long as their last dim is contiguous
and their leading dims merge into one row stride; other layouts are copied to contiguous first (`.contiguous()` /
`reshape`), as are down, up, owner and row_scales (small). out is a new tensor with y's shape and layout
(torch.empty_like: what the torch formula and the op's fake return); a permuted y's out is written contiguous
and copied into place.

Not proven on hardware: this kernel has run only in Triton's interpreter (fp32/fp16 dots; bf16 dots are wrong
there, DESIGN.md §4) and been compiled for sm_90 in the tests; its GPU tests and benchmark are ready to run.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import FP8_MIN_CAPABILITY, require_capability

DENSE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SMALL_M = 16  # up to this many rows (the modulation GEMVs): rank tiles of 16 spread the shrink over programs
MAX_SHRINK_BLOCK_R = 256  # the shrink's rank tile for large M (the padded R, at most this)
EXPAND_BLOCK_R = 64  # the expand's step over R
_NAN = tl.constexpr(float("nan"))  # the scale of an out-of-range owner (a tl.constexpr: see kernels/_common.py)


def _check(y: Tensor, x: Tensor, down: Tensor, up: Tensor, owner: Tensor, row_scales: Tensor,
           x_scale: Tensor | None) -> None:
    if x.ndim < 2:
        raise ValueError(f"lora_add: x must be [B, ..., K] (at least 2-d), got {tuple(x.shape)}")
    B, R = x.shape[0], down.shape[0]
    problems = []
    if x.shape[:-1] != y.shape[:-1] or x.shape[-1] != down.shape[1] or y.shape[-1] != up.shape[0]:
        problems.append(f"x {tuple(x.shape)}, y {tuple(y.shape)}, down {tuple(down.shape)}, up {tuple(up.shape)} "
                        "do not chain (x [B, ..., K], down [R, K], up [N, R], y [B, ..., N])")
    if up.shape[1] != R or owner.shape != (R,) or owner.dtype not in (torch.int32, torch.int64):
        problems.append(f"up {tuple(up.shape)} / owner {tuple(owner.shape)} {owner.dtype} must have R = {R} columns "
                        "(owner: int32/int64)")
    if row_scales.ndim != 2 or row_scales.shape[0] != B or row_scales.dtype != torch.float32:
        problems.append(f"row_scales must be [B = {B}, adapters] float32, got {tuple(row_scales.shape)} "
                        f"{row_scales.dtype}")
    if (x_scale is None) != (x.dtype != torch.float8_e4m3fn) or (
            x_scale is not None and (x_scale.shape != x.shape[:-1] or x_scale.dtype != torch.float32)):
        problems.append("x is e4m3fn rows exactly when x_scale [B, ...] (fp32) is given")
    problems += _dtype_and_device_problems(y, x, down, up, owner, row_scales, x_scale)
    if problems:
        raise ValueError("lora_add: " + "; ".join(problems))


def _dtype_and_device_problems(y, x, down, up, owner, row_scales, x_scale) -> list[str]:
    problems = []
    if x.dtype not in (*DENSE_DTYPES, torch.float8_e4m3fn):
        problems.append(f"x must be float32/float16/bfloat16 or float8_e4m3fn, got {x.dtype}")
    bad = {name: t.dtype for name, t in (("y", y), ("down", down), ("up", up)) if t.dtype not in DENSE_DTYPES}
    if bad:
        problems.append(f"y, down, up must be float32/float16/bfloat16, got {bad}")
    named = {"y": y, "down": down, "up": up, "owner": owner, "row_scales": row_scales, "x_scale": x_scale}
    elsewhere = {name: str(t.device) for name, t in named.items() if t is not None and t.device != x.device}
    if elsewhere:
        problems.append(f"every input must be on x's device {x.device}, got {elsewhere}")
    elif owner.device.type == "cpu" and owner.numel() and row_scales.ndim == 2 and (
            int(owner.min()) < 0 or int(owner.max()) >= row_scales.shape[1]):
        problems.append(f"owner entries must index row_scales' {row_scales.shape[1]} adapters, got values in "
                        f"[{int(owner.min())}, {int(owner.max())}]")
    return problems


def lora_add_ref(y: Tensor, x: Tensor, down: Tensor, up: Tensor, owner: Tensor, row_scales: Tensor,
                 x_scale: Tensor | None = None) -> Tensor:
    """The formula in fp32 (the torch backend and the kernel's reference)."""
    _check(y, x, down, up, owner, row_scales, x_scale)
    xf = x.float() if x_scale is None else x.float() * x_scale.float()[..., None]
    scales = row_scales[:, owner.long()].reshape(x.shape[0], *([1] * (x.ndim - 2)), -1)  # [B, 1.., R]
    h = (xf @ down.float().t()) * scales
    return (y.float() + h @ up.float().t()).to(y.dtype)


# ---- kernels ----


@triton.jit
def _shrink_tile(x_ptrs, d_ptrs, k_ok, MASKED: tl.constexpr, CAST_X_TO_DOWN: tl.constexpr):
    """One K step's x [BLOCK_M, BLOCK_K] and down^T [BLOCK_K, BLOCK_R] tiles, in the dot's dtype."""
    if MASKED:
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        d = tl.load(d_ptrs, mask=k_ok[:, None], other=0.0)
    else:
        x = tl.load(x_ptrs)
        d = tl.load(d_ptrs)
    if CAST_X_TO_DOWN:  # same dtype, or fp8 x (exact in down's dtype)
        x = x.to(d.dtype)
    else:
        x = x.to(tl.float32)
        d = d.to(tl.float32)
    return x, d


@triton.jit
def _lora_shrink_kernel(
    X, DOWN, XSCALE, OWNER, ROW_SCALES, H,
    M, K, R, ROWS_PER_BATCH, ADAPTERS,
    stride_xm, stride_dr, stride_sb,
    M_BUCKET,  # autotune key only
    HAS_XSCALE: tl.constexpr, CAST_X_TO_DOWN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (offs_m % M).to(tl.int64)  # in range, so the K loop needs no row / rank masks
    ranks = (offs_r % R).to(tl.int64)
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :]  # x tile [BLOCK_M, BLOCK_K]
    d_ptrs = DOWN + ranks[None, :] * stride_dr + offs_k[:, None]  # down^T tile [BLOCK_K, BLOCK_R]
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    k_full = (K // BLOCK_K) * BLOCK_K
    for _ in range(0, k_full, BLOCK_K):
        x, d = _shrink_tile(x_ptrs, d_ptrs, offs_k, False, CAST_X_TO_DOWN)
        acc = tl.dot(x, d, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        d_ptrs += BLOCK_K
    if k_full < K:
        x, d = _shrink_tile(x_ptrs, d_ptrs, offs_k < K - k_full, True, CAST_X_TO_DOWN)
        acc = tl.dot(x, d, acc, input_precision=DOT_PRECISION)

    m_ok = offs_m < M
    r_ok = offs_r < R
    if HAS_XSCALE:  # fp8 rows: the per-row dequantization scale
        acc = acc * tl.load(XSCALE + rows)[:, None]
    owner = tl.load(OWNER + ranks).to(tl.int64)
    owner_ok = (owner >= 0) & (owner < ADAPTERS)
    batch = rows // ROWS_PER_BATCH
    scale = tl.load(ROW_SCALES + batch[:, None] * stride_sb + owner[None, :], mask=owner_ok[None, :], other=0.0)
    scale = tl.where(owner_ok[None, :], scale, _NAN)
    tl.store(H + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :], acc * scale,
             mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_expand_kernel(
    H, UP, Y, OUT,
    M, N, R,
    stride_un, stride_ym, stride_om,
    M_BUCKET,  # autotune key only
    SPLIT_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # axis 0 over N: programs launched together share one h row block (L2 reuse)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    rows = (offs_m % M).to(tl.int64)
    chans = (offs_n % N).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r_ok = r0 + offs_r < R
        h = tl.load(H + rows[:, None] * R + (r0 + offs_r)[None, :], mask=r_ok[None, :], other=0.0)
        u = tl.load(UP + chans[None, :] * stride_un + (r0 + offs_r)[:, None], mask=r_ok[:, None], other=0.0)
        if SPLIT_H:  # h = hi + lo in up's dtype: two tensor-core dots, fp32-grade (see the module docstring)
            h_hi = h.to(u.dtype)
            h_lo = (h - h_hi.to(tl.float32)).to(u.dtype)
            acc = tl.dot(h_hi, u, acc)
            acc = tl.dot(h_lo, u, acc)
        else:
            acc = tl.dot(h, u.to(tl.float32), acc, input_precision=DOT_PRECISION)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    y = tl.load(Y + rows[:, None] * stride_ym + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + rows[:, None] * stride_om + offs_n[None, :], (y + acc).to(OUT.dtype.element_ty), mask=mask)


# Hopper-oriented guesses until measured (each config is a compile). Shrink: BLOCK_M from 16 (many programs at
# M = 4608, each re-reading down from L2) to 128 (few programs, the most x reuse of the down tile).
_SHRINK_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bk, w, s in [(16, 128, 4, 4), (32, 128, 4, 4), (32, 64, 4, 4), (64, 64, 4, 3), (64, 128, 8, 3),
                         (128, 64, 8, 3), (64, 64, 8, 4), (16, 256, 4, 3)]
]
_lora_shrink_tuned = triton.autotune(_SHRINK_CONFIGS, key=["M_BUCKET", "K", "BLOCK_R", "HAS_XSCALE"])(
    _lora_shrink_kernel)
# Expand: a copy-like y -> out stream with a small dot; large tiles, 4-8 warps.
_EXPAND_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [(64, 128, 4, 3), (128, 128, 8, 3), (64, 256, 8, 3), (128, 64, 4, 3), (32, 128, 4, 4),
                         (128, 256, 8, 3), (16, 128, 4, 4), (16, 256, 4, 3)]
]
_lora_expand_tuned = triton.autotune(_EXPAND_CONFIGS, key=["M_BUCKET", "N", "BLOCK_R", "SPLIT_H"])(
    _lora_expand_kernel)
# Triton's interpreter: one small config (it cannot autotune), so the tests' small shapes still run several K, R
# and N steps with ragged tails.
_INTERP_SHRINK = dict(BLOCK_M=16, BLOCK_R=16, BLOCK_K=16, num_warps=4)
_INTERP_EXPAND = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_R=16, num_warps=4)


# ---- launcher ----


def _rows(t: Tensor, M: int) -> Tensor:
    """t [..., C] as an [M, C] matrix with a contiguous last dim: a view where the layout allows, else a copy."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(M, t.shape[-1])


def _writable_rows(out: Tensor, M: int) -> Tensor | None:
    """out as an [M, N] view with a contiguous last dim the expand can write, or None for layouts without one."""
    try:
        rows = out.view(M, out.shape[-1])
    except RuntimeError:
        return None
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else None


def _fp32_dot_precision(device: torch.device) -> str:
    """fp32 x fp32 dots: exact "ieee" in the interpreter (tests), fp32-grade "tf32x3" on the tensor cores."""
    return "tf32x3" if device.type == "cuda" else "ieee"


def _shrink(x2: Tensor, down: Tensor, x_scale: Tensor | None, owner: Tensor, row_scales: Tensor,
            rows_per_batch: int) -> Tensor:
    """h [M, R] fp32 (see the module docstring)."""
    M, K = x2.shape
    R = down.shape[0]
    h = torch.empty(M, R, dtype=torch.float32, device=x2.device)
    cast_x_to_down = x2.dtype in (down.dtype, torch.float8_e4m3fn)
    dot_dtype = down.dtype if cast_x_to_down else torch.float32
    xs = x_scale.reshape(-1).contiguous() if x_scale is not None else h  # h: an unread pointer
    args = (x2, down, xs, owner, row_scales, h, M, K, R, rows_per_batch, row_scales.shape[1],
            x2.stride(0), down.stride(0), row_scales.stride(0), triton.next_power_of_2(M))
    flags = dict(HAS_XSCALE=x_scale is not None, CAST_X_TO_DOWN=cast_x_to_down,
                 DOT_PRECISION=_fp32_dot_precision(x2.device) if dot_dtype == torch.float32 else "tf32")
    if x2.is_cuda:
        block_r = SMALL_M if M <= SMALL_M else min(MAX_SHRINK_BLOCK_R, max(16, triton.next_power_of_2(R)))
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, block_r))  # noqa: E731
        _lora_shrink_tuned[grid](*args, **flags, BLOCK_R=block_r)
    else:
        cfg = _INTERP_SHRINK
        _lora_shrink_kernel[(triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(R, cfg["BLOCK_R"]))](*args, **flags, **cfg)
    return h


def _expand(h: Tensor, up: Tensor, y2: Tensor, out2: Tensor) -> None:
    """out2 = y2 + h @ up^T, rounded once."""
    M, N = y2.shape
    R = up.shape[1]
    split_h = up.dtype in (torch.float16, torch.bfloat16)
    args = (h, up, y2, out2, M, N, R, up.stride(0), y2.stride(0), out2.stride(0), triton.next_power_of_2(M))
    flags = dict(SPLIT_H=split_h, DOT_PRECISION="tf32" if split_h else _fp32_dot_precision(h.device))
    if h.is_cuda:
        block_r = min(EXPAND_BLOCK_R, max(16, triton.next_power_of_2(R)))
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]))  # noqa: E731
        _lora_expand_tuned[grid](*args, **flags, BLOCK_R=block_r)
    else:
        cfg = _INTERP_EXPAND
        _lora_expand_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_M"]))](*args, **flags, **cfg)


def lora_add(y: Tensor, x: Tensor, down: Tensor, up: Tensor, owner: Tensor, row_scales: Tensor,
             x_scale: Tensor | None = None) -> Tensor:
    """y + ((x @ down^T) * row_scales[b, owner]) @ up^T in fp32, rounded once to y's dtype (the module docstring)."""
    _check(y, x, down, up, owner, row_scales, x_scale)
    if x.dtype == torch.float8_e4m3fn:
        require_capability(x.device, FP8_MIN_CAPABILITY, "lora_add on e4m3fn x", "pass x dequantized (bf16)")
    M, N = math.prod(x.shape[:-1]), y.shape[-1]
    out = torch.empty_like(y)  # y's layout, as the torch formula and the op's fake give
    if M == 0 or N == 0:
        return out
    x2, y2 = _rows(x, M), _rows(y, M)
    down, up = down.contiguous(), up.contiguous()
    R = down.shape[0]
    if R == 0:  # no rank columns: the expand adds nothing (its R loop is empty)
        h = torch.empty(M, 0, dtype=torch.float32, device=x.device)
    else:
        h = _shrink(x2, down, x_scale, owner.contiguous(), row_scales.contiguous(), M // x.shape[0])
    out_rows = _writable_rows(out, M)
    target = out_rows if out_rows is not None else out.new_empty(M, N)
    _expand(h, up, y2, target)
    if out_rows is None:  # a permuted y: written contiguous, then copied into y's layout (one more pass)
        out.copy_(target.view(y.shape))
    return out
