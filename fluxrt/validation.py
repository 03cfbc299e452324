"""Request validation: the one place that says what a generation request may ask for, used by the pipeline, the
serving API and the CLI. Every check runs before any work (no weight loaded, no token encoded) and raises one clear
line: TypeError for a value of the wrong type, ValueError for a value out of range; the message names the argument
and the limit. `what=` lets a caller name the argument its own way (the CLI passes its flag, e.g. "--steps").

Limits (module constants, documented in the README) bound what one call may cost, so a single request cannot exhaust
memory or hold the pipeline's lock for hours:

- MAX_STEPS: FLUX's flow-matching schedule is trained on 1000 timesteps; finer Euler steps add time, not detail
  (diffusers users run up to a few hundred). Without a cap, num_steps=10**9 builds a schedule of 10**9 floats.
- MIN_SIDE / MAX_SIDE: one latent token (16 pixels) up to 4096 pixels a side (the rope position range FLUX is used
  with; wide panoramas stay possible).
- MAX_PIXELS: 4 MP (2048 x 2048 = 16384 image tokens). FLUX.1 is trained up to about 2 MP; past twice that images
  fall apart (repeated subjects) and a step costs over 16x a 1 MP step (attention is quadratic in tokens).
- MAX_IMAGES_PER_CALL: one call holds every image's latents, text embeddings and decoded pixels at once; split larger
  jobs into several calls (the serving API batches up to max_batch_size images anyway).
- MAX_GUIDANCE: FLUX.1-dev's distilled guidance is used at 1..10; 100 leaves room and refuses nonsense.
- Seeds are ints in [0, 2**63) (torch.Generator.manual_seed's range that round-trips through an int64).

Non-finite results (NaN/inf latents or pixels) raise NonFiniteError, defined here so every layer reports them alike.
"""

from __future__ import annotations

import math
import numbers
import operator
import secrets
from collections.abc import Sequence

import torch

from . import devices
from .ops import BACKENDS

MIN_SIDE, MAX_SIDE = 16, 4096
SIDE_MULTIPLE = 16  # 8x autoencoder, then 2x2 patches: one token per 16x16 pixels
MAX_PIXELS = 2048 * 2048
MAX_STEPS = 1000
MAX_IMAGES_PER_CALL = 64
MAX_GUIDANCE = 100.0
SEED_LIMIT = 2**63
QUANTIZE_CHOICES = (None, "fp8", "fp8-weight")


class NonFiniteError(RuntimeError):
    """The model produced NaN or inf (latents after a denoising step, or decoded pixels): the result is garbage and is
    not returned. Usual causes: corrupt or mismatched weights, fp16 overflow (run bf16 or fp32)."""


# ---- scalars ----


def as_int(value, what: str) -> int:
    """`value` as a Python int: ints and numpy integers (anything with __index__), never bool or float."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}") from None


def int_between(value, what: str, low: int, high: int, unit: str) -> int:
    """`value` as an int in [low, high]; ValueError "what must be between low and high (unit), got value"."""
    number = as_int(value, what)
    if not low <= number <= high:
        raise ValueError(f"{what} must be between {low} and {high} ({unit}), got {number}")
    return number


def check_flag(value, what: str) -> bool:
    """A True/False switch: a string such as "false" would be truthy, so only bools pass."""
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False, got {type(value).__name__} {value!r}")
    return value


# ---- request fields ----


def check_size(width, height, names: tuple[str, str] = ("width", "height")) -> tuple[int, int]:
    """(width, height) as ints: multiples of 16 in [MIN_SIDE, MAX_SIDE], at most MAX_PIXELS together."""
    sides = []
    for name, value in zip(names, (width, height)):
        value = as_int(value, name)
        if value % SIDE_MULTIPLE or not MIN_SIDE <= value <= MAX_SIDE:
            raise ValueError(f"{name} must be a multiple of {SIDE_MULTIPLE} between {MIN_SIDE} and {MAX_SIDE}, "
                             f"got {value}")
        sides.append(value)
    if sides[0] * sides[1] > MAX_PIXELS:
        raise ValueError(f"{names[0]} x {names[1]} = {sides[0]} x {sides[1]} is {sides[0] * sides[1]:,} pixels; the "
                         f"limit is {MAX_PIXELS:,} (2048 x 2048, fluxrt.validation.MAX_PIXELS): ask for a smaller image")
    return sides[0], sides[1]


def check_steps(num_steps, what: str = "num_steps") -> int:
    """The number of denoising steps as an int in [1, MAX_STEPS]."""
    return int_between(num_steps, what, 1, MAX_STEPS, "fluxrt.validation.MAX_STEPS")


def check_seed(seed, what: str = "seed") -> int:
    """One seed as an int in [0, 2**63) (numpy integers accepted)."""
    seed = as_int(seed, what)
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{what} must be an int in [0, 2**63), got {seed}")
    return seed


def draw_seed(count: int = 1) -> int:
    """A random seed s such that s + count - 1 is still a valid seed (image k of a call gets s + k)."""
    return secrets.randbelow(SEED_LIMIT - count + 1)


def check_seeds(seed, count: int, what: str = "seed") -> list[int]:
    """One seed per image: an int s gives s, s + 1, ..., a list gives its items (exactly `count` of them), None draws
    a random s (the caller reports it so the images can be reproduced)."""
    if seed is None:
        seed = draw_seed(count)
    if isinstance(seed, (list, tuple)) or (hasattr(seed, "ndim") and getattr(seed, "ndim", 0) == 1):
        seeds = [check_seed(s, f"{what}[{k}]") for k, s in enumerate(seed)]
        if len(seeds) != count:
            raise ValueError(f"got {len(seeds)} seeds for {count} images; pass one int or one seed per image")
        return seeds
    if isinstance(seed, (str, bytes, dict, set)) or not hasattr(seed, "__index__"):
        raise TypeError(f"{what} must be an int, a list of ints (one per image) or None (random), got "
                        f"{type(seed).__name__} {seed!r}")
    first = check_seed(seed, what)
    check_seed(first + count - 1, f"{what} + {count - 1} (the last image's seed)")
    return [first + k for k in range(count)]


def check_prompt(prompt, what: str = "prompt") -> list[str]:
    """The prompts of a call: a str, or a non-empty list/tuple of str ("" is a valid, unconditional prompt). A dict or
    set is refused: a dict would contribute its keys, a set its items in hash order (images out of order)."""
    if prompt is None:
        raise TypeError(f"{what} is required: a string or a list of strings")
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, (list, tuple)):
        unordered = " (a dict or set has no dependable order: pass a list)" if isinstance(prompt, (dict, set)) else ""
        raise TypeError(f"{what} must be a string or a list of strings, got {type(prompt).__name__}{unordered}")
    if not prompt:
        raise ValueError(f"{what} must be a string or a non-empty list of strings, got an empty {type(prompt).__name__}")
    for k, item in enumerate(prompt):
        if not isinstance(item, str):
            raise TypeError(f"{what}[{k}] must be a string, got {type(item).__name__} {item!r}")
    return list(prompt)


def check_guidance(guidance, what: str = "guidance") -> float:
    """Distilled guidance as a float in [0, MAX_GUIDANCE] (ints and numpy floats accepted, bool and NaN not)."""
    if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real):
        raise TypeError(f"{what} must be a number, got {type(guidance).__name__} {guidance!r}")
    guidance = float(guidance)
    if not (math.isfinite(guidance) and 0 <= guidance <= MAX_GUIDANCE):
        raise ValueError(f"{what} must be a number in [0, {MAX_GUIDANCE:g}], got {guidance!r}")
    return guidance


MAX_SEQUENCE_LENGTH = 512  # T5 tokens FLUX.1 reads at most (dev was trained with 512, schnell 256)


def check_max_sequence_length(length, what: str = "max_sequence_length") -> int:
    """The T5 token count a call encodes prompts to: an int in [1, MAX_SEQUENCE_LENGTH]."""
    return int_between(length, what, 1, MAX_SEQUENCE_LENGTH, "T5 tokens")


def check_true_cfg_scale(scale, what: str = "true_cfg_scale") -> float:
    """True classifier-free guidance's scale (diffusers' true_cfg_scale): a float in [1, MAX_GUIDANCE]; 1 is off."""
    scale = check_guidance(scale, what)
    if scale < 1:
        raise ValueError(f"{what} must be >= 1 (1 turns true classifier-free guidance off), got {scale:g}")
    return scale


def check_negative_prompt(negative_prompt, num_prompts: int, what: str = "negative_prompt") -> list[str]:
    """One negative prompt per prompt: a str (for every prompt) or a list of as many strings as there are prompts."""
    negatives = check_prompt(negative_prompt, what)
    if isinstance(negative_prompt, str):
        return negatives * num_prompts
    if len(negatives) != num_prompts:
        raise ValueError(f"{what} has {len(negatives)} entries for {num_prompts} prompts: pass one string for all, "
                         "or one per prompt")
    return negatives


def _image_count(value, what: str) -> int:
    """An int in [1, MAX_IMAGES_PER_CALL]: any count of images one call may run at once."""
    return int_between(value, what, 1, MAX_IMAGES_PER_CALL, "fluxrt.validation.MAX_IMAGES_PER_CALL")


def check_images_per_prompt(num_images_per_prompt, what: str = "num_images_per_prompt") -> int:
    return _image_count(num_images_per_prompt, what)


def check_image_count(num_prompts: int, num_images_per_prompt: int) -> int:
    """The images one call makes (prompts x images per prompt), at most MAX_IMAGES_PER_CALL."""
    count = num_prompts * num_images_per_prompt
    if count > MAX_IMAGES_PER_CALL:
        raise ValueError(f"this call asks for {count} images ({num_prompts} prompts x {num_images_per_prompt} per "
                         f"prompt); the limit is {MAX_IMAGES_PER_CALL} per call (fluxrt.validation.MAX_IMAGES_PER_CALL): "
                         "split it into several calls")
    return count


def check_batch_size(max_batch_size, what: str = "max_batch_size") -> int:
    return _image_count(max_batch_size, what)


# ---- pipeline construction ----


def check_quantize(quantize, what: str = "quantize") -> None:
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"{what} must be None, 'fp8' (W8A8) or 'fp8-weight' (weight-only), got {quantize!r}")


def check_backend(backend, what: str = "backend") -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {backend!r}")


def check_pipeline_options(device: torch.device, compile, quantize, backend, offload_text_encoders,
                           progress) -> bool:
    """FluxPipeline's switches, checked before any weight is loaded; returns whether to compile (compile=None: on a
    CUDA device only). `device` is already resolved (fluxrt.devices.resolve_device)."""
    if compile is not None:
        check_flag(compile, "compile")
    check_quantize(quantize)
    check_backend(backend)
    check_flag(offload_text_encoders, "offload_text_encoders")
    check_flag(progress, "progress")
    compiled = device.type == "cuda" if compile is None else compile
    if quantize is not None and not compiled:
        why = "compile=False was passed" if compile is False else f"compilation is off by default on {device}"
        raise ValueError(f"quantize={quantize!r} is applied by compilation and {why}: pass compile=True, or "
                         "quantize=None")
    if compiled:
        check_acceleration(device, quantize, backend)
    return compiled


def check_acceleration(device: torch.device, quantize, backend) -> None:
    """The arguments of compiling a pipeline on `device` (FluxPipeline.accelerate): quantize and backend. W8A8 needs
    fp8 tensor cores: the pipeline refuses it on a CPU (torch's fp8 CPU kernels would take hours for a 12B model)."""
    check_quantize(quantize)
    check_backend(backend)
    if quantize == "fp8":
        if device.type != "cuda":
            raise ValueError(f"quantize='fp8' (W8A8) needs an FP8-capable CUDA GPU (sm_89+: Ada, Hopper, Blackwell) "
                             f"and this pipeline is on {device}; use quantize='fp8-weight' or none")
        devices.require_fp8_tensor_cores(device, "quantize='fp8' (W8A8)", "use quantize='fp8-weight' on this GPU")
