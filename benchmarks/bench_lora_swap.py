"""Benchmark a LoRA hot-swap on FLUX.1-dev's side branches (fluxrt.lora_branch): load, swap, rescale, unload.

The branches are built at FLUX.1-dev's real shapes on the GPU (every linear, padded to --max-rank, bf16: about
0.6 GB at rank 64); the transformer's weights are not needed, a swap never touches them. Each LoRA updates every
block linear and modulation linear (the heaviest common case, "all linear layers" training) at --rank, its factors
in bf16 in pinned host memory, as fluxrt.load_lora leaves a file's tensors (on the host). Timed with
torch.cuda.synchronize around each operation (a swap's cost is host work + copies, not one kernel), the median of
--iters:

    load      LoraBranches.load of a LoRA into free columns (host -> device copies + the index writes)
    swap      unload the loaded LoRA, load another (what a server does between requests with different LoRAs)
    rescale   set_scales: one element write, the price of a scale change
    unload    zeroing one LoRA's columns in every branch

Prediction (before any GPU run): a rank-64 all-linear LoRA holds 64 x (in + out) bf16 values per linear, about 0.3
GB for FLUX.1-dev; copied from pinned memory at ~25-50 GB/s that is 6-12 ms, plus ~5 small launches per layer x
~500 layers (~2.5k launches, ~10-15 ms of host time). So load ~20-30 ms, swap ~30-40 ms: inside the issue's 50 ms
goal, bounded by launch count, not bytes. Zero recompiles and recaptures are structural (shapes and addresses never
change) and are counted in tests/test_lora_branch.py, not here.

    python benchmarks/bench_lora_swap.py [--rank 64] [--max-rank 64] [--iters 10]
    python benchmarks/bench_lora_swap.py --dry-run      # tiny shapes on the CPU, checks only, nothing timed
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import torch  # noqa: E402

from fluxrt import FluxConfig  # noqa: E402
from fluxrt.lora import Lora, LoraLayer  # noqa: E402
from fluxrt.lora_branch import LoraBranches, branched_linears  # noqa: E402
from fluxrt.reference import Flux  # noqa: E402


def block_linears(config: FluxConfig) -> dict[str, torch.nn.Module]:
    """FLUX's linears by BFL name, as meta modules (shapes only)."""
    with torch.device("meta"):
        return branched_linears(Flux(config))


def random_lora(linears: dict, rank: int, seed: int, pin: bool) -> Lora:
    """A LoRA on every block and modulation linear (the embedders and final layer left out, as trainers do)."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for name, m in linears.items():
        if not name.startswith(("double_blocks.", "single_blocks.")):
            continue
        down = (torch.randn(rank, m.in_features, generator=gen) / m.in_features**0.5).to(torch.bfloat16)
        up = (0.01 * torch.randn(m.out_features, rank, generator=gen)).to(torch.bfloat16)
        if pin:
            down, up = down.pin_memory(), up.pin_memory()
        layers.append(LoraLayer(name, down, up, alpha=float(rank)))
    return Lora(tuple(layers), "bfl")


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - start) * 1e3


def run(config: FluxConfig, rank: int, max_rank: int, iters: int, device: str) -> dict:
    on_gpu = device == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    linears = block_linears(config)
    branches = LoraBranches(linears, max_rank, 2, torch.bfloat16, device)
    a, b = random_lora(linears, rank, 0, on_gpu), random_lora(linears, rank, 1, on_gpu)
    times = {"load": [], "swap": [], "rescale": [], "unload": []}
    for _ in range(iters):
        times["load"].append(timed(lambda: branches.load("a", a), sync))
        times["swap"].append(timed(lambda: (branches.unload("a"), branches.load("b", b)), sync))
        times["rescale"].append(timed(lambda: branches.set_scales({"b": 0.5}), sync))
        times["unload"].append(timed(lambda: branches.unload("b"), sync))
    check(branches, linears, a)
    lora_bytes = sum(t.numel() * t.element_size() for layer in a.layers for t in (layer.down, layer.up))
    return {"rank": rank, "max_rank": max_rank, "layers": len(a.layers), "lora_mb": round(lora_bytes / 2**20, 1),
            "branch_mb": round(sum(t.numel() * t.element_size() for t in branches.buffers()) / 2**20, 1),
            **{f"{op}_ms": round(statistics.median(ms), 3) for op, ms in times.items()}}


def check(branches: LoraBranches, linears: dict, lora: Lora) -> None:
    """After the timed loop: one more load must write exactly the LoRA's update (scale 1: alpha = rank)."""
    branches.load("a", lora)
    layer = lora.layers[0]
    branch = branches.branch(layer.module)
    got = branch.up.float() @ branch.down.float()
    want = layer.up.float() @ layer.down.float()
    torch.testing.assert_close(got.cpu(), want, atol=2e-2, rtol=2e-2)
    branches.unload("a")
    assert not branch.up.any() and not branch.down.any(), "unload left values in the branch"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--max-rank", type=int, default=64)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks only, no timing claim")
    args = parser.parse_args(argv)
    if args.dry_run:
        row = run(FluxConfig.preset("tiny"), rank=4, max_rank=8, iters=2, device="cpu")
        print({k: v for k, v in row.items() if not k.endswith("_ms")}, "(dry run: CPU, nothing timed)")
        return 0
    import _common

    _common.require_cuda()
    row = run(FluxConfig.preset("flux-dev"), args.rank, args.max_rank, args.iters, "cuda")
    print(row, flush=True)
    _common.finish("lora_swap", [row], _common.gpu_info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
