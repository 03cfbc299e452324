"""Per-step latency of the FLUX transformer: diffusers (eager, torch.compile) vs fluxrt (bf16, fp8, fp8-weight,
fp8-attn = W8A8 + FP8 attention).

One "step" is one transformer call at a given resolution and batch (the denoising loop's unit of work), with
random weights at the preset's real widths (flux-dev: ~24 GB in bf16 on the GPU) and real position ids, T5
length 512. Timing: CUDA events on a GPU (host clock on the CPU, where numbers are a smoke test, not claims),
warm-up excluded, median of `iters`; torch.compile / first-call time and peak memory reported apart. Every
implementation gets identical weights (same seed), built on the meta device and filled in place, so no
full-size fp32 copy is ever materialised.

    fluxrt bench --model flux-dev --size 1024x1024 --batch 1 --impl diffusers-eager fluxrt-bf16 fluxrt-fp8
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import devices, sampling, validation
from .config import FluxConfig
from .testing import randomize_parameters_

IMPLS = ("diffusers-eager", "diffusers-compile", "fluxrt-bf16", "fluxrt-fp8", "fluxrt-fp8-weight", "fluxrt-fp8-attn")
# T5 tokens: FLUX.1-dev was trained with 512 (schnell 256), and the pipeline never feeds more.
MAX_TXT_LEN = 512
# A latency median settles within tens of iterations; a cap turns a typo (--iters 1000000) into an error, not hours.
MAX_ITERS = 1000


def _diffusers_model(cfg: FluxConfig, dtype: torch.dtype, device: torch.device, seed: int):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**cfg.to_diffusers())
    model = (model if dtype == torch.float32 else model.to(dtype)).to_empty(device=device)
    return randomize_parameters_(model, seed).eval().requires_grad_(False)


def _inputs(cfg: FluxConfig, batch: int, height: int, width: int, txt_len: int, dtype, device, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=sampling.pack(sampling.get_noise(batch, height, width, seed=seed, dtype=dtype, device=device)),
        encoder_hidden_states=torch.randn(batch, txt_len, cfg.context_in_dim, generator=gen).to(device, dtype),
        pooled_projections=torch.randn(batch, cfg.vec_in_dim, generator=gen).to(device, dtype),
        timestep=torch.full((batch,), 0.75, device=device),
        img_ids=sampling.prepare_img_ids(1, height, width, device)[0],
        txt_ids=sampling.prepare_txt_ids(1, txt_len, device)[0],
        guidance=torch.full((batch,), 3.5, device=device) if cfg.guidance_embed else None,
        return_dict=False,
    )


def _time_ms(fn, iters: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _build(impl: str, cfg: FluxConfig, dtype, device, seed: int):
    import fluxrt

    model = _diffusers_model(cfg, dtype, device, seed)
    if impl == "diffusers-eager":
        return model
    if impl == "diffusers-compile":
        return torch.compile(model)
    quantize = {"fluxrt-bf16": None, "fluxrt-fp8": "fp8", "fluxrt-fp8-weight": "fp8-weight",
                "fluxrt-fp8-attn": "fp8"}[impl]
    return fluxrt.compile(model, quantize=quantize, attention="fp8" if impl == "fluxrt-fp8-attn" else "bf16")


def check_iters(iters, what: str = "iters") -> int:
    iters = validation.as_int(iters, what)
    if not 1 <= iters <= MAX_ITERS:
        raise ValueError(f"{what} must be between 1 and {MAX_ITERS} (fluxrt.bench.MAX_ITERS), got {iters}")
    return iters


def check_txt_len(txt_len, what: str = "txt_len") -> int | None:
    """None (the preset's T5 length) or an int in [1, MAX_TXT_LEN]; 0 is refused, not taken as "default"."""
    if txt_len is None:
        return None
    txt_len = validation.as_int(txt_len, what)
    if not 1 <= txt_len <= MAX_TXT_LEN:
        raise ValueError(f"{what} must be between 1 and {MAX_TXT_LEN} T5 tokens (fluxrt.bench.MAX_TXT_LEN), "
                         f"got {txt_len}")
    return txt_len


def check_impls(impls) -> None:
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown or not impls:
        raise ValueError(f"unknown implementations {unknown}; choose from {IMPLS}")


def check_run(sizes, batches, impls, iters: int, warmup: int, txt_len: int | None) -> None:
    """Everything a run is asked for, checked before any model is built (ValueError naming the argument)."""
    for height, width in sizes:
        validation.check_size(width, height)
    for batch in batches:
        validation.check_batch_size(batch, "batch")
    check_impls(impls)
    check_iters(iters)
    if validation.as_int(warmup, "warmup") < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    check_txt_len(txt_len)


def run(model: str = "tiny", sizes=((64, 64),), batches=(1,), impls=IMPLS, iters: int = 10, warmup: int = 3,
        txt_len: int | None = None, device: str | None = None, seed: int = 0) -> dict:
    """Time every (impl, size, batch); sizes are (height, width). txt_len None: the preset's T5 length."""
    cfg = FluxConfig.preset(model)
    check_run(sizes, batches, impls, iters, warmup, txt_len)
    dev = devices.resolve_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if txt_len is None:
        txt_len = 512 if cfg.guidance_embed else 256
    rows = []
    for impl in impls:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        net = _build(impl, cfg, dtype, dev, seed)
        for height, width in sizes:
            for batch in batches:
                x = _inputs(cfg, batch, height, width, txt_len, dtype, dev, seed)
                with torch.inference_mode():
                    first = _time_ms(lambda: net(**x), 1, dev)[0]  # compile / autotune / capture happen here
                    _time_ms(lambda: net(**x), warmup, dev)
                    ms = statistics.median(_time_ms(lambda: net(**x), iters, dev))
                peak = torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None
                rows.append({"model": model, "width": width, "height": height, "batch": batch, "impl": impl,
                             "ms": ms, "first_call_s": first / 1e3, "peak_mem_gb": peak})
                print(f"{impl:18s} {model} {width}x{height} batch {batch}: {ms:9.2f} ms/step "
                      f"(first call {first / 1e3:.1f} s)", flush=True)
        del net
    return {**_environment(dev), "device": str(dev), "dtype": str(dtype), "per_step": rows}


def _environment(dev: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def default_output(device: torch.device, now: datetime | None = None) -> Path:
    """benchmarks/results/step_<date>_<gpu>.json for GPU runs (the committed results). CPU smoke runs (not claims)
    go to the temp dir under a name no other run shares (date, time and process id): the temp dir is shared."""
    now = now or datetime.now(timezone.utc)
    if device.type != "cuda":
        return Path(tempfile.gettempdir()) / f"fluxrt_step_{now:%Y%m%d-%H%M%S}_{os.getpid()}_cpu.json"
    gpu = torch.cuda.get_device_name(device).replace(" ", "-")
    return Path("benchmarks/results") / f"step_{now:%Y-%m-%d}_{gpu}.json"


def chart_path(out: Path) -> Path | None:
    """Where the PNG bar chart beside the JSON `out` goes; None when matplotlib is not installed (no chart)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    return out.with_suffix(".png")


def write_json(result: dict, file: Path) -> None:
    file.write_text(json.dumps(result, indent=2) + "\n")


def write_chart(result: dict, file: Path) -> None:
    """A PNG bar chart of ms per step (needs matplotlib; see chart_path)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["per_step"]
    labels = [f"{r['impl']}\n{r['width']}x{r['height']} b{r['batch']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 1.2), 4))
    ax.bar(range(len(rows)), [r["ms"] for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("ms per step")
    ax.set_title(f"FLUX transformer step, {result['gpu'] or result['device']}")
    fig.tight_layout()
    fig.savefig(file, format="png", dpi=120)  # format given: `file` may be a temp name without .png
    plt.close(fig)
