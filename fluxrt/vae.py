"""The fast FLUX autoencoder: the reference modules' weights run through fused ops, channels-last convolutions and
tiled decoding. Built by `fluxrt.compile(autoencoder)` (fluxrt.reference.AutoEncoder or diffusers AutoencoderKL).

What is fused (fluxrt.ops, backed by the C++/CUDA extension fluxrt._C):
- GroupNorm + SiLU in one pass (every ResNet norm, the output norm);
- a ResNet block's residual add + the NEXT block's GroupNorm (+ SiLU): the sum is written once and normalized
  from the same pass, instead of add -> write -> re-read for statistics -> normalize -> SiLU;
- the mid-attention q/k/v 1x1 convolutions as one convolution (one GEMM over the activations instead of three).
Convolutions stay cuDNN/oneDNN: they are the FLOPs, and channels-last lets cuDNN pick its fastest NHWC kernels.

Tiles see their own GroupNorm statistics and attention, so a tiled decode is close to, not equal to, the untiled
one (tests/test_vae.py states the tolerance). Two tilings:
- fluxrt's (`tiled_decode`): overlapping tiles of `tile_latent`^2 latents (128: 1024^2 pixels) overlapping by
  `tile_overlap` (32), each blended into one fp32 output with linear ramps as it is decoded: peak memory is one
  tile's decode plus the output.
- diffusers' (`diffusers_tiled`, AutoencoderKL.tiled_decode / _tiled_encode): tiles every
  `tile_latent_min_size * (1 - tile_overlap_factor)` latents, each blended with the tile above and to the left over
  `tile_sample_min_size * tile_overlap_factor` pixels, then cropped; every decoded tile is kept until the end.

Who tiles when:
- FastAutoEncoder (fluxrt.reference.AutoEncoder compiled): fluxrt's tiling, automatically above `tile_auto_pixels`
  latent pixels (2 * 128^2: 2048x2048 images and larger are tiled, 1024^2 and 2048x1024 are not) to bound peak
  memory; `tiling=True` always, `tiling=False` never.
- FastAutoencoderKL (diffusers AutoencoderKL compiled) follows diffusers' contract: untiled at any size until
  `enable_tiling()`, then diffusers' tiles, overlap and blending for decode and encode (its tiled decode to fp32
  rounding), until `disable_tiling()`; the settings (use_tiling, use_slicing, tile_sample_min_size,
  tile_latent_min_size, tile_overlap_factor) are carried over from the diffusers model at compile time and can be
  changed on the compiled one as on diffusers'. `enable_tiling(method="fluxrt")` is the explicit option for
  fluxrt's tiling of the decode (one blended output instead of every tile kept; encode stays diffusers' tiling).
  `enable_slicing()` decodes and encodes one image of a batch at a time, as diffusers does.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .diffusers_save import DiffusersStandIn, save_autoencoder
from .reference.autoencoder import AttnBlock, AutoEncoder, AutoEncoderParams, Decoder, Encoder, ResnetBlock

log = logging.getLogger("fluxrt")

# Latent tiles of 128x128 (1024x1024 pixels) overlapping by 32 latents (256 pixels, a quarter, as diffusers does):
# a tile's peak memory is that of an untiled 1024^2 decode. Auto-tiling starts above 2 * 128^2 latent pixels, so
# 1024^2 and 2048x1024 decode exactly (untiled) and 2048^2 is tiled.
TILE_LATENT = 128
TILE_OVERLAP = 32
TILE_AUTO_LATENT_PIXELS = 2 * TILE_LATENT * TILE_LATENT
_EXTENSION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what fluxrt._C's group-norm kernels take


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


def _records_last_call(method):
    """Run a FastAutoEncoder API method inside fluxrt.ops.trace() and keep what ran in plan["last_call"]. Calls
    nest (decode -> decode_unscaled): the outermost one finishes last, so its whole record is what stays."""

    @functools.wraps(method)
    def recorded(self, *args, **kwargs):
        with ops.trace() as ran:
            out = method(self, *args, **kwargs)
        self.plan["last_call"] = {op: sorted(backends) for op, backends in ran.backends().items()}
        return out

    return recorded


def _runs_offload_hook(method):
    """diffusers' apply_forward_hook for FastAutoencoderKL.decode / encode: a pipeline calls those, not forward, so
    an accelerate hook on the module (enable_model_cpu_offload: move the VAE to the execution device) is run here,
    before the inputs are checked against the weights' device, as diffusers' AutoencoderKL runs it."""

    @functools.wraps(method)
    def hooked(self, *args, **kwargs):
        hook = getattr(self, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(self)
        return method(self, *args, **kwargs)

    return hooked


class FastAutoEncoder(nn.Module):
    """Same API as fluxrt.reference.AutoEncoder (encode / decode / forward), running its (shared) weights fast.

    backend: "auto" (fluxrt._C where built, else the torch formulas, announced once) | "ext" | "torch".
    channels_last: convolutions and fused ops in NHWC (default: on CUDA).
    tiling (also an attribute): "auto" (default: fluxrt's tiled decode above `tile_auto_pixels` latent pixels,
    2048^2 images and up, to bound peak memory; smaller decodes are exact) | True (always tiled) | False (never);
    tiles of `tile_latent`^2 latents overlapping by `tile_overlap` (attributes, module defaults TILE_*).
    """

    def __init__(self, ae: AutoEncoder, backend: str = "auto", channels_last: bool | None = None,
                 tiling: bool | str = "auto"):
        super().__init__()
        device = next(ae.parameters()).device
        self.ae = ae
        self.backend = backend
        self.channels_last = device.type == "cuda" if channels_last is None else channels_last
        self.tile_latent, self.tile_overlap, self.tile_auto_pixels = TILE_LATENT, TILE_OVERLAP, TILE_AUTO_LATENT_PIXELS
        self.slicing = False  # decode one image of a batch at a time (diffusers' enable_slicing)
        self._fused_qkv: dict[int, tuple[tuple, Tensor, Tensor]] = {}  # id(AttnBlock) -> (its key, weight, bias)
        if self.channels_last:  # NHWC weights once here, not a format conversion per call
            for conv in (m for m in ae.modules() if isinstance(m, nn.Conv2d)):
                conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
        self._decoder = _decoder_stages(ae.decoder)
        self._encoder = _encoder_stages(ae.encoder)
        self.plan = self._describe(device)
        self.tiling = tiling

    def _describe(self, device: torch.device) -> dict:
        fused = "torch formulas" if self.backend == "torch" else _fused_ops_description(device)
        return {
            "device": str(device),
            "ops": {"group_norm_silu": fused, "add_group_norm_silu": fused},
            "convolutions": "channels-last" if self.channels_last else "NCHW",
            "tiling": None,  # set with the tiling attribute
            "last_call": None,  # what the last encode/decode/forward ran: {op: sorted backends} (fluxrt.ops.trace)
        }

    @property
    def tiling(self) -> bool | str:
        return self._tiling

    @tiling.setter
    def tiling(self, tiling: bool | str) -> None:
        if tiling != "auto" and not isinstance(tiling, bool):
            raise ValueError(f"tiling must be 'auto', True or False, got {tiling!r}")
        self._tiling = tiling
        tiles = f"fluxrt's {self.tile_latent}^2-latent tiles, {self.tile_overlap} overlap"
        self.plan["tiling"] = {"auto": f"auto (above {self.tile_auto_pixels} latent pixels: {tiles})",
                               True: f"on ({tiles})", False: "off"}[tiling]

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
    @_records_last_call
    def encode(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] -> the scaled posterior mean (as AutoEncoder.encode)."""
        mean, _logvar = torch.chunk(self.encode_moments(x), 2, dim=1)
        return self.ae.scale_factor * (mean - self.ae.shift_factor)

    @_records_last_call
    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents -> images (as AutoEncoder.decode: z / scale + shift first)."""
        return self.decode_unscaled(z / self.ae.scale_factor + self.ae.shift_factor)

    @_records_last_call
    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    # --- raw encoder / decoder ---------------------------------------------------------------------------------
    @_records_last_call
    def encode_moments(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, 2z, H/8, W/8] (mean | logvar), the encoder's raw output."""
        self._check(x, self.ae.params.in_channels, "images")
        return self._encode_tile(x)

    @_records_last_call
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

    def _encode_tile(self, x: Tensor) -> Tensor:
        return self._run(self._encoder, self._format(x)).contiguous()

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

    def _op_backend(self, x: Tensor) -> str:
        # fluxrt._C's kernels take fp32/bf16/fp16; "auto" runs an fp64 model (a truth to measure against, which the
        # reference accepts) on the torch formulas, which compute in fp64 (plan["last_call"] shows it)
        return "torch" if self.backend == "auto" and x.dtype not in _EXTENSION_DTYPES else self.backend

    def _norm(self, x: Tensor, norm: nn.GroupNorm, silu: bool) -> Tensor:
        return ops.group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu,
                                   backend=self._op_backend(x))

    def _add_then_norm(self, x: Tensor, y: Tensor, next_norm: nn.GroupNorm | None, silu: bool):
        """(x + y, the next stage's leading norm of it), the norm fused with the add when there is one."""
        if next_norm is None:
            return x + y, None
        return ops.add_group_norm_silu(x, y, next_norm.weight, next_norm.bias, next_norm.num_groups, next_norm.eps,
                                       silu, backend=self._op_backend(x))

    def _resnet(self, block: ResnetBlock, x: Tensor, normed: Tensor | None, next_norm, next_silu):
        h = block.conv1(normed if normed is not None else self._norm(x, block.norm1, silu=True))
        del normed
        h = block.conv2(self._norm(h, block.norm2, silu=True))
        shortcut = block.nin_shortcut(x) if block.in_channels != block.out_channels else x
        return self._add_then_norm(shortcut, h, next_norm, next_silu)

    def _qkv(self, block: AttnBlock) -> tuple[Tensor, Tensor]:
        """The block's q/k/v 1x1 convs as one (weights concatenated: 3C^2 values, small next to the activations),
        rebuilt whenever their weights change: a .to(dtype / device) gives them new storage, an in-place write
        (load_state_dict, copy_) bumps their version counter. Kept off the module tree, so the reference module's
        state_dict is unchanged and no stale copy is left behind for .to() to miss."""
        sources = (block.q.weight, block.k.weight, block.v.weight, block.q.bias, block.k.bias, block.v.bias)
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
        cached = self._fused_qkv.get(id(block))
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, torch.cat(sources[:3]), torch.cat(sources[3:]))
            self._fused_qkv[id(block)] = cached
        return cached[1], cached[2]

    def _attention(self, block: AttnBlock, x: Tensor, normed: Tensor | None, next_norm, next_silu):
        b, c, height, width = x.shape
        weight, bias = self._qkv(block)
        qkv = F.conv2d(normed if normed is not None else self._norm(x, block.norm, silu=False), weight, bias)
        # [B, 3C, H, W] -> three [B, 1, HW, C]; for channels-last activations the permute is a free view
        q, k, v = qkv.permute(0, 2, 3, 1).reshape(b, 1, height * width, 3 * c).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.reshape(b, height, width, c).permute(0, 3, 1, 2)
        return self._add_then_norm(x, block.proj_out(self._format(h)), next_norm, next_silu)


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


def axis_tiles(size: int, tile: int, overlap: int, upscale: int, device) -> list[tuple[int, int, Tensor]]:
    """The tiles along one latent axis of `size`: (start, length) in latents and the blend weights over their
    `length * upscale` output pixels, fading over `overlap * upscale` pixels at each edge shared with a neighbour."""
    tiles = []
    for start in _tile_starts(size, tile, overlap):
        length = min(tile, size - start)
        weights = _ramp(length * upscale, overlap * upscale, start > 0, start + length < size, device)
        tiles.append((start, length, weights))
    return tiles


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
    for y0, th, wy in axis_tiles(h, tile, overlap, upscale, z.device):
        for x0, tw, wx in axis_tiles(w, tile, overlap, upscale, z.device):
            image = decode(z[:, :, y0:y0 + th, x0:x0 + tw]).float()
            if out is None:
                out = torch.zeros(b, image.shape[1], h * upscale, w * upscale, device=z.device)
                weight = torch.zeros(h * upscale, w * upscale, device=z.device)
            window = wy[:, None] * wx[None, :]
            rows, cols = slice(y0 * upscale, (y0 + th) * upscale), slice(x0 * upscale, (x0 + tw) * upscale)
            out[:, :, rows, cols] += image * window
            weight[rows, cols] += window
    return (out / weight).to(z.dtype)


def diffusers_tiled(run, x: Tensor, tile: int, stride: int, blend: int, keep: int) -> Tensor:
    """diffusers' AutoencoderKL tiling (tiled_decode and _tiled_encode, the same loop): `run` maps each input tile
    x[..., i:i+tile, j:j+tile] (i, j every `stride`) to its output tile; each output tile, in place, is cross-faded
    over its first `blend` rows with the tile above, then over its first `blend` columns with the tile to the left
    (both already blended), cropped to `keep` x `keep` and the crops concatenated."""
    rows = [[run(x[:, :, i:i + tile, j:j + tile]) for j in range(0, x.shape[3], stride)]
            for i in range(0, x.shape[2], stride)]
    out_rows = []
    for i, row in enumerate(rows):
        for j, current in enumerate(row):
            if i > 0:
                _cross_fade(rows[i - 1][j], current, blend, dim=2)
            if j > 0:
                _cross_fade(row[j - 1], current, blend, dim=3)
        out_rows.append(torch.cat([tile_out[:, :, :keep, :keep] for tile_out in row], dim=3))
    return torch.cat(out_rows, dim=2)


def _cross_fade(before: Tensor, current: Tensor, extent: int, dim: int) -> None:
    """diffusers' blend_v (dim 2) / blend_h (dim 3), vectorized: over the first `extent` samples along `dim`,
    current = before's last samples * (1 - y / extent) + current * (y / extent), in place. The weights are rounded
    from float64, as diffusers' Python-float factors are, and applied in fp32 for fp32 tiles."""
    extent = min(before.shape[dim], current.shape[dim], extent)
    if extent == 0:
        return
    shape = [1, 1, 1, 1]
    shape[dim] = extent
    ramp = torch.arange(extent, dtype=torch.float64, device=current.device) / extent
    compute = torch.promote_types(current.dtype, torch.float32)
    fade_in, fade_out = ramp.to(compute).view(shape), (1 - ramp).to(compute).view(shape)
    head = current.narrow(dim, 0, extent)
    head.copy_(before.narrow(dim, before.shape[dim] - extent, extent) * fade_out + head * fade_in)


# the diffusers AutoencoderKL attributes that say how it tiles and slices (diffusers' defaults: _diffusers_defaults)
DIFFUSERS_TILING_STATE = ("use_tiling", "use_slicing", "tile_sample_min_size", "tile_latent_min_size",
                          "tile_overlap_factor")
TILING_METHODS = ("diffusers", "fluxrt")


def _diffusers_defaults(config) -> dict:
    """What AutoencoderKL.__init__ sets: untiled, unsliced, tiles of config.sample_size pixels, a quarter overlap."""
    sample = config["sample_size"]
    first = sample[0] if isinstance(sample, (list, tuple)) else sample
    return {"use_tiling": False, "use_slicing": False, "tile_sample_min_size": sample,
            "tile_latent_min_size": int(first / 2 ** (len(config["block_out_channels"]) - 1)),
            "tile_overlap_factor": 0.25}


class FastAutoencoderKL(DiffusersStandIn, nn.Module):
    """Drop-in for a FLUX diffusers AutoencoderKL: decode/encode/forward with its kwargs and return types, .config,
    .dtype, .device, save_pretrained (a diffusers folder: fluxrt.diffusers_save), and diffusers' tiling and slicing
    contract (module docstring): use_tiling, use_slicing, tile_sample_min_size, tile_latent_min_size,
    tile_overlap_factor, enable/disable_tiling, enable/disable_slicing, and an accelerate hook run by decode and
    encode (model offload; diffusers' apply_forward_hook). decode takes UNSCALED latents, as diffusers' does.

    `fast` must not tile by itself (tiling=False): this class tiles as diffusers does. `state`: the diffusers
    model's tiling and slicing attributes (DIFFUSERS_TILING_STATE) to carry over; diffusers' defaults otherwise."""

    diffusers_class_name = "AutoencoderKL"

    def __init__(self, fast: FastAutoEncoder, config, state: dict | None = None):
        super().__init__()
        if fast.tiling is not False:
            raise ValueError(f"FastAutoencoderKL tiles as diffusers does; give it a FastAutoEncoder built with "
                             f"tiling=False, not {fast.tiling!r}")
        self.fast = fast
        self.config = config
        self.plan = fast.plan  # the same dict: last_call stays current
        for name, value in {**_diffusers_defaults(config), **(state or {})}.items():
            setattr(self, name, value)
        self.tiling_method = "diffusers"
        self._describe_tiling()

    @property
    def dtype(self) -> torch.dtype:
        return self.fast.ae.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.fast.ae.decoder.conv_in.weight.device

    # --- diffusers' API ----------------------------------------------------------------------------------------
    @_runs_offload_hook
    @_records_last_call
    def decode(self, z: Tensor, return_dict: bool = True, generator=None):
        from diffusers.models.autoencoders.vae import DecoderOutput

        self.fast._check(z, self.fast.ae.params.z_channels, "latents")
        if self.use_slicing and z.shape[0] > 1:
            image = torch.cat([self._decode(one) for one in z.split(1)])
        else:
            image = self._decode(z)
        return DecoderOutput(sample=image) if return_dict else (image,)

    @_runs_offload_hook
    @_records_last_call
    def encode(self, x: Tensor, return_dict: bool = True):
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        self.fast._check(x, self.fast.ae.params.in_channels, "images")
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode(one) for one in x.split(1)])
        else:
            moments = self._encode(x)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    @_records_last_call
    def forward(self, sample: Tensor, sample_posterior: bool = False, return_dict: bool = True, generator=None):
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)

    def enable_tiling(self, method: str = "diffusers") -> None:
        """Tile decode and encode as diffusers does; method="fluxrt": fluxrt's tiling of the decode instead (one
        blended output, not every tile kept; module docstring)."""
        if method not in TILING_METHODS:
            raise ValueError(f"method must be one of {TILING_METHODS} (diffusers' tiling or fluxrt's), got {method!r}")
        self.use_tiling, self.tiling_method = True, method
        self._describe_tiling()

    def disable_tiling(self) -> None:
        self.use_tiling = False
        self._describe_tiling()

    def enable_slicing(self) -> None:
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def save_pretrained(self, save_directory, safe_serialization: bool = True, variant: str | None = None,
                        max_shard_size: int | str = "10GB") -> None:
        """Write the diffusers AutoencoderKL folder that AutoencoderKL.from_pretrained loads (fluxrt.diffusers_save)."""
        save_autoencoder(self, save_directory, safe_serialization, variant, max_shard_size)

    # --- tiling -------------------------------------------------------------------------------------------------
    def _describe_tiling(self) -> None:
        if not self.use_tiling:
            self.plan["tiling"] = "off (diffusers' contract: enable_tiling() turns it on)"
        elif self.tiling_method == "fluxrt":
            self.plan["tiling"] = (f"fluxrt's decode tiles ({self.fast.tile_latent}^2 latents, "
                                   f"{self.fast.tile_overlap} overlap); encode: diffusers' tiles")
        else:
            self.plan["tiling"] = "diffusers' (tile_sample_min_size, tile_latent_min_size, tile_overlap_factor)"

    def _decode(self, z: Tensor) -> Tensor:
        if not self.use_tiling:
            return self.fast._decode_tile(z)
        if self.tiling_method == "fluxrt":
            return tiled_decode(self.fast._decode_tile, z, self.fast.tile_latent, self.fast.tile_overlap,
                                upscale=self.fast.upscale)
        if max(z.shape[-2:]) <= self.tile_latent_min_size:
            return self.fast._decode_tile(z)
        return diffusers_tiled(self.fast._decode_tile, z, *self._tiles(self.tile_latent_min_size,
                                                                       self.tile_sample_min_size))

    def _encode(self, x: Tensor) -> Tensor:
        if not self.use_tiling or max(x.shape[-2:]) <= self.tile_sample_min_size:
            return self.fast._encode_tile(x)
        return diffusers_tiled(self.fast._encode_tile, x, *self._tiles(self.tile_sample_min_size,
                                                                       self.tile_latent_min_size))

    def _tiles(self, tile_in: int, tile_out: int) -> tuple[int, int, int, int]:
        """diffusers' (tile, stride, blend, keep) for input tiles of `tile_in` giving output tiles of `tile_out`;
        ValueError where diffusers' loop would fail or lose pixels (a zero stride or crop)."""
        stride = int(tile_in * (1 - self.tile_overlap_factor))
        blend = int(tile_out * self.tile_overlap_factor)
        if stride <= 0 or tile_out - blend <= 0:
            raise ValueError(f"tile_latent_min_size {self.tile_latent_min_size}, tile_sample_min_size "
                             f"{self.tile_sample_min_size} and tile_overlap_factor {self.tile_overlap_factor} leave "
                             "tiles no stride: use larger tiles or an overlap factor below 1")
        return tile_in, stride, blend, tile_out - blend


def is_diffusers_autoencoder_kl(obj) -> bool:
    return type(obj).__name__ == "AutoencoderKL" and type(obj).__module__.startswith("diffusers")


def check_autoencoder_conversion(vae: nn.Module) -> Callable[[], AutoEncoder]:
    """Check the whole conversion of a FLUX diffusers AutoencoderKL to a fluxrt.reference.AutoEncoder on meta
    tensors (CheckpointError with the model untouched), and return the move: a call that converts it by moving its
    tensors (renames and views only: nothing is allocated, so nothing can fail half-way), leaving it empty."""
    from .convert import CheckpointError, vae_diffusers_to_bfl
    from .diffusers_adapter import _Consuming, check_diffusers_parameters, check_fits
    from .loading import infer_autoencoder_params

    what = "AutoencoderKL"
    config = dict(vae.config)
    problems = [f"{key}={config.get(key)!r} (FLUX: {want!r})" for key, want in
                (("latent_channels", 16), ("use_quant_conv", False),
                 ("use_post_quant_conv", False)) if config.get(key, want) != want]
    if problems:
        raise CheckpointError(f"fluxrt.compile takes FLUX's autoencoder; this AutoencoderKL has {', '.join(problems)}")
    meta = check_diffusers_parameters(vae, what)
    try:
        converted = vae_diffusers_to_bfl(meta)
        params = infer_autoencoder_params({k: tuple(v.shape) for k, v in converted.items()}, config)
    except CheckpointError as err:
        raise CheckpointError(f"fluxrt.compile cannot convert this {what}: {err}. Remove the modules or parameters "
                              "added to it (fluxrt runs FLUX's own layers only)") from None
    with torch.device("meta"):
        ae = AutoEncoder(params)
    check_fits(ae, converted, what)
    dtype = next(iter(meta.values())).dtype

    def move() -> AutoEncoder:
        with torch.device("meta"):
            ae = AutoEncoder(params)
        ae.load_state_dict(vae_diffusers_to_bfl(_Consuming(vae)), strict=True, assign=True)
        return ae.to(dtype).requires_grad_(False).eval()

    return move


def check_reference_autoencoder(ae: AutoEncoder) -> None:
    """CheckpointError unless FastAutoEncoder can run `ae`: weights loaded, of one floating dtype, on one device."""
    from .convert import CheckpointError

    params = list(ae.parameters())
    if any(p.is_meta for p in params):
        raise CheckpointError("the autoencoder has meta (empty) parameters: load its weights before fluxrt.compile")
    dtypes = sorted({str(p.dtype) for p in params})
    if len(dtypes) != 1 or not params[0].is_floating_point():
        raise CheckpointError(f"the autoencoder mixes parameter dtypes ({', '.join(dtypes)}): cast it to one floating "
                              "dtype (ae.to(torch.bfloat16)) before fluxrt.compile")
    devices = sorted({str(p.device) for p in params})
    if len(devices) != 1:
        raise CheckpointError(f"the autoencoder has parameters on several devices ({', '.join(devices)}): move it to "
                              "one (ae.to(device)) before fluxrt.compile")


def _fused_ops_description(device: torch.device) -> str:
    """What backend="auto" runs for the VAE ops on this device (for the plan)."""
    from . import _extension

    if not _extension.available():
        return "torch formulas (fluxrt._C is not built)"
    if not _extension.has_kernels(device.type):
        return f"torch formulas (fluxrt._C has no {device.type} kernels)"
    return f"fluxrt._C ({device.type.upper()})"


def check_autoencoder(obj, backend: str = "auto") -> Callable[[], nn.Module]:
    """fluxrt.compile's autoencoder step, checked first: returns the call that builds a FastAutoEncoder for a
    fluxrt.reference.AutoEncoder, a FastAutoencoderKL for a diffusers AutoencoderKL. backend: "auto" | "torch"
    (the transformer's "triton" means "auto" here: the VAE ops are C++/CUDA, not Triton)."""
    vae_backend = "torch" if backend == "torch" else "auto"
    if is_diffusers_autoencoder_kl(obj):
        convert, config = check_autoencoder_conversion(obj), obj.config
        state = {name: getattr(obj, name) for name in DIFFUSERS_TILING_STATE if hasattr(obj, name)}  # kept, not reset

        def build() -> nn.Module:
            fast = FastAutoEncoder(convert(), backend=vae_backend, tiling=False)
            return _logged(FastAutoencoderKL(fast, config, state))

        return build
    if not isinstance(obj, AutoEncoder):
        raise TypeError("expected a fluxrt.reference.AutoEncoder or a diffusers AutoencoderKL, got "
                        f"{type(obj).__name__}")
    check_reference_autoencoder(obj)
    return lambda: _logged(FastAutoEncoder(obj, backend=vae_backend))


def _logged(fast: nn.Module) -> nn.Module:
    log.info("fluxrt.compile plan (autoencoder): %s", fast.plan)
    return fast
