"""Where fluxrt runs and in what dtype: the one home of the default device, device/dtype argument checks and the
GPU capability checks (fp8 tensor cores). Every public entry point resolves its `device=` / `dtype=` here, before
it loads anything, so a bad argument is one clear error, not a failure minutes into loading a 12B model.
"""

from __future__ import annotations

import torch

FP8_MIN_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (sm_89), Hopper (sm_90), Blackwell

_DTYPE_NAMES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp64": torch.float64, "float64": torch.float64, "double": torch.float64,
}


def default_device() -> torch.device:
    """CUDA when a GPU is visible, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: torch.device | str | None, what: str = "device") -> torch.device:
    """`device` as a torch.device (None: default_device()). ValueError for a string that names no device,
    RuntimeError for a CUDA device on a machine without one (or a GPU index past the last GPU)."""
    if device is None:
        return default_device()
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"{what} must be a torch.device or a string such as 'cpu', 'cuda', 'cuda:1'; "
                         f"got {type(device).__name__} {device!r}")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{what} {device!r} is not a device; use e.g. 'cpu', 'cuda', 'cuda:1'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"{what} {str(device)!r} asks for a CUDA GPU and this machine has none (or torch was "
                               "built without CUDA); use 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"{what} {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type not in ("cpu", "meta"):
        raise ValueError(f"{what} {str(device)!r}: fluxrt runs on 'cpu' and 'cuda' devices")
    return device


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device, what: str = "dtype") -> torch.dtype:
    """`dtype` as a floating torch.dtype (None: bf16 on CUDA, fp32 elsewhere). Accepts the usual names as strings
    ("bf16", "bfloat16", "fp16", "float16", "fp32", "float32", also with a "torch." prefix)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        name = dtype.lower().removeprefix("torch.")
        if name not in _DTYPE_NAMES:
            raise ValueError(f"{what} {dtype!r} is not a dtype name; use torch.bfloat16, torch.float16 or "
                             f"torch.float32 (or one of {sorted(_DTYPE_NAMES)})")
        dtype = _DTYPE_NAMES[name]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
        raise ValueError(f"{what} must be a floating dtype of 16 bits or more (torch.bfloat16, torch.float16, "
                         f"torch.float32), got {dtype!r}")
    return dtype


def has_fp8_tensor_cores(device: torch.device) -> bool:
    """Whether `device` is a CUDA GPU with fp8 tensor cores (sm_89+)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_MIN_CAPABILITY


def require_fp8_tensor_cores(device: torch.device, what: str, instead: str) -> None:
    """RuntimeError naming the GPU when `device` is a CUDA GPU without fp8 tensor cores. The CPU passes: there
    torch's own fp8 kernels run (slowly, for tests). `what` is the feature asked for, `instead` the way out."""
    if device.type == "cuda" and not has_fp8_tensor_cores(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise RuntimeError(f"{what} needs fp8 tensor cores (sm_89+: Ada, Hopper, Blackwell), but "
                           f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}; {instead}")
