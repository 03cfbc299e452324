"""FluxPipeline.__call__'s diffusers-named inputs and outputs: the checks of generator, latents, prompt_embeds /
pooled_prompt_embeds (and their negatives), prompt_2 / negative_prompt_2, sigmas, output_type, return_dict and
callback_on_step_end, with diffusers' FluxPipeline meaning (its check_inputs rules, one clear error each), and the
formatting of the result. Every check runs before any work; fluxrt.validation holds the checks serving and the CLI
share.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .config import FluxConfig
from .sampling import STEP_HOOK_TENSORS, latent_grid
from .validation import MAX_SEQUENCE_LENGTH, check_negative_prompt, check_prompt, check_steps

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class _DefaultSeed(int):
    """seed's default, 0: an int, told apart from a seed=0 the caller passed (which clashes with generator=)."""

    def __repr__(self) -> str:
        return "0"


DEFAULT_SEED = _DefaultSeed(0)


@dataclass
class FluxPipelineOutput:
    """return_dict=True's result, like diffusers' FluxPipelineOutput: .images, also as out[0] or out["images"]."""

    images: Any

    def __getitem__(self, key):
        if key in (0, "images"):
            return self.images
        raise KeyError(f"FluxPipelineOutput holds only images (out[0], out['images'] or out.images), not {key!r}")

    def to_tuple(self) -> tuple:
        return (self.images,)


@dataclass(frozen=True)
class TextInput:
    """One side of a call's text conditioning: prompts (CLIP's) and prompts_2 (T5's), or ready embeddings
    (T5's [N, T, context_in_dim], CLIP's pooled [N, vec_in_dim])."""

    prompts: list[str] | None = None
    prompts_2: list[str] | None = None
    embeds: tuple[Tensor, Tensor] | None = None

    def __len__(self) -> int:
        return len(self.prompts) if self.embeds is None else self.embeds[0].shape[0]


# ---- text ----


def check_text(prompt, prompt_2, prompt_embeds, pooled_prompt_embeds, config: FluxConfig) -> TextInput:
    """The prompt side: prompt (+ prompt_2, T5's prompt, default prompt) or prompt_embeds + pooled_prompt_embeds."""
    if prompt_embeds is None and pooled_prompt_embeds is None:
        if prompt is None:
            raise TypeError("prompt is required: a string or a list of strings (or prompt_embeds with "
                            "pooled_prompt_embeds)")
        prompts = check_prompt(prompt)
        prompts_2 = prompts if prompt_2 is None else check_negative_prompt(prompt_2, len(prompts), "prompt_2")
        return TextInput(prompts, prompts_2)
    for name, value in (("prompt", prompt), ("prompt_2", prompt_2)):
        if value is not None and prompt_embeds is not None:  # pooled_prompt_embeds alone: check_embeds says so
            raise ValueError(f"pass {name} or prompt_embeds, not both: prompt_embeds replace what the prompts encode")
    return TextInput(embeds=check_embeds(prompt_embeds, pooled_prompt_embeds, config, ""))


def check_negative_text(negative_prompt, negative_prompt_2, negative_prompt_embeds, negative_pooled_prompt_embeds,
                        config: FluxConfig, num_prompts: int) -> TextInput | None:
    """The negative side of true CFG as given (None: not given): negative_prompt (+ negative_prompt_2, default
    negative_prompt; one string for all prompts or one per prompt) or negative_prompt_embeds +
    negative_pooled_prompt_embeds (one row per prompt)."""
    if negative_prompt_embeds is None and negative_pooled_prompt_embeds is None:
        if negative_prompt is None:
            if negative_prompt_2 is not None:
                raise ValueError("negative_prompt_2 (T5's negative prompt) needs negative_prompt (CLIP's): pass both, "
                                 "or negative_prompt alone for both encoders")
            return None
        negatives = check_negative_prompt(negative_prompt, num_prompts)
        negatives_2 = negatives if negative_prompt_2 is None else check_negative_prompt(
            negative_prompt_2, num_prompts, "negative_prompt_2")
        return TextInput(negatives, negatives_2)
    for name, value in (("negative_prompt", negative_prompt), ("negative_prompt_2", negative_prompt_2)):
        if value is not None and negative_prompt_embeds is not None:
            raise ValueError(f"pass {name} or negative_prompt_embeds, not both: negative_prompt_embeds replace what "
                             "the negative prompts encode")
    embeds = check_embeds(negative_prompt_embeds, negative_pooled_prompt_embeds, config, "negative_")
    if embeds[0].shape[0] != num_prompts:
        raise ValueError(f"negative_prompt_embeds has {embeds[0].shape[0]} rows for {num_prompts} prompts: pass one "
                         "row per prompt")
    return TextInput(embeds=embeds)


def check_embeds(embeds, pooled, config: FluxConfig, prefix: str) -> tuple[Tensor, Tensor]:
    """(T5 embeddings [N, T, context_in_dim], CLIP pooled [N, vec_in_dim]): both given, floating, finite."""
    names = (f"{prefix}prompt_embeds", f"{prefix}pooled_prompt_embeds")
    if embeds is None or pooled is None:
        given, missing = names if pooled is None else names[::-1]
        raise ValueError(f"{given} needs {missing} too (T5's per-token embeddings and CLIP's pooled one, from the same "
                         "prompts)")
    _check_float_tensor(embeds, names[0])
    _check_float_tensor(pooled, names[1])
    if embeds.ndim != 3 or embeds.shape[2] != config.context_in_dim or not 1 <= embeds.shape[1] <= MAX_SEQUENCE_LENGTH:
        raise ValueError(f"{names[0]} must be [prompts, tokens (1..{MAX_SEQUENCE_LENGTH}), {config.context_in_dim}] "
                         f"(T5's last hidden state), got {tuple(embeds.shape)}")
    if pooled.shape != (embeds.shape[0], config.vec_in_dim):
        raise ValueError(f"{names[1]} must be [{embeds.shape[0]}, {config.vec_in_dim}] (CLIP's pooled output, one row "
                         f"per row of {names[0]}), got {tuple(pooled.shape)}")
    return embeds, pooled


def check_embeds_match(text: TextInput, negative: TextInput | None) -> None:
    """diffusers' rule: prompt_embeds and negative_prompt_embeds, both given under true CFG, have one shape."""
    if negative is None or text.embeds is None or negative.embeds is None:
        return
    if text.embeds[0].shape != negative.embeds[0].shape:
        raise ValueError(f"prompt_embeds {tuple(text.embeds[0].shape)} and negative_prompt_embeds "
                         f"{tuple(negative.embeds[0].shape)} must have the same shape when both are passed")


def _check_float_tensor(value, name: str) -> None:
    if not isinstance(value, Tensor) or not value.is_floating_point():
        got = f"a {value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {got}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} hold NaN or inf")


# ---- start noise ----


@dataclass(frozen=True)
class NoiseSource:
    """Where a call's start noise comes from: exactly one of per-image seeds, diffusers' generator(s), or latents."""

    seeds: list[int] | None = None
    generator: torch.Generator | list[torch.Generator] | None = None
    latents: Tensor | None = None


def check_noise_sources(seed, generator, latents) -> None:
    """seed, generator and latents each make the start noise: at most one of them (seed's default aside)."""
    given = [name for name, value in (("seed", seed), ("generator", generator), ("latents", latents))
             if value is not None and value is not DEFAULT_SEED]
    if len(given) > 1:
        raise TypeError(f"pass one of {' or '.join(given)}, not both: each sets the start noise (seed: fluxrt's "
                        "per-image seeds; generator: diffusers' torch.Generator(s); latents: the noise itself)")


def check_generator(generator, count: int, device: torch.device) -> torch.Generator | list[torch.Generator]:
    """A torch.Generator (draws the whole batch) or a list of one per image, on the CPU or the pipeline's device
    type."""
    generators = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    for k, item in enumerate(generators):
        if not isinstance(item, torch.Generator):
            where = f"generator[{k}]" if isinstance(generator, (list, tuple)) else "generator"
            raise TypeError(f"{where} must be a torch.Generator (or generator a list of one per image), got "
                            f"{type(item).__name__}")
    if isinstance(generator, (list, tuple)) and len(generators) != count:
        raise ValueError(f"got {len(generators)} generators for {count} images; pass one generator, or one per image")
    kinds = {g.device.type for g in generators}
    if len(kinds) > 1 or not kinds <= {"cpu", device.type}:
        raise ValueError(f"the generators are on {sorted(kinds)} and the pipeline on {device}: pass CPU generators "
                         "(or ones on the pipeline's device), all on one device")
    return generators if isinstance(generator, (list, tuple)) else generator


def check_latents(latents, count: int, width: int, height: int, channels: int) -> Tensor:
    """Packed start noise [images, tokens, channels] as diffusers' FluxPipeline takes it, for width x height."""
    if not isinstance(latents, Tensor):
        raise TypeError(f"latents must be a torch.Tensor [images, tokens, {channels}], got {type(latents).__name__}")
    rows, cols = latent_grid(height, width)
    expected = (count, rows * cols, channels)
    if latents.ndim == 4:
        raise ValueError(f"latents {tuple(latents.shape)} are unpacked [images, channels, h, w]: pass them packed "
                         f"{expected} as diffusers does, fluxrt.sampling.pack(latents)")
    if tuple(latents.shape) != expected:
        raise ValueError(f"latents must be {expected} for {count} images of {width} x {height} ([images, tokens, "
                         f"channels]), got {tuple(latents.shape)}")
    _check_float_tensor(latents, "latents")
    return latents


# ---- schedule ----


def check_sigmas(sigmas, num_steps: int | None) -> list[float] | None:
    """diffusers' sigmas: noise levels in [0, 1], one per step; num_steps, if given, must be their count."""
    if sigmas is None:
        return None
    if isinstance(sigmas, Tensor):
        sigmas = sigmas.tolist() if sigmas.ndim == 1 else sigmas
    elif hasattr(sigmas, "ndim") and hasattr(sigmas, "tolist"):  # a numpy array
        sigmas = sigmas.tolist() if sigmas.ndim == 1 else sigmas
    if not isinstance(sigmas, (list, tuple)):
        raise TypeError(f"sigmas must be a list of floats (one noise level per step), got {type(sigmas).__name__}")
    if not sigmas:
        raise ValueError("sigmas must hold at least one noise level (one per step), got an empty list")
    check_steps(len(sigmas), "len(sigmas)")
    for k, sigma in enumerate(sigmas):
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not (math.isfinite(sigma)
                                                                                   and 0 <= sigma <= 1):
            raise ValueError(f"sigmas[{k}] must be a number in [0, 1] (a noise level), got {sigma!r}")
    if num_steps is not None and num_steps != len(sigmas):
        raise ValueError(f"num_steps / num_inference_steps = {num_steps} disagrees with the {len(sigmas)} sigmas: "
                         "pass sigmas alone (one step per sigma), or the matching count")
    return [float(s) for s in sigmas]


# ---- step callback ----


def check_step_callback(callback, tensor_inputs) -> tuple[str, ...]:
    """callback_on_step_end(pipe, step_index, timestep, callback_kwargs) -> dict, and the tensors it is given."""
    if callback is not None and not callable(callback):
        raise TypeError("callback_on_step_end must be a function (pipe, step_index, timestep, callback_kwargs) -> "
                        f"dict, got {type(callback).__name__}")
    if isinstance(tensor_inputs, str) or not isinstance(tensor_inputs, (list, tuple)):
        raise TypeError(f"callback_on_step_end_tensor_inputs must be a list of names from {list(STEP_HOOK_TENSORS)}, "
                        f"got {type(tensor_inputs).__name__} {tensor_inputs!r}")
    unknown = [name for name in tensor_inputs if name not in STEP_HOOK_TENSORS]
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs may name only {list(STEP_HOOK_TENSORS)}, got {unknown}")
    return tuple(tensor_inputs)


def step_hook(pipe, callback: Callable, tensor_inputs: tuple[str, ...], device: torch.device):
    """fluxrt.sampling.denoise's on_step_end calling a diffusers callback_on_step_end: timestep is t * 1000 as a
    float32 tensor (diffusers' t), callback_kwargs the tensors named; its dict replaces latents / prompt_embeds."""

    def on_step_end(index: int, t: float, tensors: dict[str, Tensor]):
        timestep = torch.tensor(t * 1000, dtype=torch.float32, device=device)
        changes = callback(pipe, index, timestep, {name: tensors[name] for name in tensor_inputs})
        if not isinstance(changes, dict):
            raise TypeError(f"callback_on_step_end must return a dict (callback_kwargs, edited or not), got "
                            f"{type(changes).__name__} at step index {index}")
        return changes

    return on_step_end


# ---- output ----


def check_output(output_type, return_dict) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
    if return_dict is not None and not isinstance(return_dict, bool):
        raise TypeError(f"return_dict must be None (the images alone), True (an object with .images) or False (a "
                        f"tuple (images,)), got {type(return_dict).__name__} {return_dict!r}")


def format_output(result: Tensor, output_type: str, return_dict: bool | None):
    """result: pixels [N, 3, H, W] in [0, 1] on the CPU, or with output_type="latent" the packed latents."""
    if output_type == "np":
        images = result.permute(0, 2, 3, 1).float().numpy()  # [N, H, W, 3] float32, as diffusers' "np"
    elif output_type == "pil":
        images = to_pil(result)
    else:
        images = result
    if return_dict is None:
        return images
    return FluxPipelineOutput(images) if return_dict else (images,)


def to_pil(images: Tensor) -> list:
    """[N, 3, H, W] in [0, 1] -> PIL RGB images (x * 255 rounded, as diffusers' numpy_to_pil)."""
    from PIL import Image

    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p) for p in pixels]  # uint8 [H, W, 3] -> RGB
