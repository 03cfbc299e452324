"""Benchmark fluxrt.kernels.lora.lora_add (the LoRA side branch) against the base linear at FLUX-dev 1024² shapes.

Each row is one layer type at one row count M, one padded rank R and one x kind: "bf16" (x, y, down, up bf16;
base = torch bf16 F.linear) or "fp8" (x e4m3fn rows with per-row scales, as a W8A8 linear reads them; base =
torch._scaled_mm with rowwise scales, fluxrt.quantize.scaled_mm_rowwise). Timed, as do_bench's median ms: the
Triton lora_add, the torch formula (lora_add_ref: the op's torch backend, fp32), plain PyTorch in bf16 (what
peft computes: x @ A^T, scaled, @ B^T, + y, each rounded), and the base linear; branch_pct = Triton / base.
GB/s counts the bytes the branch must move (x, y read, out written, down, up, the fp32 h written and read) and is
also given as a fraction of the measured copy bandwidth (the branch is bandwidth bound: kernels/lora.py).

Rows: every layer at M = 4608 (one 1024² image with 512 text tokens, batch 1: qkv, proj, mlp_up, mlp_down of the
double blocks, linear1, linear2 of the single blocks) and the modulation GEMVs at M = 1; then the rows a flux-dev
step really has (the double blocks' image stream at 4096 rows and text stream at 512). The step estimate sums,
over FLUX-dev's 19 double blocks (img + txt: qkv, proj, mlp up / down, 2 modulations) and 38 single blocks
(linear1, linear2, modulation), branch time / base time: the LoRA overhead on the block linears (attention and
the rest of the step come on top of the base, so the share of a whole step is smaller).

Checked before timing, with DESIGN.md §4's rule (a failing row carries the error, untimed): max |Triton - truth|
<= 2 x max |plain PyTorch - truth| + atol, truth = lora_add_ref in fp32 without the final rounding.

    python benchmarks/bench_lora.py [--ranks 16 64 128] [--layers qkv proj ...] [--kinds bf16 fp8]
    python benchmarks/bench_lora.py --dry-run     # CPU: the same checks on tiny shapes in Triton's interpreter
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import _common  # noqa: E402
import torch  # noqa: E402

M = 4608  # rows of one 1024² image: 4096 image + 512 text tokens
LAYERS = {  # name: (K, N)
    "qkv": (3072, 9216), "proj": (3072, 3072), "mlp_up": (3072, 12288), "mlp_down": (12288, 3072),
    "linear1": (3072, 21504), "linear2": (15360, 3072), "mod_double": (3072, 18432), "mod_single": (3072, 9216),
}
DOUBLE = ("qkv", "proj", "mlp_up", "mlp_down")
# one flux-dev step at 1024², batch 1: (layer, M, calls per step)
STEP = ([(layer, rows, 19) for rows in (4096, 512) for layer in DOUBLE] + [("mod_double", 1, 2 * 19)]
        + [("linear1", 4608, 38), ("linear2", 4608, 38), ("mod_single", 1, 38)])
ADAPTERS = 3  # owner mixes three adapters; row_scales has a fourth, all zero, owning the two padded columns
DRY_RUN_SHRINK = 96  # --dry-run divides K and N by this (3072 -> 32) and uses M = 40 (1 for the GEMVs)


def cases(layers: list[str]) -> list[tuple[str, int]]:
    """(layer, M) pairs: the layers at M = 4608 (GEMVs at 1), then the step's other row counts."""
    main = [(name, 1 if name.startswith("mod") else M) for name in layers]
    return main + [(name, rows) for name, rows, _ in STEP if name in layers and (name, rows) not in main]


def make_inputs(K: int, N: int, rows: int, R: int, kind: str, dense: torch.dtype, device: str, seed: int) -> dict:
    """Random lora_add inputs (never zeros) and the base linear's weight, for one row."""
    from fluxrt.kernels.quantize_rows import quantize_rows_ref
    from fluxrt.quantize import quantize_weight

    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    x = randn(1, rows, K)
    owner = torch.arange(R) % ADAPTERS
    owner[-2:] = ADAPTERS  # the padded columns belong to an adapter whose scale is 0
    row_scales = torch.cat([torch.rand(1, ADAPTERS, generator=gen) + 0.5, torch.zeros(1, 1)], dim=1)
    inputs = dict(y=randn(1, rows, N), down=randn(R, K) / K**0.5, up=0.1 * randn(N, R), owner=owner,
                  row_scales=row_scales, weight=randn(N, K) / K**0.5)
    if kind == "fp8":
        inputs["x"], inputs["x_scale"] = quantize_rows_ref(x)
        inputs["weight"], inputs["weight_scale"] = quantize_weight(inputs["weight"])
    else:
        inputs["x"], inputs["x_scale"] = x, None
    for name in ("y", "down", "up", "weight", "x"):
        if inputs[name].dtype != torch.float8_e4m3fn:
            inputs[name] = inputs[name].to(dense)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}


def branch_args(i: dict) -> tuple:
    return i["y"], i["x"], i["down"], i["up"], i["owner"], i["row_scales"], i["x_scale"]


def plain(y, x, down, up, owner, row_scales, x_scale=None):
    """Plain PyTorch in y's dtype (peft's order of roundings): the low-precision baseline of the rule."""
    dt = y.dtype
    xd = x.to(dt) if x_scale is None else (x.float() * x_scale[..., None]).to(dt)
    scales = row_scales[:, owner.long()].to(dt)[:, None, :]
    return y + ((xd @ down.to(dt).t()) * scales) @ up.to(dt).t()


def check(i: dict, atol: float) -> dict:
    """The rule against the fp32 truth; raises AssertionError (with the errors) when the Triton output breaks it."""
    from fluxrt.kernels.lora import lora_add, lora_add_ref
    from fluxrt.testing import assert_within_rule, max_abs_error

    args = branch_args(i)
    truth = lora_add_ref(args[0].float(), *args[1:])
    out, baseline = lora_add(*args), plain(*args)
    assert out.dtype == args[0].dtype and out.shape == args[0].shape, f"out {out.dtype} {tuple(out.shape)}"
    assert_within_rule(out, baseline, truth, atol=atol, what="triton lora_add")
    return {"max_err_triton": max_abs_error(out, truth), "max_err_plain": max_abs_error(baseline, truth)}


def branch_bytes(K: int, N: int, rows: int, R: int, x_bytes: int, y_bytes: int, w_bytes: int) -> int:
    """What the branch must move: x read, y read + out written, down and up read, h written and read (fp32)."""
    return rows * K * x_bytes + 2 * rows * N * y_bytes + R * (K + N) * w_bytes + 2 * rows * R * 4


def base_linear(i: dict, kind: str):
    if kind == "fp8":
        from fluxrt.quantize import scaled_mm_rowwise

        return lambda: scaled_mm_rowwise(i["x"], i["x_scale"], i["weight"], i["weight_scale"], None, torch.bfloat16)
    return lambda: torch.nn.functional.linear(i["x"], i["weight"])


def bench_row(layer: str, rows: int, R: int, kind: str, copy_gbps: float) -> dict:
    from fluxrt.kernels.lora import lora_add, lora_add_ref

    K, N = LAYERS[layer]
    row = {"layer": layer, "M": rows, "K": K, "N": N, "R": R, "x": kind}
    i = make_inputs(K, N, rows, R, kind, torch.bfloat16, "cuda", seed=K + N + R + rows)
    try:
        row.update(check(i, atol=1e-3))
    except AssertionError as e:
        print(f"MISMATCH, not timed: {row}\n{e}", file=sys.stderr)
        return {**row, "error": str(e)}
    args = branch_args(i)
    times = {"triton": _common.bench(lambda: lora_add(*args)), "torch_ref": _common.bench(lambda: lora_add_ref(*args)),
             "plain_bf16": _common.bench(lambda: plain(*args)), "base": _common.bench(base_linear(i, kind))}
    nbytes = branch_bytes(K, N, rows, R, 1 if kind == "fp8" else 2, 2, 2)
    gbps = _common.gbps(nbytes, times["triton"])
    return {**row, **{f"{k}_ms": ms for k, ms in times.items()}, "branch_pct": 100 * times["triton"] / times["base"],
            "plain_pct": 100 * times["plain_bf16"] / times["base"], "triton_GB/s": gbps,
            "triton_frac_copy_bw": gbps / copy_gbps}


def step_estimate(rows: list[dict]) -> list[dict]:
    """Per (R, x kind): sum over a flux-dev step's block linears of branch time / sum of base times."""
    timed = {(r["layer"], r["M"], r["R"], r["x"]): r for r in rows if "triton_ms" in r}
    out = []
    for R, kind in dict.fromkeys((r["R"], r["x"]) for r in rows):
        parts = [(timed.get((layer, m, R, kind)), count) for layer, m, count in STEP]
        if any(r is None for r, _ in parts):
            out.append({"R": R, "x": kind, "step": "incomplete (a layer failed or was not run)"})
            continue
        total = {k: sum(r[f"{k}_ms"] * count for r, count in parts) for k in ("triton", "plain_bf16", "base")}
        out.append({"R": R, "x": kind, "base_ms_per_step": total["base"], "triton_ms_per_step": total["triton"],
                    "triton_pct_of_base": 100 * total["triton"] / total["base"],
                    "plain_bf16_pct_of_base": 100 * total["plain_bf16"] / total["base"]})
    return out


def dry_run(layers: list[str], ranks: list[int], kinds: list[str]) -> list[dict]:
    """The checks on tiny fp32 shapes (Triton's interpreter cannot do bf16 dots, DESIGN.md §4), nothing timed."""
    rows = []
    for layer in layers:
        K, N = (d // DRY_RUN_SHRINK for d in LAYERS[layer])
        count = 1 if layer.startswith("mod") else 40
        for R in ranks:
            for kind in kinds:
                row = {"layer": layer, "M": count, "K": K, "N": N, "R": R, "x": kind.replace("bf16", "fp32"),
                       "dense": "fp32"}
                try:
                    row.update(check(make_inputs(K, N, count, R, kind, torch.float32, "cpu", seed=K + N + R),
                                     atol=1e-5))
                except AssertionError as e:
                    row["error"] = str(e)
                rows.append(row)
                print(row, flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", nargs="+", choices=list(LAYERS), default=list(LAYERS))
    parser.add_argument("--ranks", nargs="+", type=int, default=[16, 64, 128])
    parser.add_argument("--kinds", nargs="+", choices=["bf16", "fp8"], default=["bf16", "fp8"])
    parser.add_argument("--dry-run", action="store_true", help="CPU, interpreter, tiny shapes: checks only")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before fluxrt.kernels imports triton
        rows = dry_run(args.layers, [r // 4 + 3 for r in args.ranks], args.kinds)  # not powers of two
        if any("error" in r for r in rows):
            raise SystemExit("dry run: some rows did not match their reference (see the error column)")
        print(f"dry run: {len(rows)} rows checked, none timed")
        return rows
    _common.require_cuda()
    meta = {**_common.gpu_info(), "copy_gbps": _common.measure_copy_bandwidth()}
    rows = []
    for layer, count in cases(args.layers):
        for R in args.ranks:
            for kind in args.kinds:
                rows.append(bench_row(layer, count, R, kind, meta["copy_gbps"]))
                print(rows[-1], flush=True)
                torch.cuda.empty_cache()
    _common.finish("lora", rows + step_estimate(rows), meta)
    return rows


if __name__ == "__main__":
    main()
