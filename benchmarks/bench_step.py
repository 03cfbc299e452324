"""Per-step latency at real FLUX widths (fluxrt.bench): the issue-6 table on a GPU, a smoke run on a CPU.

GPU: flux-dev at 1024², 512² and 2048x1024, batch 1 and 4, every implementation (diffusers eager, diffusers +
torch.compile, fluxrt bf16 / fp8 / fp8-weight). CPU: the tiny config at 64², a few implementations, numbers are
not claims. Writes benchmarks/results/step_<date>_<gpu>.json (+ .png with matplotlib); CPU runs go to the temp dir.

    python benchmarks/bench_step.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from fluxrt import bench  # noqa: E402


def main() -> None:
    if torch.cuda.is_available():
        result = bench.run("flux-dev", sizes=[(1024, 1024), (512, 512), (1024, 2048)], batches=[1, 4],
                           impls=bench.IMPLS, iters=20)
    else:
        result = bench.run("tiny", sizes=[(64, 64)], batches=[1], impls=("diffusers-eager", "fluxrt-bf16"), iters=3)
    bench.write(result, bench.default_output(result))


if __name__ == "__main__":
    main()
