"""Attention over one K/V block with its log-sum-exp: the Triton kernel vs attention_lse_ref vs the plain formula
(torch.softmax / torch.logsumexp on the whole score matrix, fp64), the log-sum-exp merge ring attention relies on,
the op's dispatch, its errors and its fake impl, and the benchmark's dry run."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import fluxrt.ops as ops
from fluxrt.kernels import attention_lse as A
from fluxrt.testing import assert_within_rule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_attention_lse.py"


def make_qkv(B, H, Sq, Sk, D, dtype, seed, layout="stacked", device=DEVICE):
    """Random q [B, H, Sq, D], k, v [B, H, Sk, D] in one of the layouts the op meets:
    contiguous   three separate tensors;
    stacked      q a row slice of one [3, B, H, S, D] buffer (rope_qk_norm's output), k, v two of its slices;
    transposed   [B, S, H, D] tensors (the projection's layout) seen as [B, H, S, D] through a transpose."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)  # noqa: E731
    if layout == "contiguous":
        return randn(B, H, Sq, D), randn(B, H, Sk, D), randn(B, H, Sk, D)
    if layout == "stacked":
        qkv = randn(3, B, H, max(Sq, Sk), D)
        return qkv[0, :, :, :Sq], qkv[1, :, :, :Sk], qkv[2, :, :, :Sk]
    assert layout == "transposed", layout
    return randn(B, Sq, H, D).transpose(1, 2), randn(B, Sk, H, D).transpose(1, 2), randn(B, Sk, H, D).transpose(1, 2)


def formula(q, k, v):
    """The independent truth: the whole fp64 score matrix, torch.softmax and torch.logsumexp."""
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.softmax(dim=-1) @ v.double(), scores.logsumexp(dim=-1)


def poisoned(B, H, Sq, D):
    """NaN-filled outputs, so an element the kernel never writes fails the check."""
    return (torch.full((B, H, Sq, D), float("nan"), device=DEVICE), torch.full((B, H, Sq), float("nan"), device=DEVICE))


def check_fp32(out, lse, q, k, v):
    """fp32 inputs: the kernel within DESIGN.md §4's rule of the fp64 formula, the fp32 ref as the baseline."""
    ref_out, ref_lse = A.attention_lse_ref(q, k, v)
    true_out, true_lse = formula(q, k, v)
    assert out.dtype == lse.dtype == torch.float32 and out.is_contiguous() and lse.is_contiguous()
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    assert_within_rule(out, ref_out, true_out, atol=1e-6, what="out")
    assert_within_rule(lse, ref_lse, true_lse, atol=1e-6, what="lse")
    # and the ref itself is the formula (it is the torch backend)
    torch.testing.assert_close(ref_out, true_out.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_lse, true_lse.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Sq, Sk", [(37, 70), (70, 37), (13, 1), (32, 48)])  # tails both ways; Sk = 1; whole tiles
def test_matches_ref_and_formula(Sq, Sk, D):
    q, k, v = make_qkv(2, 3, Sq, Sk, D, torch.float32, seed=Sq + Sk + D)
    out, lse = A.attention_lse(q, k, v, *poisoned(2, 3, Sq, D))
    check_fp32(out, lse, q, k, v)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])  # "stacked" is the default above
def test_any_strides_with_a_contiguous_last_dim(layout):
    q, k, v = make_qkv(2, 3, 21, 45, 64, torch.float32, seed=5, layout=layout)
    check_fp32(*A.attention_lse(q, k, v), q, k, v)


def test_fp16_inputs_within_the_rule():
    """16-bit inputs (fp16: the interpreter's bf16 dot is wrong, DESIGN.md §4): fp16 SDPA as the baseline for out;
    lse from fp16 scores accumulated in fp32 is as exact as fp32 math on those fp16 values (the fp32 ref)."""
    q, k, v = make_qkv(1, 2, 40, 53, 64, torch.float16, seed=7)
    out, lse = A.attention_lse(q, k, v)
    true_out, true_lse = formula(q, k, v)
    assert_within_rule(out, F.scaled_dot_product_attention(q, k, v), true_out, atol=1e-4, what="out fp16")
    torch.testing.assert_close(lse, true_lse.float(), atol=1e-5, rtol=1e-5)


def merge(out_a, lse_a, out_b, lse_b):
    """The exact combination of two key blocks' results (what fluxrt.parallel's ring merge computes)."""
    lse = torch.logaddexp(lse_a, lse_b)
    return out_a * torch.exp(lse_a - lse)[..., None] + out_b * torch.exp(lse_b - lse)[..., None], lse


@pytest.mark.parametrize("split", [29, 1])
def test_merging_two_blocks_is_attention_over_all_keys(split):
    """The property ring attention relies on: blocks attended apart and merged by log-sum-exp give attention over
    the concatenated keys (a wrong lse, e.g. in log2 units or unscaled, breaks the weights of the merge)."""
    q, k, v = make_qkv(2, 3, 24, 70, 64, torch.float32, seed=split)
    parts = [A.attention_lse(q, k[:, :, keys], v[:, :, keys]) for keys in (slice(0, split), slice(split, None))]
    out, lse = merge(*parts[0], *parts[1])
    true_out, true_lse = formula(q, k, v)
    torch.testing.assert_close(out, true_out.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, true_lse.float(), atol=1e-5, rtol=1e-5)


def test_ref_chunks_query_rows():
    """The torch formula in query chunks that do not divide Sq matches the whole-matrix formula."""
    q, k, v = make_qkv(2, 3, 13, 9, 32, torch.float32, seed=3)
    out, lse = A.attention_lse_ref(q, k, v, chunk=4)
    true_out, true_lse = formula(q, k, v)
    torch.testing.assert_close(out, true_out.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, true_lse.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend, ran_on", [("triton", "triton"), ("torch", "torch"),
                                             ("auto", "triton" if DEVICE == "cuda" else "torch")])
def test_op_dispatch_is_recorded(backend, ran_on):
    q, k, v = make_qkv(1, 2, 11, 19, 64, torch.float32, seed=4)
    with ops.trace() as ran:
        out, lse = ops.attention_lse(q, k, v, backend=backend)
    assert ran == [("attention_lse", ran_on)]
    check_fp32(out, lse, q, k, v)


def test_torch_backend_takes_any_head_dim():
    q, k, v = make_qkv(1, 2, 6, 10, 40, torch.float32, seed=6)
    with pytest.raises(ValueError, match="head_dim 40 is not supported by the Triton kernel.*use backend='torch'"):
        ops.attention_lse(q, k, v, backend="triton")
    out, lse = ops.attention_lse(q, k, v, backend="torch")
    true_out, true_lse = formula(q, k, v)
    torch.testing.assert_close(out, true_out.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, true_lse.float(), atol=1e-5, rtol=1e-5)


def test_a_strided_last_dim_is_for_the_torch_backend():
    q, k, v = make_qkv(1, 2, 5, 7, 64, torch.float32, seed=9)
    q = q.transpose(2, 3).contiguous().transpose(2, 3)  # same values, last-dim stride 5
    with pytest.raises(ValueError, match="contiguous last dim.*call .contiguous\\(\\) or use backend='torch'"):
        ops.attention_lse(q, k, v, backend="triton")
    out, lse = ops.attention_lse(q, k, v, backend="torch")
    true_out, true_lse = formula(q, k, v)
    torch.testing.assert_close(out, true_out.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, true_lse.float(), atol=1e-5, rtol=1e-5)


def bad_inputs():
    q, k, v = make_qkv(1, 2, 5, 7, 64, torch.float32, seed=8, layout="contiguous")
    return [
        ((q[0], k, v), "must be 4-d"),
        ((q, k, v[:, :, :6]), "k and v must have one shape"),
        ((q, k[:, :1], v[:, :1]), "must agree on B, H and D"),
        ((q[..., :32], k, v), "must agree on B, H and D"),
        ((q[:, :, :0], k, v), "must not be empty"),
        ((q, k[:, :, :0], v[:, :, :0]), "must not be empty"),
        ((q.double(), k.double(), v.double()), "takes float32, bfloat16 or float16"),
        ((q, k.half(), v), "must share one dtype"),
        ((q, k, v.to("meta")), "must be on one device"),
    ]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_inputs_raise_one_value_error(backend):
    for args, message in bad_inputs():
        with pytest.raises(ValueError, match=message):
            ops.attention_lse(*args, backend=backend)
    q, k, v = make_qkv(1, 2, 5, 7, 64, torch.float32, seed=9)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.attention_lse(q, k, v, backend="cuda")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    q, k, v = make_qkv(1, 2, 9, 20, 64, torch.float32, seed=10)
    with ops.trace() as ran:
        opcheck(torch.ops.fluxrt.attention_lse.default, (q, k, v), {"backend": backend})
    assert ran.backends() == {"attention_lse": {backend}}


def test_compiles_without_graph_breaks():
    """The fake impl gives torch.compile the two outputs' shapes and dtypes: fullgraph tracing through the op."""
    q, k, v = make_qkv(2, 2, 9, 17, 64, torch.float32, seed=11)

    def attend_and_merge(q, k, v):  # two blocks merged, as a ring step does
        return merge(*ops.attention_lse(q, k[:, :, :8], v[:, :, :8], backend="torch"),
                     *ops.attention_lse(q, k[:, :, 8:], v[:, :, 8:], backend="torch"))

    torch._dynamo.reset()
    compiled = torch.compile(attend_and_merge, fullgraph=True, backend="aot_eager")
    with ops.trace() as ran:
        out, lse = compiled(q, k, v)
    assert ran == [("attention_lse", "torch")] * 2
    true_out, true_lse = formula(q, k, v)
    torch.testing.assert_close(out, true_out.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, true_lse.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(DEVICE == "cuda", reason="the dry run is for Triton's CPU interpreter; a GPU runs the benchmark")
def test_benchmark_dry_run_checks_every_case(capsys):
    """benchmarks/bench_attention_lse.py --dry-run: every case's checks on tiny shapes in the interpreter."""
    spec = importlib.util.spec_from_file_location("bench_attention_lse", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--dry-run"])
    assert {r["scheme"] for r in rows} == {"ring", "ulysses", "usp"} and all("error" not in r for r in rows), rows
    assert f"dry run: {len(rows)} rows checked" in capsys.readouterr().out


# ---- GPU: bf16 at FLUX shapes. out: DESIGN.md §4's rule with SDPA in bf16 as the baseline (the kernel rounds the
# probabilities to bf16 for the P·V product, as SDPA does, but keeps the output in fp32), atol 1e-4 (|out| < ~0.15
# here: attention over thousands of random keys averages v; emulated on the CPU at Sk 4608: 2e-4 max error for the
# kernel's arithmetic, 3.4e-4 with SDPA's extra bf16 output rounding). lse: the scores are fp32-accumulated products of
# bf16 values, as in the fp32 ref, so they differ only in summation order and exp2 vs exp (~1e-6 at |lse| ~ 9);
# atol 1e-4 leaves margin yet catches a missed tile (one of 36 at Sk 4608: ~3e-2) or a wrong scale. ----


@pytest.mark.gpu
@pytest.mark.parametrize("Sq, Sk, D", [(1152, 4608, 128), (4608, 4608, 128), (577, 4357, 128), (1152, 4357, 64)])
def test_bf16_at_flux_shapes(Sq, Sk, D):
    q, k, v = make_qkv(1, 24, Sq, Sk, D, torch.bfloat16, seed=Sq + Sk, device="cuda")
    out, lse = A.attention_lse(q, k, v, *poisoned(1, 24, Sq, D))
    true_out, true_lse = A.attention_lse_ref(q.float(), k.float(), v.float())
    assert_within_rule(out, F.scaled_dot_product_attention(q, k, v), true_out, atol=1e-4, what="out bf16")
    torch.testing.assert_close(lse, true_lse, atol=1e-4, rtol=0)
