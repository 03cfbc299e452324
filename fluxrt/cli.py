"""fluxrt command line.

  fluxrt generate [--model PATH|tiny-random] --prompt TEXT --width W --height H --steps N --guidance G --seed S
                  --out FILE.png [--quantize fp8|fp8-weight] [--no-compile] [--compare-reference]
  fluxrt bench ...   per-step latency of the transformer, diffusers vs fluxrt (fluxrt.bench)

The default model, tiny-random, is built in process with random weights (nothing to download): tiny on a CPU,
flux-dev's real widths on a GPU. Errors print one line, `fluxrt: error: ...`, and exit 2.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import time
from pathlib import Path

import torch

TINY_RANDOM = "tiny-random"
DEFAULT_PROMPT = "an astronaut riding a horse on the surface of the moon"


class UsageError(ValueError):
    """A bad command line: reported as one line before any model is loaded."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fluxrt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_bench(sub)
    args = parser.parse_args(argv)
    return _bench(args) if args.command == "bench" else _generate(args)


# ---- generate ----


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="prompt -> PNG (default model: tiny-random, random weights, offline)")
    g.add_argument("--model", default=TINY_RANDOM,
                   help="a local FLUX folder (diffusers layout, or BFL's flux1-*.safetensors + ae.safetensors beside "
                        "the text-encoder folders), a BFL transformer file (with --ae and --text-encoders), or "
                        "tiny-random (default)")
    g.add_argument("--ae", type=Path, help="autoencoder (ae.safetensors or a diffusers vae folder) for a file --model")
    g.add_argument("--text-encoders", type=Path,
                   help="folder with tokenizer, text_encoder, tokenizer_2, text_encoder_2 for a file --model")
    g.add_argument("--prompt", default=DEFAULT_PROMPT)
    g.add_argument("--width", type=int, help="pixels, a multiple of 16 (default 1024; tiny-random on a CPU: 256)")
    g.add_argument("--height", type=int, help="pixels, a multiple of 16 (default 1024; tiny-random on a CPU: 256)")
    g.add_argument("--steps", type=int, help="denoising steps (default: dev 28, schnell 4)")
    g.add_argument("--guidance", type=float, help="distilled guidance (default: dev 3.5; schnell has none)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", type=Path, default=Path("out.png"), help="PNG path (written whole or not at all)")
    g.add_argument("--quantize", choices=["fp8", "fp8-weight"], help="fp8: W8A8 (sm_89+ GPU); fp8-weight: weights")
    g.add_argument("--no-compile", action="store_true", help="run the plain-PyTorch reference transformer")
    g.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"], help="fluxrt.compile backend")
    g.add_argument("--device", help="default: cuda when there is a GPU, else cpu")
    g.add_argument("--compare-reference", action="store_true",
                   help="first run the uncompiled reference transformer, then print per-step latency side by side")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check_args(args) -> None:
    for name in ("width", "height"):
        value = getattr(args, name)
        if value is not None and (value % 16 or not 16 <= value <= 4096):
            raise UsageError(f"--{name} must be a multiple of 16 between 16 and 4096, got {value}")
    if args.steps is not None and args.steps <= 0:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.out.suffix.lower() != ".png":
        raise UsageError(f"--out must name a .png file, got {str(args.out)!r}")
    if args.out.is_dir():
        raise UsageError(f"--out {str(args.out)!r} is a folder; name a .png file")
    if args.model != TINY_RANDOM and not Path(args.model).exists():
        raise UsageError(f"--model {args.model!r} does not exist (a local FLUX folder or file, or {TINY_RANDOM})")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device} asks for a CUDA GPU and this machine has none; use --device cpu")
    if args.no_compile and (args.quantize or args.compare_reference):
        raise UsageError("--quantize and --compare-reference need the compiled transformer; drop --no-compile")
    if args.quantize == "fp8":
        if device.type != "cuda":
            raise UsageError("--quantize fp8 (W8A8) needs an FP8-capable CUDA GPU (sm_89+: Ada, Hopper, Blackwell) "
                             f"and none is in use (device {device}); use --quantize fp8-weight")
        from .quantize import require_fp8_tensor_cores

        try:
            require_fp8_tensor_cores(device)
        except RuntimeError as err:
            raise UsageError(str(err)) from None


def _open_output(out: Path) -> Path:
    """A temp file beside `out` (same filesystem, so the final rename is atomic): fails now, not after sampling,
    when the folder cannot be written."""
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UsageError(f"cannot write --out {str(out)!r}: {str(blocker)!r} is a file, not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.open("xb").close()  # not mkstemp: that makes the file 0600, and the PNG should get the umask's mode
    except OSError as err:
        raise UsageError(f"cannot write --out {str(out)!r}: {err.strerror or err}") from None
    return tmp


def _generate(args) -> int:
    tmp = None
    try:
        _check_args(args)
        tmp = _open_output(args.out)
        _run_generate(args, tmp)
        os.replace(tmp, args.out)
        tmp = None
    except (ValueError, RuntimeError, OSError) as err:  # CheckpointError is a ValueError
        print(f"fluxrt: error: {_one_line(err)}", file=sys.stderr)
        return 2
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return 0


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _build_pipeline(args, compile: bool):
    common = dict(compile=compile, quantize=args.quantize if compile else None, backend=args.backend,
                  progress=not args.no_progress)
    if args.model == TINY_RANDOM:
        from .tiny import tiny_random_pipeline

        return tiny_random_pipeline(device=args.device, **common)
    from .pipeline import FluxPipeline

    return FluxPipeline.from_pretrained(args.model, autoencoder=args.ae, text_encoders=args.text_encoders,
                                        device=args.device, **common)


def _timed(pipe, call: dict) -> tuple[torch.Tensor, list[float]]:
    """The image ([1, 3, H, W] in [0, 1]) and the seconds each denoising step took."""
    stamps = [time.perf_counter()]

    def tick(step: int, total: int) -> None:
        if pipe.device.type == "cuda":
            torch.cuda.synchronize(pipe.device)
        stamps.append(time.perf_counter())

    image = pipe(**call, output_type="pt", callback=tick)
    return image, [b - a for a, b in zip(stamps[:-1], stamps[1:])]


def _run_generate(args, tmp: Path) -> None:
    from .pipeline import to_pil

    compile = not args.no_compile
    pipe = _build_pipeline(args, compile=compile and not args.compare_reference)
    tiny_cpu = args.model == TINY_RANDOM and pipe.device.type == "cpu"
    side = 256 if tiny_cpu else 1024
    call = dict(prompt=args.prompt, width=args.width or side, height=args.height or side, num_steps=args.steps,
                guidance=args.guidance, seed=args.seed)
    columns = {}
    if args.compare_reference:
        reference_image, columns["reference"] = _timed(pipe, call)
        pipe.accelerate(quantize=args.quantize, backend=args.backend)
    image, columns["fluxrt" if compile else "reference"] = _timed(pipe, call)
    to_pil(image)[0].save(tmp, format="PNG")  # no timestamps or other metadata: same seed, same bytes

    steps = len(next(iter(columns.values())))
    what = "random weights" if args.model == TINY_RANDOM else args.model
    print(f"fluxrt generate: {call['width']}x{call['height']}, {steps} steps, seed {args.seed}, {pipe.dtype} on "
          f"{pipe.device} ({what}; transformer hidden {pipe.config.hidden_size}, "
          f"{pipe.config.depth}+{pipe.config.depth_single_blocks} blocks)")
    if pipe.plan is not None:
        plan = pipe.plan["transformer"]
        vae = pipe.plan["autoencoder"]
        print(f"fluxrt plan: ops {sorted(set(plan['ops'].values()))}, linears {plan['linears']}, "
              f"cuda graphs {plan['cuda_graphs']}; VAE norms {vae['ops']['group_norm_silu']}, "
              f"{vae['convolutions']} convolutions")
    print("per-step latency (ms; step 1 includes warm-up and compilation)")
    print("step  " + "".join(f"{name:>12s}" for name in columns))
    for i in range(steps):
        print(f"{i + 1:4d}  " + "".join(f"{times[i] * 1e3:12.2f}" for times in columns.values()))
    medians = {name: statistics.median(times) for name, times in columns.items()}
    line = "median" + "".join(f"{m * 1e3:12.2f}" for m in medians.values())
    if len(medians) == 2:
        line += f"   fluxrt is {medians['reference'] / medians['fluxrt']:.2f}x the reference's speed"
        diff = (image - reference_image).abs().max().item()
        print(line + f"\nfluxrt vs reference image: max |difference| {diff:.2e} (pixel range 0..1)")
    else:
        print(line)
    print(f"wrote {args.out}")


# ---- bench ----


def _add_bench(sub) -> None:
    b = sub.add_parser("bench", help="per-step latency: diffusers vs fluxrt (GPU numbers only count)")
    b.add_argument("--model", default="tiny", choices=["tiny", "flux-dev", "flux-schnell"])
    b.add_argument("--size", nargs="+", default=["64x64"], help="WIDTHxHEIGHT, multiples of 16")
    b.add_argument("--batch", type=int, nargs="+", default=[1])
    b.add_argument("--impl", nargs="+", default=["diffusers-eager", "fluxrt-bf16", "fluxrt-fp8-weight"])
    b.add_argument("--iters", type=int, default=10)
    b.add_argument("--txt-len", type=int, default=None)
    b.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: benchmarks/results/step_<date>_<gpu>.json; CPU runs: the temp dir)")


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
