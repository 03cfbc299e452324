"""fluxrt.testing: the numerical checks fluxrt's own tests and benchmarks use, public for users who check their own
builds the same way (e.g. a compiled model against diffusers on their weights). DESIGN.md §4 states the rules.

    rel_error(out, ref), max_abs_error(out, ref)     fp64 measures; NaN/inf anywhere -> inf (never passes a bound)
    assert_within_rule(out, baseline, ref)           flash-attention's rule: |out - ref| <= 2 |baseline - ref| + atol
    sqnr_db(out, ref)                                the FP8 accuracy measure, in dB
    randomize_parameters_(module, seed)              fresh random weights (never zeros) for random-weight models
    e4m3_ulp, interpreter_conversion_defect          for fp8 checks under Triton's CPU interpreter

No reference formulas live here: those are the `_ref` functions beside each kernel and fluxrt.reference. The module
imports only torch, so importing it costs nothing at runtime (fluxrt.bench uses randomize_parameters_).
"""

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


def e4m3_ulp(v: Tensor) -> Tensor:
    """Spacing of e4m3fn values at |v|: 2^(floor(log2|v|) - 3); 2^-9 in the subnormal range (below 2^-6)."""
    return torch.exp2(torch.floor(torch.log2(v.abs().clamp_min(2.0**-6))) - 3)


def interpreter_conversion_defect(got: Tensor, want: Tensor) -> Tensor:
    """Where Triton's interpreter converts fp32 -> e4m3fn wrongly (DESIGN.md §4; measured on triton 3.9 over
    dense fp32 points between all e4m3 values): when rounding carries into an odd exponent the value comes out
    as half of the power of two it should be (125 -> 64, not 128), and below e4m3's smallest normal (2^-6) it
    truncates (off by one subnormal step, 2^-9). Only those are set aside; every other value keeps the rule.
    A carry is recognised by `got` being half of a power of two within one step of `want` (not only equal to it),
    so a kernel whose own fp32 value sits just across a rounding boundary from the reference's is covered too."""
    twice = 2 * got.abs()
    pow2 = twice == torch.exp2(torch.log2(twice.clamp_min(1e-30)).round())
    carry = pow2 & (got != 0) & ((2 * got - want).abs() <= e4m3_ulp(want))
    subnormal = (want.abs() <= 2.0**-6) & ((got - want).abs() <= 2.0**-9)
    return (carry | subnormal) & (got != want)


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
