"""Modulated LayerNorm and gated residual, fused (FLUX's AdaLN glue between GEMMs).

    out = LN(x) * (1 + scale) + shift                       modulated_layer_norm
    h = x + gate * y;  out = LN(h) * (1 + scale) + shift    gated_residual_norm  (returns h, out)
    h = x + gate * y                                        gated_residual

x, y: [B, L, D] (last dim contiguous, rows may be strided); `out=` takes preallocated outputs; gate, scale, shift: [B, D] or [B, 1, D] (any batch
stride, so chunks of the modulation output need no copy). LN has no affine, eps 1e-6, fp32 statistics.

Design: one program per row, the whole row in registers (D up to 8192: FLUX's 3072 pads to 4096), so each
element is read once and written once — the op is pure bandwidth. All arithmetic is fp32 and the result is
rounded once; the plain-PyTorch formula rounds after LN, after (1 + scale) and after each product, so the
kernel is closer to the fp32 truth than the reference in bf16 (the DESIGN.md §4 rule, not bit equality).
In gated_residual_norm the LN reads h as stored (rounded to the output dtype), like the unfused model does.

The *_fp8 variants feed a W8A8 GEMM: they emit the normalised row as e4m3fn with its per-row (per-token)
absmax scale, quantizing the fp32 value directly (no bf16 rounding in between).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._common import e4m3_clamp, e4m3_scale, output
from .quantize_rows import quantize_rows_ref  # the fp8 refs below quantize their normalized rows with it

MAX_D = 8192


# ---- reference formulas (what fluxrt.reference computes, in the input dtype) ----


def _per_batch(v: Tensor) -> Tensor:
    return v if v.ndim == 3 else v[:, None, :]  # [B, D] -> [B, 1, D]


def modulated_layer_norm_ref(x: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-6) -> Tensor:
    return (1 + _per_batch(scale)) * F.layer_norm(x, (x.shape[-1],), eps=eps) + _per_batch(shift)


def modulated_layer_norm_fp8_ref(x: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-6):
    """The modulated LN computed in fp32, then quantized per row (what the fused W8A8 kernel emits)."""
    return quantize_rows_ref(modulated_layer_norm_ref(x.float(), scale.float(), shift.float(), eps))


def gated_residual_norm_fp8_ref(x, gate, y, scale, shift, eps: float = 1e-6):
    h = gated_residual_ref(x, gate, y)
    return (h, *quantize_rows_ref(modulated_layer_norm_ref(h.float(), scale.float(), shift.float(), eps)))


def gated_residual_ref(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    return x + _per_batch(gate) * y


def gated_residual_norm_ref(x: Tensor, gate: Tensor, y: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-6):
    h = gated_residual_ref(x, gate, y)
    return h, modulated_layer_norm_ref(h, scale, shift, eps)


# ---- kernel ----


@triton.jit
def _modulated_norm_kernel(
    X, GATE, Y, SCALE, SHIFT, H_OUT, OUT, ROW_SCALE,
    L, D,
    stride_xb, stride_xl, stride_yb, stride_yl, stride_gate_b, stride_scale_b, stride_shift_b,
    stride_hb, stride_hl, stride_ob, stride_ol,
    eps,
    HAS_RESIDUAL: tl.constexpr, HAS_NORM: tl.constexpr, QUANT_OUT: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // L
    l = row % L
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    # Convert to fp32 right after loading: Triton's interpreter does bf16 arithmetic wrongly (DESIGN.md §4).
    x = tl.load(X + b * stride_xb + l * stride_xl + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        gate = tl.load(GATE + b * stride_gate_b + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + b * stride_yb + l * stride_yl + cols, mask=mask, other=0.0).to(tl.float32)
        h = (x + gate * y).to(H_OUT.dtype.element_ty)
        tl.store(H_OUT + b * stride_hb + l * stride_hl + cols, h, mask=mask)
        x = h.to(tl.float32)
    if HAS_NORM:
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
        scale = tl.load(SCALE + b * stride_scale_b + cols, mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(SHIFT + b * stride_shift_b + cols, mask=mask, other=0.0).to(tl.float32)
        out = xc * rstd * (1.0 + scale) + shift
        if QUANT_OUT:  # W8A8: the row is in registers, so its absmax scale costs no extra pass
            row_scale = e4m3_scale(tl.max(tl.where(mask, tl.abs(out), 0.0), axis=0))
            tl.store(ROW_SCALE + row, row_scale)
            out = e4m3_clamp(out / row_scale)
        tl.store(OUT + b * stride_ob + l * stride_ol + cols, out.to(OUT.dtype.element_ty), mask=mask)


_CONFIGS = [triton.Config({}, num_warps=w) for w in (2, 4, 8, 16)]
# Autotune on the GPU only (the interpreter cannot run several configs); keyed by D (and, implicitly, dtypes).
_modulated_norm_tuned = triton.autotune(_CONFIGS, key=["D", "HAS_RESIDUAL", "HAS_NORM", "QUANT_OUT"])(
    _modulated_norm_kernel
)


def _check(x: Tensor, *vectors: Tensor, y: Tensor | None = None) -> None:
    if x.ndim != 3 or x.stride(-1) != 1:
        raise ValueError(f"x must be [B, L, D] with a contiguous last dim, got shape {tuple(x.shape)} strides {x.stride()}")
    B, L, D = x.shape
    if D > MAX_D:
        raise ValueError(f"D = {D} is over the one-pass limit {MAX_D}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {x.dtype}; use float32, float16 or bfloat16")
    if y is not None and (y.shape != x.shape or y.stride(-1) != 1 or y.dtype != x.dtype or y.device != x.device):
        raise ValueError(f"y must match x ({tuple(x.shape)}, {x.dtype}, {x.device}), got {tuple(y.shape)}, {y.dtype}, {y.device}")
    for v in vectors:
        shape = tuple(v.shape)
        if shape not in ((B, D), (B, 1, D)) or v.stride(-1) != 1 or v.device != x.device:
            raise ValueError(f"modulation vectors must be [{B}, {D}] or [{B}, 1, {D}] on {x.device} with a "
                             f"contiguous last dim, got {shape} on {v.device}")


def _launch(x, gate, y, scale, shift, h, out, eps, has_residual, has_norm, row_scale=None):
    B, L, D = x.shape
    dummy = x  # unused pointer arguments (constexpr flags keep them unread)
    gate, y, scale, shift = (t if t is not None else dummy for t in (gate, y, scale, shift))
    h_out, o = (h if h is not None else dummy), (out if out is not None else dummy)
    args = (
        x, gate, y, scale, shift, h_out, o, row_scale if row_scale is not None else dummy, L, D,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), gate.stride(0), scale.stride(0), shift.stride(0),
        h_out.stride(0), h_out.stride(1), o.stride(0), o.stride(1), eps,
    )
    meta = dict(HAS_RESIDUAL=has_residual, HAS_NORM=has_norm, QUANT_OUT=row_scale is not None,
                BLOCK_D=triton.next_power_of_2(D))
    if x.is_cuda:
        _modulated_norm_tuned[(B * L,)](*args, **meta)
    else:  # Triton's interpreter: one fixed config
        _modulated_norm_kernel[(B * L,)](*args, **meta, num_warps=4)


def _like_x(x: Tensor, out: Tensor | None) -> Tensor:
    """out (checked) or a new tensor, with x's shape, dtype and device."""
    return output(out, x.shape, x.dtype, x.device)


def modulated_layer_norm(x: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-6, out: Tensor | None = None) -> Tensor:
    _check(x, scale, shift)
    out = _like_x(x, out)
    _launch(x, None, None, scale, shift, None, out, eps, has_residual=False, has_norm=True)
    return out


def gated_residual_norm(x: Tensor, gate: Tensor, y: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-6,
                        out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    _check(x, gate, scale, shift, y=y)
    h_out, norm_out = (None, None) if out is None else out
    h, out = _like_x(x, h_out), _like_x(x, norm_out)
    _launch(x, gate, y, scale, shift, h, out, eps, has_residual=True, has_norm=True)
    return h, out


def _fp8_outputs(x: Tensor) -> tuple[Tensor, Tensor]:
    B, L, D = x.shape
    return (torch.empty(B, L, D, dtype=torch.float8_e4m3fn, device=x.device),
            torch.empty(B, L, dtype=torch.float32, device=x.device))


def modulated_layer_norm_fp8(x: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """LN(x) * (1 + scale) + shift quantized per row for a W8A8 GEMM: (out8 e4m3fn [B, L, D], row scale [B, L])."""
    _check(x, scale, shift)
    out8, row_scale = _fp8_outputs(x)
    _launch(x, None, None, scale, shift, None, out8, eps, has_residual=False, has_norm=True, row_scale=row_scale)
    return out8, row_scale


def gated_residual_norm_fp8(x: Tensor, gate: Tensor, y: Tensor, scale: Tensor, shift: Tensor,
                            eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """h = x + gate * y (in x's dtype) and LN(h) * (1 + scale) + shift quantized per row: (h, out8, row scale)."""
    _check(x, gate, scale, shift, y=y)
    h = _like_x(x, None)
    out8, row_scale = _fp8_outputs(x)
    _launch(x, gate, y, scale, shift, h, out8, eps, has_residual=True, has_norm=True, row_scale=row_scale)
    return h, out8, row_scale


def gated_residual(x: Tensor, gate: Tensor, y: Tensor, out: Tensor | None = None) -> Tensor:
    _check(x, gate, y=y)
    h = _like_x(x, out)
    _launch(x, gate, y, None, None, h, None, 0.0, has_residual=True, has_norm=False)
    return h
