"""LoRA side branch with per-row adapter selection: y + ((x A^T) * s) B^T for every row of a batch at once.

    out = y + ((x @ down^T) * row_scales[b, owner]) @ up^T        (b: the batch index of each row)

x: [B, ..., K] dense (fp32/fp16/bf16), or e4m3fn rows with x_scale [B, ...] fp32 (x ~ x8 * x_scale, the FP8Rows
a W8A8 linear reads); y: [B, ..., N], the base linear's output. down [R, K], up [N, R]: every loaded LoRA's factors
for this layer side by side along the padded rank R (alpha / rank folded into up; unused columns zero). owner [R]
int: which adapter owns each rank column; row_scales [B, L] fp32: each batch row's scale per adapter. So one
launch serves a batch whose rows use different LoRAs at different scales (fluxrt.lora_branch), and swapping a
LoRA or a scale rewrites buffers, never shapes. Arithmetic is fp32; the result is rounded once to y's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check(y: Tensor, x: Tensor, down: Tensor, up: Tensor, owner: Tensor, row_scales: Tensor,
           x_scale: Tensor | None) -> None:
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
    if (x_scale is None) != (x.dtype != torch.float8_e4m3fn) or (x_scale is not None and x_scale.shape != x.shape[:-1]):
        problems.append("x is e4m3fn rows exactly when x_scale [B, ...] (fp32) is given")
    if problems:
        raise ValueError("lora_add: " + "; ".join(problems))


def lora_add_ref(y: Tensor, x: Tensor, down: Tensor, up: Tensor, owner: Tensor, row_scales: Tensor,
                 x_scale: Tensor | None = None) -> Tensor:
    """The formula in fp32 (the torch backend and the kernel's reference)."""
    _check(y, x, down, up, owner, row_scales, x_scale)
    xf = x.float() if x_scale is None else x.float() * x_scale.float()[..., None]
    scales = row_scales[:, owner.long()].reshape(x.shape[0], *([1] * (x.ndim - 2)), -1)  # [B, 1.., R]
    h = (xf @ down.float().t()) * scales
    return (y.float() + h @ up.float().t()).to(y.dtype)
