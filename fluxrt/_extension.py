"""fluxrt._C, the C++/CUDA extension built from csrc/ (DESIGN.md §5): optional, loaded once on first use.

Importing it registers the torch.ops.fluxrt_C ops; `on_load` hooks (their fake impls) run right after. `import
fluxrt` does not load it: the first `available()` / `require()` / `has_kernels()` call does. Without it fluxrt runs
the torch formulas instead and says so once (`announce_once`); `require()` is for callers that must have it.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable

import torch

log = logging.getLogger("fluxrt")

_module = None
_error: str | None = None
_announced: set[str] = set()
_hooks: list[Callable[[], None]] = []  # run once, right after fluxrt._C is imported


def _load():
    global _module, _error
    if _module is None and _error is None:
        try:
            _module = importlib.import_module("fluxrt._C")
        except ImportError as err:  # not built, or built against another torch (undefined symbols)
            _error = str(err)
        else:
            for hook in _hooks:
                hook()
    return _module


def on_load(hook: Callable[[], None]) -> None:
    """Run `hook()` once fluxrt._C is loaded (now, if it already is): what needs its ops registered (fake impls)
    waits for the first use instead of importing it at `import fluxrt`."""
    _hooks.append(hook)
    if _module is not None:
        hook()


def available() -> bool:
    """True when fluxrt._C imports (its ops are then registered as torch.ops.fluxrt_C.*)."""
    return _load() is not None


def has_kernels(device_type: str) -> bool:
    """True when fluxrt._C is loaded and has kernels for this device type; it has "cpu" ones always, "cuda" ones
    when it was built against a CUDA torch with nvcc present, none for other devices."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return (key is not None and available()
            and torch._C._dispatch_has_kernel_for_dispatch_key("fluxrt_C::group_norm_silu", key))


def missing_reason() -> str:
    """Why fluxrt._C is not loaded and how to build it."""
    skipped = (" FLUXRT_SKIP_EXT=1 is set in this environment, which makes setup.py skip the extension; unset it "
               "and rebuild." if os.environ.get("FLUXRT_SKIP_EXT") == "1" else "")
    return (f"fluxrt._C (the C++/CUDA extension) is not importable ({_error}). Build it with "
            "`pip install --no-build-isolation -e .` or, for PYTHONPATH runs, `python setup.py build_ext --inplace` "
            f"in the repository root (torch must be installed first).{skipped}")


def require():
    """The loaded fluxrt._C module; a RuntimeError that says how to build it when it is missing."""
    module = _load()
    if module is None:
        raise RuntimeError(missing_reason())
    return module


def announce_once(message: str) -> None:
    """Log `message` as a warning the first time it comes up in this process (fallbacks are visible, not noisy)."""
    if message not in _announced:
        _announced.add(message)
        log.warning("%s", message)
