"""The fast FLUX autoencoder: the reference modules' weights run through fused ops, channels-last convolutions and
tiled decoding. Built by `fluxrt.compile(autoencoder)` (fluxrt.reference.AutoEncoder or diffusers AutoencoderKL).

What is fused (fluxrt.ops, backed by the C++/CUDA extension fluxrt._C):
- GroupNorm + SiLU in one pass (every ResNet norm, the output norm);
- a ResNet block's residual add + the NEXT block's GroupNorm (+ SiLU): the sum is written once and normalized
  from the same pass, instead of add -> write -> re-read for statistics -> normalize -> SiLU;
- the mid-attention q/k/v 1x1 convolutions as one convolution (one GEMM over the activations instead of three).
Convolutions stay cuDNN/oneDNN: they are the FLOPs, and channels-last lets cuDNN pick its fastest NHWC kernels.

Tiled decoding splits the latent into overlapping tiles, decodes each alone and blends the overlaps with linear
ramps. GroupNorm statistics and the mid attention then see one tile instead of the whole image, so a tiled decode
is close to, not equal to, the untiled one (tests/test_vae.py states the tolerance); it is used automatically only
above `TILE_AUTO_LATENT_PIXELS` (2048x2048 images and larger) or on request, to bound peak memory.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .reference.autoencoder import AttnBlock, AutoEncoder, AutoEncoderParams, Decoder, Encoder, ResnetBlock

log = logging.getLogger("fluxrt")

# Latent tiles of 128x128 (1024x1024 pixels) overlapping by 32 latents (256 pixels, a quarter, as diffusers does):
# a tile's peak memory is that of an untiled 1024^2 decode. Auto-tiling starts above 2 * 128^2 latent pixels, so
# 1024^2 and 2048x1024 decode exactly (untiled) and 2048^2 is tiled.
TILE_LATENT = 128
TILE_OVERLAP = 32
TILE_AUTO_LATENT_PIXELS = 2 * TILE_LATENT * TILE_LATENT


Stage = tuple[str, nn.Module]  # ("conv" | "resnet" | "attn" | "out", module); a net is a flat list of stages


def _leading_norm(stage: Stage | None) -> tuple[nn.GroupNorm | None, bool]:
    """The GroupNorm a stage applies first to its input, and whether SiLU follows it (None: no leading norm).
    A stage's add can then produce the next stage's normalized input in the same pass."""
    if stage is None:
        return None, False
    kind, module = stage
    if kind == "resnet":
        return module.norm1, True
    if kind == "attn":
        return module.norm, False
    if kind == "out":
        return module[0], True
    return None, False


def _decoder_stages(d: Decoder) -> list[Stage]:
    stages = [("conv", d.conv_in), ("resnet", d.mid.block_1), ("attn", d.mid.attn_1), ("resnet", d.mid.block_2)]
    for level in reversed(range(len(d.up))):
        stages += [("resnet", block) for block in d.up[level].block]
        if level != 0:
            stages.append(("conv", d.up[level].upsample))
    stages.append(("out", nn.ModuleList([d.norm_out, d.conv_out])))
    return stages


def _encoder_stages(e: Encoder) -> list[Stage]:
    stages = [("conv", e.conv_in)]
    for level, down in enumerate(e.down):
        stages += [("resnet", block) for block in down.block]
        if level != len(e.down) - 1:
            stages.append(("conv", down.downsample))
    stages += [("resnet", e.mid.block_1), ("attn", e.mid.attn_1), ("resnet", e.mid.block_2)]
    stages.append(("out", nn.ModuleList([e.norm_out, e.conv_out])))
    return stages


class FastAutoEncoder(nn.Module):
    """Same API as fluxrt.reference.AutoEncoder (encode / decode / forward), running its (shared) weights fast.

    backend: "auto" (fluxrt._C where built, else the torch formulas, announced once) | "ext" | "torch".
    channels_last: convolutions and fused ops in NHWC (default: on CUDA).
    tiling: "auto" (tile above `tile_auto_pixels` latent pixels) | True | False; tiles of `tile_latent`^2 latents
    overlapping by `tile_overlap` (attributes, module defaults TILE_*).
    """

    def __init__(self, ae: AutoEncoder, backend: str = "auto", channels_last: bool | None = None,
                 tiling: bool | str = "auto"):
        super().__init__()
        if tiling not in ("auto", True, False):
            raise ValueError(f"tiling must be 'auto', True or False, got {tiling!r}")
        device = next(ae.parameters()).device
        self.ae = ae
        self.backend = backend
        self.channels_last = device.type == "cuda" if channels_last is None else channels_last
        self.tiling = tiling
        self.tile_latent, self.tile_overlap, self.tile_auto_pixels = TILE_LATENT, TILE_OVERLAP, TILE_AUTO_LATENT_PIXELS
        self.slicing = False  # decode one image of a batch at a time (diffusers' enable_slicing)
        for block in (ae.encoder.mid.attn_1, ae.decoder.mid.attn_1):
            _fuse_qkv(block)
        if self.channels_last:  # NHWC weights once here, not a format conversion per call
            for conv in (m for m in ae.modules() if isinstance(m, nn.Conv2d)):
                conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
        self._decoder = _decoder_stages(ae.decoder)
        self._encoder = _encoder_stages(ae.encoder)

    @property
    def params(self) -> AutoEncoderParams:
        return self.ae.params

    @property
    def scale_factor(self) -> float:
        return self.ae.scale_factor

    @property
    def shift_factor(self) -> float:
        return self.ae.shift_factor

    # --- the reference API -------------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] -> the scaled posterior mean (as AutoEncoder.encode)."""
        mean, _logvar = torch.chunk(self.encode_moments(x), 2, dim=1)
        return self.ae.scale_factor * (mean - self.ae.shift_factor)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents -> images (as AutoEncoder.decode: z / scale + shift first)."""
        return self.decode_unscaled(z / self.ae.scale_factor + self.ae.shift_factor)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # --- raw encoder / decoder ---------------------------------------------------------------------------------
    def encode_moments(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, 2z, H/8, W/8] (mean | logvar), the encoder's raw output."""
        self._check(x, self.ae.params.in_channels, "images")
        return self._run(self._encoder, self._format(x)).contiguous()

    def decode_unscaled(self, z: Tensor) -> Tensor:
        """Unscaled latents [B, z, h, w] -> images [B, 3, 8h, 8w] (the decoder alone), tiled when configured."""
        self._check(z, self.ae.params.z_channels, "latents")
        if self.slicing and z.shape[0] > 1:
            return torch.cat([self.decode_unscaled(zi) for zi in z.split(1)])
        tiled = self.tiling is True or (self.tiling == "auto" and z.shape[2] * z.shape[3] > self.tile_auto_pixels)
        if tiled:
            return tiled_decode(self._decode_tile, z, self.tile_latent, self.tile_overlap, upscale=self.upscale)
        return self._decode_tile(z)

    @property
    def upscale(self) -> int:
        return 2 ** (len(self.ae.params.ch_mult) - 1)

    def _decode_tile(self, z: Tensor) -> Tensor:
        return self._run(self._decoder, self._format(z)).contiguous()

    def _check(self, x: Tensor, channels: int, what: str) -> None:
        weight = self.ae.decoder.conv_in.weight
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{what} must be [B, {channels}, H, W], got {list(x.shape)}")
        if x.device != weight.device or x.dtype != weight.dtype:
            raise ValueError(f"{what} are {x.dtype} on {x.device} but the autoencoder is {weight.dtype} on "
                             f"{weight.device}: move one of them (.to(...)) first")

    def _format(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    # --- the fused forward ---------------------------------------------------------------------------------------
    def _run(self, stages: list[Stage], h: Tensor) -> Tensor:
        normed = None  # the next stage's leading norm of h, when the previous stage produced it fused with its add
        for i, (kind, module) in enumerate(stages):
            next_norm, next_silu = _leading_norm(stages[i + 1] if i + 1 < len(stages) else None)
            if kind == "resnet":
                h, normed = self._resnet(module, h, normed, next_norm, next_silu)
            elif kind == "attn":
                h, normed = self._attention(module, h, normed, next_norm, next_silu)
            elif kind == "out":
                norm, conv = module
                h = conv(normed if normed is not None else self._norm(h, norm, silu=True))
                normed = None
            else:
                h, normed = module(h), None
        return h

    def _norm(self, x: Tensor, norm: nn.GroupNorm, silu: bool) -> Tensor:
        return ops.group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu, backend=self.backend)

    def _add_then_norm(self, x: Tensor, y: Tensor, next_norm: nn.GroupNorm | None, silu: bool):
        """(x + y, the next stage's leading norm of it), the norm fused with the add when there is one."""
        if next_norm is None:
            return x + y, None
        return ops.add_group_norm_silu(x, y, next_norm.weight, next_norm.bias, next_norm.num_groups, next_norm.eps,
                                       silu, backend=self.backend)

    def _resnet(self, block: ResnetBlock, x: Tensor, normed: Tensor | None, next_norm, next_silu):
        h = block.conv1(normed if normed is not None else self._norm(x, block.norm1, silu=True))
        del normed
        h = block.conv2(self._norm(h, block.norm2, silu=True))
        shortcut = block.nin_shortcut(x) if block.in_channels != block.out_channels else x
        return self._add_then_norm(shortcut, h, next_norm, next_silu)

    def _attention(self, block: AttnBlock, x: Tensor, normed: Tensor | None, next_norm, next_silu):
        b, c, height, width = x.shape
        qkv = block.qkv(normed if normed is not None else self._norm(x, block.norm, silu=False))
        # [B, 3C, H, W] -> three [B, 1, HW, C]; for channels-last activations the permute is a free view
        q, k, v = qkv.permute(0, 2, 3, 1).reshape(b, 1, height * width, 3 * c).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.reshape(b, height, width, c).permute(0, 3, 1, 2)
        return self._add_then_norm(x, block.proj_out(self._format(h)), next_norm, next_silu)


def _fuse_qkv(block: AttnBlock) -> None:
    """Give an AttnBlock one `qkv` 1x1 conv (weights concatenated: 3C^2 values, small next to the activations);
    its q/k/v convs stay as they are, so the reference forward and state_dict are unchanged."""
    if hasattr(block, "qkv"):
        return
    c = block.q.weight.shape[0]
    w = block.q.weight
    qkv = nn.Conv2d(c, 3 * c, kernel_size=1, device=w.device, dtype=w.dtype)
    qkv.weight.data = torch.cat([block.q.weight, block.k.weight, block.v.weight])
    qkv.bias.data = torch.cat([block.q.bias, block.k.bias, block.v.bias])
    # not registered as a submodule: it would add keys to the reference module's state_dict
    object.__setattr__(block, "qkv", qkv.requires_grad_(False))


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one axis: every `tile - overlap`, the last tile flush with the end."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def _ramp(length: int, fade: int, fade_in: bool, fade_out: bool, device) -> Tensor:
    """Blend weights along one axis: linear ramps of `fade` samples at the edges shared with a neighbour tile.
    Strictly positive, so every output pixel has a nonzero total weight."""
    w = torch.ones(length, device=device)
    if fade == 0:
        return w
    ramp = (torch.arange(fade, device=device, dtype=torch.float32) + 0.5) / fade
    if fade_in:
        w[:fade] = ramp
    if fade_out:
        w[length - fade:] = torch.minimum(w[length - fade:], ramp.flip(0))
    return w


def tiled_decode(decode, z: Tensor, tile: int, overlap: int, upscale: int) -> Tensor:
    """Decode latents [B, C, h, w] tile by tile (tiles of `tile`^2 latents overlapping by `overlap`) and blend.

    `decode` maps a latent tile to its image tile ([B, C, t, t] -> [B, 3, upscale*t, upscale*t]). Blending is a
    normalized weighted sum (fp32), so a purely local `decode` is reproduced exactly; peak memory is one tile's
    decode plus the fp32 output.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"need 0 <= overlap < tile, got overlap {overlap}, tile {tile}")
    b, _, h, w = z.shape
    out = weight = None
    fade = overlap * upscale
    ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
    for y0 in ys:
        for x0 in xs:
            th, tw = min(tile, h - y0), min(tile, w - x0)
            image = decode(z[:, :, y0:y0 + th, x0:x0 + tw]).float()
            if out is None:
                out = torch.zeros(b, image.shape[1], h * upscale, w * upscale, device=z.device)
                weight = torch.zeros(h * upscale, w * upscale, device=z.device)
            wy = _ramp(th * upscale, fade, y0 > 0, y0 + th < h, z.device)
            wx = _ramp(tw * upscale, fade, x0 > 0, x0 + tw < w, z.device)
            window = wy[:, None] * wx[None, :]
            rows, cols = slice(y0 * upscale, (y0 + th) * upscale), slice(x0 * upscale, (x0 + tw) * upscale)
            out[:, :, rows, cols] += image * window
            weight[rows, cols] += window
    return (out / weight).to(z.dtype)


class FastAutoencoderKL(nn.Module):
    """Drop-in for a FLUX diffusers AutoencoderKL: decode/encode/forward with its kwargs and return types, .config,
    .dtype, .device, enable/disable_tiling and _slicing. decode takes UNSCALED latents, as diffusers' does."""

    def __init__(self, fast: FastAutoEncoder, config):
        super().__init__()
        self.fast = fast
        self.config = config
        self.plan = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.fast.ae.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.fast.ae.decoder.conv_in.weight.device

    def decode(self, z: Tensor, return_dict: bool = True, generator=None):
        from diffusers.models.autoencoders.vae import DecoderOutput

        image = self.fast.decode_unscaled(z)
        return DecoderOutput(sample=image) if return_dict else (image,)

    def encode(self, x: Tensor, return_dict: bool = True):
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        posterior = DiagonalGaussianDistribution(self.fast.encode_moments(x))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def forward(self, sample: Tensor, sample_posterior: bool = False, return_dict: bool = True, generator=None):
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)

    def enable_tiling(self, *args, **kwargs) -> None:
        self.fast.tiling = True

    def disable_tiling(self) -> None:
        self.fast.tiling = "auto"

    def enable_slicing(self) -> None:
        self.fast.slicing = True

    def disable_slicing(self) -> None:
        self.fast.slicing = False


def is_diffusers_autoencoder_kl(obj) -> bool:
    return type(obj).__name__ == "AutoencoderKL" and type(obj).__module__.startswith("diffusers")


def autoencoder_from_diffusers(vae: nn.Module) -> AutoEncoder:
    """A FLUX diffusers AutoencoderKL as a fluxrt.reference.AutoEncoder, by moving its tensors (no second copy);
    the diffusers model is consumed (its parameters are left empty)."""
    from .convert import CheckpointError, vae_diffusers_to_bfl
    from .diffusers_adapter import _Consuming
    from .loading import infer_autoencoder_params

    config = dict(vae.config)
    problems = [f"{key}={config.get(key)!r} (FLUX: {want!r})" for key, want in
                (("latent_channels", 16), ("use_quant_conv", False),
                 ("use_post_quant_conv", False)) if config.get(key, want) != want]
    if problems:
        raise CheckpointError(f"fluxrt.compile takes FLUX's autoencoder; this AutoencoderKL has {', '.join(problems)}")
    dtype = next(vae.parameters()).dtype
    state_dict = vae_diffusers_to_bfl(_Consuming(vae))
    params = infer_autoencoder_params({k: tuple(v.shape) for k, v in state_dict.items()}, config)
    with torch.device("meta"):
        ae = AutoEncoder(params)
    ae.load_state_dict(state_dict, strict=True, assign=True)
    return ae.to(dtype).requires_grad_(False).eval()


def _fused_ops_description(device: torch.device) -> str:
    """What backend="auto" runs for the VAE ops on this device (for the plan)."""
    from . import _extension

    if not _extension.available():
        return "torch formulas (fluxrt._C is not built)"
    if not _extension.has_kernels(device.type):
        return f"torch formulas (fluxrt._C has no {device.type} kernels)"
    return f"fluxrt._C ({device.type.upper()})"


def compile_autoencoder(obj, backend: str = "auto") -> nn.Module:
    """fluxrt.compile for an autoencoder: a FastAutoEncoder for a fluxrt.reference.AutoEncoder, a FastAutoencoderKL
    for a diffusers AutoencoderKL. backend: "auto" | "torch" (the transformer's "triton" means "auto" here: the VAE
    ops are C++/CUDA, not Triton)."""
    vae_backend = "torch" if backend == "torch" else "auto"
    config = None
    if is_diffusers_autoencoder_kl(obj):
        config = obj.config
        obj = autoencoder_from_diffusers(obj)
    elif not isinstance(obj, AutoEncoder):
        raise TypeError(f"expected a fluxrt.reference.AutoEncoder or a diffusers AutoencoderKL, got {type(obj).__name__}")
    fast = FastAutoEncoder(obj, backend=vae_backend)
    device = next(obj.parameters()).device
    fused = "torch formulas" if vae_backend == "torch" else _fused_ops_description(device)
    fast.plan = {
        "device": str(device),
        "ops": {"group_norm_silu": fused, "add_group_norm_silu": fused},
        "convolutions": "channels-last" if fast.channels_last else "NCHW",
        "tiling": f"auto (above {TILE_AUTO_LATENT_PIXELS} latent pixels: {TILE_LATENT}^2 tiles, {TILE_OVERLAP} overlap)",
    }
    log.info("fluxrt.compile plan (autoencoder): %s", fast.plan)
    if config is None:
        return fast
    wrapped = FastAutoencoderKL(fast, config)
    wrapped.plan = fast.plan
    return wrapped
