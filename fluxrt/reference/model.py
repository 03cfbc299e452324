"""FLUX.1 transformer (dev and schnell) in plain PyTorch: the numerical truth of fluxrt.

Parameter names and forward are BFL's (src/flux/model.py, modules/layers.py), so a BFL checkpoint loads with
load_state_dict(strict=True). Precision follows BFL with one deliberate change: the timestep and guidance
embeddings are computed from fp32 t (diffusers rounds t*1000 in bf16, 750 -> 752; BFL rounds t to the model
dtype first). Nothing here is tuned for speed; the accelerated model lives outside this package.

Shapes: B batch, T text tokens, L image tokens, H heads, D head_dim, C hidden_size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from .math import attention, rope


class EmbedND(nn.Module):
    """RoPE tables for n-axis position ids: [B, L, n_axes] -> [B, 1, L, D/2, 2, 2]."""

    def __init__(self, dim: int, theta: int, axes_dim: list[int]):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = list(axes_dim)

    def forward(self, ids: Tensor) -> Tensor:
        n_axes = ids.shape[-1]
        emb = torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(n_axes)], dim=-3)
        return emb.unsqueeze(1)


def timestep_embedding(t: Tensor, dim: int, max_period: int = 10000, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding [cos | sin] of t * 1000, computed in fp32 whatever t's dtype: [N] -> [N, dim]."""
    t = time_factor * t.float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # BFL's cast order: normalise in fp32, round to x's dtype, then multiply by the scale.
        x_dtype = x.dtype
        x = x.float()
        rrms = torch.rsqrt(torch.mean(x**2, dim=-1, keepdim=True) + 1e-6)
        return (x * rrms).to(dtype=x_dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        q = self.query_norm(q)
        k = self.key_norm(k)
        return q.to(v), k.to(v)


class SelfAttention(nn.Module):
    """Holds one stream's qkv / norm / proj weights; the double block runs them around a joint attention."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


@dataclass
class ModulationOut:  # each [B, 1, C]
    shift: Tensor
    scale: Tensor
    gate: Tensor


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(nn.functional.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden, bias=True), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class DoubleStreamBlock(nn.Module):
    """Separate txt and img weights, one joint attention over cat(txt, img)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = _layer_norm(hidden_size)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.img_norm2 = _layer_norm(hidden_size)
        self.img_mlp = _mlp(hidden_size, mlp_hidden_dim)

        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = _layer_norm(hidden_size)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.txt_norm2 = _layer_norm(hidden_size)
        self.txt_mlp = _mlp(hidden_size, mlp_hidden_dim)

    def _qkv(self, x: Tensor, mod: ModulationOut, norm: nn.LayerNorm, attn: SelfAttention):
        x = (1 + mod.scale) * norm(x) + mod.shift
        q, k, v = rearrange(attn.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = attn.norm(q, k, v)
        return q, k, v

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor | None,
                attend: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """attend(q, k, v) -> [B, T+L, C]: the joint attention (default: attention with RoPE pe; fluxrt.parallel
        passes its sequence-sharded one)."""
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)

        img_q, img_k, img_v = self._qkv(img, img_mod1, self.img_norm1, self.img_attn)
        txt_q, txt_k, txt_v = self._qkv(txt, txt_mod1, self.txt_norm1, self.txt_attn)

        q = torch.cat((txt_q, img_q), dim=2)  # [B, H, T+L, D], text first
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn = attention(q, k, v, pe=pe) if attend is None else attend(q, k, v)  # [B, T+L, C]
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * self.img_mlp((1 + img_mod2.scale) * self.img_norm2(img) + img_mod2.shift)

        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * self.txt_mlp((1 + txt_mod2.scale) * self.txt_norm2(txt) + txt_mod2.shift)
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP over the joint sequence (ViT-22B style): linear1 -> (qkv | mlp), linear2 back."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = _layer_norm(hidden_size)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor | None,
                attend: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None) -> Tensor:
        """attend: as DoubleStreamBlock.forward's."""
        mod, _ = self.modulation(vec)
        x_mod = (1 + mod.scale) * self.pre_norm(x) + mod.shift
        qkv, mlp = torch.split(self.linear1(x_mod), [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe=pe) if attend is None else attend(q, k, v)
        output = self.linear2(torch.cat((attn, self.mlp_act(mlp)), 2))
        return x + mod.gate * output


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = _layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)  # BFL order: shift first
        x = (1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :]
        return self.linear(x)


class Flux(nn.Module):
    """FLUX.1 flow-matching transformer. `params` is a fluxrt.FluxConfig (or any object with its fields)."""

    def __init__(self, params):
        super().__init__()
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.out_channels
        if params.hidden_size % params.num_heads != 0:
            raise ValueError(f"hidden_size {params.hidden_size} must be divisible by num_heads {params.num_heads}")
        pe_dim = params.hidden_size // params.num_heads
        if sum(params.axes_dim) != pe_dim:
            raise ValueError(f"axes_dim {list(params.axes_dim)} must sum to the head dim {pe_dim}")
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(dim=pe_dim, theta=params.theta, axes_dim=params.axes_dim)
        self.img_in = nn.Linear(self.in_channels, self.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, self.hidden_size)
        self.guidance_in = (
            MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size) if params.guidance_embed else nn.Identity()
        )
        self.txt_in = nn.Linear(params.context_in_dim, self.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(self.hidden_size, self.num_heads, params.mlp_ratio, params.qkv_bias)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(self.hidden_size, self.num_heads, params.mlp_ratio)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(self.hidden_size, 1, self.out_channels)

    def forward(
        self,
        img: Tensor,  # [B, L, in_channels] packed latents
        img_ids: Tensor,  # [B, L, 3] (or [L, 3])
        txt: Tensor,  # [B, T, context_in_dim] T5 features
        txt_ids: Tensor,  # [B, T, 3] (or [T, 3]), zeros for FLUX.1
        timesteps: Tensor,  # [B] in [0, 1]
        y: Tensor,  # [B, vec_in_dim] CLIP pooled
        guidance: Tensor | None = None,  # [B], dev only
    ) -> Tensor:  # [B, L, out_channels]
        img_ids, txt_ids = self._check_inputs(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        img = self.img_in(img)
        vec = self.conditioning_vector(timesteps, y, guidance)
        txt = self.txt_in(txt)

        ids = torch.cat((txt_ids, img_ids), dim=1)
        pe = self.pe_embedder(ids)

        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe)

        img = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            img = block(img, vec=vec, pe=pe)
        img = img[:, txt.shape[1] :, ...]

        return self.final_layer(img, vec)

    def conditioning_vector(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None = None) -> Tensor:
        """vec [B, C]: timestep (+ guidance) embeddings + the CLIP pooled vector, what every block modulates by."""
        dtype = self.time_in.in_layer.weight.dtype  # embeddings are fp32; round once into the model dtype
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dtype))
        if self.params.guidance_embed:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        return vec + self.vector_in(y)

    def _check_inputs(self, img, img_ids, txt, txt_ids, timesteps, y, guidance) -> tuple[Tensor, Tensor]:
        p = self.params
        if img.ndim != 3 or img.shape[-1] != p.in_channels:
            raise ValueError(f"img must be [B, L, {p.in_channels}] packed latents, got {tuple(img.shape)}")
        batch = img.shape[0]
        if txt.ndim != 3 or txt.shape[0] != batch or txt.shape[-1] != p.context_in_dim:
            raise ValueError(f"txt must be [{batch}, T, {p.context_in_dim}], got {tuple(txt.shape)}")
        ids = []
        for name, x, seq in (("img_ids", img_ids, img.shape[1]), ("txt_ids", txt_ids, txt.shape[1])):
            if x.ndim == 2:  # diffusers passes ids without the batch dim
                x = x[None].expand(batch, -1, -1)
            if x.ndim != 3 or x.shape[0] != batch or x.shape[1] != seq or x.shape[2] != len(p.axes_dim):
                raise ValueError(f"{name} must be [{batch}, {seq}, {len(p.axes_dim)}], got {tuple(x.shape)}")
            ids.append(x)
        if timesteps.shape != (batch,):
            raise ValueError(f"timesteps must be [{batch}], got {tuple(timesteps.shape)}")
        if y.shape != (batch, p.vec_in_dim):
            raise ValueError(f"y must be [{batch}, {p.vec_in_dim}] pooled CLIP features, got {tuple(y.shape)}")
        if p.guidance_embed and (guidance is None or guidance.shape != (batch,)):
            got = None if guidance is None else tuple(guidance.shape)
            raise ValueError(f"this guidance-distilled (dev) model needs guidance of shape [{batch}], got {got}")
        return ids[0], ids[1]
