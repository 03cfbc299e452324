"""Context parallelism for FLUX on torch.distributed: the joint sequence (text + image tokens) split across ranks.

Three schemes, one code path (USP, "unified sequence parallelism", with the two degrees as knobs):
- Ulysses (ulysses_degree = world): all-to-all from sequence-sharded to head-sharded before attention, back after.
  Needs num_heads divisible by the degree. Two all-to-alls per attention (q, k, v in as one; the output back).
- ring (ring_degree = world): each rank keeps its queries; K/V blocks rotate around the ranks and the partial
  results merge by log-sum-exp (online softmax, statistics in fp32). Any world size.
- usp: ulysses_degree x ring_degree = world. Rank g sits at ring position g // u, Ulysses position g % u.

Sharding (Shards): rank r holds text tokens [r*Tc, (r+1)*Tc) and image tokens [r*Lc, (r+1)*Lc), each stream padded
to a multiple of the world size, so the double blocks keep their txt/img split per shard. Padding keys are dropped
(K/V rows compacted, KeyIndex) before each block's attention and padding queries are dropped at the end, so any T and
L work and no attention kernel needs a mask. The RoPE tables are built per shard from the sharded ids; the modulation
vectors are per image, not per token: the reference computes them whole on every rank, the compiled model computes
1/N of the batched GEMV's rows on each rank and all-gathers them (row_range, gather_rows). The final layer runs per
shard and the image tokens are all-gathered at the end, so every rank returns the whole [B, L, out_channels].

Two models run it, every rank calling with the same full inputs (SPMD):
- `ParallelFlux(model, scheme)` wraps a fluxrt.reference.Flux: the reference's blocks, attention in fp32 math;
- `fluxrt.compile(model, parallel=scheme)`: FastFlux's fused blocks, each K/V block through
  fluxrt.ops.attention_lse (Triton on GPUs). No CUDA graphs (the collectives run eagerly).
fluxrt.parallel_engine runs either from one leading rank (the pipeline, CLI and server: rank 0 broadcasts each call).
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from einops import rearrange
from torch import Tensor, nn

from . import ops
from .reference.math import apply_rope

SCHEMES = ("ulysses", "ring", "usp")
_joined_timeout_s: float | None = None  # init()'s timeout_s


class ParallelError(RuntimeError):
    """A collective failed on this rank: a peer rank died, or the collective ran past init()'s timeout_s."""


@contextmanager
def _collective(what: str):
    """Turn the backend's error for a failed collective into one ParallelError that says what to do."""
    try:
        yield
    except RuntimeError as error:  # gloo/nccl raise RuntimeError subclasses (DistBackendError, DistNetworkError)
        raise ParallelError(
            f"rank {dist.get_rank()}: {what} failed, so a peer rank died or timed out ({error}). "
            "The image is lost on every rank; look for the first failing rank's error and rerun."
        ) from error


def init(
    rank: int | None = None,
    world_size: int | None = None,
    *,
    backend: str | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    timeout_s: float = 120.0,
) -> tuple[int, int]:
    """Join the default process group; returns (rank, world_size). Calling it again returns the same pair.

    Without rank/world_size it reads torchrun's RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. The backend is nccl
    when CUDA is available (each rank then uses cuda:LOCAL_RANK), gloo otherwise. Every collective times out after
    timeout_s, so a dead peer turns into an error instead of a hang.
    """
    if dist.is_initialized():
        joined = dist.get_rank(), dist.get_world_size()
        if (rank, world_size) not in ((None, None), joined):
            raise ValueError(
                f"this process already joined as rank {joined[0]} of {joined[1]}, not rank {rank} of {world_size}; "
                "call fluxrt.parallel.destroy() first to rejoin differently"
            )
        return joined
    rank, world_size = _rank_and_world(rank, world_size)
    addr = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = master_port or os.environ.get("MASTER_PORT")
    if port is None:
        raise ValueError("fluxrt.parallel.init needs a rendezvous port: pass master_port= or set MASTER_PORT")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    global _joined_timeout_s
    _joined_timeout_s = timeout_s
    dist.init_process_group(
        backend,
        init_method=f"tcp://{addr}:{int(port)}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return rank, world_size


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None and world_size is None:
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ValueError(
                "fluxrt.parallel.init found no RANK/WORLD_SIZE: launch with torchrun, or pass rank= and world_size="
            )
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if rank is None or world_size is None:
        raise ValueError("pass both rank= and world_size= (or neither, under torchrun)")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def timeout_s() -> float:
    """How long a collective waits for a peer: init()'s timeout_s (torch's default, 30 minutes, for a group joined
    some other way)."""
    return _joined_timeout_s if _joined_timeout_s is not None else 1800.0


def destroy() -> None:
    """Leave the default process group (no-op when none was joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class Mesh:
    """Where this rank sits: global rank = ring_pos * ulysses_degree + ulysses_pos."""

    rank: int
    world_size: int
    ulysses_degree: int
    ring_degree: int
    ulysses_group: object  # ProcessGroup of this rank's Ulysses peers, or None when the degree is 1
    ring_ranks: tuple[int, ...]  # global ranks of this rank's ring, in ring order
    scheme: str = "usp"  # what the user asked for (the degrees say how it runs)

    def describe(self) -> str:
        """What the plan says about it, e.g. "usp over 4 ranks (ulysses 2 x ring 2), this is rank 1"."""
        return (f"{self.scheme} over {self.world_size} ranks (ulysses {self.ulysses_degree} x ring {self.ring_degree}), "
                f"this is rank {self.rank}")

    @property
    def ring_pos(self) -> int:
        return self.rank // self.ulysses_degree

    def ulysses_ranks(self, ring_pos: int) -> range:
        start = ring_pos * self.ulysses_degree
        return range(start, start + self.ulysses_degree)


def make_mesh(scheme: str, num_heads: int, ulysses_degree: int | None = None) -> Mesh:
    """Split the default group into Ulysses and ring groups for `scheme`; every rank must call it in step."""
    if not dist.is_initialized():
        raise RuntimeError("no process group: call fluxrt.parallel.init() first (or launch with torchrun)")
    rank, world = dist.get_rank(), dist.get_world_size()
    u = _ulysses_degree(scheme, world, num_heads, ulysses_degree)
    ring = world // u
    with _collective("making the context-parallel process groups"):
        groups = [dist.new_group(list(range(i * u, (i + 1) * u))) if u > 1 else None for i in range(ring)]
    ring_ranks = tuple(i * u + rank % u for i in range(ring))
    return Mesh(rank, world, u, ring, groups[rank // u], ring_ranks, scheme)


def check_scheme(scheme: str, num_heads: int, ulysses_degree: int | None = None) -> None:
    """make_mesh's checks alone (no process groups made): ValueError saying what to choose instead."""
    if not dist.is_initialized():
        raise RuntimeError("no process group: call fluxrt.parallel.init() first (or launch with torchrun)")
    _ulysses_degree(scheme, dist.get_world_size(), num_heads, ulysses_degree)


def _ulysses_degree(scheme: str, world: int, num_heads: int, ulysses_degree: int | None) -> int:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown context-parallel scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme != "usp" and ulysses_degree is not None:
        raise ValueError(f"ulysses_degree is set by the scheme {scheme!r}; pass it only with scheme='usp'")
    u = {"ulysses": world, "ring": 1}.get(scheme, ulysses_degree or math.gcd(world, num_heads))
    if world % u:
        raise ValueError(f"ulysses_degree {u} must divide the world size {world}")
    if num_heads % u:
        raise ValueError(
            f"Ulysses degree {u} must divide the {num_heads} attention heads; use scheme='ring' or 'usp' "
            f"with ulysses_degree dividing {num_heads}"
        )
    return u


# --- attention over the sharded sequence -------------------------------------------------------------------


def _all_to_all(x: Tensor, group) -> Tensor:
    x = x.contiguous()  # before empty_like, which would copy a permuted view's strides
    out = torch.empty_like(x)
    with _collective("the Ulysses all-to-all"):
        dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(qkv: Tensor, mesh: Mesh) -> Tensor:
    """[3, B, H, S, D] sequence-sharded -> [3, B, H/u, u*S, D] head-sharded (the Ulysses group's shards, in rank
    order): q, k and v in one all-to-all."""
    u = mesh.ulysses_degree
    if u == 1:
        return qkv
    sent = rearrange(qkv, "K B (U h) S D -> U K B h S D", U=u)
    return rearrange(_all_to_all(sent, mesh.ulysses_group), "U K B h S D -> K B h (U S) D")


def _heads_to_seq(x: Tensor, mesh: Mesh) -> Tensor:
    """Inverse of _seq_to_heads: [B, H/u, u*S, D] -> [B, H, S, D]."""
    u = mesh.ulysses_degree
    if u == 1:
        return x
    sent = rearrange(x, "B h (U S) D -> U B h S D", U=u)
    return rearrange(_all_to_all(sent, mesh.ulysses_group), "U B h S D -> B (U h) S D")


def _block_attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The reference's block attention: softmax attention of q over one K/V block in fp32 math; returns (out [B, h,
    Sq, D] fp32, log-sum-exp [B, h, Sq] fp32). fluxrt.ops.attention_lse is the same contract on the fused ops."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse[..., None]) @ v.float(), lse


def _merge(out: Tensor | None, lse: Tensor | None, block_out: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Two partial attentions of the same queries over disjoint key sets -> the attention over their union."""
    if out is None:
        return block_out, block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    return (out * torch.exp(lse - new_lse)[..., None] + block_out * torch.exp(block_lse - new_lse)[..., None],
            new_lse)


class KeyIndex:
    """Which key rows of each ring block are real: padding keys are dropped (compacted away) before the block's
    attention, so no kernel needs a mask. Built once per call (the lengths are the call's), used by every layer."""

    def __init__(self, valid: Tensor, mesh: Mesh, device: torch.device):
        self.blocks = []  # per ring position: None (every key real), an index tensor of the real ones, or "empty"
        for source in range(mesh.ring_degree):
            key_valid = valid[list(mesh.ulysses_ranks(source))].reshape(-1)
            if key_valid.all():
                self.blocks.append(None)
            elif not key_valid.any():
                self.blocks.append("empty")  # a block of padding only adds nothing (and would make the merge 0/0)
            else:
                self.blocks.append(key_valid.nonzero().squeeze(1).to(device))

    def keys(self, source: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor] | None:
        """k, v [B, h, S, D] of the block from ring position `source`, real rows only; None for an all-padding one."""
        index = self.blocks[source]
        if index is None:
            return k, v
        if isinstance(index, str):
            return None
        return k.index_select(2, index), v.index_select(2, index)


BlockAttention = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def _ring_attention(qkv: Tensor, keys: KeyIndex, mesh: Mesh, block: BlockAttention) -> Tensor:
    """Attention of the local queries over every ring member's K/V: qkv [3, B, h, S, D] -> fp32 [B, h, S, D]."""
    ring = mesh.ring_degree
    pos = mesh.ring_pos
    q, kv = qkv[0], qkv[1:].contiguous()
    out = lse = None
    for step in range(ring):
        incoming = None
        if step + 1 < ring:  # start passing the block on before computing with it
            incoming = torch.empty_like(kv)
            exchange = [
                dist.P2POp(dist.isend, kv, mesh.ring_ranks[(pos + 1) % ring]),
                dist.P2POp(dist.irecv, incoming, mesh.ring_ranks[(pos - 1) % ring]),
            ]
            with _collective("the ring K/V exchange"):
                requests = dist.batch_isend_irecv(exchange)
        real = keys.keys((pos - step) % ring, kv[0], kv[1])  # the block came from ring position pos - step
        if real is not None:
            out, lse = _merge(out, lse, *block(q, *real))
        if incoming is not None:
            with _collective("the ring K/V exchange"):
                for request in requests:
                    request.wait()
            kv = incoming
    return out


def attention(qkv: Tensor, keys: KeyIndex, mesh: Mesh, block: BlockAttention) -> Tensor:
    """Joint attention over the sharded sequence: qkv [3, B, H, S_local, D] (RoPE applied) -> [B, S_local, H*D] in
    its dtype. block(q, k, v) -> (out, lse) is one K/V block's attention (the reference formula or the fused op)."""
    out = _ring_attention(_seq_to_heads(qkv, mesh), keys, mesh, block).to(qkv.dtype)
    return rearrange(_heads_to_seq(out, mesh), "B H S D -> B S (H D)")


def reference_attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor, keys: KeyIndex, mesh: Mesh) -> Tensor:
    """The reference's attention(q, k, v, pe) on sequence shards (pe the local RoPE table)."""
    q, k = apply_rope(q, k, pe)
    return attention(torch.stack((q, k, v.to(q.dtype))), keys, mesh, _block_attention)


def fused_attention(qkv: Tensor, keys: KeyIndex, mesh: Mesh, backend: str) -> Tensor:
    """The compiled model's attention on sequence shards: qkv [3, B, H, S_local, D] as fluxrt.ops.rope_qk_norm writes
    it (normed, RoPE applied) -> [B, S_local, H*D]; each K/V block through fluxrt.ops.attention_lse."""
    return attention(qkv, keys, mesh,
                     lambda q, k, v: ops.attention_lse(q, k, v, backend=backend))


# --- the model -----------------------------------------------------------------------------------------------


class Shards:
    """One call's split of the joint sequence: this rank's slice of each stream, padded to the world size.

    Rank r holds text tokens [r*Tc, (r+1)*Tc) and image tokens [r*Lc, (r+1)*Lc), Tc and Lc the stream lengths
    rounded up to a multiple of the world size; tokens past a stream's end are padding (zeros, dropped as keys by
    `keys`, their outputs dropped by `gather_image`)."""

    def __init__(self, text_len: int, image_len: int, mesh: Mesh, device: torch.device):
        world, r = mesh.world_size, mesh.rank
        tc, lc = -(-text_len // world), -(-image_len // world)
        index = torch.arange(world)[:, None]
        valid = torch.cat((index * tc + torch.arange(tc) < text_len, index * lc + torch.arange(lc) < image_len), dim=1)
        self.text, self.image = slice(r * tc, (r + 1) * tc), slice(r * lc, (r + 1) * lc)
        self.image_len = image_len
        self.mesh = mesh
        self.keys = KeyIndex(valid, mesh, device)

    def take(self, x: Tensor, stream: str) -> Tensor:
        """This rank's rows of x [B, len, ...] for stream "text" or "image", zero-padded to the shard's length."""
        rows = self.text if stream == "text" else self.image
        part = x[:, rows]
        missing = rows.stop - rows.start - part.shape[1]
        if missing:
            part = torch.cat((part, part.new_zeros(part.shape[0], missing, *part.shape[2:])), dim=1)
        return part

    def gather_image(self, out: Tensor) -> Tensor:
        """Every rank's image rows [B, Lc, C] -> the whole image [B, L, C] on every rank (padding dropped)."""
        parts = [torch.empty_like(out) for _ in range(self.mesh.world_size)]
        with _collective("gathering the image tokens"):
            dist.all_gather(parts, out.contiguous())
        return torch.cat(parts, dim=1)[:, : self.image_len]


def row_range(rows: int, mesh: Mesh) -> tuple[int, int]:
    """This rank's rows [start, stop) of an output of `rows` rows split over the ranks (the last ones may get fewer,
    or none)."""
    per_rank = -(-rows // mesh.world_size)
    start = min(mesh.rank * per_rank, rows)
    return start, min(start + per_rank, rows)


def gather_rows(part: Tensor, rows: int, mesh: Mesh) -> Tensor:
    """Every rank's columns [B, stop - start] of row_range's split -> the whole [B, rows] on every rank."""
    per_rank = -(-rows // mesh.world_size)
    part = torch.nn.functional.pad(part, (0, per_rank - part.shape[1])).contiguous()  # all_gather takes equal sizes
    parts = [torch.empty_like(part) for _ in range(mesh.world_size)]
    with _collective("gathering the modulation vectors"):
        dist.all_gather(parts, part)
    return torch.cat(parts, dim=1)[:, :rows]


class ParallelFlux(nn.Module):
    """A fluxrt.reference.Flux run context-parallel over the default process group; same call signature.

    Every rank calls it with the same full inputs and gets the same full output. Build it on every rank in step
    (it creates process groups).
    """

    def __init__(self, model: nn.Module, scheme: str = "usp", ulysses_degree: int | None = None):
        super().__init__()
        self.model = model
        self.mesh = make_mesh(scheme, model.num_heads, ulysses_degree)
        self.scheme = scheme

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None) -> Tensor:
        m = self.model
        img_ids, txt_ids = m._check_inputs(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        shards = Shards(txt.shape[1], img.shape[1], self.mesh, img.device)
        img = m.img_in(shards.take(img, "image"))
        txt = m.txt_in(shards.take(txt, "text"))
        pe = m.pe_embedder(torch.cat((shards.take(txt_ids, "text"), shards.take(img_ids, "image")), dim=1))
        vec = m.conditioning_vector(timesteps, y, guidance)  # per image: every rank computes it whole

        def attend(q, k, v):
            return reference_attention(q, k, v, pe, shards.keys, self.mesh)

        for block in m.double_blocks:
            img, txt = block(img, txt, vec, pe=None, attend=attend)
        x = torch.cat((txt, img), dim=1)
        for block in m.single_blocks:
            x = block(x, vec, pe=None, attend=attend)
        return shards.gather_image(m.final_layer(x[:, txt.shape[1] :], vec))
