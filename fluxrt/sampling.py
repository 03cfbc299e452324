"""Flow-matching sampling for FLUX.1: noise, latent packing, position ids, the timestep schedule, Euler loop.

Follows BFL's src/flux/sampling.py. The schedule is computed in float64 (BFL: fp32 tensors; diffusers: float64
numpy) and the Euler update runs in fp32 whatever the model dtype, so latents are not re-rounded every step.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence

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


def noise_from_generators(
    num_samples: int,
    height: int,
    width: int,
    generator: torch.Generator | Sequence[torch.Generator],
    dtype: torch.dtype,
    device: torch.device | str,
) -> Tensor:
    """Unpacked latent noise drawn as diffusers' randn_tensor draws it: one generator draws the whole batch at once, a
    list draws one sample from each; in `dtype`, on the generator's device, then moved to `device`."""
    rows, cols = latent_grid(height, width)
    shape = (LATENT_CHANNELS, 2 * rows, 2 * cols)
    if isinstance(generator, torch.Generator):
        return torch.randn(num_samples, *shape, generator=generator, dtype=dtype, device=generator.device).to(device)
    if len(generator) != num_samples:
        raise ValueError(f"got {len(generator)} generators for {num_samples} samples; pass one or one per sample")
    noise = [torch.randn(1, *shape, generator=g, dtype=dtype, device=g.device) for g in generator]
    return torch.cat([n.to(device) for n in noise])


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
    sigmas = [1.0 - i / num_steps for i in range(num_steps)]
    return schedule_from_sigmas(sigmas, image_seq_len, base_shift, max_shift, shift)


def schedule_from_sigmas(
    sigmas: Sequence[float],
    image_seq_len: int,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    shift: bool = True,
) -> list[float]:
    """The timesteps of given noise levels (diffusers' `sigmas`), shifted as get_schedule shifts its own (diffusers'
    FlowMatchEulerDiscreteScheduler with dynamic shifting: the same mu from the token count), then 0 appended: one
    Euler step per sigma."""
    timesteps = [float(s) for s in sigmas]
    if shift:
        mu = schedule_mu(image_seq_len, base_shift, max_shift)
        timesteps = [time_shift(mu, 1.0, t) for t in timesteps]
    return timesteps + [0.0]


def true_cfg(model: Callable[..., Tensor], negative_txt: Tensor, negative_vec: Tensor,
             scale: float, negative_model: Callable[..., Tensor] | None = None) -> Callable[..., Tensor]:
    """`model` with true classifier-free guidance (diffusers' true_cfg_scale): each call runs the model twice, with
    the prompt and with the negative prompt's features (negative_txt [B, T', C], negative_vec [B, V]; T' may differ
    from the prompt's T, as with diffusers' negative_prompt_embeds), and returns negative + scale * (positive -
    negative), in fp32. Two passes as diffusers runs them, not one of twice the batch: the same numerics, and no
    doubled activation memory. negative_model: what runs the negative pass (default `model`; the pipeline binds its
    own step-cache states there)."""
    negative_model = model if negative_model is None else negative_model
    negative_txt_ids = prepare_txt_ids(negative_txt.shape[0], negative_txt.shape[1], device=negative_txt.device)

    def guided(img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
               guidance: Tensor | None = None) -> Tensor:
        positive = model(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=timesteps, y=y,
                         guidance=guidance).float()
        negative = negative_model(img=img, img_ids=img_ids, txt=negative_txt, txt_ids=negative_txt_ids, timesteps=timesteps,
                         y=negative_vec, guidance=guidance).float()
        return negative + scale * (positive - negative)

    return guided


# on_step_end(step_index, t, {"latents": ..., "prompt_embeds": ...}) -> replacements for the next step (or None)
StepHook = Callable[[int, float, dict[str, Tensor]], Mapping[str, Tensor] | None]
STEP_HOOK_TENSORS = ("latents", "prompt_embeds")


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
    on_step_end: StepHook | None = None,
) -> Tensor:
    """Euler integration of the flow from t=timesteps[0] to timesteps[-1].

    `model` is any callable with the BFL signature (img, img_ids, txt, txt_ids, timesteps, y, guidance) that
    returns the velocity [B, L, C]: the reference Flux, the accelerated one, or a wrapper. The model sees
    `img` in its own dtype; the running latent stays fp32. `callback(step, total)` runs after each step.
    on_step_end(step_index, t, tensors) runs after each step first (diffusers' callback_on_step_end; step_index from
    0, t the step's start time): tensors holds "latents" (the running latents in the model's dtype: with a hook they
    are kept in it, as diffusers keeps them) and "prompt_embeds" (txt); the mapping it returns may replace either
    for the next step (same shape, finite).
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
        if on_step_end is not None:
            x, txt = run_step_hook(on_step_end, step - 1, t_curr, x.to(img.dtype), txt)
        if callback is not None:
            callback(step, total)
    if check_finite and (bad := int(first_bad_step)):
        raise non_finite_latents(bad, total)
    return x.to(img.dtype)


def non_finite_latents(step: int, total: int) -> NonFiniteError:
    """The error for latents that turned NaN or inf at denoising `step` of `total`."""
    return NonFiniteError(f"the latents hold NaN or inf after denoising step {step} of {total}: the transformer's "
                          "output is not finite. Check the weights (a corrupt or mismatched checkpoint), and run "
                          "in bf16 or fp32 rather than fp16, whose range FLUX's activations overflow")


def run_step_hook(hook: StepHook, index: int, t: float, latents: Tensor, txt: Tensor) -> tuple[Tensor, Tensor]:
    """(running fp32 latents, txt) after on_step_end: what it returned, checked, else what it was given (which it may
    have edited in place)."""
    changes = hook(index, t, {"latents": latents, "prompt_embeds": txt})
    changes = {} if changes is None else changes
    if not isinstance(changes, Mapping):
        raise TypeError(f"on_step_end must return a dict of tensors (or None), got {type(changes).__name__} at step "
                        f"index {index}")
    unknown = sorted(set(changes) - set(STEP_HOOK_TENSORS))
    if unknown:
        raise ValueError(f"on_step_end returned {unknown} at step index {index}; it may return only "
                         f"{list(STEP_HOOK_TENSORS)}")
    latents = _replacement(changes.get("latents", latents), latents, "latents", index)
    txt = _replacement(changes.get("prompt_embeds", txt), txt, "prompt_embeds", index)
    return latents.float(), txt


def _replacement(new, old: Tensor, name: str, index: int) -> Tensor:
    """A hook's replacement for `old`: a finite floating tensor of old's shape, moved to old's device and dtype."""
    if new is old:
        return old
    if not isinstance(new, Tensor) or not new.is_floating_point() or new.shape != old.shape:
        what = f"{type(new).__name__}" if not isinstance(new, Tensor) else f"a {new.dtype} tensor {tuple(new.shape)}"
        raise ValueError(f"the {name} returned at step index {index} must be a floating tensor of shape "
                         f"{tuple(old.shape)}, as given; got {what}")
    if not torch.isfinite(new).all():
        raise NonFiniteError(f"the {name} returned at step index {index} hold NaN or inf")
    return new.to(old.device, old.dtype)
