"""Backend choice for fluxrt ops: "auto" | "triton" | "torch". Never a silent fallback.

auto    Triton kernels on CUDA tensors, the reference formula (`<op>_ref`) elsewhere.
triton  Triton kernels; on CPU tensors through Triton's interpreter, which must have been chosen with
        TRITON_INTERPRET=1 before triton was imported (triton decides at kernel definition).
torch   the reference formula, on any device.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from collections.abc import Iterator
from typing import TypeVar

from torch import Tensor

BACKENDS = ("auto", "triton", "torch")

T = TypeVar("T")
_local = threading.local()  # this thread's open traces (a stack: traces nest)


class Trace(list):
    """What fluxrt ops actually ran, in call order: (op name, backend) pairs, backend one of "triton", "ext",
    "torch" (the reference formula) or "scaled_mm" (torch._scaled_mm). Recorded when an op's Python body runs:
    at each eager call and at each call of torch.compile'd code (a custom op stays one opaque call in the compiled
    graph; tracing runs its fake impl, which records nothing), and once while a CUDA graph is captured: a CUDA graph
    replay records nothing."""

    def backends(self) -> dict[str, set[str]]:
        """op name -> the set of backends it ran on."""
        out: dict[str, set[str]] = {}
        for op, backend in self:
            out.setdefault(op, set()).add(backend)
        return out

    def ran_on(self, backend: str) -> set[str]:
        """The ops that ran (at least once) on `backend`."""
        return {op for op, b in self if b == backend}


@contextlib.contextmanager
def trace() -> Iterator[Trace]:
    """`with fluxrt.ops.trace() as ran: ...` -> `ran`, a Trace of every op run in this thread inside the block."""
    stack = _local.__dict__.setdefault("stack", [])
    this = Trace()
    stack.append(this)
    try:
        yield this
    finally:
        # by identity: list.remove compares by value, and an outer trace equal to this one (both empty) would go
        del stack[next(i for i, t in enumerate(stack) if t is this)]


def record(op: str, backend: str) -> None:
    """Note that `op` ran on `backend` in every open trace of this thread (called by each op where it dispatches)."""
    for open_trace in getattr(_local, "stack", ()):
        open_trace.append((op, backend))


def ran(op: str, backend: str, out: T) -> T:
    """record(op, backend), then return `out`: an op's branch ends `return ran(op, "triton", kernel(...))`, so the
    record is made after the backend returned, and a call that raised records nothing."""
    record(op, backend)
    return out


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
