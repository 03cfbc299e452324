"""Dynamic per-row (per-token) e4m3fn quantization for W8A8 GEMM inputs, optionally GELU-tanh on a column range.

    y = x;  y[..., gelu_from:] = gelu(x[..., gelu_from:], tanh)        (only when gelu_from is given)
    scale = max(absmax(y row) / 448, 1e-12);  x8 = clamp(y / scale, -448, 448) as e4m3fn

x: [..., K] float32/float16/bfloat16, last dim contiguous, rows may be strided (a column slice of a wider
buffer, e.g. FLUX's single-block [attention | mlp] activations). Returns (x8 [..., K] contiguous, scale [...] fp32).

Design: one program per row and two passes over it, BLOCK_K columns at a time: pass 1 takes the row's absmax
(of the GELU'd values where GELU applies), pass 2 reads the row again, divides by the scale and writes fp8. A
FLUX row is at most 15360 bf16 (30 KB), so pass 2 mostly hits L2 and DRAM sees one bf16 read and one fp8 write —
where the torch formula makes ~6 passes over fp32 temporaries. GELU is recomputed in pass 2 rather than stored:
the op is bandwidth bound, a few flops are free. One row per program is enough parallelism: FLUX has M = 4608·B
rows of K >= 3072, so thousands of CTAs, and packing several rows per program would only pay for K below ~512,
which no FLUX call has. All math is fp32 with correctly rounded divisions (div_rn, as torch divides), so on a
GPU the result is the reference's bit for bit when there is no GELU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import e4m3_clamp, e4m3_scale, e4m3_scale_ref, gelu_tanh, gelu_tanh_ref, to_e4m3_ref


def _check_gelu_from(gelu_from: int | None, K: int) -> None:
    if gelu_from is not None and not (isinstance(gelu_from, int) and 0 <= gelu_from <= K):
        raise ValueError(f"gelu_from must be None or an int in [0, K = {K}], got {gelu_from!r}")


def quantize_rows_ref(x: Tensor, gelu_from: int | None = None) -> tuple[Tensor, Tensor]:
    """x [..., K] -> (x8 e4m3fn [..., K], scale fp32 [...]) with x ~ x8 * scale; GELU-tanh on columns [gelu_from, K)."""
    _check_gelu_from(gelu_from, x.shape[-1])
    x = x.float()
    if gelu_from is not None:
        x = torch.cat([x[..., :gelu_from], gelu_tanh_ref(x[..., gelu_from:])], dim=-1)
    scale = e4m3_scale_ref(x.abs().amax(dim=-1))
    return to_e4m3_ref(x, scale[..., None]).contiguous(), scale


# ---- kernel ----


@triton.jit
def _load_row_block(x_row, cols, K, GELU_FROM, HAS_GELU: tl.constexpr):
    # Convert right after loading: Triton's interpreter does bf16 arithmetic wrongly (DESIGN.md §4).
    x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
    if HAS_GELU:
        x = tl.where(cols >= GELU_FROM, gelu_tanh(x), x)
    return x


@triton.jit
def _quantize_rows_kernel(
    X, X8, SCALE,
    L, K, stride_xb, stride_xl, GELU_FROM,
    HAS_GELU: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride can pass 2^31 for a wide buffer at batch > 1
    x_row = X + (row // L) * stride_xb + (row % L) * stride_xl
    cols = tl.arange(0, BLOCK_K)
    absmax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        absmax = tl.maximum(absmax, tl.abs(_load_row_block(x_row, k0 + cols, K, GELU_FROM, HAS_GELU)))
    scale = e4m3_scale(tl.max(absmax, axis=0))
    tl.store(SCALE + row, scale)
    x8_row = X8 + row * K
    for k0 in range(0, K, BLOCK_K):
        y = e4m3_clamp(tl.math.div_rn(_load_row_block(x_row, k0 + cols, K, GELU_FROM, HAS_GELU), scale))
        tl.store(x8_row + k0 + cols, y.to(X8.dtype.element_ty), mask=k0 + cols < K)


# Autotune on the GPU only (the interpreter cannot run several configs). A block of 1024-4096 columns gives each
# thread 4-16 contiguous elements per load at 4-8 warps; keyed by K (FLUX: 3072, 12288, 15360) and HAS_GELU.
_CONFIGS = [triton.Config({"BLOCK_K": b}, num_warps=w) for b in (1024, 2048, 4096) for w in (4, 8)]
_quantize_rows_tuned = triton.autotune(_CONFIGS, key=["K", "HAS_GELU"])(_quantize_rows_kernel)
# Under the interpreter a small block, so the CPU tests' K (130, 300) run several loop iterations and a ragged tail.
INTERPRETER_BLOCK_K = 128


def quantize_rows(x: Tensor, gelu_from: int | None = None) -> tuple[Tensor, Tensor]:
    """x [..., K] -> (x8 e4m3fn [..., K] contiguous, scale fp32 [...]); see the module docstring."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {x.dtype}; use float32, float16 or bfloat16")
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must be [..., K] with K >= 1, got shape {tuple(x.shape)}")
    K = x.shape[-1]
    if x.stride(-1) != 1 and K > 1:
        raise ValueError(f"x must have a contiguous last dim, got shape {tuple(x.shape)} strides {x.stride()}")
    _check_gelu_from(gelu_from, K)
    x8 = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if x8.numel() == 0:
        return x8, scale
    L = x.shape[-2] if x.ndim >= 2 else 1
    rows = x.reshape(-1, L, K)  # a view for [B, L, K] with any strides; only a >3-d unmergeable batch copies
    has_gelu = gelu_from is not None and gelu_from < K
    args = (rows, x8, scale, L, K, rows.stride(0), rows.stride(1), gelu_from if has_gelu else K)
    grid = (rows.shape[0] * L,)
    if x.is_cuda:
        _quantize_rows_tuned[grid](*args, HAS_GELU=has_gelu)
    else:  # Triton's interpreter: one fixed config
        _quantize_rows_kernel[grid](*args, HAS_GELU=has_gelu, BLOCK_K=INTERPRETER_BLOCK_K, num_warps=4)
    return x8, scale
