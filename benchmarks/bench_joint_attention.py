"""Benchmark fluxrt.kernels.joint_attention against every torch SDPA backend at FLUX.1 sequence lengths.

B = 1, H = 24 heads of D = 128, bf16, non-causal, no mask; S = 4352 (schnell 1024², 256 text tokens),
4608 (dev 1024², 512 text), 8704 (2048x1024) and 16896 (2048²). TFLOP/s counts 4·B·H·S²·D (two matmuls);
the fraction is of this GPU's measured bf16 matmul rate (8192³ torch.matmul, random data). Our kernel also
writes [B, S, H*D] (the projection's layout); SDPA writes [B, H, S, D] and would need a transpose copy after,
which is not counted against it. The FP8 path (e4m3 q, k, v with per-(batch, head) scales; quantization
not timed) is reported with its SQNR against the fp32 reference and against the bf16 kernel. Before timing, the kernel must pass DESIGN.md §4's rule against the fp32
reference (max error <= 2 x SDPA-bf16's + 1e-2). Median of triton.testing.do_bench.

Every load variant of the kernel (ja.VARIANTS: pointer, TMA descriptors, TMA + warp specialization) is checked
and timed as `fluxrt[<variant>]`; one that fails to compile or is wrong on this GPU is reported, not fatal.
`fluxrt` is ja.DEFAULT_VARIANT. Also timed: the W8A8 path's attention with e4m3 output rows
(joint_attention_fp8_out) against the bf16 kernel followed by quantize_rows, what it replaces.

    python benchmarks/bench_joint_attention.py [--seq 4352 4608 8704 16896]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import _common  # noqa: E402
import torch  # noqa: E402

B, H, D = 1, 24, 128


def measure_matmul_tflops(n: int = 8192) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / (_common.bench(lambda: a @ b) * 1e-3) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[4352, 4608, 8704, 16896])
    args = parser.parse_args()
    _common.require_cuda()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fluxrt.kernels import joint_attention as ja
    from fluxrt.testing import assert_within_rule, sqnr_db

    meta = {**_common.gpu_info(), "matmul_bf16_tflops": measure_matmul_tflops()}
    backends = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
                "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}
    rows = []
    for S in args.seq:
        torch.manual_seed(S)
        q, k, v = torch.randn(3, B, H, S, D, device="cuda", dtype=torch.bfloat16)
        flops = 4 * B * H * S * S * D
        row = {"S": S, "B": B, "H": H, "D": D}
        truth = ja.joint_attention_ref(q.float(), k.float(), v.float())
        out = ja.joint_attention(q, k, v)
        assert_within_rule(out, ja.sdpa_attention(q, k, v), truth, atol=1e-2, what=f"fluxrt attention S={S}")
        row["max_err_fluxrt"] = (out.float() - truth).abs().max().item()
        fp8_args = ja.quantize_qkv_fp8(q, k, v)
        out8 = ja.joint_attention_fp8(*fp8_args)
        row["fp8_sqnr_db_vs_fp32"] = sqnr_db(out8, truth)
        row["fp8_sqnr_db_vs_bf16"] = sqnr_db(out8, out)
        del truth, out, out8
        times = {"fluxrt": _common.bench(lambda: ja.joint_attention(q, k, v))}
        for variant in ja.VARIANTS:
            try:
                got = ja.joint_attention(q, k, v, variant=variant)
                assert_within_rule(got, ja.sdpa_attention(q, k, v), ja.joint_attention_ref(q.float(), k.float(),
                                   v.float()), atol=1e-2, what=f"variant {variant} S={S}")
                times[f"fluxrt[{variant}]"] = _common.bench(lambda: ja.joint_attention(q, k, v, variant=variant))
            except Exception as err:  # a variant this Triton/GPU cannot compile, or gets wrong: say so, go on
                row[f"fluxrt[{variant}]_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                print(f"variant {variant} failed at S={S}: {row[f'fluxrt[{variant}]_error']}", file=sys.stderr)
        from fluxrt.kernels.quantize_rows import quantize_rows
        v_absmax = v.float().abs().amax(dim=(1, 2, 3))[:, None].contiguous()
        row["fp8_out_ms"] = _common.bench(lambda: ja.joint_attention_fp8_out(q, k, v, v_absmax))
        row["bf16_then_quantize_rows_ms"] = _common.bench(lambda: quantize_rows(ja.joint_attention(q, k, v)))
        fp8_ms = _common.bench(lambda: ja.joint_attention_fp8(*fp8_args))  # quantization not included
        for name, backend in backends.items():
            try:
                with sdpa_kernel(backend):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v)  # raises if unavailable
                    times[name] = _common.bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
            except RuntimeError as err:
                print(f"{name} unavailable at S={S}: {str(err).splitlines()[0]}", file=sys.stderr)
        for name, ms in times.items():
            row[f"{name}_ms"] = ms
            row[f"{name}_TFLOP/s"] = flops / (ms * 1e-3) / 1e12
        row["fluxrt_fp8_ms"] = fp8_ms
        row["fluxrt_fp8_TFLOP/s"] = flops / (fp8_ms * 1e-3) / 1e12
        best = min((ms, name) for name, ms in times.items() if name.startswith("sdpa"))
        row["best_sdpa"] = best[1]
        row["fluxrt_vs_best_sdpa"] = best[0] / times["fluxrt"]
        row["fluxrt_frac_matmul_peak"] = row["fluxrt_TFLOP/s"] / meta["matmul_bf16_tflops"]
        rows.append(row)
        print(row, flush=True)
    _common.finish("joint_attention", rows, meta)


if __name__ == "__main__":
    main()
