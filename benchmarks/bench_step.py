"""Per-step latency at real FLUX widths (fluxrt.bench): the issue-6 table on a GPU, a smoke run on a CPU.

GPU: flux-dev at 1024², 512² and 2048x1024, batch 1 and 4, every implementation (diffusers eager, diffusers +
torch.compile, fluxrt bf16 / fp8 / fp8-weight / fp8-attn). CPU: the tiny config at 64², a few implementations,
numbers are not claims. Runs `fluxrt bench` with these settings, so its checks, output file and exit codes apply:
benchmarks/results/step_<date>_<gpu>.json (+ .png with matplotlib); CPU runs write a new file in the temp dir.
Extra arguments go to `fluxrt bench` (e.g. --out PATH).

    python benchmarks/bench_step.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from fluxrt import bench, cli  # noqa: E402


def settings() -> list[str]:
    if torch.cuda.is_available():
        return ["--model", "flux-dev", "--size", "1024x1024", "512x512", "2048x1024", "--batch", "1", "4",
                "--impl", *bench.IMPLS, "--iters", "20"]
    return ["--model", "tiny", "--size", "64x64", "--batch", "1", "--impl", "diffusers-eager", "fluxrt-bf16",
            "--iters", "3"]


if __name__ == "__main__":
    sys.exit(cli.main(["bench", *settings(), *sys.argv[1:]]))
