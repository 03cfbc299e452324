"""Step caching under CUDA graphs (fluxrt.cache on a FastFlux compiled with cuda_graphs).

Not built yet: a cached call on a CUDA-graphed model runs eagerly (the same numerics as the graphed uncached call's
kernels, without the graph replay). The plan (issue 22): the first block and the rest captured as separate graphs,
so that a skipped step replays only the first.
"""

from __future__ import annotations

from torch import Tensor


def run(fast, **kwargs) -> Tensor:
    """A cached call of `fast` (a FastFlux with CUDA graphs on): eager for now."""
    return fast._forward(**kwargs)
