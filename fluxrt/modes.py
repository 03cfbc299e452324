"""The FLUX.1 tools modes in fluxrt.FluxPipeline: what a call's image arguments change in its denoising.

    pipe(prompt, image=photo, strength=0.6)              # img2img (a text-to-image model)
    pipe(prompt, image=photo, mask_image=mask)           # inpainting: FluxInpaintPipeline's blending, or a Fill model
    pipe(prompt, control_image=edges)                    # a Canny / Depth model
    pipe(prompt, image=photo)                            # a Kontext model: edit the image

fluxrt.conditioning holds each mode's pieces (checked against diffusers' own methods); this module checks a call's
image arguments against the loaded model (ModeArgs.check, before any work) and turns them into what the denoising
loop needs (prepare): the start latents, the timesteps, the model wrapped with its conditioning, and a per-step
hook. Randomness follows diffusers' order per mode, so per-image seeds (or a generator per image) give the latents
diffusers' pipeline gives with generator=[torch.Generator().manual_seed(seed) for each image].
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import conditioning as cond
from . import sampling
from .validation import MAX_PIXELS

# diffusers' per-pipeline defaults where they differ from the text-to-image model's (steps, guidance, strength)
DEFAULT_STEPS = {"fill": 50}
DEFAULT_GUIDANCE = {"img2img": 7.0, "inpaint": 7.0, "fill": 30.0}
DEFAULT_STRENGTH = {"img2img": 0.6, "inpaint": 0.6, "fill": 1.0}
NEEDS_GENERATORS = ("img2img", "inpaint", "fill", "control")  # modes that sample the autoencoder's posterior


@dataclass(frozen=True)
class ModeArgs:
    """A call's image arguments, and the mode they select for the loaded model."""

    mode: str
    image: object = None
    mask_image: object = None
    control_image: object = None
    strength: float | None = None
    max_area: int = cond.KONTEXT_MAX_AREA  # Kontext: the output's pixel budget
    auto_resize: bool = True  # Kontext: the reference image resized to its nearest preferred resolution

    @classmethod
    def check(cls, model_mode: str, image=None, mask_image=None, control_image=None, strength=None, max_area=None,
              auto_resize: bool = True) -> "ModeArgs":
        """The mode a call runs (fluxrt.conditioning.call_mode) and its arguments, checked before any work."""
        mode = cond.call_mode(model_mode, image=image, mask_image=mask_image, control_image=control_image,
                              strength=strength)
        if strength is not None and (isinstance(strength, bool) or not isinstance(strength, numbers.Real)
                                     or not 0 <= strength <= 1):
            raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
        if (max_area is not None or auto_resize is not True) and mode != "kontext":
            raise ValueError("max_area and _auto_resize are a Kontext model's arguments (with image=)")
        if max_area is not None and (isinstance(max_area, bool) or not isinstance(max_area, int)
                                     or not 256 <= max_area <= MAX_PIXELS):
            raise ValueError(f"max_area must be an int number of pixels in [256, {MAX_PIXELS}], got {max_area!r}")
        if not isinstance(auto_resize, bool):
            raise TypeError(f"_auto_resize must be True or False, got {auto_resize!r}")
        args = cls(mode, image, mask_image, control_image, DEFAULT_STRENGTH.get(mode) if strength is None
                   else float(strength), cond.KONTEXT_MAX_AREA if max_area is None else max_area, auto_resize)
        args._check_images()
        return args

    def check_batch(self, images: int, prompts: int, generator, latents) -> None:
        """The call's batch against its images: one image (or mask) for all prompts or one per prompt; the image
        modes make their start from the image, so no latents=; those that sample the autoencoder take one generator
        per image (diffusers' retrieve_latents draws each image's sample from its own)."""
        if self.mode == "text-to-image":
            return
        if latents is not None:
            raise TypeError(f"latents= cannot be used in {self.mode} mode: the start latents come from the image "
                            "and the noise; pass seed= or generator=")
        for name in ("image", "mask_image", "control_image"):
            value = getattr(self, name)
            count = len(value) if isinstance(value, (list, tuple)) else 1
            if value is not None and count not in (1, prompts):
                raise ValueError(f"got {count} {name}s for {prompts} prompts; pass one, or one per prompt")
        if self.mode in NEEDS_GENERATORS and isinstance(generator, torch.Generator) and images > 1:
            raise ValueError(f"{self.mode} mode samples the autoencoder for each image: pass generator= as a list of "
                             f"one torch.Generator per image ({images}), or seed=")

    def _check_images(self) -> None:
        """Every image readable (type, shape, values) before any work: preprocessed once here at its own size."""
        for name in ("image", "mask_image", "control_image"):
            value = getattr(self, name)
            if value is not None:
                (cond.preprocess_mask if name == "mask_image" else cond.preprocess_image)(value, what=name)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the call generates: Kontext keeps the requested aspect ratio over its pixel budget."""
        if self.mode == "kontext":
            height, width = cond.kontext_output_size(height, width, self.max_area)
        return width, height


@dataclass
class Prepared:
    """What a mode changes in the denoising: start latents, timesteps, the model wrapper and a step hook."""

    start: Tensor  # packed [B, L, 64]
    timesteps: list[float]
    wrap: Callable[[Callable], Callable]
    hook: sampling.StepHook | None = None


def generators_for(mode: str, seeds: list[int] | None, generator) -> list[torch.Generator] | None:
    """One CPU generator per image for the modes that sample the autoencoder (None for the others)."""
    if mode not in NEEDS_GENERATORS:
        return None
    if generator is not None:
        return list(generator) if isinstance(generator, (list, tuple)) else [generator]
    return cond.make_generators(seeds)


def prepare(args: ModeArgs, autoencoder, batch: int, width: int, height: int, timesteps: list[float],
            generators: Sequence[torch.Generator], noise: Callable[[], Tensor], device, dtype) -> Prepared:
    """The start latents, timesteps, wrapper and hook of an image-mode call (args.mode not text-to-image).

    noise(): the call's start noise, unpacked [B, 16, h, w] (drawn when called: the order of draws is diffusers')."""
    if args.mode == "kontext":
        reference = cond.preprocess_image(args.image, *cond.kontext_image_size(args.image, args.auto_resize))
        tokens, ids = cond.kontext_reference(autoencoder, reference, batch)
        tokens, ids = tokens.to(device, dtype), ids.to(device)
        return Prepared(sampling.pack(noise()), timesteps, lambda model: cond.sequence_conditioned(model, tokens, ids))
    if args.mode == "control":
        control = cond.preprocess_image(args.control_image, height, width, what="control_image")
        tokens = cond.control_conditioning(autoencoder, control, batch, generators).to(device, dtype)  # before noise
        return Prepared(sampling.pack(noise()), timesteps, lambda model: cond.channel_conditioned(model, tokens))
    return _from_image(args, autoencoder, batch, width, height, timesteps, generators, noise, device, dtype)


def _from_image(args: ModeArgs, autoencoder, batch: int, width: int, height: int, timesteps: list[float],
                generators, noise, device, dtype) -> Prepared:
    """img2img, inpaint and Fill: start from the image's latents noised to the first timestep `strength` keeps."""
    timesteps = cond.strength_timesteps(timesteps, args.strength)
    pixels = cond.preprocess_image(args.image, height, width)
    latents = cond.repeat_to_batch(cond.encode_image(autoencoder, pixels, generators), batch).to(device, torch.float32)
    drawn = noise().to(device, torch.float32)  # after the image's encoding, as diffusers draws them
    start = cond.img2img_start(latents, drawn, timesteps).to(dtype)
    if args.mode == "fill":
        mask = cond.preprocess_mask(args.mask_image, height, width)
        tokens = cond.fill_conditioning(autoencoder, pixels, mask, batch, generators).to(device, dtype)
        return Prepared(start, timesteps, lambda model: cond.channel_conditioned(model, tokens))
    if args.mode == "img2img":
        return Prepared(start, timesteps, lambda model: model)
    mask = cond.inpaint_mask_latents(cond.preprocess_mask(args.mask_image, height, width), batch).to(device)
    image_tokens, noise_tokens = sampling.pack(latents), sampling.pack(drawn)

    def blend(index: int, t: float, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """FluxInpaintPipeline: after each step, outside the mask the image's latents at the next noise level."""
        return {"latents": cond.inpaint_blend(tensors["latents"], image_tokens, noise_tokens, mask,
                                              timesteps[index + 1])}

    return Prepared(start, timesteps, lambda model: model, blend)


def chain_hooks(first: sampling.StepHook | None, then: sampling.StepHook | None) -> sampling.StepHook | None:
    """`first`, then `then` on what it returned (the inpaint blend runs before a caller's callback, as diffusers)."""
    if first is None or then is None:
        return first or then

    def both(index: int, t: float, tensors: dict[str, Tensor]):
        changed = dict(tensors)
        changed.update(first(index, t, tensors) or {})
        return {**changed, **(then(index, t, changed) or {})}

    return both
