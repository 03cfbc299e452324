"""Context parallelism for FLUX on torch.distributed: the joint sequence (text + image tokens) split across ranks.

Three schemes, one code path (USP, "unified sequence parallelism", with the two degrees as knobs):
- Ulysses (ulysses_degree = world): all-to-all from sequence-sharded to head-sharded before attention, back after.
  Needs num_heads divisible by the degree. Four all-to-alls per attention (q, k, v in; the output back).
- ring (ring_degree = world): each rank keeps its queries; K/V blocks rotate around the ranks and the partial
  results merge by log-sum-exp (online softmax, statistics in fp32). Any world size.
- usp: ulysses_degree x ring_degree = world. Rank g sits at ring position g // u, Ulysses position g % u.

Sharding: rank r holds text tokens [r*Tc, (r+1)*Tc) and image tokens [r*Lc, (r+1)*Lc), each stream padded to a
multiple of the world size, so the double blocks keep their txt/img split per shard. Padding tokens are masked out as
keys and dropped as queries, so any T and L work. The RoPE tables are built per shard from the sharded ids; the
modulation vector is computed on every rank (it is per image, not per token); the final layer runs per shard and the
image tokens are all-gathered at the end, so every rank returns the whole [B, L, out_channels].

`ParallelFlux(model, scheme)` wraps a fluxrt.reference.Flux with the same call signature; each rank passes the same
full inputs. The attention here is plain fp32 PyTorch (the reference's numerics); the fused-kernel path under
fluxrt.compile is not wired in yet.
"""

from __future__ import annotations

import datetime
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from einops import rearrange
from torch import Tensor, nn

from .reference.math import apply_rope

SCHEMES = ("ulysses", "ring", "usp")


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
    groups = [dist.new_group(list(range(i * u, (i + 1) * u))) if u > 1 else None for i in range(ring)]
    ring_ranks = tuple(i * u + rank % u for i in range(ring))
    return Mesh(rank, world, u, ring, groups[rank // u], ring_ranks)


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


def _seq_to_heads(x: Tensor, mesh: Mesh) -> Tensor:
    """[B, H, S, D] sequence-sharded -> [B, H/u, u*S, D] head-sharded (the Ulysses group's shards, in rank order)."""
    u = mesh.ulysses_degree
    if u == 1:
        return x
    sent = rearrange(x, "B (U h) S D -> U B h S D", U=u)
    return rearrange(_all_to_all(sent, mesh.ulysses_group), "U B h S D -> B h (U S) D")


def _heads_to_seq(x: Tensor, mesh: Mesh) -> Tensor:
    """Inverse of _seq_to_heads: [B, H/u, u*S, D] -> [B, H, S, D]."""
    u = mesh.ulysses_degree
    if u == 1:
        return x
    sent = rearrange(x, "B h (U S) D -> U B h S D", U=u)
    return rearrange(_all_to_all(sent, mesh.ulysses_group), "U B h S D -> B (U h) S D")


def _block_attention(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax attention of fp32 q over one K/V block; returns (output, log-sum-exp [B, h, Sq, 1])."""
    scores = (q @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~key_valid, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return torch.exp(scores - lse) @ v.float(), lse


def _merge(out: Tensor | None, lse: Tensor | None, block_out: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    if out is None:
        return block_out, block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    return out * torch.exp(lse - new_lse) + block_out * torch.exp(block_lse - new_lse), new_lse


def _ring_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, mesh: Mesh) -> Tensor:
    """Attention of local q over every ring member's K/V. valid: [world, S_local] key validity of every rank."""
    ring = mesh.ring_degree
    pos = mesh.ring_pos
    kv = torch.stack((k, v)).contiguous()
    out = lse = None
    qf = q.float()
    for step in range(ring):
        incoming = None
        if step + 1 < ring:  # start passing the block on before computing with it
            incoming = torch.empty_like(kv)
            ops = [
                dist.P2POp(dist.isend, kv, mesh.ring_ranks[(pos + 1) % ring]),
                dist.P2POp(dist.irecv, incoming, mesh.ring_ranks[(pos - 1) % ring]),
            ]
            with _collective("the ring K/V exchange"):
                requests = dist.batch_isend_irecv(ops)
        source = (pos - step) % ring  # the ring position this block came from
        key_valid = valid[list(mesh.ulysses_ranks(source))].reshape(-1)
        if key_valid.any():  # a block of padding only adds nothing (and would make the merge 0/0)
            block_out, block_lse = _block_attention(qf, kv[0], kv[1], key_valid.to(q.device))
            out, lse = _merge(out, lse, block_out, block_lse)
        if incoming is not None:
            with _collective("the ring K/V exchange"):
                for request in requests:
                    request.wait()
            kv = incoming
    return out.to(q.dtype)


def sharded_attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor, valid: Tensor, mesh: Mesh) -> Tensor:
    """The reference's attention(q, k, v, pe) on sequence shards: q, k, v [B, H, S_local, D], pe the local RoPE
    table, valid [world, S_local] which tokens of each rank are real. Returns [B, S_local, H*D]."""
    q, k = apply_rope(q, k, pe)
    q, k, v = (_seq_to_heads(x, mesh) for x in (q, k, v))
    out = _heads_to_seq(_ring_attention(q, k, v, valid, mesh), mesh)
    return rearrange(out, "B H S D -> B S (H D)")


# --- the model -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shards:
    """This rank's slice of each stream, and which tokens of every rank are real (not padding)."""

    text: slice
    image: slice
    valid: Tensor  # [world, Tc + Lc] bool, on the CPU (read by Python to skip all-padding blocks)


def _shards(text_len: int, image_len: int, mesh: Mesh) -> _Shards:
    world = mesh.world_size
    tc, lc = -(-text_len // world), -(-image_len // world)
    index = torch.arange(world)[:, None]
    valid = torch.cat((index * tc + torch.arange(tc) < text_len, index * lc + torch.arange(lc) < image_len), dim=1)
    r = mesh.rank
    return _Shards(slice(r * tc, (r + 1) * tc), slice(r * lc, (r + 1) * lc), valid)


def _take(x: Tensor, rows: slice) -> Tensor:
    """x[:, rows] zero-padded to the slice's length (tokens past the end are padding)."""
    part = x[:, rows]
    missing = rows.stop - rows.start - part.shape[1]
    if missing:
        part = torch.cat((part, part.new_zeros(part.shape[0], missing, *part.shape[2:])), dim=1)
    return part


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
        image_len = img.shape[1]
        shards = _shards(txt.shape[1], image_len, self.mesh)
        img = m.img_in(_take(img, shards.image))
        txt = m.txt_in(_take(txt, shards.text))
        pe = m.pe_embedder(torch.cat((_take(txt_ids, shards.text), _take(img_ids, shards.image)), dim=1))
        vec = m.conditioning_vector(timesteps, y, guidance)  # per image: every rank computes it whole

        def attend(q, k, v):
            return sharded_attention(q, k, v, pe, shards.valid, self.mesh)

        for block in m.double_blocks:
            img, txt = block(img, txt, vec, pe=None, attend=attend)
        x = torch.cat((txt, img), dim=1)
        for block in m.single_blocks:
            x = block(x, vec, pe=None, attend=attend)
        out = m.final_layer(x[:, txt.shape[1] :], vec)
        return self._gather_image(out)[:, :image_len]

    def _gather_image(self, out: Tensor) -> Tensor:
        parts = [torch.empty_like(out) for _ in range(self.mesh.world_size)]
        with _collective("gathering the image tokens"):
            dist.all_gather(parts, out.contiguous())
        return torch.cat(parts, dim=1)
