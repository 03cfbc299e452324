"""Benchmark FLUX VAE decoding: diffusers AutoencoderKL (bf16, eager and torch.compile) vs fluxrt.compile.

FLUX's real autoencoder config with random weights (the same weights in every implementation), bf16, batch 1,
latents of 1024^2 and 2048^2 images. Per implementation: median decode latency (CUDA events, 2 warm-up decodes
excluded, torch.compile's first call timed apart as compile_s), peak allocated memory of one decode (and whether
it fits a 24 GB budget), and the output's error vs the fp32 reference decode (1024^2; DESIGN.md §4 rule: fluxrt's
error <= 2x diffusers bf16's + 1e-3). An out-of-memory decode is recorded as such, not as a crash. Then the
per-op GB/s of the extension ops (benchmarks/bench_group_norm_silu.py) at the decoder's shapes.

    python benchmarks/bench_vae.py [--sizes 1024 2048] [--iters 5] [--skip-ops]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import _common  # noqa: E402
import torch  # noqa: E402

BUDGET_GB = 24


def diffusers_vae(ae):
    """A diffusers AutoencoderKL (FLUX config) holding a copy of the fluxrt AutoEncoder's weights."""
    from diffusers import AutoencoderKL

    import fluxrt

    p = ae.params
    vae = AutoencoderKL(
        in_channels=p.in_channels, out_channels=p.out_ch, latent_channels=p.z_channels,
        block_out_channels=[p.ch * m for m in p.ch_mult], layers_per_block=p.num_res_blocks,
        down_block_types=["DownEncoderBlock2D"] * len(p.ch_mult), up_block_types=["UpDecoderBlock2D"] * len(p.ch_mult),
        norm_num_groups=p.norm_groups, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=p.scale_factor, shift_factor=p.shift_factor,
    ).to(device="cuda", dtype=torch.bfloat16).eval().requires_grad_(False)
    vae.load_state_dict(fluxrt.vae_bfl_to_diffusers(ae.state_dict()), strict=True)
    return vae


def time_decode(decode, z, iters: int) -> dict:
    """Median ms over `iters` decodes after 2 warm-ups, and the peak memory of one decode."""
    try:
        for _ in range(2):
            decode(z)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = decode(z)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            decode(z)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    except torch.cuda.OutOfMemoryError as err:
        torch.cuda.empty_cache()
        return {"ms": None, "peak_gb": None, "error": f"OOM: {str(err).splitlines()[0]}"}, None
    return {"ms": statistics.median(times), "peak_gb": peak, "fits_24gb": peak < BUDGET_GB}, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--skip-ops", action="store_true", help="do not run the per-op GB/s table")
    args = parser.parse_args()
    _common.require_cuda()
    import fluxrt
    from fluxrt.reference import AutoEncoder
    from fluxrt.testing import randomize_parameters_, rel_error

    meta = _common.gpu_info()
    with torch.device("meta"):
        ae32 = AutoEncoder()
    ae32 = randomize_parameters_(ae32.to_empty(device="cuda"), 0).requires_grad_(False).eval()
    vae = diffusers_vae(ae32)
    fast = fluxrt.compile(copy.deepcopy(ae32).to(torch.bfloat16))
    meta["fluxrt_plan"] = fast.plan
    rows = []
    with torch.inference_mode():
        for size in args.sizes:
            z = torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(size)).cuda()
            truth = ae32.decoder(z) if size <= 1024 else None  # fp32 reference (2048^2 fp32: skipped, memory)
            zb = z.bfloat16()
            cases = [("diffusers-eager", lambda x: vae.decode(x).sample)]
            torch._dynamo.reset()
            compiled_decode = torch.compile(lambda x: vae.decode(x).sample, dynamic=False)
            t0 = time.perf_counter()
            try:
                compiled_decode(zb)
                torch.cuda.synchronize()
                compile_s = time.perf_counter() - t0
                cases.append(("diffusers-compile", compiled_decode))
            except torch.cuda.OutOfMemoryError as err:
                rows.append({"impl": "diffusers-compile", "size": size, "error": f"OOM: {str(err).splitlines()[0]}"})
            cases.append(("fluxrt", fast.decode_unscaled))
            results = {}
            for impl, decode in cases:
                row, out = time_decode(decode, zb, args.iters)
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
            del truth, compiled_decode
            torch.cuda.empty_cache()
    _common.finish("vae", rows, meta)
    if not args.skip_ops:
        import bench_group_norm_silu

        sys.argv = [sys.argv[0]]
        bench_group_norm_silu.main()


if __name__ == "__main__":
    main()
