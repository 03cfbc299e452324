"""Step caching's quality against the work it saves: each fluxrt.cache method and setting against uncached images.

For every setting (First-Block Cache at a sweep of thresholds, TaylorSeer at a few (order, interval, warmup), and
"none": an uncached rerun, and "fbc:0", which must be exact) the compiled pipeline draws the same prompts with the
same seeds (image k: seed k) as an uncached reference run, interleaved with it batch by batch, and each row reports:

- steps: transformer calls per image (steps x 2 with true CFG, whose negative pass keeps its own cache state) and
  how many were computed / skipped (pipe.cache_stats, summed over the images);
- speedup: the transformer work of all calls over that of the calls actually made (WorkModel: multiply-adds from the
  model's config and token counts, benchmarks/cp_model.py's counts). Every FLUX block, double or single, costs
  S*h*(4h + 2m) in its linears plus 2*S^2*h in attention (S = image + text tokens, h = hidden size, m = MLP width);
  outside the blocks a call pays the embedders, the batched modulation GEMV and the final layer (the "overhead"). A
  computed call costs all of it; a First-Block-Cache skip the overhead and the first double block; a TaylorSeer
  prediction the overhead alone. steps_speedup is the plain calls / computed;
- denoise_s: measured wall time of the denoising (text embeddings computed beforehand, decoding after) for all
  prompts on this machine, and wall_speedup against the "none" rerun. A CPU figure is not a GPU claim;
- quality against the reference images (pixels in [0, 1]): PSNR of the set (10 log10(1 / mean MSE over the images);
  inf: every image identical) and of the worst image, the images below 20 dB (showing something else: a trajectory
  that took another turn), SSIM (11x11 Gaussian window, sigma 1.5, per RGB channel, the valid region; mean and
  worst), LPIPS (mean) when `import lpips` works;
- prompt adherence (fluxrt.shapes_eval.adherence on fluxrt.shapes_eval.heldout_scenes, seed 0) for a model trained on
  fluxrt.shapes (its model_index.json has _fluxrt_training) at 64x64; other models draw fluxrt.tiny.CORPUS's captions
  and have no adherence.

Outputs: a markdown table, JSON ({"meta", "rows", "suggested"}) and a PNG plot (PSNR and SSIM against speedup, one
line per method; drawn with PIL, so it needs no plotting library). "suggested" applies the default-picking rule
(suggest): per method the largest speedup (then PSNR) with set PSNR >= 30 dB, no image below 20 dB, and adherence at
most 1 point below uncached.

    python benchmarks/bench_cache.py        # the embedded tiny model on the CPU -> results/cache_tiny_<date>.*
    python benchmarks/bench_cache.py --model ./FLUX.1-dev --size 1024 --steps 28 --prompts 16 --batch 1
    python benchmarks/bench_cache.py --model ./FLUX.1-dev --quantize fp8 --settings none fbc:0.04 fbc:0.08 fbc:0.12
    python benchmarks/bench_cache.py --smoke --out /tmp/cache.json   # seconds: the CI run (writes only with --out)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import _common  # noqa: E402
import cp_model  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

import fluxrt  # noqa: E402
from fluxrt import cache, sampling, shapes, shapes_eval  # noqa: E402
from fluxrt.config import FluxConfig  # noqa: E402
from fluxrt.pipeline import to_pil  # noqa: E402
from fluxrt.tiny import CORPUS, TRAINED  # noqa: E402
from fluxrt.validation import check_size, check_steps  # noqa: E402

FBC_THRESHOLDS = (0.02, 0.05, 0.08, 0.1, 0.12, 0.14, 0.16, 0.2, 0.25, 0.3, 0.4, 0.5)
# TaylorSeer (order, interval, warmup); (1, 5, 3) is diffusers' TaylorSeerCacheConfig default and fluxrt.cache's
TAYLORSEER = ((1, 2, 3), (2, 2, 3), (1, 3, 3), (2, 3, 3), (1, 3, 5), (1, 4, 3), (2, 4, 3), (1, 4, 5), (1, 5, 3),
              (1, 5, 5))
SETTINGS = ("none", "fbc:0", *(f"fbc:{t:g}" for t in FBC_THRESHOLDS),
            *(f"taylorseer:{o}:{i}:{w}" for o, i, w in TAYLORSEER))
SMOKE = {"prompts": 4, "steps": 6, "batch": 2, "settings": ("none", "fbc:0", "fbc:0.5", "taylorseer:1:2:2")}
DEFAULT_PROMPTS = 256
DEFAULT_BATCH = 8
PSNR_FLOOR_DB = 30.0  # suggest(): the quality a default must keep
ADHERENCE_DROP_POINTS = 1.0  # suggest(): at most this many points ("all", in %) below the uncached images
CHANGED_DB = 20.0  # an image this far from its uncached self shows something else (e.g. a background flipped)
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03  # Wang et al. 2004's constants, pixels in [0, 1]


# ---- image quality ---------------------------------------------------------------------------------------------


def mse(images: Tensor, reference: Tensor) -> list[float]:
    """Per-image mean squared error of images against reference ([N, C, H, W], pixels in [0, 1])."""
    return (images.double() - reference.double()).pow(2).flatten(1).mean(1).tolist()


def psnr_db(mean_squared_error: float) -> float:
    """PSNR in dB of pixels in [0, 1] at this MSE; identical (0): inf."""
    return 10 * math.log10(1 / mean_squared_error) if mean_squared_error > 0 else math.inf


def _gaussian_window(channels: int) -> Tensor:
    """The 11x11 Gaussian (sigma 1.5, sums to 1) as a depthwise conv2d weight [channels, 1, 11, 11], float64."""
    offsets = torch.arange(SSIM_WINDOW, dtype=torch.float64) - (SSIM_WINDOW - 1) / 2
    line = torch.exp(-(offsets**2) / (2 * SSIM_SIGMA**2))
    line = line / line.sum()
    return torch.outer(line, line).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW)


def ssim(images: Tensor, reference: Tensor) -> list[float]:
    """Per-image SSIM (Wang et al. 2004) of images against reference ([N, C, H, W], pixels in [0, 1]): local means,
    variances and covariance under an 11x11 Gaussian window (sigma 1.5) per channel, over the valid region (no
    padding), C1 = (0.01)^2, C2 = (0.03)^2; the mean of the SSIM map over channels and positions. 1: identical."""
    if images.shape != reference.shape or images.dim() != 4 or min(images.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"ssim takes two [N, C, H, W] batches of one shape with H, W >= {SSIM_WINDOW}, got "
                         f"{tuple(images.shape)} and {tuple(reference.shape)}")
    x, y = images.double(), reference.double()
    window = _gaussian_window(x.shape[1])

    def local_mean(t: Tensor) -> Tensor:
        return F.conv2d(t, window, groups=x.shape[1])

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x = local_mean(x * x) - mu_x**2
    var_y = local_mean(y * y) - mu_y**2
    cov = local_mean(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    ssim_map = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1).tolist()


def lpips_scorer():
    """A function (images, reference) -> per-image LPIPS distances when the lpips package is installed, else None."""
    try:
        import lpips
    except ImportError:
        return None
    metric = lpips.LPIPS(net="alex", verbose=False).eval()

    def score(images: Tensor, reference: Tensor) -> list[float]:
        with torch.no_grad():  # lpips wants [-1, 1]
            return metric(images.float() * 2 - 1, reference.float() * 2 - 1).flatten().tolist()

    return score


# ---- transformer work --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkModel:
    """Multiply-adds (MACs) of one transformer call per image, by part (see the module docstring), from the FLOP
    counts of benchmarks/cp_model.py (weights only, tested against torch's FLOP counter on the reference model)."""

    first_block: float  # double block 0: both streams' linears and the joint attention
    blocks: float  # every block, double and single
    overhead: float  # embedders, the batched modulation GEMV and the final layer: paid by every call

    @classmethod
    def of(cls, config: FluxConfig, image_tokens: int, text_tokens: int) -> "WorkModel":
        flux = cp_model.Flux.from_config(config)
        tokens = image_tokens + text_tokens
        attention = flux.attention_flops(tokens) / 2  # MACs are half the FLOPs
        full = (flux.linear_flops(text_tokens, image_tokens) / 2 + flux.layers * attention + flux.modulation
                + flux.vector_embedders)
        blocks = flux.per_token_params * tokens + flux.layers * attention
        return cls(first_block=flux.stream * tokens + attention, blocks=blocks, overhead=full - blocks)

    @property
    def full(self) -> float:
        return self.overhead + self.blocks

    @property
    def first_block_skip(self) -> float:
        return self.overhead + self.first_block

    def speedup(self, calls: int, computed: int, skipped: int, method: str) -> float:
        """calls' full work over the work done: computed calls in full, skipped ones at the method's cost."""
        skip_cost = {"fbc": self.first_block_skip, "taylorseer": self.overhead}.get(method, self.full)
        return calls * self.full / (computed * self.full + skipped * skip_cost)


# ---- generation -----------------------------------------------------------------------------------------------


@dataclass
class Batch:
    seeds: list[int]  # image k of the run: seed k
    scenes: list | None  # the held-out scenes the prompts caption (adherence), or None
    txt: Tensor
    vec: Tensor
    negative: tuple[Tensor, Tensor] | None  # true CFG's negative prompt embeddings, or None when it is off

    @property
    def size(self) -> int:
        return len(self.seeds)


def encode_batches(pipe, prompts: list[str], scenes: list | None, batch: int) -> list[Batch]:
    """The prompts' embeddings in batches, computed once so the timed calls are the denoising alone."""
    negatives, _ = pipe.resolve_true_cfg(None, None, len(prompts))
    batches = []
    for start in range(0, len(prompts), batch):
        chunk = slice(start, min(start + batch, len(prompts)))
        txt, vec = pipe.encode_prompt(prompts[chunk])
        negative = None if negatives is None else pipe.encode_prompt(negatives[chunk])
        batches.append(Batch(list(range(chunk.start, chunk.stop)), None if scenes is None else scenes[chunk], txt, vec,
                             negative))
    return batches


@dataclass
class Drawn:
    images: Tensor  # [N, 3, H, W] in [0, 1]
    seconds: float  # the denoising's wall time
    computed: list[int]  # per image: transformer calls computed (true CFG's negative pass included)
    skipped: list[int]


def draw(pipe, batch: Batch, setting: str, width: int, height: int, steps: int) -> Drawn:
    """One batch drawn with cache=setting."""
    negative = {} if batch.negative is None else dict(negative_prompt_embeds=batch.negative[0],
                                                      negative_pooled_prompt_embeds=batch.negative[1])
    _synchronize(pipe)
    start = time.perf_counter()
    latents = pipe(prompt_embeds=batch.txt, pooled_prompt_embeds=batch.vec, **negative, seed=batch.seeds,
                   width=width, height=height, num_steps=steps, output_type="latent", progress=False,
                   cache=cache.parse(setting))
    _synchronize(pipe)
    seconds = time.perf_counter() - start
    stats = pipe.cache_stats or [{"computed": calls_per_image(steps, batch), "skipped": 0}] * batch.size
    return Drawn(pipe.decode(latents, height, width), seconds,
                 [row["computed"] + row.get("negative", {}).get("computed", 0) for row in stats],
                 [row["skipped"] + row.get("negative", {}).get("skipped", 0) for row in stats])


def calls_per_image(steps: int, batch: Batch) -> int:
    return steps * (1 if batch.negative is None else 2)


def _synchronize(pipe) -> None:
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)


# ---- rows ------------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """One setting's measurements, per image, over the batches drawn so far (images are not kept)."""

    seconds: float = 0.0
    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    mse: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    lpips: list[float] = field(default_factory=list)
    adherence: list[dict] = field(default_factory=list)  # shapes_eval.adherence of each batch

    def add(self, drawn: Drawn, reference: Tensor, scenes: list | None, lpips_score=None) -> None:
        """drawn's timing, counts and quality against the reference images of the same batch."""
        self.seconds += drawn.seconds
        self.computed += drawn.computed
        self.skipped += drawn.skipped
        self.mse += mse(drawn.images, reference)
        self.ssim += ssim(drawn.images, reference)
        if lpips_score is not None:
            self.lpips += lpips_score(drawn.images, reference)
        if scenes is not None:
            self.adherence.append(shapes_eval.adherence([np.asarray(im) for im in to_pil(drawn.images)], scenes))

    def adherence_total(self) -> dict | None:
        """The batches' adherence fractions as one over all images (None: not measured)."""
        if not self.adherence:
            return None
        n = sum(part["n"] for part in self.adherence)
        return {**{key: sum(part[key] * part["n"] for part in self.adherence) / n
                   for key in self.adherence[0] if key != "n"}, "n": n}


def method_of(setting: str) -> str:
    config = cache.parse(setting)
    return {type(None): "none", cache.FirstBlockCache: "fbc", cache.TaylorSeer: "taylorseer"}[type(config)]


def quality(tally: Tally) -> dict:
    """The quality columns of a setting: PSNR of the set (of the mean MSE) and of the worst image, SSIM, LPIPS and
    adherence when measured."""
    row = {"psnr_db": _finite_or_none(psnr_db(statistics.fmean(tally.mse))),
           "psnr_db_min": _finite_or_none(psnr_db(max(tally.mse))),
           "identical_images": sum(error == 0 for error in tally.mse),
           "changed_images": sum(psnr_db(error) < CHANGED_DB for error in tally.mse),
           "ssim_mean": statistics.fmean(tally.ssim), "ssim_min": min(tally.ssim)}
    if tally.lpips:
        row["lpips_mean"] = statistics.fmean(tally.lpips)
    if tally.adherence:
        row["adherence"] = tally.adherence_total()
    return row


def _finite_or_none(value: float) -> float | None:
    """JSON has no infinity: None stands for inf dB (identical images)."""
    return value if math.isfinite(value) else None


def make_row(setting: str, tally: Tally, reference: Tally, work: WorkModel, calls: int) -> dict:
    """One setting's row; calls: transformer calls per image. wall_speedup, against the "none" row, is filled in once
    every setting has run."""
    method, images = method_of(setting), len(tally.computed)
    computed, skipped = sum(tally.computed), sum(tally.skipped)
    row = {"setting": setting, "method": method, "images": images, "calls": calls * images, "computed": computed,
           "skipped": skipped, "speedup": work.speedup(calls * images, computed, skipped, method),
           "steps_speedup": calls * images / computed, "denoise_s": tally.seconds, "wall_speedup": None}
    row.update(quality(tally))
    if "adherence" in row:
        row["adherence_delta_points"] = 100 * (row["adherence"]["all"] - reference.adherence_total()["all"])
    return row


def suggest(rows: list[dict]) -> dict:
    """Per method, the setting with the largest speedup (then the highest PSNR) that keeps quality: set PSNR >=
    PSNR_FLOOR_DB, no image below CHANGED_DB (at a few hundred images one image that turned caps the set PSNR near
    31 dB, so the PSNR bar alone counts such images, noisily), and adherence ("all") at most ADHERENCE_DROP_POINTS
    below the uncached images' (when measured). None when no setting passes."""
    picks = {}
    for method in ("fbc", "taylorseer"):
        passing = [row for row in rows if row["method"] == method and row["skipped"] > 0
                   and (row["psnr_db"] is None or row["psnr_db"] >= PSNR_FLOOR_DB) and row["changed_images"] == 0
                   and row.get("adherence_delta_points", 0.0) >= -ADHERENCE_DROP_POINTS]
        best = max(passing, key=lambda row: (row["speedup"], math.inf if row["psnr_db"] is None else row["psnr_db"]),
                   default=None)
        picks[method] = None if best is None else best["setting"]
    return picks


# ---- outputs ---------------------------------------------------------------------------------------------------


def _num(value, digits: int = 2) -> str:
    return "inf" if value is None else f"{value:.{digits}f}"


def _times(speedup: float | None) -> str:
    return "-" if speedup is None else f"{speedup:.2f}x"


def markdown(meta: dict, rows: list[dict], picks: dict) -> str:
    lpips, adherence = "lpips_mean" in rows[0], "adherence" in rows[0]
    columns = (["setting", "computed / calls per image", "skipped", "speedup (work)", "steps speedup", "denoise s",
                "wall speedup", "PSNR dB (set / worst)", f"images < {CHANGED_DB:g} dB", "SSIM (mean / worst)"]
               + ["LPIPS"] * lpips
               + ["adherence all (Δ points)", "colour+shape"] * adherence)
    setup = (f"{meta['images']} prompts ({meta['prompts']}), {meta['width']}x{meta['height']}, {meta['steps']} steps, "
             f"{meta['calls_per_image']} transformer calls per image ({meta['calls_note']}); batch {meta['batch']}; "
             f"{meta['dtype']}, quantize {meta['quantize']}; commit {meta['commit']}, {meta['date']}, torch "
             f"{meta['torch']}, {meta['threads']} threads. Quality against the uncached images of the same seeds.")
    notes = (f"Speedup (work): all calls' multiply-adds over those of the calls made; a First-Block-Cache skip costs "
             f"{100 * meta['work']['first_block_skip_share']:.1f} % of a call (the first double block and the "
             f"embedders, modulation and final layer), a TaylorSeer prediction "
             f"{100 * meta['work']['overhead_share']:.1f} % (those alone). Steps speedup: calls / computed. PSNR inf: "
             f"identical images. {'' if lpips else 'LPIPS: not measured (lpips is not installed). '}"
             f"{meta['device_note']}")
    rule = (f"set PSNR >= {PSNR_FLOOR_DB:g} dB, no image below {CHANGED_DB:g} dB"
            + (f" and adherence at most {ADHERENCE_DROP_POINTS:g} point below uncached" if adherence else ""))
    lines = [f"# bench_cache: {meta['label']}", "", setup, "", "| " + " | ".join(columns) + " |",
             "|---|" + "---:|" * (len(columns) - 1), *(_table_line(row, lpips, adherence) for row in rows), "", notes,
             "", f"Suggested (the largest speedup, then PSNR, with {rule}): First-Block Cache {picks['fbc']}, "
             f"TaylorSeer {picks['taylorseer']}."]
    return "\n".join(lines) + "\n"


def _table_line(r: dict, lpips: bool, adherence: bool) -> str:
    cells = [r["setting"], f"{r['computed'] / r['images']:.1f} / {r['calls'] / r['images']:g}",
             f"{100 * r['skipped'] / r['calls']:.0f} %", _times(r["speedup"]), _times(r["steps_speedup"]),
             f"{r['denoise_s']:.2f}", _times(r["wall_speedup"]),
             f"{_num(r['psnr_db'], 1)} / {_num(r['psnr_db_min'], 1)}", str(r["changed_images"]),
             f"{r['ssim_mean']:.4f} / {r['ssim_min']:.4f}"]
    if lpips:
        cells.append(f"{r['lpips_mean']:.4f}")
    if adherence:
        cells += [f"{100 * r['adherence']['all']:.1f} % ({r['adherence_delta_points']:+.1f})",
                  f"{100 * r['adherence']['both']:.1f} %"]
    return "| " + " | ".join(cells) + " |"


def plot(path: Path, rows: list[dict], title: str) -> None:
    """PSNR and SSIM against speedup, one line per method (PIL: no plotting library needed)."""
    from PIL import Image, ImageDraw, ImageFont

    panels = (("psnr_db", "PSNR of the set (dB)"), ("ssim_mean", "mean SSIM"))
    width, height, margin = 560, 420, 70
    image = Image.new("RGB", (width * len(panels), height + 50), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    draw.text((10, 8), title, fill="black", font=font)
    colours = {"fbc": (31, 119, 180), "taylorseer": (214, 39, 40)}
    cached = [r for r in rows if r["method"] in colours and r["skipped"] > 0]
    x_max = max([r["speedup"] for r in cached] + [1.0]) * 1.05
    for index, (key, label) in enumerate(panels):
        left, top = index * width + margin, 40 + 30
        box = (left, top, left + width - margin - 20, top + height - margin - 20)
        values = [r[key] for r in cached if r[key] is not None]
        y_min, y_max = (min(values), max(values)) if values else (0.0, 1.0)
        y_min, y_max = y_min - 0.05 * (y_max - y_min or 1), y_max + 0.05 * (y_max - y_min or 1)

        def at(x: float, y: float) -> tuple[float, float]:
            return (box[0] + (x - 1) / (x_max - 1 or 1) * (box[2] - box[0]),
                    box[3] - (y - y_min) / (y_max - y_min) * (box[3] - box[1]))

        draw.rectangle(box, outline="black")
        for tick in np.linspace(y_min, y_max, 5):
            draw.text((box[0] - 55, at(1, tick)[1] - 7), f"{tick:.4g}", fill="black", font=font)
        for tick in np.linspace(1, x_max, 5):
            draw.text((at(tick, y_min)[0] - 12, box[3] + 5), f"{tick:.2f}x", fill="black", font=font)
        draw.text((box[0], box[3] + 25), f"speedup (transformer work)   y: {label}", fill="black", font=font)
        for method, colour in colours.items():
            points = sorted((r["speedup"], r[key], r["setting"].split(":", 1)[1]) for r in cached
                            if r["method"] == method and r[key] is not None)
            best = {}  # the line joins the best value at each speedup (settings may share one: same skip count)
            for x, y, _ in points:
                best[x] = max(best.get(x, y), y)
            if len(best) > 1:
                draw.line([at(x, y) for x, y in sorted(best.items())], fill=colour, width=2)
            for (px, py), (_, _, name) in zip((at(x, y) for x, y, _ in points), points):
                draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
                draw.text((px + 4, py - 14), name, fill=colour, font=font)
            legend_x = box[0] + 170 * list(colours).index(method)  # above the box: never over a point
            draw.line((legend_x, top - 12, legend_x + 20, top - 12), fill=colour, width=2)
            draw.text((legend_x + 25, top - 19), {"fbc": "First-Block Cache", "taylorseer": "TaylorSeer"}[method],
                      fill=colour, font=font)
    image.save(path)


# ---- main ------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=TRAINED, help="a model folder or file (FluxPipeline."
                        "from_pretrained); default the embedded tiny model trained on fluxrt.shapes")
    parser.add_argument("--steps", type=int, help="denoising steps (default the model's: tiny 20, dev 28)")
    parser.add_argument("--size", help="SIZE or WxH in pixels (default the model's: tiny 64, FLUX 1024)")
    parser.add_argument("--prompts", type=int, help=f"images per setting (default {DEFAULT_PROMPTS})")
    parser.add_argument("--batch", type=int, help=f"images per pipeline call (default {DEFAULT_BATCH}; 1 for a "
                        "latency figure: a batch's step costs as much as its rows that compute)")
    parser.add_argument("--settings", nargs="+", help=f"cache specs to compare ({cache.SPEC_HELP}, or none); "
                        f"default {' '.join(SETTINGS)}")
    parser.add_argument("--quantize", choices=("fp8", "fp8-weight"), help="compile the transformer quantized (FP8 "
                        "shifts the residuals: re-tune thresholds there); the reference is then uncached FP8")
    parser.add_argument("--out", type=Path, help="the JSON path (.md and .png beside it); default "
                        "benchmarks/results/cache_<model>_<date>.json (--smoke: nothing is written)")
    parser.add_argument("--smoke", action="store_true", help=f"a few seconds on the CPU: {SMOKE}")
    args = parser.parse_args(argv)
    preset = SMOKE if args.smoke else {"prompts": DEFAULT_PROMPTS, "batch": DEFAULT_BATCH, "settings": SETTINGS}
    for name in ("prompts", "batch", "settings", "steps"):
        if getattr(args, name) is None:
            setattr(args, name, preset.get(name))
    for name in ("prompts", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive int, got {getattr(args, name)}")
    try:  # the pipeline's own rules, checked before a model loads
        if args.steps is not None:
            check_steps(args.steps, "--steps")
        args.size = _parse_size(parser, args.size)
        if args.size is not None:
            check_size(*args.size, names=("--size width", "--size height"))
    except ValueError as err:
        parser.error(str(err))
    args.settings = _parse_settings(parser, args.settings)
    return args


def _parse_size(parser: argparse.ArgumentParser, size: str | None) -> tuple[int, int] | None:
    if size is None:
        return None
    try:
        sides = [int(side) for side in size.lower().split("x")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides) < 1:
        parser.error(f"--size must be SIZE or WxH in pixels, e.g. 1024 or 1024x768; got {size!r}")
    return sides[0], sides[-1]


def _parse_settings(parser: argparse.ArgumentParser, settings) -> list[str]:
    """Each spec in its canonical spelling (cache.parse(...).spec()); one clear error for a bad or repeated one."""
    canonical = []
    for spec in settings:
        try:
            config = cache.parse(spec)
        except ValueError as err:
            parser.error(f"--settings: {err}")
        canonical.append("none" if config is None else config.spec())
    repeated = sorted({spec for spec in canonical if canonical.count(spec) > 1})
    if repeated:
        parser.error(f"--settings lists {', '.join(repeated)} more than once; give each setting once")
    return canonical


def load_pipeline(args):
    """The compiled pipeline (the cache runs on the compiled transformer): torch formulas on a CPU, the default
    backend on a GPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return fluxrt.FluxPipeline.from_pretrained(args.model, device=device, compile=True, quantize=args.quantize,
                                                   backend="torch" if device == "cpu" else "auto", progress=False)
    except (OSError, ValueError, TypeError, fluxrt.CheckpointError) as err:
        raise SystemExit(f"bench_cache: cannot load --model {args.model}: {err}") from None


def trained_on_shapes(model: Path) -> bool:
    """Whether the model folder records fluxrt.train_tiny training (so the shapes adherence metric applies)."""
    index = model / "model_index.json"
    return index.is_file() and "_fluxrt_training" in json.loads(index.read_text())


def prompts_for(args, width: int, height: int) -> tuple[list[str], list | None, str]:
    """(prompts, held-out scenes for adherence or None, what they are)."""
    if trained_on_shapes(args.model) and (width, height) == (shapes.SIZE, shapes.SIZE):
        scenes = shapes_eval.heldout_scenes(args.prompts, seed=0)
        return [shapes.caption(scene) for scene in scenes], scenes, "fluxrt.shapes held-out scenes, seed 0"
    prompts = [CORPUS[i % len(CORPUS)] for i in range(args.prompts)]
    return prompts, None, "fluxrt.tiny.CORPUS captions in turn"


def device_label(pipe, model: Path) -> tuple[str, str, str]:
    """(file tag, label, note): CPU runs say their times are no GPU claim."""
    name = "tiny" if model.resolve() == TRAINED.resolve() else model.name.lower().replace(" ", "-")
    if pipe.device.type == "cuda":
        gpu = torch.cuda.get_device_name(pipe.device)
        return f"{name}_{_common.gpu_slug(gpu)}", f"{gpu}, {model.name}", f"Times measured on {gpu}."
    cores = len(os.sched_getaffinity(0))
    return name, f"CPU ({cores} cores), {model.name} model", (
        f"Times: CPU, {torch.get_num_threads()} thread(s), a shared {cores}-core machine: not a GPU claim; for a tiny "
        "model a call is mostly per-op overhead, so wall time gains less than the work does.")


def measure(pipe, batches: list[Batch], settings: list[str], width: int, height: int, steps: int,
            lpips_score) -> tuple[Tally, dict[str, Tally]]:
    """(the uncached reference's tally, each setting's tally against it). Settings run interleaved batch by batch,
    so a busy moment of a shared machine slows each alike."""
    draw(pipe, batches[0], "none", width, height, min(steps, 2))  # warm-up: first-call costs are nobody's
    reference, tallies = Tally(), {setting: Tally() for setting in settings}
    started = time.perf_counter()
    for index, batch in enumerate(batches):
        drawn = draw(pipe, batch, "none", width, height, steps)
        reference.add(drawn, drawn.images, batch.scenes)
        for setting, tally in tallies.items():
            tally.add(draw(pipe, batch, setting, width, height, steps), drawn.images, batch.scenes, lpips_score)
        print(f"batch {index + 1}/{len(batches)}: {time.perf_counter() - started:.0f} s", flush=True)
    return reference, tallies


def table_rows(tallies: dict[str, Tally], reference: Tally, work: WorkModel, calls: int) -> list[dict]:
    """The rows, with wall_speedup against the "none" row (None without one)."""
    rows = [make_row(setting, tally, reference, work, calls) for setting, tally in tallies.items()]
    none_seconds = tallies["none"].seconds if "none" in tallies else None
    for row in rows:
        row["wall_speedup"] = None if none_seconds is None else none_seconds / row["denoise_s"]
        print(f"{row['setting']:22s} skipped {row['skipped']:5d}/{row['calls']:5d}  speedup {row['speedup']:.2f}x  "
              f"PSNR {_num(row['psnr_db'], 1)} dB  SSIM {row['ssim_mean']:.4f}  {row['denoise_s']:.2f} s")
    return rows


def describe(args, pipe, label: str, device_note: str, run: dict, reference: Tally, work: WorkModel,
             now: datetime) -> dict:
    """The run's meta: what was drawn, how, where and when."""
    return {"label": label, "model": str(args.model), "device": str(pipe.device), "dtype": str(pipe.dtype),
            "quantize": args.quantize, **run, "batch": args.batch, "reference_seconds": reference.seconds,
            "reference_adherence": reference.adherence_total(),
            "work": {"first_block_macs": work.first_block, "blocks_macs": work.blocks, "overhead_macs": work.overhead,
                     "first_block_skip_share": work.first_block_skip / work.full,
                     "overhead_share": work.overhead / work.full},
            "torch": torch.__version__, "threads": torch.get_num_threads(), "commit": _common._git_commit(),
            "date": now.isoformat(timespec="seconds"), "device_note": device_note}


def write_outputs(out: Path, meta: dict, rows: list[dict], picks: dict, table: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows, "suggested": picks}, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    quantized = f", quantize {meta['quantize']}" if meta["quantize"] else ""
    plot(out.with_suffix(".png"), rows, f"{meta['label']}{quantized}: {meta['steps']} steps, {meta['images']} images, "
         "quality vs uncached")
    print(f"wrote {out} and its .md and .png")


def main(argv=None) -> int:
    args = parse_args(argv)
    pipe = load_pipeline(args)
    if pipe.device.type == "cpu":
        # One thread: the tiny model's ops are far too small to gain from more, and OpenMP's spin-waiting threads
        # slow a shared 2-core machine down (benchmarks/eval_tiny.py measured ~20x).
        torch.set_num_threads(1)
    width, height = args.size or pipe.default_size
    steps = args.steps or pipe.default_steps
    prompts, scenes, prompt_note = prompts_for(args, width, height)
    batches = encode_batches(pipe, prompts, scenes, args.batch)
    calls = calls_per_image(steps, batches[0])
    grid_rows, grid_cols = sampling.latent_grid(height, width)
    work = WorkModel.of(pipe.config, grid_rows * grid_cols, batches[0].txt.shape[1])
    lpips_score = lpips_scorer()
    reference, tallies = measure(pipe, batches, args.settings, width, height, steps, lpips_score)
    rows = table_rows(tallies, reference, work, calls)
    picks = suggest(rows)
    tag, label, device_note = device_label(pipe, args.model)
    now = datetime.now(timezone.utc)
    run = {"images": len(prompts), "prompts": prompt_note, "width": width, "height": height, "steps": steps,
           "calls_per_image": calls, "lpips": lpips_score is not None,
           "calls_note": "true CFG: a prompt and a negative pass per step" if calls > steps else "one pass per step"}
    meta = describe(args, pipe, label, device_note, run, reference, work, now)
    table = markdown(meta, rows, picks)
    print("\n" + table)
    out = args.out or (None if args.smoke else _common.RESULTS / f"cache_{tag}_{now:%Y-%m-%d}.json")
    if out is not None:
        write_outputs(out, meta, rows, picks, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
