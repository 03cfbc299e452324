"""What several kernels share: the e4m3 range, output allocation, GELU-tanh (kernel and torch formula), and the
GPU capability checks (fluxrt.devices is the runtime's: kernels do not import the runtime).

Kernel modules import this; the fluxrt runtime does not (kernels and triton load on an op's first use).

FP8_E4M3_MAX and MIN_SCALE are plain floats for the host (launchers, references, tests); the @triton.jit helpers
below read them as `tl.constexpr` copies. Triton compiles only globals that are tl.constexpr instances (triton 3.9:
"annotating a variable as constexpr ... is not supported"); the interpreter runs any global, so a plain float read
in a kernel passes the CPU tests and fails on a GPU. Kernels use these helpers instead of the number.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

FP8_E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448.0, the largest finite e4m3fn
MIN_SCALE = 1e-12  # floor of a quantization scale: an all-zero row quantizes to zeros, not NaN
_FP8_E4M3_MAX = tl.constexpr(FP8_E4M3_MAX)  # the kernels' copies (see the module docstring)
_MIN_SCALE = tl.constexpr(MIN_SCALE)


# ---- e4m3 quantization ----


def e4m3_scale_ref(absmax: Tensor) -> Tensor:
    """The dequantization scale that maps |values| <= absmax onto e4m3's range: absmax / 448, floored."""
    return (absmax / FP8_E4M3_MAX).clamp_min(MIN_SCALE)


def to_e4m3_ref(x: Tensor, scale: Tensor) -> Tensor:
    """x / scale (scale broadcast by the caller) clamped to e4m3's range and rounded to float8_e4m3fn."""
    return (x / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


@triton.jit
def e4m3_scale(absmax):
    """e4m3_scale_ref in a kernel: the division correctly rounded (div_rn, as torch divides; Triton's `/` on fp32 is
    an approximate division on the GPU), so the scale is the reference's bit for bit."""
    return tl.maximum(tl.math.div_rn(absmax, _FP8_E4M3_MAX), _MIN_SCALE)


@triton.jit
def e4m3_clamp(x):
    """x clamped to [-448, 448] before the conversion to e4m3 (out-of-range values would become NaN)."""
    return tl.minimum(tl.maximum(x, -_FP8_E4M3_MAX), _FP8_E4M3_MAX)


@triton.jit
def to_e4m3_range(p):
    """p in [0, 1] spread over e4m3's range (the fp8 attention's probabilities); from_e4m3_range undoes it."""
    return p * _FP8_E4M3_MAX


@triton.jit
def from_e4m3_range(x):
    return x / _FP8_E4M3_MAX


# ---- GELU, tanh approximation ----


def gelu_tanh_ref(y: Tensor) -> Tensor:
    """The torch formula every GELU-tanh reference uses (diffusers' / BFL's `approximate="tanh"`)."""
    return F.gelu(y, approximate="tanh")


@triton.jit
def gelu_tanh(y):
    """gelu(y, tanh) on fp32 y, written y * sigmoid(2 * sqrt(2/pi) * (y + 0.044715 y^3)): the same function as
    0.5 y (1 + tanh(...)) without its cancellation for negative y."""
    z = 1.5957691216057308 * (y + 0.044715 * y * y * y)
    return y / (1.0 + tl.exp(-z))


# ---- outputs ----


def output(out: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
           name: str = "out") -> Tensor:
    """A kernel's output: a new tensor, or the caller's `out` once it is checked to be one the kernel can write:
    `shape`, `dtype`, on `device`, a contiguous last dim (rows may be strided, e.g. a column slice of a wider
    buffer) and rows that do not overlap (two programs would write the same memory)."""
    shape = tuple(shape)
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    rows_overlap = out.ndim >= 2 and out.shape[-2] > 1 and out.stride(-2) < out.shape[-1]
    if (tuple(out.shape) != shape or out.dtype != dtype or out.device != torch.device(device)
            or out.stride(-1) != 1 or rows_overlap):
        raise ValueError(f"{name} must be {shape} {dtype} on {device} with a contiguous last dim and rows that do not "
                         f"overlap, got {tuple(out.shape)} {out.dtype} on {out.device} with strides {out.stride()}")
    return out


# ---- GPU capability ----

FP8_MIN_CAPABILITY = (8, 9)  # fp8 tensor cores and Triton's fp8e4nv type: Ada, Hopper, Blackwell
TMA_MIN_CAPABILITY = (9, 0)  # tensor memory accelerator: Hopper and newer


def below_capability(device: torch.device, minimum: tuple[int, int]) -> bool:
    """True for a CUDA device older than sm_<minimum>; False for the CPU (the interpreter runs everything)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) < minimum


def require_capability(device: torch.device, minimum: tuple[int, int], what: str, instead: str) -> None:
    """RuntimeError naming the GPU when `what` cannot run on `device`; `instead` says what to use."""
    if below_capability(device, minimum):
        major, minor = torch.cuda.get_device_capability(device)
        raise RuntimeError(f"{what} needs sm_{minimum[0]}{minimum[1]}+, but {torch.cuda.get_device_name(device)} is "
                           f"sm_{major}{minor}; {instead}")
