"""Kernel-only durations of the modulated-norm kernels at B=1 (FLUX 1024²: L 4608, D 3072, bf16), for ncu.

do_bench times the op from the host's side; at B=1 these kernels run ~20-35 us, so launch overhead shows in
its numbers. This script just runs each op a few times with an L2 flush between, for ncu to time the kernels:

    PYTHONPATH=. ncu --clock-control none --metrics gpu__time_duration.sum,dram__bytes.sum \\
        -k regex:_modulated_norm_kernel python benchmarks/ncu_modulated_norm.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fluxrt.kernels import modulated_norm as K  # noqa: E402

B, L, D = 1, 4608, 3072


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("ncu_modulated_norm.py needs a CUDA GPU")
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x, y = torch.randn(B, L, D, **bf16), torch.randn(B, L, D, **bf16)
    gate, scale, shift = (torch.randn(B, D, **bf16) for _ in range(3))
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    ops = [
        lambda: K.modulated_layer_norm(x, scale, shift),
        lambda: K.gated_residual_norm(x, gate, y, scale, shift),
        lambda: K.gated_residual(x, gate, y),
    ]
    for op in ops * 3:  # autotune and warm up
        op()
    for op in ops * 5:
        flush.zero_()
        op()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
