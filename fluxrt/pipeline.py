"""FluxPipeline: prompt in, images out. Text encoders (CLIP-L pooled + T5 v1.1), the FLUX transformer (fluxrt.compile
on a GPU by default), the flow-matching sampler of fluxrt.sampling and the autoencoder's decoder.

    pipe = fluxrt.FluxPipeline.from_pretrained("FLUX.1-dev")          # a local diffusers-layout folder
    images = pipe("a red apple on a wooden table", width=1024, height=1024, seed=0)   # -> [PIL.Image]

Conventions follow BFL and diffusers (which agree): T5 padded to 512 tokens for dev / 256 for schnell with no
attention mask, CLIP to 77; noise from a CPU generator per image seed (or diffusers' generator= / latents=);
dev shifts the schedule (given sigmas too), schnell does not;
images map [-1, 1] -> [0, 1] -> uint8 with rounding (diffusers; BFL truncates, half a level darker on average).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import numbers
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from . import cache, modes, sampling
from .call_inputs import (
    DEFAULT_SEED,
    NoiseSource,
    TextInput,
    check_embeds_match,
    check_generator,
    check_latents,
    check_negative_text,
    check_noise_sources,
    check_output,
    check_sigmas,
    check_step_callback,
    check_text,
    format_output,
    step_hook,
    to_pil,  # noqa: F401 -- fluxrt.pipeline.to_pil, as the CLI imports it
)
from .convert import CheckpointError
from .devices import resolve_device, resolve_dtype
from .loading import check_mode, detect_mode, load_autoencoder, load_transformer
from .lora import load_lora
from .lora_branch import LoraBranches, check_scale
from .modes import ModeArgs
from .quantize import FP8Linear
from .reference import AutoEncoder, Flux
from .compiler import prepare as prepare_compile  # compile's check phase; also takes the autoencoder (-> fluxrt.vae)
from .validation import (
    NonFiniteError,
    check_acceleration,
    check_flag,
    check_guidance,
    check_image_count,
    check_images_per_prompt,
    check_max_sequence_length,
    check_negative_prompt,
    check_pipeline_options,
    check_prompt,
    check_seeds,
    check_size,
    check_steps,
    check_true_cfg_scale,
)

logger = logging.getLogger("fluxrt")  # the library's one logger (fluxrt.loading's too): what the CLI shows
CLIP_LENGTH = 77
TEXT_FOLDERS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")


class FluxPipeline:
    """FLUX.1 text-to-image. Build with from_pretrained (or fluxrt.tiny.tiny_random_pipeline); call like diffusers'.

    compile: None -> fluxrt.compile the transformer when it is on a CUDA device; True/False to force.
    quantize: None | "fp8" (W8A8, needs an FP8 GPU) | "fp8-weight" (applied by compilation).
    offload_text_encoders: keep the text encoders on the CPU and bring them to the device only to encode.
    progress: the denoising progress bar (a call's progress= overrides it); from_pretrained's also the loading bars.
    Calls are serialized by a lock, so one pipeline can be shared by threads (see generate for serving).
    """

    def __init__(self, transformer: Flux, autoencoder: AutoEncoder, clip_tokenizer, clip_encoder: nn.Module,
                 t5_tokenizer, t5_encoder: nn.Module, *, compile: bool | None = None, quantize: str | None = None,
                 backend: str = "auto", offload_text_encoders: bool = False, progress: bool = True,
                 sampling_defaults: dict | None = None, mode: str | None = None):
        if not isinstance(transformer, Flux):
            raise TypeError(f"transformer must be a fluxrt.reference.Flux (see fluxrt.load_transformer), got "
                            f"{type(transformer).__name__}")
        param = next(transformer.parameters())
        # every switch is checked before anything is moved or compiled: a refused pipeline leaves the modules as given
        compile = check_pipeline_options(param.device, compile, quantize, backend, offload_text_encoders, progress)
        self.config = transformer.params
        # which FLUX.1 model this is (fluxrt.loading.MODES): text-to-image, fill, control or kontext; a Kontext
        # model has a dev's shapes, so only its folder, its file name or mode= tell it apart
        self.mode = detect_mode(self.config) if mode is None else check_mode(mode, self.config)
        self.transformer, self.autoencoder = transformer, autoencoder
        self.device, self.dtype = param.device, param.dtype
        self.vae_dtype = next(autoencoder.parameters()).dtype
        self.clip_tokenizer, self.clip_encoder = clip_tokenizer, clip_encoder
        self.t5_tokenizer, self.t5_encoder = t5_tokenizer, t5_encoder
        self.offload_text_encoders = offload_text_encoders
        if offload_text_encoders:
            self._move_text_encoders("cpu")
        self.progress = progress
        # FLUX.1-dev was trained with 512 T5 tokens, schnell with 256 (the guidance embedder tells them apart); a
        # model folder may name its own (model_index.json's SAMPLING_KEY, e.g. the embedded tiny model's)
        defaults = check_sampling_defaults(sampling_defaults or {}, "sampling_defaults")
        self.max_sequence_length = defaults.get("max_sequence_length", 512 if self.config.guidance_embed else 256)
        self.default_steps = defaults.get("num_steps", 28 if self.config.guidance_embed else 4)
        self.default_size = (defaults.get("width", 1024), defaults.get("height", 1024))
        self.default_guidance = 3.5 if self.config.guidance_embed else None
        # true classifier-free guidance: off unless asked for, or unless the model's folder asks for it (the tiny
        # model, trained with caption dropout and no distilled guidance, draws its prompts far better with it)
        self.default_true_cfg_scale = defaults.get("true_cfg_scale", 1.0)
        self.default_negative_prompt = defaults.get("negative_prompt")
        self.plan = None  # what fluxrt.compile chose, once compiled
        self._lock = threading.RLock()
        # name -> [Lora, scale, FusedLora or None (hot-swapped: a side branch of the compiled transformer)], in load order
        self._loras: dict[str, list] = {}
        if compile:
            self.accelerate(quantize=quantize, backend=backend)

    # ---- construction ----

    @classmethod
    def from_pretrained(cls, path: str | Path, *, transformer: str | Path | None = None,
                        autoencoder: str | Path | None = None, text_encoders: str | Path | None = None,
                        device: torch.device | str | None = None, dtype: torch.dtype | str | None = None,
                        torch_dtype: torch.dtype | str | None = None, compile: bool | None = None,
                        quantize: str | None = None, backend: str = "auto", offload_text_encoders: bool = False,
                        progress: bool = True) -> "FluxPipeline":
        """Load from local files (never the network):

        - a diffusers-layout folder (text_encoder, text_encoder_2, tokenizer, tokenizer_2, transformer, vae), or a
          folder of BFL files (flux1-dev.safetensors + ae.safetensors) beside those four text folders (the layout of
          BFL's Hugging Face repos);
        - a BFL transformer file, with autoencoder= (ae.safetensors or a diffusers vae folder) and text_encoders=
          (a folder holding the four text folders).
        transformer= / autoencoder= / text_encoders= override the parts found in `path`. Defaults: CUDA when there
        is a GPU, bf16 there and fp32 on a CPU; torch_dtype= is diffusers' name for dtype=. compile, quantize,
        backend, offload_text_encoders, progress: as FluxPipeline's (progress=False also hides the loading bars).
        Every argument is checked before any weight is loaded.
        """
        device = resolve_device(device)
        dtype = resolve_dtype(_one_dtype(dtype, torch_dtype), device)
        check_pipeline_options(device, compile, quantize, backend, offload_text_encoders, progress)
        transformer, autoencoder, text_encoders = _find_parts(path, transformer, autoencoder, text_encoders)
        # fluxrt's loaders first: they check every header before reading a weight, so a bad transformer or
        # autoencoder file is refused before the text encoders (9 GB for T5-XXL) are read
        flux = load_transformer(transformer, dtype=dtype, device=device)
        ae = load_autoencoder(autoencoder, dtype=dtype, device=device)
        with _loading_bars(progress):
            # offloaded encoders are loaded straight to the CPU: never resident on the GPU beside the transformer
            text = _load_text_encoders(text_encoders, dtype, torch.device("cpu") if offload_text_encoders else device)
        return cls(flux, ae, *text, compile=compile, quantize=quantize, backend=backend,
                   offload_text_encoders=offload_text_encoders, progress=progress,
                   sampling_defaults=sampling_defaults(path), mode=detect_mode(flux.params, transformer))

    def accelerate(self, quantize: str | None = None, backend: str = "auto", attention: str = "bf16") -> None:
        """Swap in the fluxrt-compiled models (in place: weights are reused, not copied). The one acceleration step.
        quantize and attention as fluxrt.compile's."""
        with self._lock:
            self._refuse_while_parallel("accelerate")
            if self.plan is not None:
                raise RuntimeError("this pipeline is already compiled")
            check_acceleration(self.device, quantize, backend)
            # both models are checked before either is converted: a refused autoencoder leaves the transformer as it was
            build_transformer = prepare_compile(self.transformer, quantize=quantize, backend=backend,
                                                attention=attention)
            build_autoencoder = prepare_compile(self.autoencoder, backend=backend)  # -> fluxrt.vae.FastAutoEncoder
            self.transformer, self.autoencoder = build_transformer(), build_autoencoder()
            self.plan = {"transformer": self.transformer.plan, "autoencoder": self.autoencoder.plan}

    # ---- generation ----

    def __call__(self, prompt: str | Sequence[str] | None = None, width: int | None = None, height: int | None = None,
                 num_steps: int | None = None, guidance: float | None = None,
                 seed: int | Sequence[int] | None = DEFAULT_SEED, num_images_per_prompt: int = 1,
                 output_type: str = "pil", progress: bool | None = None,
                 callback: Callable[[int, int], None] | None = None, negative_prompt: str | Sequence[str] | None = None,
                 true_cfg_scale: float | None = None, *, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, max_sequence_length: int | None = None,
                 loras: Mapping[str, float] | Sequence[Mapping[str, float] | None] | None = None,
                 prompt_2: str | Sequence[str] | None = None, negative_prompt_2: str | Sequence[str] | None = None,
                 prompt_embeds: Tensor | None = None, pooled_prompt_embeds: Tensor | None = None,
                 negative_prompt_embeds: Tensor | None = None, negative_pooled_prompt_embeds: Tensor | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None, latents: Tensor | None = None,
                 sigmas: Sequence[float] | None = None, return_dict: bool | None = None,
                 callback_on_step_end: Callable | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",), image=None, mask_image=None,
                 control_image=None, strength: float | None = None, max_area: int | None = None,
                 _auto_resize: bool = True, cache=None):
        """Images for `prompt` (a string or a list): N = prompts x num_images_per_prompt, grouped by prompt.

        output_type: "pil" (a list of PIL images), "pt" (a float tensor [N, 3, H, W] in [0, 1] on the CPU), "np"
        (float32 [N, H, W, 3] in [0, 1]) or "latent" (the packed latents [N, tokens, 64]). return_dict: None (the
        images alone), True (fluxrt.call_inputs.FluxPipelineOutput, .images or out[0]) or False (a tuple (images,)).
        width / height / num_steps / guidance default to the model's (FLUX.1 1024 x 1024; dev 28 steps at 3.5;
        schnell 4 steps and no guidance input, so guidance is ignored); a folder's model_index.json may say otherwise.
        Start noise: seed (an int s gives image k the seed s + k; a list one seed per image; None draws a random s and
        logs it, INFO on logger "fluxrt"; default 0), or diffusers' generator (one torch.Generator for the batch or one
        per image) or latents ([N, tokens, 64], packed); one of the three.
        negative_prompt ("" for the unconditional prompt; one string or one per prompt) with true_cfg_scale > 1 runs
        true classifier-free guidance as diffusers does (two transformer passes a step); both default to the model's
        (off for FLUX.1; the tiny model 3 with ""); a scale > 1 without a negative prompt is an error, a negative
        prompt at scale 1 is ignored with a warning. callback(step, total) after each step.
        diffusers' FluxPipeline arguments with its meaning: num_inference_steps, guidance_scale (passing both a name
        and its fluxrt spelling is an error), max_sequence_length (T5 tokens, 1..512), prompt_2 / negative_prompt_2
        (T5's prompts; default prompt / negative_prompt), prompt_embeds + pooled_prompt_embeds (instead of prompt) and
        negative_prompt_embeds + negative_pooled_prompt_embeds, sigmas (one step per noise level, shifted as the
        model's own schedule), callback_on_step_end(pipe, step_index, timestep, callback_kwargs) -> dict with the
        tensors named in callback_on_step_end_tensor_inputs ("latents", "prompt_embeds"; what it returns replaces
        them). loras (hot-swap mode, enable_lora_hotswap): {name: scale} for every image or one (or None) per prompt.
        The tools modes (fluxrt.modes), as diffusers' pipelines take them: image= + strength= (img2img; default 0.6),
        image= + mask_image= (inpainting; FluxInpaintPipeline's blending with a text-to-image model, the channels of a
        Fill model), control_image= (a Canny / Depth model), image= (a Kontext model: max_area, _auto_resize).
        Images: PIL, numpy or tensors, one or one per prompt. The wrong argument for the loaded model is an error.
        Limits (fluxrt.validation): MAX_STEPS, MAX_PIXELS per image, MAX_IMAGES_PER_CALL. Every argument is checked
        before any work. A prompt longer than the text encoders read is cut, with a warning naming what was dropped.
        NaN or inf latents or pixels raise fluxrt.NonFiniteError instead of returning a broken image.
        cache: step caching for this call (fluxrt.cache: "fbc:0.08", "taylorseer:1:5:5" or a config; None: off; or one
        per prompt), on the compiled transformer; pipe.cache_stats then says what each image computed and skipped.
        """
        text = check_text(prompt, prompt_2, prompt_embeds, pooled_prompt_embeds, self.config)
        mode = ModeArgs.check(self.mode, image, mask_image, control_image, strength, max_area, _auto_resize)
        num_steps = _one_spelling(num_steps, num_inference_steps, "num_steps", "num_inference_steps")
        guidance = _one_spelling(guidance, guidance_scale, "guidance", "guidance_scale")
        length = check_max_sequence_length(self.max_sequence_length if max_sequence_length is None
                                           else max_sequence_length)
        width, height = mode.output_size(*check_size(self.default_size[0] if width is None else width,
                                                     self.default_size[1] if height is None else height))
        num_steps, sigmas = self.resolve_steps(num_steps, sigmas, mode.mode)
        per_prompt = check_images_per_prompt(num_images_per_prompt)
        count = check_image_count(len(text), per_prompt)
        noise = self._noise_source(seed, generator, latents, count, width, height)
        mode.check_batch(count, len(text), noise.generator, noise.latents)
        guidance = self.resolve_guidance(guidance, mode.mode)
        negative, cfg_scale = self._resolve_negative(
            check_negative_text(negative_prompt, negative_prompt_2, negative_prompt_embeds,
                                negative_pooled_prompt_embeds, self.config, len(text)), true_cfg_scale, len(text))
        check_embeds_match(text, negative)
        check_output(output_type, return_dict)
        progress = self.progress if progress is None else check_flag(progress, "progress")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be a function (step, total) -> None, got {type(callback).__name__}")
        tensor_inputs = check_step_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        step_cache = self.check_cache(cache, len(text))
        with self._lock, torch.inference_mode():
            # under the lock: a LoRA loaded or unloaded by another thread cannot move the slots in between
            lora_scales = self._per_image_lora_scales(loras, len(text), per_prompt)
            txt, vec = (f.repeat_interleave(per_prompt, 0) for f in self._encode(text, length))
            if negative is not None:
                negative = tuple(f.repeat_interleave(per_prompt, 0) for f in self._encode(negative, length))
            hook = None if callback_on_step_end is None else step_hook(self, callback_on_step_end, tensor_inputs,
                                                                         self.device)
            result = self._denoise_and_decode(txt, vec, width, height, num_steps, guidance, noise, progress, callback,
                                              negative, cfg_scale, lora_scales, sigmas=sigmas, on_step_end=hook,
                                              decode=output_type != "latent", mode=mode,
                                              step_cache=None if step_cache is None else
                                              [c for c in step_cache for _ in range(per_prompt)])
        return format_output(result, output_type, return_dict)

    def resolve_steps(self, num_steps, sigmas=None, mode: str = "text-to-image") -> tuple[int, list[float] | None]:
        """(steps, sigmas) of a call: one step per sigma when sigmas are given (a num_steps given too must agree),
        else num_steps or the default (the model's; diffusers' Fill pipeline's 50 for a Fill model)."""
        if num_steps is not None:
            num_steps = check_steps(num_steps)
        sigmas = check_sigmas(sigmas, num_steps)
        if sigmas is not None:
            return len(sigmas), sigmas
        return (modes.DEFAULT_STEPS.get(mode, self.default_steps) if num_steps is None else num_steps), None

    def _noise_source(self, seed, generator, latents, count: int, width: int, height: int) -> NoiseSource:
        """A call's start noise, checked: latents, diffusers' generator(s) or per-image seeds (one of them)."""
        check_noise_sources(seed, generator, latents)
        if latents is not None:
            return NoiseSource(latents=check_latents(latents, count, width, height, self.config.out_channels))
        if generator is not None:
            return NoiseSource(generator=check_generator(generator, count, self.device))
        seeds = check_seeds(seed, count)
        if seed is None:
            logger.info("seed=None: drew seed %d (image k gets %d + k); pass seed=%d to make these images again",
                        seeds[0], seeds[0], seeds[0])
        return NoiseSource(seeds=seeds)

    def start_noise(self, noise: NoiseSource, count: int, width: int, height: int) -> Tensor:
        """Packed start latents [count, tokens, 64] in the pipeline's dtype, on its device."""
        if noise.latents is not None:
            return noise.latents.to(self.device, self.dtype)
        if noise.generator is not None:
            unpacked = sampling.noise_from_generators(count, height, width, noise.generator, self.dtype, self.device)
        else:
            unpacked = sampling.get_noise(count, height, width, seed=noise.seeds, dtype=self.dtype, device=self.device)
        return sampling.pack(unpacked)

    def _encode(self, text: TextInput, length: int) -> tuple[Tensor, Tensor]:
        """(T5 embeddings, CLIP pooled) of one side of a call's text: its prompts encoded, or its embeddings moved."""
        if text.embeds is not None:
            return tuple(f.to(self.device, self.dtype) for f in text.embeds)
        return self.encode_prompt(text.prompts, length, prompts_2=text.prompts_2)

    def resolve_guidance(self, guidance, mode: str = "text-to-image") -> float | None:
        """The guidance a call runs with: for None the default (the model's; diffusers' img2img / inpaint pipelines'
        7.0 and Fill's 30 in those modes); always None for schnell, which has no guidance input (diffusers ignores it
        there too; a given value is still checked)."""
        if guidance is not None:
            guidance = check_guidance(guidance)
        if not self.config.guidance_embed:
            return None
        return modes.DEFAULT_GUIDANCE.get(mode, self.default_guidance) if guidance is None else guidance

    def resolve_true_cfg(self, negative_prompt, true_cfg_scale, num_prompts: int) -> tuple[list[str] | None, float]:
        """(one negative prompt per prompt, or None when true CFG is off; the scale) a call runs with."""
        negative = check_negative_text(negative_prompt, None, None, None, self.config, num_prompts)
        negative, scale = self._resolve_negative(negative, true_cfg_scale, num_prompts)
        return (None if negative is None else negative.prompts), scale

    def _resolve_negative(self, given: TextInput | None, true_cfg_scale,
                          num_prompts: int) -> tuple[TextInput | None, float]:
        """(the negative side of true CFG, or None when it is off; the scale): the caller's negative prompts or
        embeddings, else the model's default negative prompt."""
        scale = check_true_cfg_scale(self.default_true_cfg_scale if true_cfg_scale is None else true_cfg_scale)
        negative = given
        if negative is None and self.default_negative_prompt is not None:
            defaults = [self.default_negative_prompt] * num_prompts
            negative = TextInput(defaults, defaults)
        if scale == 1:
            if given is not None:  # only the caller's own negative prompt is worth a word; the model's is simply off
                logger.warning("negative_prompt is ignored at true_cfg_scale=1 (true classifier-free guidance is off); "
                               "pass true_cfg_scale > 1 to use it")
            return None, scale
        if negative is None:
            raise ValueError(f"true_cfg_scale={scale:g} needs a negative_prompt to guide away from: pass "
                             "negative_prompt=\"\" for the unconditional prompt, or true_cfg_scale=1 to turn it off")
        return negative, scale

    def encode_prompt(self, prompts: Sequence[str], max_sequence_length: int | None = None, *,
                      prompts_2: Sequence[str] | None = None) -> tuple[Tensor, Tensor]:
        """(T5 last_hidden_state [N, 512|256, 4096], CLIP pooler_output [N, 768]) in the transformer's dtype.
        prompts_2: T5's prompts (diffusers' prompt_2), one per prompt; default `prompts`."""
        prompts = check_prompt(prompts)
        prompts_2 = prompts if prompts_2 is None else check_negative_prompt(prompts_2, len(prompts), "prompts_2")
        length = check_max_sequence_length(self.max_sequence_length if max_sequence_length is None
                                           else max_sequence_length)
        with self._lock, torch.inference_mode():
            self._warn_if_truncated(prompts, length, prompts_2)
            if self.offload_text_encoders:
                self._move_text_encoders(self.device)
            try:
                t5_ids = self.t5_tokenizer(prompts_2, padding="max_length", max_length=length,
                                           truncation=True, return_tensors="pt").input_ids
                clip_ids = self.clip_tokenizer(prompts, padding="max_length", max_length=CLIP_LENGTH,
                                               truncation=True, return_tensors="pt").input_ids
                # No attention mask, as FLUX was trained: padding tokens are part of the conditioning.
                txt = self.t5_encoder(t5_ids.to(self.device), output_hidden_states=False)[0]
                vec = self.clip_encoder(clip_ids.to(self.device), output_hidden_states=False).pooler_output
            finally:
                if self.offload_text_encoders:
                    self._move_text_encoders("cpu")
            return txt.to(self.device, self.dtype), vec.to(self.device, self.dtype)

    def _warn_if_truncated(self, prompts: list[str], t5_length: int, prompts_2: list[str]) -> None:
        """One warning per prompt that does not fit the encoders (T5 reads prompts_2 to max_sequence_length tokens,
        CLIP prompts to 77), saying how many tokens each one drops: what is cut never reaches the model."""
        encoders = (("T5", self.t5_tokenizer, t5_length, prompts_2),
                    ("CLIP", self.clip_tokenizer, CLIP_LENGTH, prompts))
        lengths = {name: [len(ids) for ids in tokenizer(texts, truncation=False, verbose=False).input_ids]
                   for name, tokenizer, _, texts in encoders}
        for k, prompt in enumerate(prompts):
            cut = [f"{name} keeps {limit} of {lengths[name][k]} tokens ({lengths[name][k] - limit} dropped)"
                   for name, _, limit, _ in encoders if lengths[name][k] > limit]
            if cut:
                both = prompt if prompts_2[k] == prompt else f"{prompt} / {prompts_2[k]}"  # CLIP's / T5's
                logger.warning("prompt %d is longer than the text encoders read: %s; the end of %r is ignored", k,
                               ", ".join(cut), _shorten(both))

    def _denoise_and_decode(self, txt: Tensor, vec: Tensor, width: int, height: int, num_steps: int,
                            guidance: float | None, noise: NoiseSource, progress: bool, callback,
                            negative: tuple[Tensor, Tensor] | None = None, cfg_scale: float = 1.0,
                            lora_scales: Tensor | None = None, sigmas: list[float] | None = None,
                            on_step_end: sampling.StepHook | None = None, decode: bool = True,
                            mode: ModeArgs | None = None, step_cache=None) -> Tensor:
        """negative: the negative prompts' (txt, vec), one row per image, for true CFG at cfg_scale; None: off.
        lora_scales: [images, adapter slots] for the hot-swapped LoRAs (None: the loaded scales). sigmas: the noise
        levels to step through (None: the model's schedule of num_steps). decode=False returns the packed latents.
        mode: the call's image arguments (fluxrt.modes): start latents, timesteps, conditioning and step hook.
        step_cache: fluxrt.cache configs, one per image (None: no cache): each image (and each negative pass of true
        CFG) gets its own state."""
        from tqdm.auto import tqdm

        batch = txt.shape[0]
        rows, cols = sampling.latent_grid(height, width)
        timesteps = self.schedule(num_steps, rows * cols, sigmas)
        self._cache_runs = []
        model = self._transformer_call(batch, lora_scales, step_cache)
        negative_model = None if negative is None else self._transformer_call(batch, lora_scales, step_cache)
        if mode is None or mode.mode == "text-to-image":
            img = self.start_noise(noise, batch, width, height)
        else:
            prepared = self.prepare_mode(mode, noise, batch, width, height, timesteps)
            img, timesteps, model = prepared.start, prepared.timesteps, prepared.wrap(model)
            negative_model = None if negative is None else prepared.wrap(negative_model)
            on_step_end = modes.chain_hooks(prepared.hook, on_step_end)
        img_ids = sampling.prepare_img_ids(batch, height, width, device=self.device)
        txt_ids = sampling.prepare_txt_ids(batch, txt.shape[1], device=self.device)
        with tqdm(total=len(timesteps) - 1, desc="fluxrt", unit="step", disable=not progress, leave=False) as bar:
            def step_done(step: int, total: int) -> None:
                bar.update(1)
                if callback is not None:
                    callback(step, total)

            if negative is not None:
                model = sampling.true_cfg(model, *negative, cfg_scale, negative_model=negative_model)
            latents = sampling.denoise(model, img, img_ids, txt, txt_ids, vec, timesteps, guidance=guidance,
                                       callback=step_done, on_step_end=on_step_end)  # NonFiniteError names the step
        return self.decode(latents, height, width) if decode else latents

    @property
    def cache_stats(self) -> list[dict | None] | None:
        """Per image of the last call with cache=: {"computed": steps, "skipped": steps} (and "negative": the same for
        its true-CFG negative pass), None for an image without cache; None when the last call ran no cache."""
        if not getattr(self, "_cache_runs", None):
            return None
        positive, *negative = self._cache_runs
        stats = [None if state is None else dict(state.stats) for state in positive]
        for row, state in zip(stats, negative[0] if negative else ()):
            if row is not None:
                row["negative"] = dict(state.stats)
        return stats

    def check_cache(self, spec, prompts: int | None = None):
        """A call's cache= (one spec or config for every prompt, or a list of one per prompt) as a list of configs
        per prompt, or None when no prompt caches; prompts=None: one spec, returned as its config. Refused unless the
        transformer is compiled."""
        from .transformer import FastFlux

        if prompts is None:
            configs = [cache.parse(spec)]
        elif isinstance(spec, (list, tuple)):
            if len(spec) != prompts:
                raise ValueError(f"cache has {len(spec)} entries for {prompts} prompts: give one for every prompt, or "
                                 "one per prompt")
            configs = [cache.parse(s) for s in spec]
        else:
            configs = [cache.parse(spec)] * prompts
        if all(c is None for c in configs):
            return None
        if not isinstance(self.transformer, FastFlux):
            raise ValueError("cache= runs on the compiled transformer: build the pipeline with compile=True (the "
                             "default on a GPU) or call pipe.accelerate() first")
        return configs[0] if prompts is None else configs

    def _transformer_call(self, batch: int, lora_scales: Tensor | None, step_cache):
        """The transformer with the call's per-image arguments bound: LoRA scales, and fresh step-cache states (their
        stats go to self.cache_stats)."""
        kwargs = {}
        if lora_scales is not None:
            kwargs["lora_scales"] = lora_scales
        if step_cache is not None:
            kwargs["cache_states"] = cache.states(step_cache, batch)
            self._cache_runs.append(kwargs["cache_states"])
        return functools.partial(self.transformer, **kwargs) if kwargs else self.transformer

    def decode(self, latents: Tensor, height: int, width: int) -> Tensor:
        """Packed latents [N, tokens, 64] -> pixels [N, 3, H, W] in [0, 1] on the CPU (one autoencoder call).
        NonFiniteError for NaN or inf pixels."""
        image = self.autoencoder.decode(sampling.unpack(latents, height, width).to(self.vae_dtype))
        image = image.float()
        if not torch.isfinite(image).all():  # clamp would keep NaN, and to_pil would turn it into black silently
            raise NonFiniteError(f"the autoencoder decoded NaN or inf pixels ({self.vae_dtype}) from finite latents; "
                                 "check the autoencoder's weights, and run it in bf16 or fp32 (fp16 overflows)")
        return (image / 2 + 0.5).clamp(0, 1).cpu()

    def prepare_mode(self, mode: ModeArgs, noise: NoiseSource, batch: int, width: int, height: int,
                      timesteps: list[float]) -> modes.Prepared:
        """An image mode's start, timesteps, conditioning and hook; its random draws in diffusers' order, from one
        generator per image (the seeds' own, or the caller's)."""
        generators = modes.generators_for(mode.mode, noise.seeds, noise.generator)

        def draw() -> Tensor:  # unpacked start noise, drawn when the mode's order says
            if generators is not None:
                return sampling.noise_from_generators(batch, height, width, generators, self.dtype, self.device)
            return sampling.unpack(self.start_noise(noise, batch, width, height), height, width)

        return modes.prepare(mode, self.autoencoder, batch, width, height, timesteps, generators, draw, self.device,
                             self.dtype)

    def schedule(self, num_steps: int, image_seq_len: int, sigmas: list[float] | None) -> list[float]:
        """The timesteps of a call: dev shifts them by the image's token count, schnell does not (given sigmas
        too, as diffusers' scheduler shifts them for each model)."""
        shift = self.config.guidance_embed
        if sigmas is None:
            return sampling.get_schedule(num_steps, image_seq_len, shift=shift)
        return sampling.schedule_from_sigmas(sigmas, image_seq_len, shift=shift)

    # ---- LoRA ----

    @property
    def loras(self) -> dict[str, float]:
        """The LoRAs applied, {name: scale}, in the order they were loaded."""
        return {name: entry[1] for name, entry in self._loras.items()}

    @property
    def lora_branches(self) -> LoraBranches | None:
        """The compiled transformer's LoRA side branches in hot-swap mode (per_image_scales for a batch), else None."""
        return self._branches()

    @property
    def lock(self) -> threading.RLock:
        """The lock every call holds: hold it to run the transformer yourself between calls (fluxrt.serve's step
        batcher), so a LoRA load on another thread waits for the step's end."""
        return self._lock

    @property
    def lora_hotswap(self) -> bool:
        """Whether LoRAs run as side branches of the compiled transformer (enable_lora_hotswap) instead of fused."""
        return self._branches() is not None

    def enable_lora_hotswap(self, max_rank: int = 64, max_adapters: int = 4) -> None:
        """Run LoRAs as side branches of the compiled transformer (fluxrt.lora_branch) instead of fusing them:
        loading, unloading and scale changes then rewrite buffers only (no recompile, no CUDA-graph recapture, no
        weight copy), each call may pick its LoRAs (`loras=`), and one batch may mix them (serving). Costs a branch per
        linear each step and max_rank x (in + out) values per linear (about 0.6 GB for FLUX.1-dev at rank 64 in bf16).
        max_rank: the rank all loaded LoRAs share per layer; max_adapters: how many may be loaded at once. Needs a
        compiled pipeline with no fused LoRA loaded; an FP8 (quantized) transformer enables it at its first LoRA."""
        with self._lock:
            self._refuse_while_parallel("enable_lora_hotswap")
            fast = self._compiled_transformer()
            if self._loras and self._branches() is None:
                raise RuntimeError(f"LoRAs are fused into the weights already ({', '.join(self._loras)}): unload_lora() "
                                   "first, then enable hot-swap and load them again")
            fast.enable_lora_branches(max_rank=max_rank, max_adapters=max_adapters)

    def load_lora(self, path: str | Path, scale: float = 1.0, name: str | None = None) -> str:
        """Apply a FLUX.1 LoRA file at `scale` (fluxrt.load_lora's formats: diffusers/PEFT, kohya, BFL/ComfyUI,
        XLabs); returns its name (default: the file's stem) for set_lora_scales, unload_lora and `loras=`. Several
        LoRAs add up, each at its own scale. By default it is fused into the transformer's bf16/fp32 weights (the
        compiled transformer runs the same weights), exactly undone by unload_lora; in hot-swap mode
        (enable_lora_hotswap, and always for a quantized FP8 transformer, where fusing would add requantization
        error) it runs as a side branch. The file and its fit to this model are checked before anything changes."""
        with self._lock:
            self._refuse_while_parallel("load_lora")
            scale = _check_lora_scale(scale, "scale")
            name = Path(path).stem if name is None else name
            if not isinstance(name, str) or not name:
                raise TypeError(f"name must be a non-empty string, got {name!r}")
            if name in self._loras:
                raise ValueError(f"a LoRA named {name!r} is loaded already: pass another name=, or unload_lora({name!r})")
            lora = load_lora(path, config=self.config)
            branches = self._branches()
            if branches is None and self.transformer_quantized:
                if isinstance(self.transformer, Flux):
                    raise RuntimeError("this transformer holds FP8 weights, which take a LoRA only as a side branch of "
                                       "the compiled transformer (fusing would requantize them): compile the pipeline "
                                       "(compile=True or pipe.accelerate()) before loading LoRAs")
                branches = self._compiled_transformer().enable_lora_branches()
            if branches is not None:
                branches.load(name, lora, scale)
                self._loras[name] = [lora, scale, None]
            else:
                self._loras[name] = [lora, scale, lora.fuse(self._base_transformer(), scale)]
            return name

    def set_lora_scales(self, scales: dict[str, float]) -> None:
        """Change loaded LoRAs' scales ({name: scale}); every name and scale is checked before anything changes."""
        with self._lock:
            self._refuse_while_parallel("set_lora_scales")
            if not isinstance(scales, dict):
                raise TypeError(f"scales must be a dict {{name: scale}}, got {type(scales).__name__}")
            checked = {self._known_lora(name): _check_lora_scale(value, f"scales[{name!r}]")
                       for name, value in scales.items()}
            branches = self._branches()
            if branches is not None:
                branches.set_scales(checked)
            else:
                self._unfuse_all()
            for name, value in checked.items():
                self._loras[name][1] = value
            if branches is None:
                self._fuse_all()

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA (or all of them, name=None): the output is then exactly the one without it (fused: the
        weights come back bit for bit; hot-swapped: its branch columns are zeroed)."""
        with self._lock:
            self._refuse_while_parallel("unload_lora")
            names = list(self._loras) if name is None else [self._known_lora(name)]
            branches = self._branches()
            if branches is None:
                self._unfuse_all()
            for gone in names:
                if branches is not None:
                    branches.unload(gone)
                del self._loras[gone]
            if branches is None:
                self._fuse_all()

    # ---- context parallelism ----

    def context_parallel(self, scheme: str = "ulysses", ulysses_degree: int | None = None,
                         keepalive_s: float | None = None):
        """Run the transformer over every rank of fluxrt.parallel.init()'s group (fluxrt.parallel_engine): every rank
        builds the same pipeline, then

            with pipe.context_parallel("ulysses") as leading:
                if leading:                       # rank 0: call the pipeline as usual
                    image = pipe(prompt)[0]

        Rank 0 encodes the text, samples and decodes; the others run their shard of each transformer call and enter
        the block (leading=False) once rank 0 has left it. Set LoRAs up before: while it runs, load_lora and the other
        weight changes are refused (they would change rank 0's weights only)."""
        from .parallel_engine import context_parallel

        return context_parallel(self, scheme, ulysses_degree, keepalive_s)

    def _refuse_while_parallel(self, what: str) -> None:
        from .parallel_engine import Leader

        if isinstance(self.transformer, Leader):
            raise RuntimeError(f"{what} changes the weights of this rank only while the transformer runs context-"
                               "parallel: do it on every rank before pipe.context_parallel()")

    def _known_lora(self, name) -> str:
        if name not in self._loras:
            raise KeyError(f"no LoRA named {name!r} is loaded (loaded: {sorted(self._loras) or 'none'})")
        return name

    def _compiled_transformer(self):
        from .transformer import FastFlux

        if not isinstance(self.transformer, FastFlux):
            raise RuntimeError("LoRA hot-swap runs on the compiled transformer: build the pipeline with compile=True "
                               "(the default on a GPU) or call pipe.accelerate() first")
        return self.transformer

    def _branches(self) -> LoraBranches | None:
        return getattr(self.transformer, "lora", None) if not isinstance(self.transformer, Flux) else None

    @property
    def transformer_quantized(self) -> bool:
        """Whether the transformer holds FP8 weights, which take LoRAs as side branches only (never fused)."""
        return any(isinstance(m, FP8Linear) for m in self._base_transformer().modules())

    def _base_transformer(self) -> Flux:
        """The fluxrt.reference.Flux whose weights the transformer runs (a compiled FastFlux and a context-parallel
        Leader share them)."""
        return self.transformer if isinstance(self.transformer, Flux) else self.transformer.model

    def _unfuse_all(self) -> None:
        """Unfuse every LoRA, last fused first (the order in which each restore is exact)."""
        for entry in reversed(list(self._loras.values())):
            entry[2].unfuse()
            entry[2] = None

    def _fuse_all(self) -> None:
        for entry in self._loras.values():
            entry[2] = entry[0].fuse(self._base_transformer(), entry[1])

    def check_lora_choice(self, choice) -> dict[str, float] | None:
        """A call's or request's LoRA choice ({name: scale}) checked against the loaded LoRAs: a dict of floats, or
        None (the loaded scales). ValueError / KeyError / TypeError naming what is wrong."""
        if choice is None:
            return None
        if self._branches() is None:
            raise ValueError("choosing LoRAs per call or request needs hot-swap mode (pipe.enable_lora_hotswap() "
                             "before loading them): fused LoRAs apply to every image")
        if not isinstance(choice, Mapping):
            raise TypeError(f"a LoRA choice is a dict {{name: scale}}, got {type(choice).__name__}")
        return {self._known_lora(name): check_scale(scale, f"the scale of LoRA {name!r}") for name, scale in
                choice.items()}

    def _per_image_lora_scales(self, loras, prompts: int, per_prompt: int) -> Tensor | None:
        """A call's `loras` as the transformer's lora_scales [images, adapter slots] (None: the loaded scales)."""
        if loras is None:
            return None
        if isinstance(loras, Mapping):
            choices = [self.check_lora_choice(loras)] * prompts
        elif isinstance(loras, Sequence) and not isinstance(loras, str) and len(loras) == prompts:
            choices = [self.check_lora_choice(choice) for choice in loras]
        else:
            raise TypeError(f"loras must be a dict {{name: scale}} or a list of {prompts} of them (one per prompt), got "
                            f"{type(loras).__name__}{f' of {len(loras)}' if isinstance(loras, Sequence) else ''}")
        per_image = [choice for choice in choices for _ in range(per_prompt)]
        return self._branches().per_image_scales(per_image)

    def generate(self, requests, max_batch_size: int = 4):
        """Serving entry point: a list of fluxrt.GenerationRequest -> a list of fluxrt.GenerationResult, in order (a
        single request or a string is a TypeError: pass [request]). See fluxrt.serving."""
        from .serving import generate

        return generate(self, requests, max_batch_size=max_batch_size)

    def _move_text_encoders(self, device) -> None:
        self.clip_encoder.to(device)
        self.t5_encoder.to(device)


def _one_spelling(fluxrt_value, diffusers_value, fluxrt_name: str, diffusers_name: str):
    """The value of an argument fluxrt and diffusers name differently; TypeError when both are given."""
    if fluxrt_value is not None and diffusers_value is not None:
        raise TypeError(f"pass {fluxrt_name} or {diffusers_name} (diffusers' name for it), not both")
    return diffusers_value if fluxrt_value is None else fluxrt_value


def _check_lora_scale(scale, what: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"{what} must be a finite number (a LoRA's scale), got {scale!r}")
    return float(scale)


def _shorten(text: str, keep: int = 60) -> str:
    return text if len(text) <= keep else text[: keep - 3] + "..."


SAMPLING_KEY = "_fluxrt_sampling"  # model_index.json: a model's own defaults (diffusers ignores "_" keys)
INT_SAMPLING_FIELDS = ("num_steps", "max_sequence_length", "width", "height")
SAMPLING_FIELDS = INT_SAMPLING_FIELDS + ("true_cfg_scale", "negative_prompt")


def check_sampling_defaults(defaults, where: str) -> dict:
    """A model's sampling defaults: a dict of some of SAMPLING_FIELDS: positive ints (width/height multiples of 16),
    true_cfg_scale a number >= 1, negative_prompt a string."""
    ints = {k: v for k, v in defaults.items() if k in INT_SAMPLING_FIELDS} if isinstance(defaults, dict) else {}
    if not isinstance(defaults, dict) or set(defaults) - set(SAMPLING_FIELDS) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in ints.values()):
        raise CheckpointError(f"{where} must map some of {SAMPLING_FIELDS} to values (positive ints; true_cfg_scale a "
                              f"number >= 1; negative_prompt a string), got {defaults!r}")
    try:
        check_steps(defaults.get("num_steps", 1))
        check_size(defaults.get("width", 1024), defaults.get("height", 1024))
        check_true_cfg_scale(defaults.get("true_cfg_scale", 1.0))
        check_prompt(defaults.get("negative_prompt", ""), "negative_prompt")
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: {err}") from None
    if not isinstance(defaults.get("negative_prompt", ""), str):
        raise CheckpointError(f"{where}: negative_prompt must be one string, got {defaults['negative_prompt']!r}")
    return defaults


def sampling_defaults(path) -> dict:
    """The sampling defaults a diffusers-layout model folder records in its model_index.json (SAMPLING_KEY), or {}.
    Read before any weight is loaded, so callers (the CLI) can check a request against them first."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return {}
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{index} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{index} must hold a JSON object, got {type(data).__name__}")
    return check_sampling_defaults(data.get(SAMPLING_KEY, {}), f"{index}'s {SAMPLING_KEY}")


def _one_dtype(dtype, torch_dtype):
    """dtype= or its diffusers name torch_dtype=; both only when they agree."""
    if torch_dtype is None:
        return dtype
    if dtype is not None and dtype != torch_dtype:
        raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; torch_dtype is diffusers' name "
                         "for dtype: pass one of them")
    return torch_dtype


def _as_path(value, what: str) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path (str or pathlib.Path), got {type(value).__name__} {value!r}")
    path = Path(value)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist")
    return path


def _find_parts(path, transformer, autoencoder, text_encoders) -> tuple[Path, Path, Path]:
    """(transformer, autoencoder, text-encoder folder) from from_pretrained's path and overrides, all checked to
    exist."""
    path = _as_path(path, "path")
    overrides = {"transformer": transformer, "autoencoder": autoencoder, "text_encoders": text_encoders}
    parts = {name: _as_path(value, name) for name, value in overrides.items() if value is not None}
    if path.is_dir():
        parts.setdefault("transformer", _find_transformer(path))
        parts.setdefault("autoencoder", _find_autoencoder(path))
        parts.setdefault("text_encoders", path)
    elif "autoencoder" not in parts or "text_encoders" not in parts:
        raise ValueError(f"{path} is a single transformer file: pass autoencoder= (ae.safetensors) and "
                         "text_encoders= (a folder with tokenizer, text_encoder, tokenizer_2, text_encoder_2)")
    else:
        parts.setdefault("transformer", path)
    missing = [name for name in TEXT_FOLDERS if not (parts["text_encoders"] / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"{parts['text_encoders']} lacks the text-encoder folders {missing} (diffusers "
                                f"layout: {', '.join(TEXT_FOLDERS)}); pass text_encoders= a folder that has them")
    return parts["transformer"], parts["autoencoder"], parts["text_encoders"]


@contextlib.contextmanager
def _loading_bars(progress: bool):
    """transformers draws a "Loading weights" bar per text encoder (older versions: "Loading checkpoint shards").
    from_pretrained has no per-call switch for it, only transformers' process-wide one: turn it off for the load
    and put back what was there."""
    from transformers.utils import logging as hf_logging

    if progress or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


def _find_transformer(folder: Path) -> Path:
    if (folder / "transformer").is_dir():
        return folder / "transformer"
    files = sorted(f for f in folder.glob("*.safetensors") if f.name != "ae.safetensors")
    if len(files) != 1:
        found = [f.name for f in files] or "none"
        raise FileNotFoundError(f"{folder} has no transformer/ folder and not exactly one transformer .safetensors "
                                f"file (found: {found}); pass transformer=")
    return files[0]


def _find_autoencoder(folder: Path) -> Path:
    for candidate in (folder / "vae", folder / "ae.safetensors"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{folder} has neither a vae/ folder nor ae.safetensors; pass autoencoder=")


def _load_text_encoders(folder: Path, dtype: torch.dtype, device: torch.device) -> tuple:
    import transformers
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    # transformers renamed torch_dtype to dtype in 4.56; older versions would silently ignore the new name.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    # safetensors only (never unpickle) and local files only (never the network)
    load = dict(use_safetensors=True, local_files_only=True, **{dtype_kw: dtype})
    clip_tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    t5_tokenizer = T5TokenizerFast.from_pretrained(str(folder / "tokenizer_2"), local_files_only=True)
    clip = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), **load)
    t5 = T5EncoderModel.from_pretrained(str(folder / "text_encoder_2"), **load)
    return (clip_tokenizer, clip.to(device).eval().requires_grad_(False),
            t5_tokenizer, t5.to(device).eval().requires_grad_(False))
