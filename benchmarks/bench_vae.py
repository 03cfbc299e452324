"""Benchmark FLUX VAE decoding: diffusers AutoencoderKL (bf16, eager and torch.compile) vs fluxrt.compile.

FLUX's real autoencoder config with random weights (the same weights in every implementation), bf16, batch 1,
latents of 1024^2 and 2048^2 images. Per implementation: median decode latency (CUDA events, 2 warm-up decodes
excluded, torch.compile's first call timed apart as compile_s), peak allocated memory of one decode (and whether
it fits a 24 GB budget), and the output's error vs the fp32 reference decode (1024^2; DESIGN.md §4 rule: fluxrt's
error <= 2x diffusers bf16's + 1e-3). An out-of-memory decode is recorded as such, not as a crash. Then the
per-op GB/s of the extension ops (benchmarks/bench_group_norm_silu.py) at the decoder's shapes.

Without a GPU it runs a smoke test instead (a small autoencoder, 64² and 128² images, fp32 on the CPU, no
torch.compile, JSON to --out or the temp dir): the numbers are no claim, the run proves the script works.

    python benchmarks/bench_vae.py [--sizes 1024 2048] [--iters 5] [--skip-ops] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import _common  # noqa: E402
import torch  # noqa: E402

BUDGET_GB = 24


def diffusers_vae(ae, device, dtype):
    """A diffusers AutoencoderKL (same config) holding a copy of the fluxrt AutoEncoder's weights."""
    from diffusers import AutoencoderKL

    import fluxrt

    p = ae.params
    vae = AutoencoderKL(
        in_channels=p.in_channels, out_channels=p.out_ch, latent_channels=p.z_channels,
        block_out_channels=[p.ch * m for m in p.ch_mult], layers_per_block=p.num_res_blocks,
        down_block_types=["DownEncoderBlock2D"] * len(p.ch_mult), up_block_types=["UpDecoderBlock2D"] * len(p.ch_mult),
        norm_num_groups=p.norm_groups, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=p.scale_factor, shift_factor=p.shift_factor,
    ).to(device=device, dtype=dtype).eval().requires_grad_(False)
    vae.load_state_dict(fluxrt.vae_bfl_to_diffusers(ae.state_dict()), strict=True)
    return vae


def time_decode(decode, z, iters: int) -> tuple[dict, torch.Tensor | None]:
    """Median ms over `iters` decodes after 2 warm-ups (CUDA events on a GPU), and the peak memory of one decode."""
    cuda = z.is_cuda
    try:
        for _ in range(2):
            decode(z)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        out = decode(z)
        peak = None
        if cuda:
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        times = []
        for _ in range(iters):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                decode(z)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                decode(z)
                times.append((time.perf_counter() - t0) * 1e3)
    except torch.cuda.OutOfMemoryError as err:
        torch.cuda.empty_cache()
        return {"ms": None, "peak_gb": None, "error": f"OOM: {str(err).splitlines()[0]}"}, None
    row = {"ms": statistics.median(times), "peak_gb": peak}
    if peak is not None:
        row["fits_24gb"] = peak < BUDGET_GB
    return row, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes (default 1024 2048; CPU 64 128)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--skip-ops", action="store_true", help="do not run the per-op GB/s table")
    parser.add_argument("--out", type=Path, default=None, help="JSON path for a CPU smoke run (default: temp dir)")
    args = parser.parse_args()
    import fluxrt
    from fluxrt.reference import AutoEncoder, AutoEncoderParams
    from fluxrt.testing import randomize_parameters_, rel_error

    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    sizes = args.sizes or ([1024, 2048] if gpu else [64, 128])
    params = AutoEncoderParams() if gpu else AutoEncoderParams(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)
    meta = _common.gpu_info() if gpu else {"device": "cpu (smoke test: the numbers are no claim)",
                                           "torch": torch.__version__}
    with torch.device("meta"):
        ae32 = AutoEncoder(params)
    ae32 = randomize_parameters_(ae32.to_empty(device=device), 0).requires_grad_(False).eval()
    vae = diffusers_vae(ae32, device, dtype)
    fast = fluxrt.compile(copy.deepcopy(ae32).to(dtype))
    meta["fluxrt_plan"] = fast.plan
    rows = []
    with torch.inference_mode():
        for size in sizes:
            z = torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(size)).to(device)
            truth = ae32.decoder(z) if size <= 1024 else None  # fp32 reference (2048^2 fp32: skipped, memory)
            zd = z.to(dtype)
            cases = [("diffusers-eager", lambda x: vae.decode(x).sample)]
            compile_s = None
            if gpu:  # inductor on the CPU would spend minutes compiling a smoke test
                torch._dynamo.reset()
                compiled_decode = torch.compile(lambda x: vae.decode(x).sample, dynamic=False)
                t0 = time.perf_counter()
                try:
                    compiled_decode(zd)
                    torch.cuda.synchronize()
                    compile_s = time.perf_counter() - t0
                    cases.append(("diffusers-compile", compiled_decode))
                except torch.cuda.OutOfMemoryError as err:
                    rows.append({"impl": "diffusers-compile", "size": size,
                                 "error": f"OOM: {str(err).splitlines()[0]}"})
            cases.append(("fluxrt", fast.decode_unscaled))
            results = {}
            for impl, decode in cases:
                row, out = time_decode(decode, zd, args.iters)
                row = {"impl": impl, "size": size, **row}
                if impl == "diffusers-compile":
                    row["compile_s"] = compile_s
                if out is not None and truth is not None:
                    row["rel_err_vs_fp32"] = rel_error(out.float(), truth)
                results[impl] = row
                rows.append(row)
                print(row, flush=True)
                del out
            eager = results.get("diffusers-eager", {})
            for row in results.values():
                if row.get("ms") and eager.get("ms"):
                    row["speedup_vs_diffusers_eager"] = eager["ms"] / row["ms"]
            ours = results["fluxrt"]
            if "rel_err_vs_fp32" in ours and "rel_err_vs_fp32" in eager:
                if ours["rel_err_vs_fp32"] > 2 * eager["rel_err_vs_fp32"] + 1e-3:
                    ours["error"] = "fluxrt decode outside the accuracy rule vs the fp32 reference"
            del truth
            if gpu:
                torch.cuda.empty_cache()
    if not gpu:
        out = args.out or Path(tempfile.gettempdir()) / "fluxrt_vae_cpu.json"
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n")
        print(f"CPU smoke run (no claims): wrote {out}")
        if any("error" in r for r in rows):
            raise SystemExit("fluxrt's decode did not match the reference (see the error field)")
        return
    _common.finish("vae", rows, meta)
    if not args.skip_ops:
        import bench_group_norm_silu

        sys.argv = [sys.argv[0]]
        bench_group_norm_silu.main()


if __name__ == "__main__":
    main()
