"""The batchers a serving engine's one worker thread drives: how queued jobs share the transformer.

    batcher = make_batcher("step", pipe, max_batch=8)
    if batcher.admits(request):            # a request resolved by fluxrt.serving.resolve
        batcher.admit(job_id, request)
    finished = batcher.step()             # {job_id: fluxrt.GenerationResult} of the jobs done in this step

- "serial": one job at a time, start to end, in one step().
- "request": request-level batching, as pipe.generate batches: compatible jobs (generate's key: size, steps,
  guidance, true-CFG scale, mode) admitted while the batcher is idle run start to end as one batch in one step().
- "step": step-level (continuous) batching. Jobs of one size run as rows of one transformer call per denoising
  step, each with its own schedule (steps), position in it, seed, guidance, true CFG (its negative pass as extra
  rows of the same call, combined after) and LoRA choice (per-row lora_scales, hot-swap mode). Jobs admitted between
  steps join at the next step (their prompts encoded together in one encoder call); a row whose last step is done
  leaves, and the rows that finish together are decoded together. The image modes run as rows too, each with its
  own start latents and strength-cut schedule (img2img, inpainting), inpainting blend after each step, conditioning
  channels (Fill, Canny/Depth) or reference tokens (Kontext: rows of one reference size share a call). On a
  text-to-image model, text-to-image, img2img and inpainting jobs of one size share one call.

max_batch counts jobs; a call's rows are the jobs plus one per job with true CFG (padded to a power of two when the
transformer replays CUDA graphs: StepBatcher.row_buckets). The engine offers its queue's head (admits) and waits
while it cannot join, so jobs run in arrival order.

Progress (GenerationRequest.on_step, after every step) and live previews (on_preview, every preview_every steps:
fluxrt.preview of the row's denoised estimate x_t - t * velocity, from its fp32 latents; the image stays the one a job without previews gets) come from the
step batcher only, after a row's step, progress first. The request and serial batchers run pipe.generate, which
takes no per-step callback (and the pipeline's callback_on_step_end rounds the running latents to the model's dtype
each step, which would change a bf16 image), so they give none: the engine refuses such jobs at submit
(fluxrt.serve.engine).

Every kind gives each job the image pipe.generate([request]) gives it alone, up to one 8-bit level from batched
summation order, and a job's failure (NaN/inf latents: fluxrt.NonFiniteError; a run-time error) is its own result's
error, in generate's words, never the other jobs'. Only the engine's one worker thread may call a batcher.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import sampling
from ..cache import ImageCache
from ..cache import states as cache_states
from ..call_inputs import NoiseSource, to_pil
from ..modes import ModeArgs
from ..preview import LatentPreview
from ..serving import GenerationRequest, GenerationResult, batch_key, kontext_reference_size
from ..validation import NonFiniteError, check_batch_size

KINDS = ("step", "request", "serial")


def make_batcher(kind: str, pipe, max_batch: int) -> "Batcher":
    """The batcher of `kind` ("step", "request" or "serial") over `pipe`, at most max_batch jobs in flight (serial:
    one whatever max_batch says)."""
    if kind not in KINDS:
        raise ValueError(f"batching must be one of {list(KINDS)}, got {kind!r}")
    max_batch = check_batch_size(max_batch)
    if kind == "step":
        return StepBatcher(pipe, max_batch)
    return RequestBatcher(pipe, 1 if kind == "serial" else max_batch)


def _check_resolved(request) -> GenerationRequest:
    if not isinstance(request, GenerationRequest) or request.num_steps is None or request.seed is None:
        raise ValueError("a batcher takes requests resolved by fluxrt.serving.resolve(pipe, request) (steps and seed "
                         f"filled in), got {request!r}")
    return request


def _error_text(err: Exception) -> str:
    """A run-time failure in pipe.generate's words."""
    return f"{type(err).__name__}: {err}"


class Batcher:
    """The interface the engine drives (see the module docstring); only its one worker thread calls it."""

    group_words = "group"  # what group_of compares, in words (admit's error)

    def __init__(self, pipe, max_batch: int):
        self.pipe = pipe
        self.max_batch = check_batch_size(max_batch)
        # (rows in the last step's transformer batch, seconds of the step); request / serial: the batch's images
        self.last_step: tuple[int, float] | None = None
        self._dropped: set[Hashable] = set()
        self._group: tuple | None = None  # group_of the jobs in flight
        self._last_asked: tuple = (None, None)  # (request, its group): the engine asks about its queue's head each step

    def group_of(self, request: GenerationRequest) -> tuple:
        """What jobs must share to be in flight together."""
        raise NotImplementedError

    def admits(self, request: GenerationRequest) -> bool:
        """May this (resolved) request join now: nothing in flight, or room left and the same group."""
        if len(self) == 0:
            return True
        return len(self) < self.max_batch and self._group_of(request) == self._group

    def admit(self, key: Hashable, request: GenerationRequest) -> None:
        """Take a job (ask admits first); `key` names it in step()'s results and in drop."""
        request = _check_resolved(request)
        if key in self._keys():
            raise ValueError(f"job {key!r} is in flight already: each job needs its own key")
        if not self.admits(request):
            raise ValueError(f"job {key!r} cannot join now (max_batch {self.max_batch} jobs in flight, or another "
                             f"{self.group_words} than theirs): ask admits() first")
        if len(self) == 0:
            self._group = self._group_of(request)
        self._dropped.discard(key)
        self._add(key, request)

    def step(self) -> dict:
        raise NotImplementedError

    def drop(self, key: Hashable) -> None:
        """Cancel a job: it leaves at the next step boundary with no result (a key not in flight: nothing to do, as
        a job may finish while its client goes away)."""
        self._dropped.add(key)

    def __len__(self) -> int:
        raise NotImplementedError

    def _keys(self) -> set:
        raise NotImplementedError

    def _add(self, key: Hashable, request: GenerationRequest) -> None:
        raise NotImplementedError

    def _group_of(self, request: GenerationRequest) -> tuple:
        """group_of, worked out once for the request asked about last (it checks the request's images)."""
        if self._last_asked[0] is not request:
            self._last_asked = (request, self.group_of(request))
        return self._last_asked[1]


class RequestBatcher(Batcher):
    """"request" (and "serial", max_batch 1): jobs admitted while idle that share generate's key run start to end
    as one pipe.generate batch in one step()."""

    group_words = "size, steps, guidance, true-CFG scale or mode"

    def __init__(self, pipe, max_batch: int):
        super().__init__(pipe, max_batch)
        self._jobs: dict[Hashable, GenerationRequest] = {}

    def group_of(self, request: GenerationRequest) -> tuple:
        """pipe.generate's key: one size, steps, guidance, true-CFG scale and mode."""
        return batch_key(self.pipe, request)

    def _keys(self) -> set:
        return set(self._jobs)

    def _add(self, key: Hashable, request: GenerationRequest) -> None:
        self._jobs[key] = request

    def step(self) -> dict:
        jobs = {key: request for key, request in self._jobs.items() if key not in self._dropped}
        self._jobs.clear()
        self._dropped.clear()
        if not jobs:
            return {}
        started = time.perf_counter()
        results = self.pipe.generate(list(jobs.values()), max_batch_size=len(jobs))
        self.last_step = (len(jobs), time.perf_counter() - started)
        return dict(zip(jobs, results))

    def __len__(self) -> int:
        return len(self._jobs)


@dataclass(eq=False)
class _Row:
    """One text-to-image job in the step batcher: its own schedule, position and running fp32 latents."""

    key: Hashable
    request: GenerationRequest
    timesteps: list[float]
    latents: Tensor  # packed [1, L, 64], fp32 (as sampling.denoise keeps them)
    txt: Tensor  # [1, T, C] in the pipeline's dtype
    vec: Tensor
    negative: tuple[Tensor, Tensor] | None  # true CFG's negative (txt, vec), or None when off
    conditioning: "_Conditioning"
    width: int  # of the image generated (Kontext: its output size)
    height: int
    hook: sampling.StepHook | None = None  # the inpainting blend after each step
    position: int = 0  # steps done
    first_bad_step: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    cache: ImageCache | None = None  # its step-cache state (request.cache), and its true-CFG negative pass's
    negative_cache: ImageCache | None = None
    velocity: Tensor | None = None  # the last step's velocity, kept for previews only (their denoised estimate)

    @property
    def done(self) -> bool:
        return self.position == len(self.timesteps) - 1


@dataclass(frozen=True)
class _Conditioning:
    """What an image mode adds to the transformer's input of one row, as its fluxrt.modes wrapper adds it: channels
    appended to each image token (Fill, Canny/Depth; [1, L, c]) or reference tokens and ids appended to the sequence
    (Kontext; [1, L', 64], [1, L', 3]). Empty for text-to-image, img2img and inpainting."""

    channels: Tensor | None = None
    tokens: Tensor | None = None
    ids: Tensor | None = None

    @classmethod
    def of(cls, wrap, start: Tensor, img_ids: Tensor) -> "_Conditioning":
        """Read off a mode's wrapper (fluxrt.modes.Prepared.wrap) by calling it once around a probe that keeps the
        input it would pass the transformer: each row's conditioning then joins a batch exactly as appended alone."""
        seen = {}

        def probe(img, img_ids, **_):
            seen.update(img=img, img_ids=img_ids)
            return torch.zeros(img.shape[0], img.shape[1], start.shape[-1], dtype=img.dtype, device=img.device)

        wrap(probe)(img=start, img_ids=img_ids)
        length, width = start.shape[1], start.shape[2]
        img, ids = seen["img"], seen["img_ids"]
        channels = img[:, :length, width:] if img.shape[2] > width else None
        tokens = img[:, length:] if img.shape[1] > length else None
        return cls(channels, tokens, None if tokens is None else ids[:, length:])

    @property
    def shape_key(self) -> tuple:
        """Rows share a call when their conditioning has the same shape."""
        return (0 if self.channels is None else self.channels.shape[-1], 0 if self.tokens is None else
                self.tokens.shape[1])

    @staticmethod
    def batch(rows: list, img: Tensor, img_ids: Tensor) -> tuple[Tensor, Tensor]:
        """The batch's transformer input (img, img_ids) with each row's conditioning appended, as alone."""
        first = rows[0].conditioning
        if first.channels is not None:
            img = torch.cat([img, torch.cat([row.conditioning.channels for row in rows]).to(img.dtype)], dim=-1)
        if first.tokens is not None:
            img = torch.cat([img, torch.cat([row.conditioning.tokens for row in rows]).to(img.dtype)], dim=1)
            img_ids = torch.cat([img_ids, torch.cat([row.conditioning.ids for row in rows]).to(img_ids)], dim=1)
        return img, img_ids


class StepBatcher(Batcher):
    """"step": step-level (continuous) batching; see the module docstring."""

    group_words = "size (Kontext: or reference size)"

    def __init__(self, pipe, max_batch: int):
        super().__init__(pipe, max_batch)
        self._pending: dict[Hashable, GenerationRequest] = {}  # admitted, joining at the next step
        self._rows: list[_Row] = []
        # A CUDA-graphed transformer captures a graph per batch size (fluxrt.graphs): rows padded up to a few sizes
        # keep the captures few, where every size from 1 to 2 x max_batch (true CFG) would come and go
        self.row_buckets: tuple[int, ...] | None = _row_buckets(pipe, 2 * max_batch)

    def group_of(self, request: GenerationRequest) -> tuple:
        """One output size and, for Kontext, one reference size (they share each transformer call; the T5 length
        is the pipeline's and the conditioning channels the model's, the same for every job)."""
        width, height = self._mode_args(request).output_size(request.width, request.height)
        return width, height, kontext_reference_size(self.pipe, request)

    def _mode_args(self, request: GenerationRequest) -> ModeArgs:
        """The request's image arguments as pipe.generate passes them (Kontext: the requested size is the output's
        pixel budget)."""
        kontext = self.pipe.mode == "kontext" and request.image is not None
        return ModeArgs.check(self.pipe.mode, request.image, request.mask_image, request.control_image,
                              request.strength, max_area=request.width * request.height if kontext else None)

    def _keys(self) -> set:
        return set(self._pending) | {row.key for row in self._rows}

    def _add(self, key: Hashable, request: GenerationRequest) -> None:
        self._pending[key] = request

    def __len__(self) -> int:
        return len(self._pending) + len(self._rows)

    def step(self) -> dict:
        """One denoising step of every row (the joiners' first), then the finished rows decoded."""
        self._leave_dropped()
        if len(self) == 0:
            return {}
        started = time.perf_counter()
        finished: dict[Hashable, GenerationResult] = {}
        with self.pipe.lock, torch.inference_mode():  # a LoRA load on another thread waits for the step's end
            self._join_pending(finished)
            rows = self._advance_rows(finished)
            self._send_progress(finished)  # a step's progress before its preview: one job's events come in order
            self._send_previews(finished)
            self.last_step = (rows, time.perf_counter() - started)
            self._decode_finished(finished)
        return finished

    def _leave_dropped(self) -> None:
        for key in self._dropped & set(self._pending):
            del self._pending[key]
        self._rows = [row for row in self._rows if row.key not in self._dropped]
        self._dropped.clear()

    # ---- joining ----

    def _join_pending(self, finished: dict) -> None:
        """The pending jobs become rows: prompts (and negative prompts) encoded in one call, noise from each seed."""
        if not self._pending:
            return
        jobs = list(self._pending.items())
        self._pending.clear()
        try:
            encoded = self._encode([request for _, request in jobs])
        except Exception:  # noqa: BLE001 -- which job's text fails? each alone
            encoded = None
        for i, (key, request) in enumerate(jobs):
            try:
                features = encoded[i] if encoded is not None else self._encode([request])[0]
                self._rows.append(self._new_row(key, request, *features))
            except Exception as err:  # noqa: BLE001 -- one job's failure must not take the others down
                finished[key] = GenerationResult(request, error=_error_text(err))

    def _encode(self, requests: list[GenerationRequest]) -> list[tuple]:
        """[(txt, vec, negative (txt, vec) or None)] per request, from one encoder call for all their texts."""
        negatives = [r for r in requests if r.negative_prompt is not None]
        texts = [r.prompt for r in requests] + [r.negative_prompt for r in negatives]
        txt, vec = self.pipe.encode_prompt(texts, self.pipe.max_sequence_length)
        out, next_negative = [], len(requests)
        for i, request in enumerate(requests):
            negative = None
            if request.negative_prompt is not None:
                negative = (txt[next_negative : next_negative + 1], vec[next_negative : next_negative + 1])
                next_negative += 1
            out.append((txt[i : i + 1], vec[i : i + 1], negative))
        return out

    def _new_row(self, key: Hashable, request: GenerationRequest, txt: Tensor, vec: Tensor, negative) -> _Row:
        """A job's row: its schedule, start latents and conditioning as pipe's _denoise_and_decode makes them for
        a batch of one (its seed's noise; an image mode's start, strength-cut schedule, conditioning and blend)."""
        pipe, mode = self.pipe, self._mode_args(request)
        width, height = mode.output_size(request.width, request.height)
        rows, cols = sampling.latent_grid(height, width)
        timesteps = pipe.schedule(request.num_steps, rows * cols, None)
        noise = NoiseSource(seeds=[request.seed])
        conditioning, hook = _Conditioning(), None
        if mode.mode == "text-to-image":
            start = pipe.start_noise(noise, 1, width, height)
        else:
            prepared = pipe.prepare_mode(mode, noise, 1, width, height, timesteps)
            start, timesteps, hook = prepared.start, prepared.timesteps, prepared.hook
            img_ids = sampling.prepare_img_ids(1, height, width, device=pipe.device)
            conditioning = _Conditioning.of(prepared.wrap, start, img_ids)
        states = cache_states(request.cache, 1 if negative is None else 2)
        return _Row(key, request, timesteps, start.float(), txt, vec, negative, conditioning, width, height, hook,
                    first_bad_step=torch.zeros((), dtype=torch.int64, device=pipe.device), cache=states[0],
                    negative_cache=states[1] if negative is not None else None)

    # ---- one step ----

    def _advance_rows(self, finished: dict) -> int:
        """One Euler step of every row; returns the transformer batch's rows. A batch that fails at run time is
        retried one row at a time, so only the failing row reports the error."""
        if not self._rows:
            return 0
        try:
            velocities = self._velocities(self._rows)
        except Exception:  # noqa: BLE001 -- which row fails? each alone
            velocities = []
            for row in list(self._rows):
                try:
                    velocities.append(self._velocities([row])[0])
                except Exception as err:  # noqa: BLE001
                    finished[row.key] = GenerationResult(row.request, error=_error_text(err))
                    self._rows.remove(row)
        for row, velocity in zip(list(self._rows), velocities):
            try:
                self._euler(row, velocity)
            except Exception as err:  # noqa: BLE001 -- a step hook's refusal (NaN/inf latents) is the row's alone
                finished[row.key] = GenerationResult(row.request, error=_error_text(err))
                self._rows.remove(row)
        return len(self._rows) + sum(row.negative is not None for row in self._rows)

    def _velocities(self, rows: list[_Row]) -> list[Tensor]:
        """Each row's velocity (fp32 [1, L, 64]) from one transformer call: the rows, then the negative rows of
        those with true CFG (same image, timestep, guidance and LoRAs; the negative prompt), combined as
        sampling.true_cfg combines them."""
        pipe = self.pipe
        guided = [row for row in rows if row.negative is not None]
        texts = [(row.txt, row.vec) for row in rows] + [row.negative for row in guided]
        every = rows + guided
        padding = self._padded(len(every)) - len(every)  # copies of the last row, whose outputs are not read
        every, texts = every + every[-1:] * padding, texts + texts[-1:] * padding
        img = torch.cat([row.latents for row in every]).to(pipe.dtype)
        txt = torch.cat([text for text, _ in texts])
        vec = torch.cat([pooled for _, pooled in texts])
        times = torch.tensor([row.timesteps[row.position] for row in every], dtype=torch.float32, device=pipe.device)
        guidance = None
        if rows[0].request.guidance is not None:  # None for every row of a model without a guidance input
            guidance = torch.tensor([row.request.guidance for row in every], dtype=torch.float32, device=pipe.device)
        extra = {}
        if any(row.request.loras is not None for row in rows):
            extra["lora_scales"] = pipe.lora_branches.per_image_scales([row.request.loras for row in every])
        if any(row.cache is not None for row in rows):  # padding rows: no state (they must not advance one twice)
            extra["cache_states"] = ([row.cache for row in rows] + [row.negative_cache for row in guided]
                                     + [None] * padding)
        img_ids = sampling.prepare_img_ids(len(every), rows[0].height, rows[0].width, device=pipe.device)
        txt_ids = sampling.prepare_txt_ids(len(every), txt.shape[1], device=pipe.device)
        tokens = img.shape[1]
        img, img_ids = _Conditioning.batch(every, img, img_ids)
        pred = pipe.transformer(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=times, y=vec,
                                guidance=guidance, **extra)[:, :tokens].float()  # Kontext: the generated tokens
        velocities = list(pred[: len(rows)].split(1))
        for i, row in enumerate(guided):
            k = rows.index(row)
            positive, negative = velocities[k], pred[len(rows) + i : len(rows) + i + 1]
            velocities[k] = negative + row.request.true_cfg_scale * (positive - negative)
        return velocities

    def _padded(self, rows: int) -> int:
        """The call's batch size: `rows`, or the next of row_buckets."""
        return min((size for size in self.row_buckets or () if size >= rows), default=rows)

    def _euler(self, row: _Row, velocity: Tensor) -> None:
        """sampling.denoise's update of one row, its first non-finite step noted on the device (read at the end: no
        host sync per step), then the row's step hook (inpainting's blend), as denoise runs it."""
        t_curr, t_prev = row.timesteps[row.position], row.timesteps[row.position + 1]
        row.latents = row.latents + (t_prev - t_curr) * velocity
        row.position += 1
        if row.request.on_preview is not None:
            row.velocity = velocity
        bad = (row.first_bad_step == 0) & ~torch.isfinite(row.latents).all()
        row.first_bad_step = torch.where(bad, row.position, row.first_bad_step)
        if row.hook is not None:
            row.latents, _ = sampling.run_step_hook(row.hook, row.position - 1, t_curr,
                                                     row.latents.to(self.pipe.dtype), row.txt)

    def _send_progress(self, finished: dict) -> None:
        """Each row's step, to the jobs that asked (GenerationRequest.on_step(step, total), after every step, the
        last too): plain ints, no tensor work. A callback that raises fails its own job only."""
        for row in list(self._rows):
            if row.request.on_step is None:
                continue
            try:
                row.request.on_step(row.position, len(row.timesteps) - 1)
            except Exception as err:  # noqa: BLE001 -- one job's callback must not take the others down
                self._fail_row(row, finished, f"the progress callback failed: {_error_text(err)}")

    def _send_previews(self, finished: dict) -> None:
        """The live previews jobs asked for (GenerationRequest.on_preview, after every preview_every-th step but the
        last, whose image follows at once): fluxrt.preview's projection of the row's denoised estimate, as ComfyUI
        previews x0 rather than the noisy latents (flow matching: x0 = x_t - t * velocity). Rows of jobs that asked
        for none cost nothing here; a failed preview fails its own job only."""
        for row in list(self._rows):
            request = row.request
            if request.on_preview is None or row.done or row.position % request.preview_every:
                continue
            try:
                rgb = LatentPreview.of(self.pipe.autoencoder).denoised_rgb(
                    row.latents, row.velocity, row.timesteps[row.position], row.height, row.width)
                request.on_preview(row.position, len(row.timesteps) - 1, rgb)
            except Exception as err:  # noqa: BLE001 -- one job's preview must not take the others down
                self._fail_row(row, finished, f"the preview failed: {_error_text(err)}")

    def _fail_row(self, row: _Row, finished: dict, error: str) -> None:
        finished[row.key] = GenerationResult(row.request, error=error)
        self._rows.remove(row)

    # ---- leaving ----

    def _decode_finished(self, finished: dict) -> None:
        """The rows whose last step is done leave: NaN/inf rows fail alone, the others are decoded together."""
        leaving = [row for row in self._rows if row.done]
        self._rows = [row for row in self._rows if not row.done]
        good = []
        for row in leaving:
            bad = int(row.first_bad_step)
            if bad:
                finished[row.key] = GenerationResult(row.request, error=_error_text(_non_finite_latents(bad, row)))
            else:
                good.append(row)
        if good:
            try:
                images = self._decode(good)
            except Exception:  # noqa: BLE001 -- which row fails? each alone
                images = []
                for row in good:
                    try:
                        images.append(self._decode([row])[0])
                    except Exception as err:  # noqa: BLE001
                        images.append(err)
            for row, image in zip(good, images):
                failed = isinstance(image, Exception)
                finished[row.key] = GenerationResult(row.request, error=_error_text(image) if failed else None,
                                                     image=None if failed else image, cache_stats=_cache_stats(row))

    def _decode(self, rows: list[_Row]) -> list:
        """PIL images of rows of one size, in one autoencoder call (the pipeline's decode and pixel mapping)."""
        pipe, first = self.pipe, rows[0]
        latents = torch.cat([row.latents for row in rows]).to(pipe.dtype)  # sampling.denoise returns the model's dtype
        return to_pil(pipe.decode(latents, first.height, first.width))


def _cache_stats(row: _Row) -> dict | None:
    """What the row's step cache computed and skipped (as FluxPipeline.cache_stats gives it per image)."""
    if row.cache is None:
        return None
    stats = dict(row.cache.stats)
    if row.negative_cache is not None:
        stats["negative"] = dict(row.negative_cache.stats)
    return stats


def _row_buckets(pipe, most: int) -> tuple[int, ...] | None:
    """Powers of two up to `most` (and `most`) when the transformer replays CUDA graphs; None (no padding) else."""
    if getattr(pipe.transformer, "graphs", None) is None or pipe.device.type != "cuda":
        return None
    return tuple(sorted({2 ** k for k in range(most.bit_length()) if 2 ** k < most} | {most}))


def _non_finite_latents(step: int, row: _Row) -> NonFiniteError:
    """sampling.denoise's error for latents that went NaN/inf at `step`."""
    return sampling.non_finite_latents(step, len(row.timesteps) - 1)
