"""The LoRA side branch (kernels/lora.py): the Triton kernel vs lora_add_ref through fluxrt.ops.lora_add, errors,
the sm_90 compile, the benchmark's dry run.

CPU: Triton's interpreter with fp32 / fp16 dot operands (its bf16 dots are wrong, DESIGN.md §4; bf16 only as y,
where the interpreter's truncating fp32 -> bf16 store costs up to one ulp). GPU: bf16 and fp8 x at FLUX's shapes
against the fp32 truth with DESIGN.md §4's rule.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.library import opcheck

import fluxrt.ops as ops
from fluxrt.kernels import lora as L
from fluxrt.kernels.quantize_rows import quantize_rows_ref
from fluxrt.testing import assert_within_rule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO = Path(__file__).resolve().parents[2]


def make_inputs(B, T, K, N, R, seed, dense=torch.float32, y_dtype=None, adapters=3, fp8=False):
    """lora_add's arguments: x [B, T, K] (x [B, K] when T is None); owner mixes `adapters` adapters and gives the
    last two (padded) columns to one more adapter whose scale is 0 in every batch row; per-row scales differ."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    lead = (B,) if T is None else (B, T)
    owner = torch.randint(0, adapters, (R,), generator=gen)
    owner[-2:] = adapters
    row_scales = torch.cat([torch.rand(B, adapters, generator=gen) * 2 - 0.5, torch.zeros(B, 1)], dim=1)
    args = dict(y=randn(*lead, N).to(y_dtype or dense), x=randn(*lead, K), down=(randn(R, K) / K**0.5).to(dense),
                up=randn(N, R).to(dense), owner=owner, row_scales=row_scales, x_scale=None)
    if fp8:
        args["x"], args["x_scale"] = quantize_rows_ref(args["x"])  # on the host: the interpreter's e4m3 is off
    else:
        args["x"] = args["x"].to(dense)
    return {k: v.to(DEVICE) if v is not None else None for k, v in args.items()}


def run_both(args):
    """(triton output, torch output) through the op, each checked to have run on the backend it claims."""
    outs = []
    for backend in ("triton", "torch"):
        with ops.trace() as ran:
            outs.append(ops.lora_add(**args, backend=backend))
        assert ran == [("lora_add", backend)], ran
    return outs


def assert_matches_ref(args, atol=1e-5, rtol=1e-5):
    out, ref = run_both(args)
    assert out.dtype == args["y"].dtype and out.shape == args["y"].shape
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("B, T, K, N, R", [
    (1, 37, 40, 50, 20),  # R not a power of two; M, K, N not multiples of the interpreter's 16-wide tiles
    (3, 5, 33, 17, 7),  # three batch elements with their own scales, R < one rank tile
    (2, 16, 64, 48, 48),  # everything whole tiles
    (2, None, 40, 70, 20),  # the modulation GEMV: x [B, K]
])
def test_matches_ref_fp32(B, T, K, N, R):
    assert_matches_ref(make_inputs(B, T, K, N, R, seed=B * K + N + R))


def test_fp16_operands_split_h_into_two_halves():
    """fp16 x / down / up: fp16 dots in the shrink, and the expand's hi + lo split of h (two fp16 dots). One fp16
    half of h alone is ~1e-3 off (what the tight tolerance catches); the split is fp32-grade."""
    args = make_inputs(2, 9, 40, 50, 20, seed=1, dense=torch.float16, y_dtype=torch.float32)
    assert_matches_ref(args, atol=2e-5, rtol=2e-5)


def test_mixed_dtypes_are_fp32_dots():
    """x in another dtype than down: both go to fp32 (never x rounded to down's dtype, ~1e-3 off in fp16)."""
    args = make_inputs(2, 9, 40, 50, 20, seed=11, dense=torch.float16, y_dtype=torch.float32)
    assert_matches_ref({**args, "x": torch.randn(2, 9, 40, device=DEVICE)}, atol=2e-5, rtol=2e-5)
    bf16_x = make_inputs(2, 9, 40, 50, 20, seed=12, y_dtype=torch.bfloat16)  # fp32 factors, bf16 x and y
    bf16_x["x"] = bf16_x["x"].bfloat16()
    out, ref = run_both(bf16_x)
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-6, rtol=2**-7)


def test_bf16_y_is_rounded_once():
    """fp32 operands, bf16 y and out: one rounding of the fp32 sum; the interpreter's bf16 store truncates, so up
    to one bf16 ulp (2^-7 relative at most) from the reference's round-to-nearest."""
    args = make_inputs(2, 11, 40, 50, 20, seed=2, y_dtype=torch.bfloat16)
    out, ref = run_both(args)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-6, rtol=2**-7)
    assert (out == ref).float().mean() > 0.5, "most values must round to the reference's exactly"


def test_fp8_x_with_row_scales():
    args = make_inputs(2, 13, 40, 50, 20, seed=3, fp8=True)
    assert args["x"].dtype == torch.float8_e4m3fn and args["x_scale"].shape == (2, 13)
    assert_matches_ref(args)
    mod = make_inputs(3, None, 40, 70, 20, seed=4, fp8=True)  # the modulation shape, fp8 rows
    assert_matches_ref(mod)


def test_strided_rows_and_layouts():
    args = make_inputs(2, 7, 40, 50, 20, seed=5)
    wide_x = torch.randn(2, 7, 100, device=DEVICE)
    wide_x[..., 30:70] = args["x"]
    wide_y = torch.randn(2, 7, 90, device=DEVICE)
    wide_y[..., 10:60] = args["y"]
    strided = {**args, "x": wide_x[..., 30:70], "y": wide_y[..., 10:60]}  # column slices: rows strided
    assert strided["x"].stride(1) == 100 and strided["y"].stride(1) == 90
    assert_matches_ref(strided)
    out, _ = run_both(strided)
    torch.testing.assert_close(out, run_both(args)[0], atol=0, rtol=0)  # the same bits as from contiguous inputs
    transposed = {**args, "x": args["x"].transpose(0, 1).contiguous().transpose(0, 1),  # batch dims not mergeable
                  "down": args["down"].t().contiguous().t(), "up": args["up"].t().contiguous().t()}
    assert_matches_ref(transposed)
    permuted_y = {**args, "y": args["y"].transpose(0, 1).contiguous().transpose(0, 1)}  # out keeps y's layout
    out, ref = run_both(permuted_y)
    assert out.stride() == ref.stride() == permuted_y["y"].stride()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_per_row_scales_pick_each_rows_adapter():
    """Batch rows with different scales give what each row gives alone (the mixed-LoRA batch), and the all-zero
    scale of the padded columns' adapter really zeroes their (random, nonzero) up columns."""
    args = make_inputs(3, 5, 40, 50, 20, seed=6)
    batched, _ = run_both(args)
    for b in range(3):
        alone = {**args, **{k: args[k][b : b + 1] for k in ("y", "x", "row_scales")}}
        torch.testing.assert_close(batched[b : b + 1], run_both(alone)[0], atol=1e-6, rtol=1e-6)
    without_padding = {**args, "up": args["up"].clone()}
    without_padding["up"][:, -2:] = 0
    torch.testing.assert_close(batched, run_both(without_padding)[0], atol=1e-6, rtol=1e-6)


def test_empty_and_rank_zero():
    args = make_inputs(2, 5, 40, 50, 20, seed=7)
    no_rank = {**args, "down": args["down"][:0], "up": args["up"][:, :0], "owner": args["owner"][:0]}
    out, ref = run_both(no_rank)
    torch.testing.assert_close(out, args["y"], atol=0, rtol=0)
    torch.testing.assert_close(ref, args["y"], atol=0, rtol=0)
    no_rows = {**args, "y": args["y"][:, :0], "x": args["x"][:, :0]}
    assert run_both(no_rows)[0].shape == (2, 0, 50)
    no_k = {**args, "x": args["x"][..., :0], "down": args["down"][:, :0]}
    torch.testing.assert_close(run_both(no_k)[0], args["y"], atol=0, rtol=0)


def test_out_of_range_owner_gives_nan_in_the_kernel():
    """On a GPU owner is not checked on the host (that would synchronize at every linear): the kernel makes the
    scale of an out-of-range owner NaN, so the output is loudly wrong, never quietly."""
    args = make_inputs(1, 20, 40, 50, 20, seed=8)
    owner = args["owner"].clone()
    owner[3], owner[5] = 4, -1  # row_scales has 4 adapters
    h = L._shrink(args["x"].reshape(20, 40), args["down"], None, owner, args["row_scales"], 20)
    bad = torch.zeros(20, dtype=torch.bool, device=DEVICE)
    bad[[3, 5]] = True
    assert torch.isnan(h[:, bad]).all() and not torch.isnan(h[:, ~bad]).any()


def test_bad_inputs_are_refused_by_both_backends():
    args = make_inputs(2, 5, 40, 50, 20, seed=9)
    x8, x_scale = quantize_rows_ref(args["x"].float())
    cases = {
        r"up \(50, 21\) / owner \(20,\) torch.int64 must have R = 20 columns": {"up": torch.randn(50, 21)},
        r"up \(50, 20\) / owner \(19,\) torch.int64 must have R = 20": {"owner": args["owner"][:19]},
        r"row_scales must be \[B = 2, adapters\] float32, got \(2, 4\) torch.bfloat16":
            {"row_scales": args["row_scales"].bfloat16()},
        r"row_scales must be \[B = 2, adapters\] float32, got \(1, 4\)": {"row_scales": args["row_scales"][:1]},
        r"x is e4m3fn rows exactly when x_scale": {"x": x8},
        r"x is e4m3fn rows exactly when x_scale \[B, \.\.\.\] \(fp32\)": {"x": x8, "x_scale": x_scale.double()},
        r"x is e4m3fn rows exactly when x_scale \[B, \.\.\.\] \(fp32\) is given": {"x_scale": x_scale},
        r"x \(2, 5, 41\), y \(2, 5, 50\), down \(20, 40\), up \(50, 20\) do not chain": {"x": torch.randn(2, 5, 41)},
        r"x must be float32/float16/bfloat16 or float8_e4m3fn, got torch.float64": {"x": args["x"].double()},
        r"y, down, up must be float32/float16/bfloat16, got \{'down': torch.float64\}": {"down": args["down"].double()},
        r"x must be \[B, \.\.\., K\] \(at least 2-d\)": {"x": args["x"][0, 0], "y": args["y"][0, 0]},
    }
    if DEVICE == "cpu":  # checked on the host only where that costs no device synchronization
        cases[r"owner entries must index row_scales' 4 adapters, got values in \[-1, 3\]"] = {
            "owner": torch.cat([args["owner"][:-1], torch.tensor([-1])])}
    for message, change in cases.items():
        for backend in ("triton", "torch"):
            with pytest.raises(ValueError, match="lora_add: .*" + message):
                ops.lora_add(**{**args, **{k: v.to(DEVICE) for k, v in change.items()}}, backend=backend)
                pytest.fail(f"{backend} accepted: {message}")
    # another device (meta: the only other one on a CPU box; the op would route it to its fake, so the functions)
    for lora_add in (L.lora_add, L.lora_add_ref):
        with pytest.raises(ValueError, match=r"every input must be on x's device .*, got \{'up': 'meta'\}"):
            lora_add(**{**args, "up": args["up"].to("meta")})
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.lora_add(**args, backend="cuda")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    """The op's schema, fake (shapes and strides, a permuted y included) and compile tracing, on both backends."""
    args = make_inputs(2, 5, 40, 50, 20, seed=10)
    permuted_y = {**args, "y": args["y"].transpose(0, 1).contiguous().transpose(0, 1)}
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    with ops.trace() as ran:
        for inputs in (args, permuted_y):
            opcheck(torch.ops.fluxrt.lora_add.default, (), {**inputs, "backend": backend}, test_utils=utils)
    assert ran.backends() == {"lora_add": {backend}}


# Compiled for sm_90 in a subprocess without TRITON_INTERPRET (see tests/kernels/test_common.py): both kernels with
# the constexpr switches the GPU takes (fp8 x converted to bf16, fp32 "tf32x3" dots, bf16 hi + lo split).
COMPILE_FOR_HOPPER = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fluxrt.kernels import lora


def compile_for_hopper(fn, pointers, constexprs):
    signature = {name: "constexpr" if name in constexprs else "*" + pointers[name] if name in pointers else "i32"
                 for name in fn.arg_names}
    triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))
    print("compiled", fn.__name__, flush=True)


scales = {"XSCALE": "fp32", "ROW_SCALES": "fp32", "H": "fp32", "OWNER": "i64"}
for x, down, fp8, precision in [("fp8e4nv", "bf16", True, "tf32"), ("bf16", "bf16", False, "tf32"),
                                ("bf16", "fp32", False, "tf32x3")]:
    compile_for_hopper(lora._lora_shrink_kernel, {"X": x, "DOWN": down, **scales},
                       dict(HAS_XSCALE=fp8, CAST_X_TO_DOWN=x == down or fp8, DOT_PRECISION=precision,
                            BLOCK_M=64, BLOCK_R=64, BLOCK_K=64))
for up, split, precision in [("bf16", True, "tf32"), ("fp32", False, "tf32x3")]:
    compile_for_hopper(lora._lora_expand_kernel, {"H": "fp32", "UP": up, "Y": "bf16", "OUT": "bf16"},
                       dict(SPLIT_H=split, DOT_PRECISION=precision, BLOCK_M=64, BLOCK_N=128, BLOCK_R=64))
"""


def test_kernels_compile_for_a_gpu(tmp_path):
    """The interpreter accepts what Triton's compiler refuses (plain-float globals, mismatched branch types)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], capture_output=True, text=True, env=env,
                            timeout=600, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split().count("compiled") == 5, result.stdout


def test_benchmark_dry_run():
    """benchmarks/bench_lora.py --dry-run: its checks on tiny shapes in the interpreter, so it cannot rot."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "benchmarks/bench_lora.py", "--dry-run", "--ranks", "16", "64"],
                            capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "dry run: 32 rows checked, none timed" in result.stdout, result.stdout[-2000:]
    assert "'error'" not in result.stdout


# ---- GPU: bf16 and fp8 x at FLUX's shapes ----


def plain_in(dtype, args):
    """Plain PyTorch in `dtype` (peft's roundings): the baseline of DESIGN.md §4's rule."""
    y, x, x_scale = args["y"], args["x"], args["x_scale"]
    xd = x.to(dtype) if x_scale is None else (x.float() * x_scale[..., None]).to(dtype)
    scales = args["row_scales"][:, args["owner"]].to(dtype).reshape(x.shape[0], *([1] * (x.ndim - 2)), -1)
    return y + ((xd @ args["down"].to(dtype).t()) * scales) @ args["up"].to(dtype).t()


@pytest.mark.gpu
@pytest.mark.parametrize("K, N, R", [(3072, 9216, 64), (3072, 21504, 128), (15360, 3072, 16), (12288, 3072, 100)])
@pytest.mark.parametrize("fp8", [False, True])
def test_bf16_at_flux_shapes(K, N, R, fp8):
    args = make_inputs(2, 4608, K, N, R, seed=K + N + R, dense=torch.bfloat16, fp8=fp8)
    truth = L.lora_add_ref(args["y"].float(), *(args[k] for k in ("x", "down", "up", "owner", "row_scales",
                                                                 "x_scale")))
    with ops.trace() as ran:
        out = ops.lora_add(**args, backend="triton")
    assert ran == [("lora_add", "triton")]
    assert_within_rule(out, plain_in(torch.bfloat16, args), truth, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("B, N", [(1, 18432), (4, 9216)])
def test_bf16_modulation_gemv(B, N):
    args = make_inputs(B, None, 3072, N, 64, seed=B + N, dense=torch.bfloat16)
    truth = L.lora_add_ref(args["y"].float(), *(args[k] for k in ("x", "down", "up", "owner", "row_scales",
                                                                 "x_scale")))
    assert_within_rule(ops.lora_add(**args, backend="triton"), plain_in(torch.bfloat16, args), truth, atol=1e-3)
