"""One context-parallel transformer driven from rank 0: the pipeline, CLI and server run on rank 0; the other ranks
only run their shard of each transformer call.

    rank 0:    leader = Leader(sharded(model, "ulysses"))   # the transformer's call signature
               pipe.transformer = leader ... leader.close()  # (FluxPipeline.lead_context_parallel does this)
    rank > 0:  follow(sharded(model, "ulysses"))             # returns when rank 0 closes; ParallelError if it dies

Each call, rank 0 broadcasts a header (which inputs come, their dtypes and shapes) and then the inputs (img, img_ids,
txt, txt_ids, timesteps, y, guidance, lora_scales); every rank runs the sharded model (fluxrt.parallel) on them. So
the text is encoded once, on rank 0, and reaches the other ranks inside each call's broadcast; the sampler, the
VAE decode and the PNG stay on rank 0 (benchmarks/NOTES.md models the patch-parallel VAE and says why not). Any
batcher or mode that calls the transformer works unchanged. Inputs are checked on rank 0 before anything is sent, so
a bad call raises there and the other ranks never see it.

Liveness: every collective times out after fluxrt.parallel.init()'s timeout_s. Between calls (rank 0 encoding text,
decoding, or a server waiting for requests) rank 0 sends a keep-alive header every keepalive_s, so idle followers
never time out, while a dead rank 0 is noticed within timeout_s, and a dead follower fails rank 0's next call.
No pickle: headers are int64 tensors.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import parallel
from .parallel import ParallelError, ParallelFlux, _collective

CALL, STOP, KEEPALIVE = 1, 2, 3
INPUTS = ("img", "img_ids", "txt", "txt_ids", "timesteps", "y", "guidance", "lora_scales")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.bool)
MAX_DIMS = 4
_SLOT = 3 + MAX_DIMS  # present, dtype code, ndim, shape
HEADER_LEN = 1 + _SLOT * len(INPUTS)


def sharded(model: nn.Module, scheme: str, ulysses_degree: int | None = None) -> nn.Module:
    """The context-parallel form of a fluxrt.reference.Flux (ParallelFlux) or of a compiled FastFlux (sharded in
    place: FastFlux.shard). Every rank calls it in step: it makes the process groups."""
    from .reference import Flux
    from .transformer import FastFlux

    if isinstance(model, FastFlux):
        return model.shard(parallel.make_mesh(scheme, model.model.num_heads, ulysses_degree))
    if isinstance(model, Flux):
        return ParallelFlux(model, scheme, ulysses_degree)
    raise TypeError(f"context parallelism runs a fluxrt.reference.Flux or a compiled FastFlux, not a "
                    f"{type(model).__name__}")


def base_model(model: nn.Module) -> nn.Module:
    """The fluxrt.reference.Flux a sharded model runs (ParallelFlux.model, FastFlux.model)."""
    return model.model


class Leader:
    """Rank 0's handle on the transformer sharded over every rank: call it as the transformer. close() (or leaving a
    `with` block) lets the followers return."""

    def __init__(self, model: nn.Module, keepalive_s: float | None = None):
        if not dist.is_initialized() or dist.get_rank() != 0:
            raise RuntimeError("the Leader runs on rank 0 of an initialized process group (fluxrt.parallel.init()); "
                               "the other ranks call fluxrt.parallel_engine.follow")
        self.sharded = model
        self.model = base_model(model)  # the weights (what pipelines read the config and dtype from)
        self.device = next(self.model.parameters()).device
        self._lock = threading.Lock()
        self._closed = False
        self._failure: Exception | None = None
        self._last_sent = time.monotonic()
        self._stop = threading.Event()
        interval = keepalive_s if keepalive_s is not None else parallel.timeout_s() / 4
        if interval <= 0:
            raise ValueError(f"keepalive_s must be > 0 seconds, got {keepalive_s}")
        self._thread = threading.Thread(target=self._keep_alive, args=(interval,), name="fluxrt-cp-keepalive",
                                        daemon=True)
        self._thread.start()

    @property
    def lora(self):
        """The sharded FastFlux's LoRA side branches (per-image scales travel with each call), or None."""
        return getattr(self.sharded, "lora", None)

    @property
    def failure(self) -> Exception | None:
        """What broke the group (a call that raised mid-way: a dead or silent rank, out of memory, ...), or None.
        Once set, every call raises: the ranks are out of step."""
        return self._failure

    @property
    def plan(self) -> dict | None:
        return getattr(self.sharded, "plan", None)

    def __call__(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                 guidance: Tensor | None = None, lora_scales: Tensor | None = None) -> Tensor:
        self.model._check_inputs(img, img_ids, txt, txt_ids, timesteps, y, guidance)  # before anything is sent
        if lora_scales is not None:
            if self.lora is None:
                raise ValueError("lora_scales needs the LoRA side branches of a compiled transformer")
            self.lora.check_per_image(lora_scales, img.shape[0])
        inputs = (img, img_ids, txt, txt_ids, timesteps, y, guidance, lora_scales)
        with self._lock:
            self._check_usable()
            try:
                _send(CALL, inputs, self.device)
                return _run(self.sharded, inputs)
            except Exception as error:  # the ranks are out of step now: no STOP can be sent safely
                self._failure = error
                raise
            finally:
                self._last_sent = time.monotonic()

    def close(self) -> None:
        """Tell the followers to return (they exit cleanly); later calls raise. Idempotent."""
        self._stop.set()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._failure is None:
                _send(STOP, (), self.device)
        self._thread.join()

    def __enter__(self) -> "Leader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise ParallelError(f"the context-parallel group failed in an earlier call ({self._failure}); restart "
                                "every rank")
        if self._closed:
            raise RuntimeError("this context-parallel transformer is closed: the other ranks have left")

    def _keep_alive(self, interval: float) -> None:
        while not self._stop.wait(interval / 2):
            with self._lock:
                if self._closed or self._failure is not None:
                    return
                if time.monotonic() - self._last_sent < interval:
                    continue
                try:
                    _send(KEEPALIVE, (), self.device)
                except ParallelError as error:  # a follower died: the next call says so
                    self._failure = error
                    return
                self._last_sent = time.monotonic()


@contextmanager
def context_parallel(pipe, scheme: str, ulysses_degree: int | None = None,
                     keepalive_s: float | None = None) -> Iterator[bool]:
    """`with context_parallel(pipe, "ulysses") as leading:` on every rank (FluxPipeline.context_parallel).

    Rank 0: the pipeline's transformer becomes a Leader over every rank; the block runs with leading=True and calls
    the pipeline as usual; leaving it lets the other ranks go and puts the transformer back. Other ranks: entering
    follows rank 0's calls until it leaves its block, then the block runs with leading=False (skip the work)."""
    model = pipe.transformer
    shard = sharded(model, scheme, ulysses_degree)
    try:
        if dist.get_rank() != 0:
            follow(shard)
            yield False
            return
        with Leader(shard, keepalive_s) as leader:
            pipe.transformer = leader
            try:
                yield True
            finally:
                pipe.transformer = model
    finally:
        if shard is model:  # a FastFlux sharded in place: back to one device
            model.shard(None)


def follow(model: nn.Module) -> int:
    """Run this rank's shard of every call rank 0's Leader makes, until it closes; returns the number of calls run.
    ParallelError when rank 0 (or another rank) dies or stops answering for init()'s timeout_s."""
    device = next(base_model(model).parameters()).device
    calls = 0
    while True:
        op, inputs = _receive(device)
        if op == STOP:
            return calls
        if op == CALL:
            _run(model, inputs)
            calls += 1


def _run(model: nn.Module, inputs: tuple) -> Tensor:
    *args, lora_scales = inputs
    kwargs = {} if lora_scales is None else {"lora_scales": lora_scales}
    with torch.inference_mode():
        return model(*args, **kwargs)


def _send(op: int, inputs: tuple, device: torch.device) -> None:
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[0] = op
    for slot, tensor in enumerate(inputs):
        if tensor is not None:
            at = 1 + slot * _SLOT
            header[at : at + 3 + tensor.dim()] = torch.tensor([1, DTYPES.index(tensor.dtype), tensor.dim(),
                                                               *tensor.shape])
    with _collective("sending the next call to the other ranks"):
        dist.broadcast(header.to(device), src=0)
        for tensor in inputs:
            if tensor is not None:
                dist.broadcast(tensor.to(device).contiguous(), src=0)


def _receive(device: torch.device) -> tuple[int, tuple]:
    header = torch.empty(HEADER_LEN, dtype=torch.int64, device=device)
    with _collective("waiting for rank 0's next call"):
        dist.broadcast(header, src=0)
        values = header.tolist()
        inputs = []
        for slot in range(len(INPUTS)):
            present, dtype, ndim, *shape = values[1 + slot * _SLOT : 1 + (slot + 1) * _SLOT]
            if not present:
                inputs.append(None)
                continue
            tensor = torch.empty(shape[:ndim], dtype=DTYPES[dtype], device=device)
            dist.broadcast(tensor, src=0)
            inputs.append(tensor)
    return values[0], tuple(inputs)
