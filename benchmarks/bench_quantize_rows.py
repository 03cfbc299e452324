"""Benchmark fluxrt.kernels.quantize_rows (per-row e4m3fn quantization, GELU-tanh fused) at FLUX.1's W8A8 inputs.

Cases (M = 4608 tokens, bf16, random data): attention output -> proj (K 3072), gelu(MLP up) -> MLP down (K 12288,
gelu_from 0), and the single block's [attention | gelu(mlp)] -> linear2 (K 15360, gelu_from 3072, read as a
column slice of the [M, 21504] linear1 output, as the model does). The Triton kernel vs its eager `_ref` vs
torch.compile(_ref), each as do_bench's median ms (L2 flushed between repetitions; compile time reported apart).
GB/s counts the bytes the op must move: the bf16 input read once, the fp8 output and the fp32 scales written
once; the kernel's second pass over a row is meant to hit L2 and is not counted. The Triton kernel is also given
as a fraction of the measured device-to-device copy bandwidth.

Checked before timing (a failing row carries the error, untimed): scales within 2e-6 of the ref's, every value
within one e4m3 step of the ref's, and bit-equal x8 and scales without GELU (fp32 GELU vs torch's may move a
value one step). fp8_frac_equal reports how many x8 values equal the ref's.

    python benchmarks/bench_quantize_rows.py [--cases proj mlp_down linear2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import _common  # noqa: E402
import torch  # noqa: E402

M = 4608
CASES = {  # name: (K, gelu_from, width of the buffer the rows are sliced from)
    "proj": (3072, None, 3072), "mlp_down": (12288, 0, 12288), "linear2": (15360, 3072, 21504),
}


def check(out, ref, exact: bool) -> dict:
    """How far x8 * scale is from the ref's; raises AssertionError where it breaks the rule above."""
    (x8, scale), (ref8, ref_scale) = out, ref
    got, want = x8.float(), ref8.float()
    step = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(2.0**-6))) - 3)  # e4m3 spacing at |want|
    worst_steps = ((got * scale[..., None] - want * ref_scale[..., None]).abs()
                   / (step * ref_scale[..., None])).max().item()
    stats = {"fp8_frac_equal": (got == want).float().mean().item(), "fp8_max_err_steps": worst_steps,
             "scale_max_rel_err": ((scale - ref_scale).abs() / ref_scale).max().item()}
    if exact:
        if not (torch.equal(x8.view(torch.uint8), ref8.view(torch.uint8)) and torch.equal(scale, ref_scale)):
            raise AssertionError(f"x8 / scales are not bit-equal to the ref's: {stats}")
    elif stats["scale_max_rel_err"] > 2e-6 or worst_steps > 1 + 1e-3 or stats["fp8_frac_equal"] < 0.99:
        raise AssertionError(f"beyond one e4m3 step / 99% equal / scale rtol 2e-6: {stats}")
    return stats


def bench_case(name: str, copy_gbps: float) -> dict:
    from fluxrt.kernels import quantize_rows as qr

    K, gelu_from, width = CASES[name]
    row = {"case": name, "M": M, "K": K, "gelu_from": gelu_from, "strided": width != K, "dtype": "bf16"}
    torch.manual_seed(0)
    x = (3 * torch.randn(M, width, device="cuda")).to(torch.bfloat16)[:, width - K :]
    nbytes = M * K * (2 + 1) + M * 4
    row["MB"] = nbytes / 1e6
    ref = qr.quantize_rows_ref(x, gelu_from)
    try:
        row.update(check(qr.quantize_rows(x, gelu_from), ref, exact=gelu_from is None))
    except AssertionError as e:
        print(f"MISMATCH, not timed: {row}\n{e}", file=sys.stderr)
        return {**row, "error": str(e)}
    compiled, compile_s, compiled_out = _common.compile_time(qr.quantize_rows_ref, x, gelu_from)
    try:
        check(compiled_out, ref, exact=False)
        compile_ok = True
    except AssertionError as e:
        print(f"warning: torch.compile(ref): {e} ({row})", file=sys.stderr)
        compile_ok = False
    del ref, compiled_out
    times = {k: _common.bench(lambda f=f: f(x, gelu_from))
             for k, f in (("triton", qr.quantize_rows), ("eager", qr.quantize_rows_ref), ("compile", compiled))}
    return {
        **row,
        **{f"{k}_ms": ms for k, ms in times.items()},
        **{f"{k}_GB/s": _common.gbps(nbytes, ms) for k, ms in times.items()},
        "triton_frac_copy_bw": _common.gbps(nbytes, times["triton"]) / copy_gbps,
        "speedup_vs_eager": times["eager"] / times["triton"], "speedup_vs_compile": times["compile"] / times["triton"],
        "compile_s": compile_s, "compile_ok": compile_ok,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    args = parser.parse_args()
    _common.require_cuda()
    meta = {**_common.gpu_info(), "copy_gbps": _common.measure_copy_bandwidth()}
    rows = []
    for name in args.cases:
        rows.append(bench_case(name, meta["copy_gbps"]))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    _common.finish("quantize_rows", rows, meta)


if __name__ == "__main__":
    main()
