"""The serving API: a list of requests in, one result per request out, in order.

    results = pipe.generate([fluxrt.GenerationRequest("a cat", width=1024, height=768, seed=7), ...])
    for r in results:
        r.image.save(...) if r.ok else log(r.error)

Requests with the same size, steps, guidance and true-CFG scale run together as one batch (up to max_batch_size
images): the transformer's cost per image falls with batch size on a GPU, and each image keeps its own seed, so its
pixels do not depend on what it was batched with beyond floating-point reduction order. The LoRAs a request names
(GenerationRequest.loras, {name: scale} of LoRAs loaded in hot-swap mode) do not split batches: the side branch
(fluxrt.lora_branch) runs each image's own LoRAs at its own scales inside the batch. A bad request (wrong size, steps,
seed, type, or past the limits of fluxrt.validation) gets its own error before anything runs and never stops the
others; a batch that fails at run time (out of memory, NaN/inf: fluxrt.NonFiniteError) is retried one request at a
time so only the failing request reports the error. `requests` must be a list: a single request or a prompt string
is a TypeError (wrap it: [request]).

Thread safety: the pipeline runs one batch at a time under its lock (one GPU worker); callers on other threads
wait for it and each gets exactly its own results.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, replace
from typing import Any

from . import conditioning as cond
from .modes import ModeArgs
from .validation import check_batch_size, check_seed, check_size, draw_seed


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    width: int = 1024
    height: int = 1024
    num_steps: int | None = None  # None: the model's default (dev 28, schnell 4)
    guidance: float | None = None  # None: the model's default (dev 3.5); schnell ignores it
    seed: int | None = None  # None: a random seed, reported in the result
    negative_prompt: str | None = None  # true CFG (as FluxPipeline's call); None: the model's default
    true_cfg_scale: float | None = None  # None: the model's default (off for FLUX.1; the tiny model 3)
    loras: Mapping[str, float] | None = None  # loaded LoRAs to run, {name: scale} (hot-swap mode); None: as loaded
    # the tools modes, as FluxPipeline's call takes them (fluxrt.modes): img2img / inpainting / Fill / Kontext
    image: Any = None
    mask_image: Any = None
    control_image: Any = None  # a Canny / Depth model's
    strength: float | None = None  # img2img / inpainting / Fill; None: the mode's default (0.6; Fill 1.0)
    cache: Any = None  # step caching (fluxrt.cache: "fbc:0.08", "taylorseer:1:5:5", a config); None: off
    # live previews and progress (fluxrt serve's streamed events; the step batcher's, not pipe.generate's), called on
    # the batcher's thread: on_step(step, total) after every denoising step (1 .. total, the steps the job runs);
    # on_preview(step, total, rgb) with fluxrt.preview's uint8 [h, w, 3] latent-grid preview after every
    # preview_every-th step but the last, after that step's on_step. None: not called, and no cost
    preview_every: int | None = None
    on_preview: Any = None
    on_step: Any = None


@dataclass(frozen=True)
class GenerationResult:
    request: GenerationRequest  # as run: the seed and defaults filled in
    image: Any = None  # a PIL.Image when ok
    error: str | None = None  # what was wrong, when not ok
    cache_stats: dict | None = None  # with request.cache: {"computed": steps, "skipped": steps} (fluxrt.cache)

    @property
    def ok(self) -> bool:
        return self.error is None


def resolve(pipe, request) -> GenerationRequest:
    """The request with defaults filled in (steps, guidance, a drawn seed, true CFG, strength), or TypeError /
    ValueError / KeyError naming what is wrong with it. A server resolves each request when it is submitted, so a bad
    one is refused before it queues (fluxrt.serve)."""
    if not isinstance(request, GenerationRequest):
        raise TypeError(f"expected a fluxrt.GenerationRequest, got {type(request).__name__}")
    if not isinstance(request.prompt, str):
        raise TypeError(f"prompt must be a string, got {type(request.prompt).__name__}")
    mode = ModeArgs.check(pipe.mode, request.image, request.mask_image, request.control_image, request.strength)
    width, height = check_size(request.width, request.height)
    steps = pipe.resolve_steps(request.num_steps, None, mode.mode)[0]
    guidance = pipe.resolve_guidance(request.guidance, mode.mode)
    seed = draw_seed() if request.seed is None else check_seed(request.seed)
    if request.negative_prompt is not None and not isinstance(request.negative_prompt, str):
        raise TypeError(f"negative_prompt must be a string, got {type(request.negative_prompt).__name__}")
    negatives, cfg_scale = pipe.resolve_true_cfg(request.negative_prompt, request.true_cfg_scale, 1)
    loras = pipe.check_lora_choice(request.loras)
    return replace(request, width=width, height=height, num_steps=steps, guidance=guidance, seed=seed,
                   negative_prompt=None if negatives is None else negatives[0], true_cfg_scale=cfg_scale, loras=loras,
                   strength=mode.strength, cache=pipe.check_cache(request.cache))


def batch_key(pipe, request: GenerationRequest) -> tuple:
    """What must be equal for resolved requests to share one pipeline call: size, steps, guidance, the true-CFG
    scale (or off), the mode and strength (fluxrt.modes), and for Kontext the reference size. Negative prompts,
    hot-swapped LoRAs and step caching (each image its own state) may differ within a batch."""
    cfg = request.true_cfg_scale if request.negative_prompt is not None else None
    return request.width, request.height, request.num_steps, request.guidance, cfg, _mode_key(pipe, request)


def _mode_key(pipe, request: GenerationRequest) -> tuple:
    """The mode and strength, and for Kontext the reference image's size (its tokens join the sequence)."""
    mode = ModeArgs.check(pipe.mode, request.image, request.mask_image, request.control_image, request.strength)
    return mode.mode, mode.strength, kontext_reference_size(pipe, request)


def kontext_reference_size(pipe, request: GenerationRequest) -> tuple[int, int] | None:
    """(height, width) a Kontext request's reference image runs at (None for other requests)."""
    if pipe.mode != "kontext" or request.image is None:
        return None
    return cond.kontext_image_size(request.image)


def _request_list(requests) -> list:
    """The requests as a list, in the order given; one clear TypeError for what is not a collection of them."""
    if isinstance(requests, GenerationRequest):
        raise TypeError("generate takes a list of requests: pass [request] (the results come back as a list too)")
    if isinstance(requests, (str, bytes)):
        raise TypeError(f"generate takes a list of fluxrt.GenerationRequest, got a {type(requests).__name__}; wrap a "
                        "prompt as [fluxrt.GenerationRequest(prompt)]")
    if isinstance(requests, (Set, Mapping)) or not isinstance(requests, Iterable):
        raise TypeError(f"generate takes a list of fluxrt.GenerationRequest (results come back in its order), got "
                        f"{type(requests).__name__}")
    return list(requests)


def _run(pipe, batch: list[GenerationRequest]) -> list:
    first = batch[0]
    guided = first.negative_prompt is not None  # the same for the whole batch (generate's key)
    images = {name: [getattr(r, name) for r in batch] for name in ("image", "mask_image", "control_image")
              if getattr(first, name) is not None}  # the same for the whole batch (one mode: generate's key)
    kontext = pipe.mode == "kontext" and "image" in images  # the request's size is the output's, as in the CLI
    return pipe([r.prompt for r in batch], width=first.width, height=first.height, num_steps=first.num_steps,
                guidance=first.guidance, seed=[r.seed for r in batch], progress=False,
                negative_prompt=[r.negative_prompt for r in batch] if guided else None,
                true_cfg_scale=first.true_cfg_scale if guided else 1.0,
                loras=[r.loras for r in batch] if any(r.loras is not None for r in batch) else None,
                strength=first.strength, max_area=first.width * first.height if kontext else None,
                cache=[r.cache for r in batch] if any(r.cache is not None for r in batch) else None, **images)


def generate(pipe, requests, max_batch_size: int = 4) -> list[GenerationResult]:
    """One GenerationResult per request, in the order given (see the module docstring). `requests` is a list (or
    another ordered iterable) of GenerationRequest; a single request, a string, a set or a dict is a TypeError.
    max_batch_size: 1 to fluxrt.validation.MAX_IMAGES_PER_CALL images per pipeline call."""
    max_batch_size = check_batch_size(max_batch_size)
    requests = _request_list(requests)
    results: list[GenerationResult | None] = [None] * len(requests)
    groups: dict[tuple, list[tuple[int, GenerationRequest]]] = {}
    for i, request in enumerate(requests):
        try:
            resolved = resolve(pipe, request)
        except (TypeError, ValueError, KeyError) as err:
            results[i] = GenerationResult(request, error=str(err) if not isinstance(err, KeyError) else err.args[0])
            continue
        groups.setdefault(batch_key(pipe, resolved), []).append((i, resolved))
    for members in groups.values():
        for start in range(0, len(members), max_batch_size):
            chunk = members[start : start + max_batch_size]
            try:
                images = _run(pipe, [r for _, r in chunk])
            except Exception as err:  # noqa: BLE001 -- one request's failure must not take the others down
                if len(chunk) == 1:
                    results[chunk[0][0]] = GenerationResult(chunk[0][1], error=f"{type(err).__name__}: {err}")
                else:  # which one fails? each alone
                    results_alone = generate(pipe, [r for _, r in chunk], max_batch_size=1)
                    for (i, _), result in zip(chunk, results_alone):
                        results[i] = result
                continue
            stats = pipe.cache_stats if any(r.cache is not None for _, r in chunk) else None
            for k, ((i, r), image) in enumerate(zip(chunk, images)):
                results[i] = GenerationResult(r, image=image,
                                              cache_stats=stats[k] if stats and r.cache is not None else None)
    return results
