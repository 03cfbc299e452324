"""Flow-matching sampling for FLUX.1: noise, latent packing, position ids, the timestep schedule, Euler loop.

Follows BFL's src/flux/sampling.py. The schedule is computed in float64 (BFL: fp32 tensors; diffusers: float64
numpy) and the Euler update runs in fp32 whatever the model dtype, so latents are not re-rounded every step.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from einops import rearrange
from torch import Tensor

from .validation import NonFiniteError

LATENT_CHANNELS = 16


def latent_grid(height: int, width: int) -> tuple[int, int]:
    """Packed token grid (rows, cols) for an image: one token per 16x16 pixels (8x VAE, then 2x2 patches)."""
    return math.ceil(height / 16), math.ceil(width / 16)


def get_noise(
    num_samples: int,
    height: int,
    width: int,
    seed: int | Sequence[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Unpacked latent noise [num_samples, 16, 2*ceil(H/16), 2*ceil(W/16)] from a CPU generator.

    Drawn on the CPU in fp32 then moved, so one seed gives the same noise on every device. An int seed draws
    all samples from one generator (BFL); a list gives each sample its own seed (one image per seed).
    """
    rows, cols = latent_grid(height, width)
    shape = (LATENT_CHANNELS, 2 * rows, 2 * cols)
    if isinstance(seed, numbers.Integral):
        gen = torch.Generator("cpu").manual_seed(int(seed))
        noise = torch.randn(num_samples, *shape, generator=gen, dtype=torch.float32)
    else:
        if len(seed) != num_samples:
            raise ValueError(f"got {len(seed)} seeds for {num_samples} samples; pass one int or one seed per sample")
        noise = torch.stack(
            [torch.randn(*shape, generator=torch.Generator("cpu").manual_seed(int(s)), dtype=torch.float32) for s in seed]
        )
    return noise.to(device=device, dtype=dtype)


def pack(latents: Tensor) -> Tensor:
    """[B, C, 2h, 2w] -> [B, h*w, C*4]: 2x2 patches become tokens."""
    return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """[B, h*w, C*4] -> [B, C, 2h, 2w] for an image of height x width pixels."""
    rows, cols = latent_grid(height, width)
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=rows, w=cols, ph=2, pw=2)


def prepare_img_ids(batch: int, height: int, width: int, device: torch.device | str = "cpu") -> Tensor:
    """Image position ids [B, h*w, 3]: (0, row, col) on the token grid."""
    rows, cols = latent_grid(height, width)
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 1] = torch.arange(rows, device=device)[:, None]
    ids[..., 2] = torch.arange(cols, device=device)[None, :]
    return ids.reshape(1, rows * cols, 3).expand(batch, -1, -1).contiguous()


def prepare_txt_ids(batch: int, txt_len: int, device: torch.device | str = "cpu") -> Tensor:
    """Text position ids [B, T, 3]: all zeros in FLUX.1."""
    return torch.zeros(batch, txt_len, 3, device=device)


def time_shift(mu: float, sigma: float, t: float) -> float:
    if t <= 0.0:
        return 0.0
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0) ** sigma)


def schedule_mu(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu as a line through (256 tokens, base_shift) and (4096 tokens, max_shift)."""
    m = (max_shift - base_shift) / (4096 - 256)
    return base_shift + m * (image_seq_len - 256)


def get_schedule(
    num_steps: int,
    image_seq_len: int,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    shift: bool = True,
) -> list[float]:
    """num_steps + 1 timesteps from 1 to 0. dev shifts them toward 1 for longer sequences; schnell does not."""
    if num_steps <= 0:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    timesteps = [1.0 - i / num_steps for i in range(num_steps + 1)]
    if shift:
        mu = schedule_mu(image_seq_len, base_shift, max_shift)
        timesteps = [time_shift(mu, 1.0, t) for t in timesteps]
    return timesteps


def true_cfg(model: Callable[..., Tensor], negative_txt: Tensor, negative_vec: Tensor,
             scale: float) -> Callable[..., Tensor]:
    """`model` with true classifier-free guidance (diffusers' true_cfg_scale): each call runs the model twice, with
    the prompt and with the negative prompt's features (negative_txt [B, T, C], negative_vec [B, V]), and returns
    negative + scale * (positive - negative), in fp32. Two passes as diffusers runs them, not one of twice the batch:
    the same numerics, and no doubled activation memory."""

    def guided(img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
               guidance: Tensor | None = None) -> Tensor:
        positive = model(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=timesteps, y=y,
                         guidance=guidance).float()
        negative = model(img=img, img_ids=img_ids, txt=negative_txt, txt_ids=txt_ids, timesteps=timesteps,
                         y=negative_vec, guidance=guidance).float()
        return negative + scale * (positive - negative)

    return guided


def denoise(
    model: Callable[..., Tensor],
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    vec: Tensor,
    timesteps: Sequence[float],
    guidance: float | None = None,
    callback: Callable[[int, int], None] | None = None,
    check_finite: bool = True,
) -> Tensor:
    """Euler integration of the flow from t=timesteps[0] to timesteps[-1].

    `model` is any callable with the BFL signature (img, img_ids, txt, txt_ids, timesteps, y, guidance) that
    returns the velocity [B, L, C]: the reference Flux, the accelerated one, or a wrapper. The model sees
    `img` in its own dtype; the running latent stays fp32. `callback(step, total)` runs after each step.
    check_finite: raise fluxrt.NonFiniteError, naming the first step whose latents hold NaN or inf, instead of
    returning them.
    """
    batch = img.shape[0]
    guidance_vec = None if guidance is None else torch.full((batch,), guidance, device=img.device)
    x = img.float()
    total = len(timesteps) - 1
    # The first non-finite step is tracked on the device and read once at the end: reading it every step would stall
    # the GPU between steps (a host sync each), and NaN/inf never turns finite again, so the end sees every failure.
    first_bad_step = torch.zeros((), dtype=torch.int64, device=img.device)
    for step, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:]), start=1):
        t_vec = torch.full((batch,), t_curr, device=img.device)
        pred = model(img=x.to(img.dtype), img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=t_vec, y=vec,
                     guidance=guidance_vec)
        x = x + (t_prev - t_curr) * pred.float()
        if check_finite:
            first_bad_step = torch.where((first_bad_step == 0) & ~torch.isfinite(x).all(), step, first_bad_step)
        if callback is not None:
            callback(step, total)
    if check_finite and (bad := int(first_bad_step)):
        raise NonFiniteError(f"the latents hold NaN or inf after denoising step {bad} of {total}: the transformer's "
                             "output is not finite. Check the weights (a corrupt or mismatched checkpoint), and run "
                             "in bf16 or fp32 rather than fp16, whose range FLUX's activations overflow")
    return x.to(img.dtype)
