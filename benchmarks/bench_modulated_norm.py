"""Benchmark fluxrt.kernels.modulated_norm at FLUX.1 sizes (L = 4608 tokens, D = 3072, bf16, random data).

For modulated_layer_norm, gated_residual_norm and gated_residual: the Triton kernel vs its eager `_ref` formula
vs torch.compile(_ref), each as do_bench's median ms (L2 flushed between repetitions; compile time reported
apart). The ops are pure bandwidth, so GB/s counts the bytes each must move — every [B, L, D] tensor read once or
written once (modulated_layer_norm: x in, out; gated_residual_norm: x, y in, h, out; gated_residual: x, y in, h)
plus the [B, D] vectors — and the Triton kernel is also given as a fraction of the measured device-to-device
copy bandwidth. Before timing, the Triton result must pass DESIGN.md §4's rule against the fp32 truth (the ref
on fp32 inputs): max error <= 2 x the eager bf16 ref's + 1e-2 (see _common.compare).

    python benchmarks/bench_modulated_norm.py [--batch 1 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import _common  # noqa: E402
import torch  # noqa: E402

L, D = 4608, 3072


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    _common.require_cuda()
    from fluxrt.kernels import modulated_norm as mn

    meta = {**_common.gpu_info(), "copy_gbps": _common.measure_copy_bandwidth()}
    dtype, dev = torch.bfloat16, "cuda"
    rows = []
    for B in args.batch:
        torch.manual_seed(0)
        x, y = (torch.randn(B, L, D, dtype=dtype, device=dev) for _ in range(2))
        gate, scale, shift = (torch.randn(B, D, dtype=dtype, device=dev) for _ in range(3))
        big, vec = B * L * D * x.element_size(), B * D * x.element_size()
        cases = [  # op, triton, ref, args, bytes moved
            ("modulated_layer_norm", mn.modulated_layer_norm, mn.modulated_layer_norm_ref,
             (x, scale, shift), 2 * big + 2 * vec),
            ("gated_residual_norm", mn.gated_residual_norm, mn.gated_residual_norm_ref,
             (x, gate, y, scale, shift), 4 * big + 3 * vec),
            ("gated_residual", mn.gated_residual, mn.gated_residual_ref, (x, gate, y), 3 * big + vec),
        ]
        for op, fn, ref, fargs, nbytes in cases:
            row = {"op": op, "B": B, "L": L, "D": D, "dtype": "bf16"}
            rows.append(_common.compare(row, fn, ref, fargs, nbytes, meta["copy_gbps"]))
            print(rows[-1], flush=True)
        del x, y, gate, scale, shift
        torch.cuda.empty_cache()
    _common.finish("modulated_norm", rows, meta)


if __name__ == "__main__":
    main()
