"""Step caching for the compiled FLUX transformer: reuse work across denoising steps.

    fast = fluxrt.compile(model, cache=FirstBlockCache(0.08))    # or cache="fbc:0.08"
    pipe(prompt, cache="taylorseer:1:5:5")                          # per call; serving: a request's "cache"

Two methods. Each image keeps its own state (ImageCache), so one batch may mix methods, thresholds, uncached images
and images at different steps (step-level batching); the rows that must compute are run as a sub-batch.

- FirstBlockCache(threshold): ParaAttention's First-Block Cache (diffusers' FirstBlockCacheConfig). Every step runs
  the first double block; its image-stream residual r1 = img after block 0 - img before it is compared with r1 of the
  image's last fully computed step, rel = mean|r1 - r1_last| / mean|r1_last|. rel < threshold: the other blocks are
  skipped and the residual they added at that last full step (hidden after the last block - hidden after block 0)
  is added instead. threshold 0 never skips (rel < 0 is never true).
- TaylorSeer(order, interval, warmup, cooldown): arXiv 2503.06923 with diffusers' TaylorSeerCacheConfig schedule. The
  full model runs at steps < warmup, at steps with (step - warmup - 1) % interval == 0, and from `cooldown` on; at the
  other steps no block runs: the hidden states after the last block (what the final layer reads, with this step's
  conditioning) are predicted by a Taylor expansion in the step index, from divided differences of the last full
  steps' values up to `order` (fp32).

A state follows one image through one trajectory: a new call of the pipeline makes new ones. The transformer takes
them per row (FastFlux(..., cache_states=[ImageCache | None, ...])); a model compiled with cache= makes them itself
and starts over when a call's timestep is not below the previous call's (a new trajectory) or the batch changes.
ImageCache.stats says how many steps it computed and skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class FirstBlockCache:
    """Skip every block after the first while its output residual changes by less than `threshold` (relative L1)."""

    threshold: float = 0.1  # from benchmarks/bench_cache.py on the tiny trained model (NOTES.md); ParaAttention: 0.08

    def __post_init__(self):
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not (
                0 <= self.threshold < math.inf):
            raise ValueError(f"FirstBlockCache threshold must be a finite number >= 0 (0: never skip; the default 0.1; "
                             f"ParaAttention uses 0.08 on 28 steps), got {self.threshold!r}")

    def spec(self) -> str:
        return f"fbc:{self.threshold:g}"


@dataclass(frozen=True)
class TaylorSeer:
    """Run the full model every `interval` steps (after `warmup` full steps) and predict the others to `order`."""

    order: int = 1
    interval: int = 5
    warmup: int = 5  # diffusers' default is 3; on the tiny trained model 3 breaks images at interval 4-5 (NOTES.md)
    cooldown: int | None = None  # from this step on, every step is computed fully

    def __post_init__(self):
        for name, low in (("order", 0), ("interval", 1), ("warmup", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"TaylorSeer {name} must be an int >= {low}, got {value!r}")
        if self.order > 4:
            raise ValueError(f"TaylorSeer order {self.order} is past what finite differences of a few steps support; "
                             "use 1 or 2")
        if self.cooldown is not None and (isinstance(self.cooldown, bool) or not isinstance(self.cooldown, int)
                                          or self.cooldown < 0):
            raise ValueError(f"TaylorSeer cooldown must be None or an int >= 0, got {self.cooldown!r}")

    def computes(self, step: int) -> bool:
        """Whether step `step` (0-based) runs the full model (diffusers' TaylorSeer schedule)."""
        return (step < self.warmup or (step - self.warmup - 1) % self.interval == 0
                or (self.cooldown is not None and step >= self.cooldown))

    def spec(self) -> str:
        tail = "" if self.cooldown is None else f":{self.cooldown}"
        return f"taylorseer:{self.order}:{self.interval}:{self.warmup}{tail}"


CacheConfig = FirstBlockCache | TaylorSeer
SPEC_HELP = ("fbc:THRESHOLD (First-Block Cache, e.g. fbc:0.08) or taylorseer:ORDER:INTERVAL[:WARMUP[:COOLDOWN]] "
             "(e.g. taylorseer:1:5:5)")


def parse(spec) -> CacheConfig | None:
    """A cache config from its spec string ("fbc:0.08", "taylorseer:1:5:5", "none"), a config (returned as is) or None."""
    if spec is None or isinstance(spec, (FirstBlockCache, TaylorSeer)):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"cache must be None, a spec string ({SPEC_HELP}) or a fluxrt.cache config, got "
                        f"{type(spec).__name__}")
    name, *fields = spec.strip().lower().split(":")
    kinds = {"none": (0, 0, None), "fbc": (1, 1, float), "taylorseer": (2, 4, int)}
    if name not in kinds or not kinds[name][0] <= len(fields) <= kinds[name][1]:
        raise ValueError(f"cache {spec!r} is not a cache spec: expected {SPEC_HELP}, or none")
    if name == "none":
        return None
    try:
        numbers = [kinds[name][2](field) for field in fields]
    except ValueError:
        raise ValueError(f"cache {spec!r}: a field is not a number; expected {SPEC_HELP}") from None
    try:
        return FirstBlockCache(*numbers) if name == "fbc" else TaylorSeer(*numbers)
    except ValueError as err:  # the config's own message: what is out of range
        raise ValueError(f"cache {spec!r}: {err}") from None


class ImageCache:
    """One image's cache state through one trajectory (see the module docstring). stats: steps computed / skipped."""

    def __init__(self, config: CacheConfig):
        self.config = config
        self.step = -1  # the step being run (begin_step advances it)
        self.stats = {"computed": 0, "skipped": 0}
        self.first_residual: Tensor | None = None  # FBC: r1 of the last full step
        self.rest_residual: Tensor | None = None  # FBC: what the blocks after the first added then
        self.factors: list[Tensor] = []  # TaylorSeer: value and divided differences at the last full step
        self.factors_step: int | None = None

    def begin_step(self) -> bool:
        """Advance to the next step; True when it runs the blocks (FBC: always, the first at least; TaylorSeer: on
        its full steps)."""
        self.step += 1
        if isinstance(self.config, TaylorSeer):
            return not self.factors or self.config.computes(self.step)
        return True

    def computed(self, hidden: Tensor, first_residual: Tensor | None = None, after_first: Tensor | None = None) -> None:
        """Record a fully computed step: hidden [L, C] after the last block (and FBC's first-block residual and the
        hidden after block 0)."""
        self.stats["computed"] += 1
        if isinstance(self.config, FirstBlockCache):
            self.first_residual, self.rest_residual = first_residual, hidden - after_first
        else:
            self._update_factors(hidden.float())

    def skipped_rest(self, after_first: Tensor) -> Tensor:
        """FBC skip: the hidden after the last block, from this step's block-0 output and the cached residual."""
        self.stats["skipped"] += 1
        return after_first + self.rest_residual

    def predicted(self) -> Tensor:
        """TaylorSeer: the hidden after the last block at this step, by Taylor expansion around the last full step."""
        self.stats["skipped"] += 1
        offset = self.step - self.factors_step
        out = torch.zeros_like(self.factors[0])
        for order, factor in enumerate(self.factors):
            out += factor * (offset**order / math.factorial(order))
        return out

    def _update_factors(self, value: Tensor) -> None:
        factors = [value]
        if self.factors:
            delta = self.step - self.factors_step
            for previous in self.factors[: self.config.order]:
                factors.append((factors[-1] - previous) / delta)
        self.factors, self.factors_step = factors, self.step


def states(config, batch: int) -> list[ImageCache | None]:
    """Fresh per-image states for a batch (None rows: no cache). config: one config (or spec) for every image, or a
    list of one per image."""
    configs = config if isinstance(config, (list, tuple)) else [config] * batch
    if len(configs) != batch:
        raise ValueError(f"{len(configs)} cache configs for a batch of {batch} images: give one, or one per image")
    return [None if c is None else ImageCache(c) for c in map(parse, configs)]


class Trajectory:
    """The per-image states one caller keeps across calls (a model compiled with cache=, or a diffusers
    cache_context). Flow matching runs t down from 1 to 0, so a call's timestep says where it is: below the last
    call's, the next step (pass 0); equal to it, another pass of the same step (true CFG's negative prompt: each pass
    keeps its own states); above it, or a new batch size, a new trajectory (new states)."""

    def __init__(self):
        self.passes: list[list[ImageCache | None]] = []  # per pass of a step: its states
        self.current = 0
        self.last_t = math.inf

    @property
    def states(self) -> list[ImageCache | None] | None:
        """The first pass's states (None before the first call)."""
        return self.passes[0] if self.passes else None

    def states_for(self, config, batch: int, timesteps: Tensor) -> list[ImageCache | None]:
        t = float(timesteps.max())  # one device-to-host sync a call (a pipeline passing its own states costs none)
        if not self.passes or len(self.passes[0]) != batch or t > self.last_t:
            self.passes, self.current = [], 0
        elif t == self.last_t:
            self.current += 1
        else:
            self.current = 0
        if self.current == len(self.passes):
            self.passes.append(states(config, batch))
        self.last_t = t
        return self.passes[self.current]


class _Rows:
    """Select some rows of batch tensors (the identity when all rows are selected: no copy, same numerics)."""

    def __init__(self, rows: list[int], batch: int):
        self.all = rows == list(range(batch))
        self.rows = rows
        self._index: dict[torch.device, Tensor] = {}  # one host-to-device copy of the rows per device, not per tensor

    def __call__(self, x: Tensor | None) -> Tensor | None:
        if x is None or self.all:
            return x
        if x.device not in self._index:
            self._index[x.device] = torch.tensor(self.rows, device=x.device)
        return x[self._index[x.device]]


def run_blocks_cached(fast, img: Tensor, txt: Tensor, mods: list[Tensor], cos: Tensor, sin: Tensor,
                      cache_states: list[ImageCache | None], lora_scales: Tensor | None = None,
                      runs: list[bool] | None = None) -> Tensor:
    """fast.run_blocks (a FastFlux) under per-image step caching: the hidden states after the last block [B, L, C].

    Rows whose TaylorSeer state predicts run no block. The others run block 0; First-Block-Cache rows whose residual
    barely moved take their cached residual; the rest run the other blocks as one sub-batch. The FBC decisions of the
    whole batch cost one device-to-host sync. runs: which rows run blocks, when the caller has begun the states'
    step already (fluxrt.cache_graphs' fallback); None: begin it here."""
    batch = img.shape[0]
    if runs is None:
        runs = begin_steps(cache_states)
    run = [i for i in range(batch) if runs[i]]
    parts: dict[int, Tensor] = {}
    if run:
        sub = _Rows(run, batch)
        img_r, txt_r, cos_r, sin_r, scales_r = (sub(x) for x in (img, txt, cos, sin, lora_scales))
        mods_r = [sub(m) for m in mods]
        after_first, txt_after = fast.first_block(img_r, txt_r, mods_r, cos_r, sin_r, scales_r)
        first_residual = after_first - img_r
        skip = _fbc_skips([cache_states[i] for i in run], first_residual)
        full = [j for j in range(len(run)) if j not in skip]
        hidden = None
        if full:
            rest = _Rows(full, len(run))
            hidden = fast.run_blocks(rest(after_first), rest(txt_after), [rest(m) for m in mods_r], rest(cos_r),
                                     rest(sin_r), lora_scales=rest(scales_r), first=1)
        for k, j in enumerate(full):
            state = cache_states[run[j]]
            if state is not None:
                state.computed(hidden[k], first_residual[j], after_first[j])
            parts[run[j]] = hidden[k]
        if len(full) == batch:
            return hidden  # every row computed: the uncached result itself
        for j in skip:
            parts[run[j]] = cache_states[run[j]].skipped_rest(after_first[j])
    for i, state in enumerate(cache_states):
        if i not in parts:
            parts[i] = state.predicted()
    return torch.stack([parts[i].to(img.dtype) for i in range(batch)])


def begin_steps(cache_states: list[ImageCache | None]) -> list[bool]:
    """Advance every state to its next step; per row, whether it runs blocks (an uncached row always does)."""
    return [state is None or state.begin_step() for state in cache_states]


def probed_rows(cache_states: list[ImageCache | None]) -> list[int]:
    """The rows whose First-Block-Cache rule is evaluated this step (FBC, with a full step behind them)."""
    return [j for j, state in enumerate(cache_states)
            if state is not None and isinstance(state.config, FirstBlockCache) and state.first_residual is not None]


def _fbc_skips(cache_states: list[ImageCache | None], first_residual: Tensor) -> set[int]:
    """The rows (of this sub-batch) whose First-Block-Cache rule says skip, with one sync for all of them."""
    probed = probed_rows(cache_states)
    if not probed:
        return set()
    changes = torch.stack([relative_l1(first_residual[j], cache_states[j].first_residual) for j in probed]).tolist()
    return {j for j, change in zip(probed, changes) if change < cache_states[j].config.threshold}


def relative_l1(now: Tensor, before: Tensor) -> Tensor:
    """FBC's change: mean|now - before| / mean|before| in fp32, a 0-d tensor (no sync)."""
    before = before.float()
    return (now.float() - before).abs().mean() / before.abs().mean()
