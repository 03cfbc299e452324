"""Benchmark fluxrt.kernels.fp8_gemm (FP8 weight-only linear) at FLUX.1's linear shapes against bf16 cuBLAS.

Shapes (N, K): double block qkv 9216x3072, proj 3072x3072, MLP up 12288x3072, MLP down 3072x12288; single block
linear1 21504x3072, linear2 3072x15360; modulation 18432x3072 (double) and 9216x3072 (single); for M tokens in
{1, 2, 4, 16, 512, 4352, 4608} (M <= 16: the modulation linears' and small-batch regime, split-K path; 4352 /
4608: schnell / dev at 1024², tiled path). bf16, random data, bias on every linear.

Per row: bf16 cuBLAS (F.linear with the unquantized bf16 weight), fluxrt weight-only fp8, and, where torch has
it, W8A8 torch._scaled_mm with rowwise scales (x quantized per row, weight per channel; the GEMM timed alone,
the eager activation quantization reported apart; no bias; "unavailable: <reason>" where it does not run, e.g.
M not a multiple of 16 or no fp8 tensor cores), and fluxrt's Triton W8A8 GEMM on the same quantized inputs
(bias fused), checked against the fp32 ref; `w8a8_triton_vs_scaled_mm` > 1 means Triton is faster. TFLOP/s counts 2·M·N·K; GB/s counts the bytes each must move
(weights + scales + activations + output + bias); fractions are of the measured copy bandwidth and bf16 matmul
rate. fluxrt's first call (autotune + compile) is reported as first_call_s, never in the median.

Before timing, fluxrt must pass DESIGN.md §4's rule against the fp32 truth (fp8_linear_ref on fp32 activations):
max error <= 2 x plain PyTorch bf16's (fp8_linear_eager) + 1e-2; a failing row carries the error, untimed.
The SQNR of each fp8 output vs the unquantized fp32 linear is reported too.

    python benchmarks/bench_fp8_gemm.py [--m 1 4 4608] [--shapes proj mlp_down]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import _common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = {  # name: (N, K)
    "qkv": (9216, 3072), "proj": (3072, 3072), "mlp_up": (12288, 3072), "mlp_down": (3072, 12288),
    "linear1": (21504, 3072), "linear2": (3072, 15360), "mod_double": (18432, 3072), "mod_single": (9216, 3072),
}
MS = [1, 2, 4, 16, 512, 4352, 4608]


def measure_matmul_tflops(n: int = 8192) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / (_common.bench(lambda: a @ b) * 1e-3) / 1e12


def w8a8_row(x, w8, scale, bias, unquantized, M, N, K) -> dict:
    """torch._scaled_mm with rowwise scales, or why it is unavailable (the bias is added outside the timing,
    for the SQNR only)."""
    if not hasattr(torch, "_scaled_mm"):
        return {"w8a8": "unavailable: torch._scaled_mm is missing"}
    from fluxrt.kernels._common import FP8_E4M3_MAX, MIN_SCALE
    from fluxrt.testing import sqnr_db

    def quantize_rows(x):
        sx = (x.float().abs().amax(dim=1, keepdim=True) / FP8_E4M3_MAX).clamp_min(MIN_SCALE)  # [M, 1]
        return (x.float() / sx).to(torch.float8_e4m3fn), sx

    try:
        x8, sx = quantize_rows(x)
        sw = scale[None, :].contiguous()  # [1, N]
        mm = lambda: torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)  # noqa: E731
        out = mm()
        torch.cuda.synchronize()
    except Exception as err:  # noqa: BLE001 -- any failure is recorded in the row, the benchmark goes on
        return {"w8a8": f"unavailable: {type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    ms = _common.bench(mm)
    nbytes = N * K + M * K + M * N * 2 + (M + N) * 4
    row = {
        "w8a8": "ok", "w8a8_ms": ms, "w8a8_TFLOP/s": 2 * M * N * K / (ms * 1e-3) / 1e12,
        "w8a8_GB/s": _common.gbps(nbytes, ms), "w8a8_quant_x_ms": _common.bench(lambda: quantize_rows(x)),
        "w8a8_sqnr_db_vs_unquantized": sqnr_db(out.float() + bias.float(), unquantized),
    }
    return {**row, **w8a8_triton_row(x8, sx[:, 0].contiguous(), w8, scale, bias, out, M, N, K, ms)}


def w8a8_triton_row(x8, sx, w8, scale, bias, scaled_mm_out, M, N, K, scaled_mm_ms) -> dict:
    """fluxrt's Triton W8A8 GEMM on the same quantized inputs (with the bias fused, which _scaled_mm's timing
    lacks), checked against the fp32 ref; its time vs _scaled_mm decides FP8Linear's w8a8_gemm default."""
    from fluxrt.kernels import fp8_gemm as fg
    from fluxrt.testing import max_abs_error

    try:
        out = fg.w8a8_linear(x8, sx, w8, scale, bias, out_dtype=torch.bfloat16)
        torch.cuda.synchronize()
    except Exception as err:  # noqa: BLE001 -- recorded in the row
        return {"w8a8_triton": f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    truth = fg.w8a8_linear_ref(x8, sx, w8, scale, bias, out_dtype=torch.float32)
    err_triton = max_abs_error(out, truth)
    err_scaled_mm = max_abs_error(scaled_mm_out.float() + bias.float(), truth)
    if err_triton > 2 * err_scaled_mm + 1e-2:
        return {"w8a8_triton": "MISMATCH", "w8a8_triton_max_err": err_triton, "w8a8_max_err": err_scaled_mm}
    ms = _common.bench(lambda: fg.w8a8_linear(x8, sx, w8, scale, bias, out_dtype=torch.bfloat16))
    return {"w8a8_triton": "ok", "w8a8_triton_ms": ms, "w8a8_triton_TFLOP/s": 2 * M * N * K / (ms * 1e-3) / 1e12,
            "w8a8_triton_vs_scaled_mm": scaled_mm_ms / ms, "w8a8_triton_max_err": err_triton}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, nargs="+", default=MS)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    _common.require_cuda()
    from fluxrt.kernels import fp8_gemm as fg
    from fluxrt.quantize import quantize_weight
    from fluxrt.testing import assert_within_rule, max_abs_error, sqnr_db

    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 truth must be fp32
    meta = {**_common.gpu_info(), "copy_gbps": _common.measure_copy_bandwidth(),
            "matmul_bf16_tflops": measure_matmul_tflops()}
    dtype, dev = torch.bfloat16, "cuda"
    rows = []
    for name in args.shapes:
        N, K = SHAPES[name]
        torch.manual_seed(N + K)
        w = (torch.randn(N, K, device=dev) / K**0.5).to(dtype)
        bias = (0.1 * torch.randn(N, device=dev)).to(dtype)
        w8, scale = quantize_weight(w)
        for M in args.m:
            x = torch.randn(M, K, device=dev, dtype=dtype)
            row = {"linear": name, "M": M, "N": N, "K": K, "path": "split-K" if M <= fg.SMALL_M else "tiled"}
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fg.fp8_linear(x, w8, scale, bias)
            torch.cuda.synchronize()
            row["first_call_s"] = time.perf_counter() - t0
            truth = fg.fp8_linear_ref(x.float(), w8, scale, bias.float())
            eager = fg.fp8_linear_eager(x, w8, scale, bias)
            unquantized = F.linear(x.float(), w.float(), bias.float())
            row["max_err_fluxrt"], row["max_err_eager"] = max_abs_error(out, truth), max_abs_error(eager, truth)
            row["sqnr_db_vs_unquantized"] = sqnr_db(out, unquantized)
            try:
                assert_within_rule(out, eager, truth, atol=1e-2, what=f"fp8_linear {name} M={M}")
            except AssertionError as err:
                print(f"MISMATCH, not timed: {row}\n{err}", file=sys.stderr)
                rows.append({**row, "error": str(err)})
                continue
            del out, truth, eager
            flops = 2 * M * N * K
            act_out_bytes = M * K * 2 + M * N * 2 + N * 2
            t_bf16 = _common.bench(lambda x=x, w=w, b=bias: F.linear(x, w, b))
            t_fp8 = _common.bench(lambda x=x, w8=w8, s=scale, b=bias: fg.fp8_linear(x, w8, s, b))
            gbps_fp8 = _common.gbps(N * K + N * 4 + act_out_bytes, t_fp8)
            row.update({
                "bf16_ms": t_bf16, "bf16_TFLOP/s": flops / (t_bf16 * 1e-3) / 1e12,
                "bf16_GB/s": _common.gbps(N * K * 2 + act_out_bytes, t_bf16),
                "fluxrt_ms": t_fp8, "fluxrt_TFLOP/s": flops / (t_fp8 * 1e-3) / 1e12, "fluxrt_GB/s": gbps_fp8,
                "fluxrt_frac_copy_bw": gbps_fp8 / meta["copy_gbps"],
                "fluxrt_frac_matmul_peak": flops / (t_fp8 * 1e-3) / 1e12 / meta["matmul_bf16_tflops"],
                "speedup_vs_bf16": t_bf16 / t_fp8,
            })
            row.update(w8a8_row(x, w8, scale, bias, unquantized, M, N, K))
            rows.append(row)
            print(row, flush=True)
            del x, unquantized
        del w, bias, w8, scale
        torch.cuda.empty_cache()
    _common.finish("fp8_gemm", rows, meta)


if __name__ == "__main__":
    main()
