"""Benchmark fluxrt.kernels.attention_lse (attention over one K/V block + its log-sum-exp) at context-parallel shapes.

One rank's attention call under context parallelism on N GPUs, flux-dev, B = 1, D = 128, bf16, S = 4608 (1024²:
4096 image + 512 text tokens) and 16896 (2048²). With Ulysses degree u and ring degree r (u·r = N) a rank holds
H = 24/u heads, and attends its S/r queries to one S/r-key block at a time (r blocks per layer):
    ring     u = 1: H = 24, Sq = Sk = S/N   (a ring-N layer runs N of these)
    ulysses  r = 1: H = 24/N (12, 6, 3), Sq = Sk = S
    usp      u, r > 1: H = 24/u, Sq = Sk = S/r
Timed (median of triton.testing.do_bench): fluxrt's attention_lse (fp32 out [B, H, Sq, D] + fp32 lse); torch's
flash SDPA with its logsumexp (aten._scaled_dot_product_flash_attention: the same two results, but the partial
output rounded to bf16, one rounding more per ring step in a merge); the joint_attention kernel at the same shape
(bf16 [B, S, H*D], no lse: the single-device forward's kernel, how fast this kernel could be without the fp32 store).
TFLOP/s counts 4·B·H·Sq·Sk·D; the fraction is of this GPU's measured bf16 matmul rate (8192³ torch.matmul).

Checked before timing, against attention_lse_ref in fp32: each output within DESIGN.md §4's rule with SDPA in the
input dtype as the baseline (+ atol), and each lse (ours, SDPA's) within LSE_ATOL. A failing implementation carries
the error in its row and is not timed; a failing fluxrt row fails the run.

    python benchmarks/bench_attention_lse.py [--seq 4608 16896] [--ranks 2 4 8]
    python benchmarks/bench_attention_lse.py --dry-run   # CPU: tiny fp32 shapes in Triton's interpreter, checks only
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import _common  # noqa: E402
import torch  # noqa: E402

B, HEADS, D = 1, 24, 128
OUT_ATOL = {torch.bfloat16: 1e-4, torch.float32: 1e-6}  # |out| < ~0.15: averages over thousands of random v rows
LSE_ATOL = 1e-4  # fp32-accumulated scores of the same input values: only summation order and exp2 vs exp differ
DRY_RUN = dict(seq=[40, 72], heads=HEADS, head_dim=64)  # tiny S (divisible by 8: every split), fp32


def cases(seqs: list[int], ranks: list[int], heads: int) -> list[dict]:
    """One row per distinct (scheme, H, Sq, Sk): every split u x r of each N (see the module docstring)."""
    rows = {}
    for S in seqs:
        for N in ranks:
            for u in (d for d in range(1, N + 1) if N % d == 0 and heads % d == 0):
                r = N // u
                scheme = "ring" if u == 1 else "ulysses" if r == 1 else "usp"
                row = {"scheme": scheme, "S": S, "N": N, "ulysses": u, "ring": r, "H": heads // u, "Sq": S // r,
                       "Sk": S // r}
                rows.setdefault((scheme, row["H"], row["Sq"], row["Sk"]), row)
    return list(rows.values())


def sdpa_with_lse(q, k, v):
    """torch's attention that also returns the logsumexp: the flash kernel on CUDA, its CPU twin elsewhere."""
    if q.is_cuda:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)


def as_projection_rows(x):
    """[B, H, S, D] -> [B, S, H*D], the joint kernel's output layout."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


def check(row: dict, q, k, v) -> dict:
    """Each implementation against the fp32 ref; returns {name: error} for those that fail (checked in order)."""
    from fluxrt.kernels import attention_lse as al
    from fluxrt.kernels import joint_attention as ja
    from fluxrt.testing import assert_within_rule, max_abs_error

    true_out, true_lse = al.attention_lse_ref(q.float(), k.float(), v.float())
    sdpa_out, sdpa_lse = sdpa_with_lse(q, k, v)
    atol = OUT_ATOL[q.dtype]
    errors = {}

    def attempt(name, fn):
        try:
            fn()
        except AssertionError as err:
            errors[name] = str(err).splitlines()[0][:300]

    def fluxrt_check():
        out, lse = al.attention_lse(q, k, v)
        assert_within_rule(out, sdpa_out, true_out, atol=atol, what="fluxrt out")
        torch.testing.assert_close(lse, true_lse, atol=LSE_ATOL, rtol=0, msg=lambda m: f"fluxrt lse: {m}")
        row["max_err_out_fluxrt"] = max_abs_error(out, true_out)
        row["max_err_lse_fluxrt"] = max_abs_error(lse, true_lse)

    def sdpa_check():
        torch.testing.assert_close(sdpa_lse, true_lse, atol=LSE_ATOL, rtol=0, msg=lambda m: f"SDPA lse: {m}")
        row["max_err_out_sdpa"] = max_abs_error(sdpa_out, true_out)
        row["max_err_lse_sdpa"] = max_abs_error(sdpa_lse, true_lse)

    def joint_check():
        assert_within_rule(ja.joint_attention(q, k, v), as_projection_rows(sdpa_out), as_projection_rows(true_out),
                           atol=atol, what="joint_attention out")

    attempt("fluxrt", fluxrt_check)
    attempt("sdpa_lse", sdpa_check)
    attempt("joint", joint_check)
    return errors


def make_qkv(row: dict, head_dim: int, dtype, device: str):
    """q, k, v as rope_qk_norm writes them: slices of one random [3, B, H, S, D] buffer."""
    gen = torch.Generator().manual_seed(row["S"] + row["H"] + row["Sq"])
    qkv = torch.randn(3, B, row["H"], row["Sq"], head_dim, generator=gen).to(device, dtype)
    return qkv[0], qkv[1], qkv[2]


def dry_run() -> list[dict]:
    """Every scheme's checks on tiny fp32 shapes in Triton's interpreter (bf16 dots are wrong there), untimed."""
    rows = []
    for row in cases(DRY_RUN["seq"], [2, 4, 8], DRY_RUN["heads"]):
        q, k, v = make_qkv(row, DRY_RUN["head_dim"], torch.float32, "cpu")
        errors = check(row, q, k, v)
        rows.append({**row, **{f"error_{name}": e for name, e in errors.items()}})
        if errors:
            rows[-1]["error"] = "; ".join(errors)
        print(rows[-1], flush=True)
    return rows


def measure_matmul_tflops(n: int = 8192) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / (_common.bench(lambda: a @ b) * 1e-3) / 1e12


def bench_row(row: dict, peak_tflops: float) -> dict:
    from fluxrt.kernels import attention_lse as al
    from fluxrt.kernels import joint_attention as ja

    q, k, v = make_qkv(row, D, torch.bfloat16, "cuda")
    row = {**row, "D": D}
    errors = check(row, q, k, v)
    row.update({f"error_{name}": e for name, e in errors.items()})
    if "fluxrt" in errors:
        row["error"] = errors["fluxrt"]
    timed = {"fluxrt": lambda: al.attention_lse(q, k, v), "sdpa_lse": lambda: sdpa_with_lse(q, k, v),
             "joint": lambda: ja.joint_attention(q, k, v)}
    flops = 4 * B * row["H"] * row["Sq"] * row["Sk"] * D
    for name, fn in timed.items():
        if name not in errors:
            ms = _common.bench(fn)
            row[f"{name}_ms"], row[f"{name}_TFLOP/s"] = ms, flops / (ms * 1e-3) / 1e12
    if "fluxrt_ms" in row:
        row["fluxrt_frac_matmul_peak"] = row["fluxrt_TFLOP/s"] / peak_tflops
        for other in ("sdpa_lse", "joint"):
            if f"{other}_ms" in row:
                row[f"fluxrt_vs_{other}"] = row[f"{other}_ms"] / row["fluxrt_ms"]
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[4608, 16896])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--dry-run", action="store_true", help="CPU, interpreter, tiny fp32 shapes: checks only")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before fluxrt.kernels imports triton
        rows = dry_run()
        if any("error" in r for r in rows):
            raise SystemExit("dry run: some rows did not match their reference (see the error column)")
        print(f"dry run: {len(rows)} rows checked, none timed")
        return rows
    _common.require_cuda()
    meta = {**_common.gpu_info(), "matmul_bf16_tflops": measure_matmul_tflops()}
    rows = []
    for case in cases(args.seq, args.ranks, HEADS):
        rows.append(bench_row(case, meta["matmul_bf16_tflops"]))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    _common.finish("attention_lse", rows, meta)
    return rows


if __name__ == "__main__":
    main()
