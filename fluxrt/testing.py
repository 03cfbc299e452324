"""Numerical checks shared by fluxrt's tests and benchmarks (DESIGN.md §4). No reference formulas live here:
those are the `_ref` functions and fluxrt.reference."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def rel_error(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64; NaN anywhere gives inf (so it never passes a bound)."""
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return math.inf
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def max_abs_error(out: Tensor, ref: Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return math.inf
    return (out - ref).abs().max().item()


def assert_within_rule(out: Tensor, baseline: Tensor, ref: Tensor, factor: float = 2.0, atol: float = 1e-5,
                       what: str = "output") -> None:
    """flash-attention's rule: max|out - ref| <= factor * max|baseline - ref| + atol.

    `ref` is the high-precision truth, `baseline` plain PyTorch in the same low precision as `out`.
    """
    if out.shape != ref.shape or baseline.shape != ref.shape:
        raise AssertionError(f"{what}: shapes differ: out {tuple(out.shape)}, baseline {tuple(baseline.shape)}, "
                             f"ref {tuple(ref.shape)}")
    err, base = max_abs_error(out, ref), max_abs_error(baseline, ref)
    if not err <= factor * base + atol:
        raise AssertionError(f"{what}: max abs error {err:.3e} > {factor} x baseline error {base:.3e} + {atol:.1e}")


def sqnr_db(out: Tensor, ref: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (the FP8 accuracy measure)."""
    out, ref = out.detach().double(), ref.detach().double()
    noise = (out - ref).pow(2).sum()
    if not torch.isfinite(noise):
        return -math.inf
    return (10 * torch.log10(ref.pow(2).sum() / noise.clamp_min(1e-300))).item()


@torch.no_grad()
def randomize_parameters_(module: nn.Module, seed: int, bias_std: float = 0.1) -> nn.Module:
    """Fill every parameter with fresh random values (never zeros, never the identity-like default inits):
    matrices ~ N(0, 1/fan_in), vectors ~ N(0, bias_std), norm scales ~ 1 + N(0, 0.2).

    Drawn on each parameter's own device (fast for a 12B model on a GPU); a seed gives the same values on
    the same device type only.
    """
    generators: dict[torch.device, torch.Generator] = {}
    for name, p in module.named_parameters():
        if p.device not in generators:
            generators[p.device] = torch.Generator(p.device).manual_seed(seed)
        noise = torch.randn(p.shape, generator=generators[p.device], dtype=torch.float32, device=p.device)
        if p.ndim >= 2:
            value = noise / math.sqrt(p.shape[1])
        elif "norm" in name:
            value = 1 + 0.2 * noise
        else:
            value = bias_std * noise
        p.copy_(value.to(p.dtype))
    return module
