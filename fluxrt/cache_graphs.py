"""Step caching under CUDA graphs: a cached call (fluxrt.cache) of a FastFlux compiled with cuda_graphs.

One graph of the whole step cannot skip part of itself, so the cached call is cut into stages, each captured as its
own CUDA graph per input signature through fluxrt.graphs.GraphedCall (the weights-key invalidation and the
least-recently-used bound of the uncached graph apply to each stage; stage_graphs):

- "first": the embedders, the conditioning (vec, every block's modulation from the batched GEMV, RoPE's cos, sin) and
  double block 0 -> img and txt after block 0, the first-block residual r1, vec, the modulations (one [B, rows]
  tensor, concatenated inside the graph: one clone and one copy into "rest" instead of one per block), cos, sin,
  and change [B]: each row's relative L1 change of r1 against `stored`, a static input holding each probed row's
  r1 of its last full step (zeros in the other rows, whose change is never read), computed with fluxrt.cache's own
  relative_l1, row by row as cache.py does, so the values are the same.
- "rest": the other blocks and the final layer -> (output, hidden after the last block).
- "skip": hidden = img after block 0 + each row's cached rest residual (ImageCache.skipped_rest), then the final
  layer, eagerly. Not a graph: it is ~10 small kernels (B adds, a stack, the final layer's GEMV, norm and linear)
  whose GPU time is the same either way; a graph would save only their launch gaps (some 5 µs each) and cost a
  capture, a memory pool and copies of hidden into static buffers, against a skip step whose "first" replay
  reads the 3.2 B modulation weights (>= 1.3 ms at 4.8 TB/s in bf16) and runs block 0. Argued, not measured.
- "final": TaylorSeer's predicted steps run no block: vec from (timesteps, y, guidance) and the final layer on the
  predicted hidden (ImageCache.predicted, eager: a few fp32 axpys per row). TaylorSeer's full steps run first + rest.

A step whose rows agree runs "first" then "rest" (every row computes), "first" then "skip" (every row's First-Block
Cache skips) or "final" alone (every row predicts). Rows that disagree within one batch (some skip or predict,
some compute) fall back to the eager fluxrt.cache.run_blocks_cached path, as a model without graphs runs them: the
whole call runs eagerly, so a batch whose FBC rows disagree has run "first" for nothing, and its fallback reads the
decisions again (a second sync on that step).

The decision costs at most one device-to-host sync per step: a read of the [B] change (only when a row probes: an
FBC row with a stored residual). That read drains the GPU's queue, so the next stage's launch is exposed too.
A device-side flag would avoid both. torch 2.13 records a torch.cond met during a CUDA graph capture as a graph IF
node (CUDA 12.4+ conditional nodes; torch/_higher_order_ops/cudagraph_conditional_nodes.py, which also warms both
branches up), so one graph per signature could hold block 0, the decision on the device and
torch.cond(skip, rest_residual_branch, rest_blocks_branch), and the host could queue step k+1 before step k ends.
What it would not change: a conditional node takes one branch for the whole graph, so a batch's rows must still
agree (mixed rows still need this fallback); and what the host does after the decision today (the states'
stored residuals, rest residuals and stats) would have to live on the device, written by both branches, since the
host would no longer know which branch ran. Both branches must also trace with torch.cond (dynamo, into FX graphs)
and return the same shapes. TaylorSeer needs no flag: its schedule is known on the host. None of this is measured
here (written without a GPU): by arithmetic the sync and the exposed launch cost tens of µs against a skip step of
milliseconds at 1024².

Exactness: for the same inputs and states, the stages run the eager cached path's kernels in the same order (the
embedders and conditioning as FastFlux._forward, block 0 as FastFlux.first_block, the rest as
run_blocks(first=1)), so the output is expected bit-identical, and the states are updated as run_blocks_cached
updates them (begin_step once per call; computed, skipped_rest or predicted per row). tests/test_cache_graphs.py
asserts equality with atol=0 on the CPU (stages run eagerly) and on a GPU (gpu-marked: real graphs).

Memory: each stage keeps its own graphs and memory pools beside the uncached call's (fast.graphs), up to
max_graphs per stage.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from . import cache
from .graphs import GraphedCall


class FirstOut(NamedTuple):
    """Stage "first"'s outputs (each [B, ...])."""

    after_first: Tensor  # img after double block 0 [B, L, C]
    txt_after: Tensor  # txt after double block 0 [B, T, C]
    first_residual: Tensor  # after_first - img [B, L, C]
    vec: Tensor  # [B, C]
    mods: Tensor  # every block's modulation, concatenated [B, rows] (split by fast.mod_sizes)
    cos: Tensor
    sin: Tensor
    change: Tensor  # [B] fp32: each row's relative L1 change of first_residual against `stored`


def first_stage(fast, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                guidance: Tensor | None, stored: Tensor, lora_scales: Tensor | None = None) -> FirstOut:
    """The embedders, the conditioning and double block 0 (FastFlux._forward's head, then first_block), and each
    row's FBC change against `stored` [B, L, C]."""
    img, txt, vec, mods, cos, sin, row_scales = fast.head(img, img_ids, txt, txt_ids, timesteps, y, guidance,
                                                          lora_scales)
    after_first, txt_after = fast.first_block(img, txt, mods, cos, sin, row_scales)
    first_residual = after_first - img
    change = torch.stack([cache.relative_l1(first_residual[j], stored[j]) for j in range(img.shape[0])])
    return FirstOut(after_first, txt_after, first_residual, vec, torch.cat(mods, dim=1), cos, sin, change)


def rest_stage(fast, after_first: Tensor, txt_after: Tensor, mods: Tensor, cos: Tensor, sin: Tensor, vec: Tensor,
               lora_scales: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The blocks after the first and the final layer -> (output, hidden after the last block)."""
    row_scales = fast.row_scales(after_first.shape[0], lora_scales)
    hidden = fast.run_blocks(after_first, txt_after, list(mods.split(fast.mod_sizes, dim=1)), cos, sin,
                             lora_scales=row_scales, first=1)
    return fast._final_layer(hidden, vec, row_scales), hidden


def skip_stage(fast, hidden: Tensor, vec: Tensor, lora_scales: Tensor | None = None) -> Tensor:
    """The final layer on the skipped step's hidden (eager: see the module docstring)."""
    return fast._final_layer(hidden, vec, fast.row_scales(hidden.shape[0], lora_scales))


def final_stage(fast, hidden: Tensor, timesteps: Tensor, y: Tensor, guidance: Tensor | None,
                lora_scales: Tensor | None = None) -> Tensor:
    """TaylorSeer's predicted step: vec and the final layer on the predicted hidden."""
    row_scales = fast.row_scales(hidden.shape[0], lora_scales)
    vec = fast.time_vector(timesteps, y, guidance, hidden.dtype, row_scales)  # not the modulation GEMV: not needed
    return fast._final_layer(hidden, vec, row_scales)


STAGES = {"first": first_stage, "rest": rest_stage, "final": final_stage}


def stage_functions(fast) -> dict[str, Callable]:
    """The graphed stages as plain functions of tensors (eager: what a capture records; the CPU tests run these)."""
    return {name: partial(function, fast) for name, function in STAGES.items()}


def stage_graphs(fast) -> dict[str, GraphedCall]:
    """fast's stage graphs ({"first", "rest", "final"}: GraphedCall, each bounded like fast.graphs), made on the first
    cached call. GraphedCall.captures and .cache.stats ("hits": replays of a held graph) say what ran."""
    if fast.graphs is None:
        raise ValueError("stage graphs need a FastFlux compiled with cuda_graphs=True (on a CUDA model); without "
                         "graphs a cached call runs fluxrt.cache.run_blocks_cached eagerly")
    graphs = getattr(fast, "_stage_graphs", None)
    if graphs is None:
        graphs = {name: GraphedCall(function, weights=fast._graph_weights, max_graphs=fast.graphs.max_graphs)
                  for name, function in stage_functions(fast).items()}
        fast._stage_graphs = graphs
    return graphs


def run(fast, cache_states: list, **inputs) -> Tensor:
    """A cached call of `fast` (a FastFlux with CUDA graphs on, CUDA inputs): FastFlux.forward's kwargs."""
    return step(fast, stage_graphs(fast), cache_states, **inputs)


def step(fast, stages: dict[str, Callable], cache_states: list, img: Tensor, img_ids: Tensor, txt: Tensor,
         txt_ids: Tensor, timesteps: Tensor, y: Tensor, guidance: Tensor | None = None,
         lora_scales: Tensor | None = None) -> Tensor:
    """One cached call through `stages` (stage_graphs, or stage_functions for an eager run): the stages the rows
    agree on, or the eager fallback when they disagree. Every state's begin_step runs exactly once."""
    runs = cache.begin_steps(cache_states)
    inputs = dict(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=timesteps, y=y, guidance=guidance,
                  lora_scales=lora_scales)
    dtype = fast._activation_dtype()
    if not any(runs):  # every row is a TaylorSeer prediction
        hidden = torch.stack([state.predicted().to(dtype) for state in cache_states])
        return stages["final"](hidden=hidden, timesteps=timesteps, y=y, guidance=guidance, lora_scales=lora_scales)
    if not all(runs):
        return _eager(fast, cache_states, runs, inputs)
    first = FirstOut(*stages["first"](**inputs, stored=_stored_residuals(cache_states, img, fast, dtype)))
    skips = _skips(cache_states, first.change)
    if not skips:
        out, hidden = stages["rest"](after_first=first.after_first, txt_after=first.txt_after, mods=first.mods,
                                     cos=first.cos, sin=first.sin, vec=first.vec, lora_scales=lora_scales)
        for j, state in enumerate(cache_states):
            if state is not None:
                state.computed(hidden[j], first.first_residual[j], first.after_first[j])
        return out
    if len(skips) < len(cache_states):
        return _eager(fast, cache_states, runs, inputs)
    hidden = torch.stack([state.skipped_rest(first.after_first[j]).to(dtype) for j, state in enumerate(cache_states)])
    return skip_stage(fast, hidden, first.vec, lora_scales)


def _stored_residuals(cache_states: list, img: Tensor, fast, dtype: torch.dtype) -> Tensor:
    """Stage "first"'s `stored` [B, L, C]: each probed row's r1 of its last full step, zeros elsewhere."""
    probed = set(cache.probed_rows(cache_states))
    shape = (img.shape[1], fast.model.hidden_size)
    return torch.stack([cache_states[j].first_residual if j in probed else img.new_zeros(shape, dtype=dtype)
                        for j in range(len(cache_states))])


def _skips(cache_states: list, change: Tensor) -> set[int]:
    """The rows whose FBC rule says skip, from stage "first"'s change [B]: one device-to-host read, none when no row
    probes."""
    probed = cache.probed_rows(cache_states)
    if not probed:
        return set()
    changes = change.tolist()
    return {j for j in probed if changes[j] < cache_states[j].config.threshold}


def _eager(fast, cache_states: list, runs: list[bool], inputs: dict) -> Tensor:
    """Rows that disagree: FastFlux._forward's eager cached path (cache.run_blocks_cached), the states' step begun
    already (runs)."""
    img, txt, vec, mods, cos, sin, row_scales = fast.head(**inputs)
    hidden = cache.run_blocks_cached(fast, img, txt, mods, cos, sin, cache_states, row_scales, runs=runs)
    return fast._final_layer(hidden, vec, row_scales)
