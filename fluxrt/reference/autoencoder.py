"""FLUX autoencoder (encoder + decoder) in plain PyTorch, BFL's parameter names (src/flux/modules/autoencoder.py),
so BFL's ae.safetensors loads with load_state_dict(strict=True).

Differences from BFL, both deliberate: encode() returns the scaled *mean* of the posterior (deterministic;
BFL samples by default; encode_moments() gives mean and logvar to sample from), and the config is a frozen
dataclass with FLUX's values as defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


@dataclass(frozen=True)
class AutoEncoderParams:
    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # the decoder has one more per level
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    norm_groups: int = 32  # GroupNorm groups (FLUX: 32; small test VAEs use fewer)


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    def __init__(self, in_channels: int, groups: int):
        super().__init__()
        self.norm = _group_norm(in_channels, groups)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        b, c, height, width = x.shape
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(rearrange(h, "b 1 (h w) c -> b c h w", h=height, w=width))


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if self.in_channels != self.out_channels else x) + h


class Downsample(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as trained


class Upsample(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(channels: int, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, groups)
    mid.attn_1 = AttnBlock(channels, groups)
    mid.block_2 = ResnetBlock(channels, channels, groups)
    return mid


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, kernel_size=3, stride=1, padding=1)
        self.down = nn.ModuleList()
        block_in = p.ch
        for level, mult in enumerate(p.ch_mult):
            down = nn.Module()
            down.block = nn.ModuleList()
            down.attn = nn.ModuleList()  # empty in FLUX; kept for the parameter names
            for _ in range(p.num_res_blocks):
                down.block.append(ResnetBlock(block_in, p.ch * mult, p.norm_groups))
                block_in = p.ch * mult
            if level != len(p.ch_mult) - 1:
                down.downsample = Downsample(block_in)
            self.down.append(down)
        self.mid = _mid(block_in, p.norm_groups)
        self.norm_out = _group_norm(block_in, p.norm_groups)
        self.conv_out = nn.Conv2d(block_in, 2 * p.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # [B, 3, H, W] -> [B, 2z, H/8, W/8] (mean | logvar)
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            for block in down.block:
                h = block(h)
            if level != len(self.down) - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        block_in = p.ch * p.ch_mult[-1]
        self.conv_in = nn.Conv2d(p.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _mid(block_in, p.norm_groups)
        self.up = nn.ModuleList()
        for level in reversed(range(len(p.ch_mult))):
            up = nn.Module()
            up.block = nn.ModuleList()
            up.attn = nn.ModuleList()
            for _ in range(p.num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, p.ch * p.ch_mult[level], p.norm_groups))
                block_in = p.ch * p.ch_mult[level]
            if level != 0:
                up.upsample = Upsample(block_in)
            self.up.insert(0, up)  # BFL's order: up[0] is the highest resolution
        self.norm_out = _group_norm(block_in, p.norm_groups)
        self.conv_out = nn.Conv2d(block_in, p.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:  # [B, z, h, w] -> [B, 3, 8h, 8w]
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(len(self.up))):
            for block in self.up[level].block:
                h = block(h)
            if level != 0:
                h = self.up[level].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    def __init__(self, params: AutoEncoderParams | None = None):
        super().__init__()
        self.params = params or AutoEncoderParams()
        self.encoder = Encoder(self.params)
        self.decoder = Decoder(self.params)
        self.scale_factor = self.params.scale_factor
        self.shift_factor = self.params.shift_factor

    def encode(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] -> the scaled posterior mean: scale * (mean - shift)."""
        mean, _logvar = torch.chunk(self.encode_moments(x), 2, dim=1)
        return self.scale_factor * (mean - self.shift_factor)

    def encode_moments(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, 2z, H/8, W/8] (mean | logvar), unscaled: what sampling the posterior needs
        (fluxrt.conditioning.encode_image; FastAutoEncoder has the same method)."""
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents (what the transformer denoises) -> images in about [-1, 1]."""
        return self.decoder(z / self.scale_factor + self.shift_factor)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))
