"""What a live preview costs against a denoising step (issue 23: "previews must cost < 2 % of step time at 1024² on a
GPU; on the CPU, measure and report").

Per image size, on the same latents' shape:
- step_ms: one transformer call, the compiled fluxrt path (fluxrt.bench's "fluxrt-bf16": random weights at the
  preset's real widths, real position ids, T5 length 512, batch 1); median of --iters after --warmup calls, CUDA
  events on a GPU; the first call (compile, autotune, graph capture) is reported apart as first_call_s.
- preview_ms: what a preview costs the denoising thread, exactly the step batcher's call
  (fluxrt.serve.batching.StepBatcher._send_previews): LatentPreview.of(autoencoder).denoised_rgb(latents, velocity,
  t, height, width) on the row's fp32 packed latents and velocity, i.e. the [L, 64] multiply-add of the denoised
  estimate, the [L, 16] x [16, 3] projection on the latents' device and the copy of the uint8 [h, w, 3] to the CPU. Host clock from a synchronized device to the returned CPU tensor: launch overhead,
  kernels, copy and sync all count, and the step's own pending work does not. On a GPU preview_gpu_ms adds the
  device-side time alone (CUDA events).
- ratio_pct = 100 * preview_ms / step_ms: a preview after every step (preview_every 1, the worst case); verdict PASS
  when below BOUND_PCT, judged on a GPU only.
- off_thread_ms: the part the HTTP layer runs off the denoising thread (fluxrt.serve.app._partial_event): the
  nearest upsampling to the requested size (LatentPreview.image) and the PNG encode to base64. Reported, not bound.
The projection is fitted from an autoencoder of FLUX's structure with random weights (fluxrt's AutoEncoder, built as
fluxrt.tiny builds the tiny-random model's: full config on a GPU, fluxrt.tiny.TINY_AUTOENCODER on the CPU); the fit
is a one-off per autoencoder, timed apart as fit_s. The preview's cost does not depend on the weights.

GPU: flux-dev at 1024x1024, 512x512 and 2048x1024, bf16; results to benchmarks/results/preview_<date>_<gpu>.json
and .md naming the GPU (benchmarks/_common); the exit status is 1 when a size fails the bound.
CPU: the tiny config at 256x256 and 1024x1024, fp32, labelled "CPU (not a GPU claim)": the numbers show the script
works and what the preview costs next to a tiny model's step, nothing about a GPU; a new file in the temp dir unless
--out. --dry-run: 64x64, 2 timed calls (seconds; any device, the tiny config, never judged; the temp dir unless
--out).

    python benchmarks/bench_preview.py                       # GPU: the issue's table; CPU: the smoke sizes
    python benchmarks/bench_preview.py --size 1024x1024 --out benchmarks/results/preview_<date>_cpu.json
    python benchmarks/bench_preview.py --dry-run --out /tmp/preview.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import _common  # noqa: E402
import torch  # noqa: E402

from fluxrt import bench, cli  # noqa: E402
from fluxrt.config import FluxConfig  # noqa: E402
from fluxrt.preview import LatentPreview, png_base64  # noqa: E402
from fluxrt.reference import AutoEncoder, AutoEncoderParams  # noqa: E402
from fluxrt.tiny import TINY_AUTOENCODER  # noqa: E402

BOUND_PCT = 2.0  # the bound on a preview's share of a step at 1024² on a GPU
IMPL = "fluxrt-bf16"  # the compiled fluxrt step, the one a server runs
CPU_LABEL = "CPU (not a GPU claim)"


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run measures, from the device and the flags."""

    model: str
    sizes: tuple[tuple[int, int], ...]  # (height, width), fluxrt.bench's order
    iters: int
    warmup: int
    full_autoencoder: bool


GPU_PLAN = Plan("flux-dev", ((1024, 1024), (512, 512), (1024, 2048)), iters=20, warmup=3, full_autoencoder=True)
CPU_PLAN = Plan("tiny", ((256, 256), (1024, 1024)), iters=5, warmup=1, full_autoencoder=False)
DRY_RUN_PLAN = Plan("tiny", ((64, 64),), iters=2, warmup=1, full_autoencoder=False)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", nargs="+", help="WIDTHxHEIGHT, multiples of 16 (default GPU: 1024x1024 512x512 "
                        "2048x1024; CPU: 256x256 1024x1024)")
    parser.add_argument("--iters", type=int, help=f"timed calls per measurement, 1..{bench.MAX_ITERS}; the median "
                        "counts (default GPU 20, CPU 5)")
    parser.add_argument("--warmup", type=int, help=f"untimed calls before them, 0..{bench.MAX_ITERS} (default GPU 3, "
                        "CPU 1)")
    parser.add_argument("--dry-run", action="store_true", help="the tiny config at 64x64, 2 timed calls: seconds, "
                        "proves the script works (--size, --iters, --warmup still apply)")
    parser.add_argument("--out", type=Path, help="the JSON path, a .md table beside it (default GPU: "
                        "benchmarks/results/preview_<date>_<gpu>.json; CPU: a new file in the temp dir)")
    args = parser.parse_args(argv)
    try:
        args.sizes = tuple(cli._parse_sizes(args.size, "--size")) if args.size else None
        if args.iters is not None:
            bench.check_iters(args.iters, "--iters")
        if args.warmup is not None and not 0 <= args.warmup <= bench.MAX_ITERS:
            raise ValueError(f"--warmup must be between 0 and {bench.MAX_ITERS}, got {args.warmup}")
    except ValueError as err:
        parser.error(str(err))
    return args


def plan_for(args: argparse.Namespace, device: torch.device) -> Plan:
    base = DRY_RUN_PLAN if args.dry_run else GPU_PLAN if device.type == "cuda" else CPU_PLAN
    given = {"sizes": args.sizes, "iters": args.iters, "warmup": args.warmup}
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


def default_output(device: torch.device, now: datetime, dry_run: bool) -> Path:
    """A GPU's full run: the committed results' name; a CPU run or a dry run: a temp file no other run shares (the
    temp dir is shared), so a smoke run never lands among the results."""
    if device.type == "cuda" and not dry_run:
        return _common.RESULTS / f"preview_{now:%Y-%m-%d}_{_common.gpu_slug()}.json"
    return Path(tempfile.gettempdir()) / f"fluxrt_preview_{now:%Y%m%d-%H%M%S}_{os.getpid()}_{device.type}.json"


# ---- the parts timed ----


def build_autoencoder(full: bool, device: torch.device, dtype: torch.dtype, seed: int = 0) -> AutoEncoder:
    """FLUX's autoencoder structure with random weights, initialised as fluxrt.tiny's (PyTorch's default init)."""
    torch.manual_seed(seed)
    params = AutoEncoderParams() if full else TINY_AUTOENCODER
    return AutoEncoder(params).to(device, dtype).eval().requires_grad_(False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn, iters: int, warmup: int, device: torch.device) -> float:
    """Median host-clock ms of fn() from a synchronized device until fn's work is done (what its caller waits)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def fit_seconds(autoencoder, device: torch.device) -> float:
    """The one-off fit of the preview's projection (LatentPreview.of's first call for this autoencoder)."""
    _sync(device)
    start = time.perf_counter()
    LatentPreview.of(autoencoder)
    _sync(device)
    return time.perf_counter() - start


def step_times(net, inputs: dict, plan: Plan, device: torch.device) -> tuple[float, float]:
    """(first call s, median ms) of one transformer step (fluxrt.bench's timing: CUDA events on a GPU)."""
    with torch.inference_mode():
        first_ms = bench._time_ms(lambda: net(**inputs), 1, device)[0]
        bench._time_ms(lambda: net(**inputs), plan.warmup, device)
        return first_ms / 1e3, statistics.median(bench._time_ms(lambda: net(**inputs), plan.iters, device))


def preview_times(autoencoder, latents, height: int, width: int, plan: Plan, device: torch.device) -> dict:
    """The denoising thread's cost (and on a GPU the device's share of it), then the off-thread PNG's."""
    velocity = torch.randn_like(latents)  # the step's prediction (its values do not change the cost)

    def on_thread():  # as StepBatcher._send_previews, at a mid-run time
        return LatentPreview.of(autoencoder).denoised_rgb(latents, velocity, 0.5, height, width)

    rgb = on_thread()
    times = {"preview_ms": wall_ms(on_thread, plan.iters, plan.warmup, device), "preview_gpu_ms": None}
    if device.type == "cuda":
        times["preview_gpu_ms"] = statistics.median(bench._time_ms(on_thread, plan.iters, device))
    times["off_thread_ms"] = wall_ms(lambda: png_base64(LatentPreview.image(rgb, height, width)), plan.iters,
                                     plan.warmup, device)
    return times


# ---- the run ----


def measure(plan: Plan, device: torch.device, seed: int = 0) -> tuple[list[dict], dict]:
    """The rows (one per size) and the run's facts (dtype, fit_s, ...)."""
    cfg = FluxConfig.preset(plan.model)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as fluxrt.bench
    txt_len = bench.MAX_TXT_LEN  # FLUX.1-dev's T5 length; the tiny preset is dev's shape
    autoencoder = build_autoencoder(plan.full_autoencoder, device, dtype, seed)
    facts = {"model": plan.model, "impl": IMPL, "dtype": str(dtype), "batch": 1, "txt_len": txt_len,
             "iters": plan.iters, "warmup": plan.warmup, "bound_pct": BOUND_PCT,
             "autoencoder": "FLUX full config" if plan.full_autoencoder else "fluxrt.tiny.TINY_AUTOENCODER",
             "fit_s": fit_seconds(autoencoder, device)}
    net = bench._build(IMPL, cfg, dtype, device, seed)
    rows = []
    for height, width in plan.sizes:
        inputs = bench._inputs(cfg, 1, height, width, txt_len, dtype, device, seed)
        first_s, step_ms = step_times(net, inputs, plan, device)
        latents = inputs["hidden_states"].float()  # the batcher's rows keep fp32 packed latents [1, L, 64]
        row = {"width": width, "height": height, "latent_pixels": (height // 8) * (width // 8),
               "step_ms": step_ms, "first_call_s": first_s,
               **preview_times(autoencoder, latents, height, width, plan, device)}
        rows.append(judge(row, unjudged_because(plan, device)))
        print(summary(rows[-1]), flush=True)
    return rows, facts


def unjudged_because(plan: Plan, device: torch.device) -> str | None:
    """Why the bound does not apply to this run (it is a claim about FLUX's real step on a GPU), or None."""
    if device.type != "cuda":
        return "CPU"
    return "tiny config" if plan.model == "tiny" else None


def judge(row: dict, unjudged: str | None) -> dict:
    ratio = 100 * row["preview_ms"] / row["step_ms"]
    verdict = f"not judged ({unjudged})" if unjudged else "PASS" if ratio < BOUND_PCT else "FAIL"
    return {**row, "ratio_pct": ratio, "off_thread_pct": 100 * row["off_thread_ms"] / row["step_ms"],
            "verdict": verdict}


def summary(row: dict) -> str:
    return (f"{row['width']}x{row['height']}: preview {row['preview_ms']:.3f} ms / step {row['step_ms']:.2f} ms = "
            f"{row['ratio_pct']:.3f} % ({row['verdict']}, bound {BOUND_PCT} %); off the thread (upsample + PNG) "
            f"{row['off_thread_ms']:.2f} ms")


def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"label": f"GPU: {torch.cuda.get_device_name(device)}", **_common.gpu_info()}
    return {"label": CPU_LABEL, **bench._environment(device)}


def markdown(result: dict) -> str:
    meta = result["meta"]
    head = [f"# Preview cost vs step time: {meta['label']}", ""]
    head += [f"- {key}: {_common._fmt(value)}" for key, value in meta.items()
             if key != "label" and value is not None]
    note = ("ratio_pct = preview_ms / step_ms (a preview after every step); the bound is the issue's, on a GPU at "
            "1024²; off_thread_ms (upsample + PNG) runs in the HTTP layer, not on the denoising thread.")
    return "\n".join(head) + "\n\n" + _common.markdown_table(result["rows"]) + f"\n\n{note}\n"


def reserve_outputs(out: Path) -> list:
    """The JSON and its .md table, reserved before any work (fluxrt.cli's outputs: an unwritable path fails now, and a
    failed run leaves no half-written file); one failing releases the other."""
    outputs = []
    try:
        outputs.append(cli._Output(out, "--out", ".json", " (the .md table goes beside it)"))
        outputs.append(cli._Output(out.with_suffix(".md"), "--out's table", ".md", ""))
    except cli.UsageError as err:
        discard(outputs)
        raise SystemExit(f"{Path(__file__).name}: error: {err}") from None
    return outputs


def discard(outputs: list) -> None:
    for output in reversed(outputs):  # the last reserved first: the folders the first one made are then empty
        output.discard()


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out or default_output(device, datetime.now(timezone.utc), args.dry_run)
    outputs = reserve_outputs(out)
    try:
        rows, facts = measure(plan_for(args, device), device)
        result = {"meta": {**environment(device), **facts}, "rows": rows}
        outputs[0].tmp.write_text(json.dumps(result, indent=2) + "\n")
        outputs[1].tmp.write_text(markdown(result))
    except BaseException:
        discard(outputs)
        raise
    for output in outputs:
        output.commit()
    print(f"{result['meta']['label']}: wrote {out} and {out.with_suffix('.md')}")
    failed = [f"{r['width']}x{r['height']}" for r in rows if r["verdict"] == "FAIL"]
    if failed:
        print(f"previews cost {BOUND_PCT} % of a step or more at {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
