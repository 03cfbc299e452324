"""CUDA graphs for a module whose call takes tensors (and None): one graph per input signature.

A step of FLUX at batch 1 launches ~1000 kernels; at 1024² many of the glue kernels run 20-60 µs, so host-side
launch time (Python, Triton's launcher, the autotuner's cache lookup) shows between them. Replaying a captured
graph removes it. The kernels are shape-generic, so a new resolution is just a new capture (a warm-up call,
which also autotunes, then the capture); nothing is recompiled.

Each signature (shapes, dtypes, devices, which arguments are None) gets its own graph, static input buffers
and memory pool; at most `max_graphs` are kept (least recently used goes first). The output returned is a
clone of the graph's static output (a tensor, or a tuple, named tuple or list of tensors and None: each tensor
cloned; clone_output), so a caller may keep it across calls.

A graph bakes in the addresses of the weights it read. `.to(...)`, `load_state_dict`, swapping a parameter or
editing one in place would leave a replay reading freed memory or values the eager model no longer has, so every
call compares the weights' key (each tensor's address, version counter and dtype: `weights_key`) with the one the
graphs were captured under, and drops all graphs when it changed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable

import torch
from torch import Tensor, nn


def _signature(kwargs: dict) -> tuple:
    return tuple(sorted((k, None if v is None else (tuple(v.shape), v.dtype, v.device)) for k, v in kwargs.items()))


def weights_key(tensors: Iterable[Tensor]) -> tuple:
    """What a captured graph assumes about the weights: where each lives (data_ptr), that it was not written since
    (torch's version counter, bumped by every in-place op: copy_, load_state_dict, add_) and its dtype. Cheap: no
    data is read (about 0.1 µs a tensor)."""
    return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)


class GraphCache:
    """Least-recently-used values (captured graphs) by key (input signature), all valid for one weights key: a call
    under another weights key drops every value first. Holds no CUDA state itself, so it is testable anywhere."""

    def __init__(self, max_entries: int):
        if max_entries < 1:
            raise ValueError("max_graphs must be >= 1")
        self.max_entries = max_entries
        self.entries: OrderedDict[Hashable, object] = OrderedDict()
        self.weights: tuple | None = None
        # builds: values built (graphs captured); invalidations: times a weights change dropped the values held;
        # evictions: values dropped for room; hits: calls served by a value held
        self.stats = {"builds": 0, "invalidations": 0, "evictions": 0, "hits": 0}

    def get(self, key: Hashable, weights: tuple, build: Callable[[], object]):
        """The value for `key` under `weights`, built (and kept) when missing or when the weights changed."""
        if weights != self.weights:
            self.stats["invalidations"] += bool(self.entries)
            self.entries.clear()  # release the stale graphs (and their memory pools) before capturing new ones
            self.weights = weights
        if key in self.entries:
            self.entries.move_to_end(key)
            self.stats["hits"] += 1
            return self.entries[key]
        if len(self.entries) >= self.max_entries:
            self.entries.popitem(last=False)
            self.stats["evictions"] += 1
        self.entries[key] = value = build()
        self.stats["builds"] += 1
        return value


def clone_output(value):
    """A copy of a captured graph's output that the next replay cannot overwrite: each tensor cloned, None kept, and
    tuples (named ones too) and lists rebuilt around the clones (fluxrt.cache_graphs' stages return several)."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        items = [clone_output(item) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    raise TypeError(f"a CUDA-graphed call must return tensors (or None, or tuples and lists of them), got "
                    f"{type(value).__name__}")


class _Captured:
    def __init__(self, module: nn.Module, kwargs: dict):
        self.static = {k: (None if v is None else v.clone()) for k, v in kwargs.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture: Triton autotunes and compiles here
            module(**self.static)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = module(**self.static)

    def __call__(self, kwargs: dict):
        for k, v in kwargs.items():
            if v is not None:
                self.static[k].copy_(v)
        self.graph.replay()
        return clone_output(self.output)


class GraphedCall:
    """Call `module(**kwargs)` through CUDA graphs keyed by the inputs' signature (CUDA tensors only).

    weights: the tensors the graphs read (called before every call, so it sees swapped parameters); graphs are
    dropped when their weights_key changes. captures counts the graphs captured so far. The module returns a tensor
    or a structure of them (clone_output)."""

    def __init__(self, module: nn.Module, weights: Callable[[], Iterable[Tensor]], max_graphs: int = 4):
        self.module, self.weights = module, weights
        self.cache = GraphCache(max_graphs)
        self.captures = 0

    @property
    def max_graphs(self) -> int:
        return self.cache.max_entries

    @property
    def graphs(self) -> OrderedDict:
        return self.cache.entries

    def __call__(self, **kwargs):
        graph = self.cache.get(_signature(kwargs), weights_key(self.weights()), lambda: self._capture(kwargs))
        return graph(kwargs)

    def _capture(self, kwargs: dict) -> _Captured:
        self.captures += 1
        return _Captured(self.module, kwargs)
