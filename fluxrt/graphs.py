"""CUDA graphs for a module whose call takes tensors (and None): one graph per input signature.

A step of FLUX at batch 1 launches ~1000 kernels; at 1024² many of the glue kernels run 20-60 µs, so host-side
launch time (Python, Triton's launcher, the autotuner's cache lookup) shows between them. Replaying a captured
graph removes it. The kernels are shape-generic, so a new resolution is just a new capture (a warm-up call,
which also autotunes, then the capture); nothing is recompiled.

Each signature (shapes, dtypes, devices, which arguments are None) gets its own graph, static input buffers
and memory pool; at most `max_graphs` are kept (least recently used goes first). The output returned is a
clone of the graph's static output, so a caller may keep it across calls.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn


def _signature(kwargs: dict) -> tuple:
    return tuple(sorted((k, None if v is None else (tuple(v.shape), v.dtype, v.device)) for k, v in kwargs.items()))


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

    def __call__(self, kwargs: dict) -> Tensor:
        for k, v in kwargs.items():
            if v is not None:
                self.static[k].copy_(v)
        self.graph.replay()
        return self.output.clone()


class GraphedCall:
    """Call `module(**kwargs)` through CUDA graphs keyed by the inputs' signature (CUDA tensors only)."""

    def __init__(self, module: nn.Module, max_graphs: int = 4):
        if max_graphs < 1:
            raise ValueError("max_graphs must be >= 1")
        self.module, self.max_graphs = module, max_graphs
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()

    def __call__(self, **kwargs) -> Tensor:
        key = _signature(kwargs)
        if key in self.graphs:
            self.graphs.move_to_end(key)
        else:
            if len(self.graphs) >= self.max_graphs:
                self.graphs.popitem(last=False)
            self.graphs[key] = _Captured(self.module, kwargs)
        return self.graphs[key](kwargs)
