"""Backend choice for fluxrt ops: "auto" | "triton" | "torch". Never a silent fallback.

auto    Triton kernels on CUDA tensors, the reference formula (`<op>_ref`) elsewhere.
triton  Triton kernels; on CPU tensors through Triton's interpreter, which must have been chosen with
        TRITON_INTERPRET=1 before triton was imported (triton decides at kernel definition).
torch   the reference formula, on any device.
"""

from __future__ import annotations

import importlib
import os

from torch import Tensor

BACKENDS = ("auto", "triton", "torch")


def kernel_module(name: str):
    """Import fluxrt.kernels.<name> on first use, so `import fluxrt` does not import triton."""
    try:
        return importlib.import_module(f"fluxrt.kernels.{name}")
    except ImportError as err:
        raise RuntimeError(f"fluxrt.kernels.{name} needs triton, which is not importable here ({err}); "
                           "install triton or use backend='torch'") from None


def use_triton(backend: str, x: Tensor, module) -> bool:
    """True to run the op's Triton kernel, False for its torch formula; raises on an impossible request."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch" or (backend == "auto" and not x.is_cuda):
        return False
    if not x.is_cuda and not interpreter_active(module):
        raise RuntimeError(
            "backend='triton' on CPU tensors runs Triton's interpreter, which must be enabled before triton is "
            "imported: set TRITON_INTERPRET=1 in the environment of the process (e.g. `TRITON_INTERPRET=1 python "
            f"...`); TRITON_INTERPRET is {os.environ.get('TRITON_INTERPRET')!r} and triton was imported without it."
        )
    return True


def interpreter_active(module) -> bool:
    """Whether this kernel module's kernels were defined under Triton's interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    return any(isinstance(v, InterpretedFunction) for v in vars(module).values())
