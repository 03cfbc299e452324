"""fluxrt command line: `fluxrt demo` (the embedded default job), `fluxrt bench` (per-step latency,
fluxrt.bench). `generate` arrives with the pipeline issue."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from . import sampling
from .config import FluxConfig
from .reference import Flux
from .testing import randomize_parameters_


def demo(preset: str, width: int, height: int, steps: int, txt_len: int, seed: int, device: str) -> list[float]:
    """A few denoising steps of the reference transformer with random weights; returns per-step seconds."""
    cfg = FluxConfig.preset(preset)
    torch.manual_seed(seed)
    dev = torch.device(device)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    with torch.device("meta"):  # no fp32 init of 12B weights: allocate in place on the device, then fill
        model = Flux(cfg)
    model = randomize_parameters_(model.to(dtype).to_empty(device=dev), seed).requires_grad_(False).eval()
    img = sampling.pack(sampling.get_noise(1, height, width, seed=seed, dtype=dtype, device=dev))
    img_ids = sampling.prepare_img_ids(1, height, width, device=dev)
    txt = torch.randn(1, txt_len, cfg.context_in_dim, dtype=dtype, device=dev)
    txt_ids = sampling.prepare_txt_ids(1, txt_len, device=dev)
    y = torch.randn(1, cfg.vec_in_dim, dtype=dtype, device=dev)
    timesteps = sampling.get_schedule(steps, img.shape[1], shift=cfg.guidance_embed)
    guidance = 3.5 if cfg.guidance_embed else None

    stamps = [time.perf_counter()]

    def tick(step: int, total: int) -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        stamps.append(time.perf_counter())

    with torch.inference_mode():
        out = sampling.denoise(model, img, img_ids, txt, txt_ids, y, timesteps, guidance=guidance, callback=tick)
    if not torch.isfinite(out).all():
        raise RuntimeError("demo produced non-finite latents")
    per_step = [b - a for a, b in zip(stamps[:-1], stamps[1:])]
    print(f"fluxrt demo: reference FLUX ({preset}, random weights) {width}x{height} -> {img.shape[1]} image + "
          f"{txt_len} text tokens, {steps} steps, {dtype} on {dev}")
    for i, (t, s) in enumerate(zip(timesteps, per_step), start=1):
        print(f"  step {i}/{steps}  t={t:.4f}  {s * 1e3:8.2f} ms")
    print(f"median per-step latency: {statistics.median(per_step) * 1e3:.2f} ms "
          "(step 1 includes warm-up; CPU timing of the plain-PyTorch reference, not a fluxrt speed claim)")
    return per_step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fluxrt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run a few denoising steps of a random-weight reference model, print latency")
    p.add_argument("--preset", default="tiny", choices=["tiny", "flux-dev", "flux-schnell"])
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--txt-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    b = sub.add_parser("bench", help="per-step latency: diffusers vs fluxrt (GPU numbers only count)")
    b.add_argument("--model", default="tiny", choices=["tiny", "flux-dev", "flux-schnell"])
    b.add_argument("--size", nargs="+", default=["64x64"], help="WIDTHxHEIGHT, multiples of 16")
    b.add_argument("--batch", type=int, nargs="+", default=[1])
    b.add_argument("--impl", nargs="+", default=["diffusers-eager", "fluxrt-bf16", "fluxrt-fp8-weight"])
    b.add_argument("--iters", type=int, default=10)
    b.add_argument("--txt-len", type=int, default=None)
    b.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: benchmarks/results/step_<date>_<gpu>.json; CPU runs: the temp dir)")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    try:
        for name in ("width", "height"):
            value = getattr(args, name)
            if value <= 0 or value % 16:
                raise ValueError(f"--{name} must be a positive multiple of 16, got {value}")
        if args.steps <= 0 or args.txt_len <= 0:
            raise ValueError("--steps and --txt-len must be >= 1")
        demo(args.preset, args.width, args.height, args.steps, args.txt_len, args.seed, args.device)
    except (ValueError, RuntimeError) as err:
        print(f"fluxrt: error: {err}", file=sys.stderr)
        return 2
    return 0


def _bench(args) -> int:
    from . import bench

    try:
        sizes = []
        for text in args.size:
            width, _, height = text.partition("x")
            if not (width.isdigit() and height.isdigit()) or int(width) % 16 or int(height) % 16:
                raise ValueError(f"--size {text!r} must be WIDTHxHEIGHT with multiples of 16")
            sizes.append((int(height), int(width)))
        if args.iters <= 0 or any(b <= 0 for b in args.batch):
            raise ValueError("--iters and --batch must be >= 1")
        result = bench.run(args.model, sizes, args.batch, args.impl, args.iters, txt_len=args.txt_len)
    except (ValueError, RuntimeError) as err:
        print(f"fluxrt: error: {err}", file=sys.stderr)
        return 2
    bench.write(result, args.out or bench.default_output(result))
    return 0
