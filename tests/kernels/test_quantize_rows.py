"""Per-row e4m3fn quantization (kernels/quantize_rows.py) vs its _ref, the op (opcheck, compile tracing), errors.

CPU: Triton's interpreter on float32/float16 inputs (its bf16 arithmetic is wrong, DESIGN.md §4). GPU: bf16 at
FLUX's shapes, where the fp8 conversion is the hardware's and x8 must be the reference's bit for bit.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import fluxrt.ops as ops
from fluxrt.kernels import modulated_norm
from fluxrt.kernels import quantize_rows as Q
from fluxrt.testing import e4m3_ulp, interpreter_conversion_defect, sqnr_db

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# GELU's exp(-z) overflows to inf for very negative inputs on purpose (y / inf = -0, as on the GPU); numpy warns.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def randn(*shape, seed, dtype=torch.float32, device=DEVICE, std=3.0):
    gen = torch.Generator().manual_seed(seed)
    return (std * torch.randn(*shape, generator=gen)).to(device=device, dtype=dtype)


def assert_quantized_match(x8, scale, ref8, ref_scale, min_equal=0.99, scale_rtol=1e-6):
    """x8 * scale within one e4m3 step of the reference's, and at least min_equal of the values exactly equal
    (values, so -0 == +0), so that a real bug cannot hide in the tolerance."""
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == ref8.shape and x8.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == ref_scale.shape
    torch.testing.assert_close(scale, ref_scale, rtol=scale_rtol, atol=0)
    got, want = x8.float(), ref8.float()
    considered = torch.ones_like(want, dtype=torch.bool)
    if DEVICE == "cpu":
        considered = ~interpreter_conversion_defect(got, want)
    deq, ref_deq = got * scale[..., None], want * ref_scale[..., None]
    tol = e4m3_ulp(want) * ref_scale[..., None] + scale_rtol * ref_deq.abs()
    off = ((deq - ref_deq).abs() > tol) & considered
    assert not off.any(), f"{int(off.sum())} values are more than one e4m3 step from the reference"
    unequal = int(((got != want) & considered).sum())
    assert unequal <= (1 - min_equal) * want.numel(), f"{unequal} of {want.numel()} values differ by one step"


def resolve(gelu_from, K):
    return {"mid": K // 2, "K": K}.get(gelu_from, gelu_from)


@pytest.mark.parametrize("M, K", [(1, 1), (3, 7), (37, 130), (1, 300), (37, 300)])
@pytest.mark.parametrize("gelu_from", [None, 0, "mid", "K"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_ref(M, K, gelu_from, dtype):
    gelu_from = resolve(gelu_from, K)
    x = randn(M, K, seed=M * K + (gelu_from or 0), dtype=dtype)
    assert_quantized_match(*Q.quantize_rows(x, gelu_from), *Q.quantize_rows_ref(x, gelu_from))


def test_strided_rows_and_batch_dims():
    wide = randn(2, 19, 700, seed=1)
    x = wide[..., 100:400]  # [B, L, K] rows with stride 700, as a column slice of a wider activation
    for gelu_from in (None, 130):
        x8, scale = Q.quantize_rows(x, gelu_from)
        assert x8.shape == (2, 19, 300) and scale.shape == (2, 19)
        assert_quantized_match(x8, scale, *Q.quantize_rows_ref(x, gelu_from))
    x4 = randn(2, 3, 5, 400, seed=2)[..., :300]  # more leading dims, still strided
    assert_quantized_match(*Q.quantize_rows(x4, 7), *Q.quantize_rows_ref(x4, 7))


def test_gelu_columns_are_gelu_and_the_rest_untouched():
    x = randn(8, 256, seed=3)
    x8, scale = Q.quantize_rows(x, gelu_from=100)
    deq = x8.float() * scale[:, None]
    # e4m3 on Gaussian rows: ~30 dB; the interpreter's halved powers of two (see above) cost a few dB on the CPU
    assert sqnr_db(deq[:, :100], x[:, :100]) >= 20
    assert sqnr_db(deq[:, 100:], F.gelu(x[:, 100:], approximate="tanh")) >= 20


def test_gelu_from_k_is_no_gelu_and_ref_is_modulated_norms():
    x = randn(5, 130, seed=4)
    assert modulated_norm.quantize_rows_ref is Q.quantize_rows_ref  # one definition, old import path kept
    for quantize in (Q.quantize_rows, Q.quantize_rows_ref):
        a8, a = quantize(x, None)
        b8, b = quantize(x, 130)
        assert torch.equal(a8.view(torch.uint8), b8.view(torch.uint8)) and torch.equal(a, b)


def test_zero_rows():
    x = randn(6, 130, seed=5)
    x[1] = 0
    x[4] = 0
    for gelu_from in (None, 0):
        x8, scale = Q.quantize_rows(x, gelu_from)
        assert torch.equal(scale[[1, 4]], torch.full((2,), 1e-12, device=DEVICE))
        assert (x8[[1, 4]].float() == 0).all()
        assert_quantized_match(x8, scale, *Q.quantize_rows_ref(x, gelu_from))


@pytest.mark.parametrize("dtype, magnitude", [(torch.float32, 1e6), (torch.float16, 4e4), (torch.float32, 1e-13)])
def test_extreme_magnitudes(dtype, magnitude):
    # 1e6 / 4e4: far above 448 (the scale, not a clamp, brings them in range; GELU's exp overflows on the
    # negative side); 1e-13: absmax / 448 < 1e-12, so the scale floor (not the absmax) sets the scale and
    # the row quantizes to values below 0.1.
    x = randn(9, 300, seed=6, std=1.0)
    x = (x / x.abs().amax() * magnitude).to(dtype)
    for gelu_from in (None, 0, 150):
        assert_quantized_match(*Q.quantize_rows(x, gelu_from), *Q.quantize_rows_ref(x, gelu_from))


def test_bad_inputs_are_rejected():
    x = randn(4, 64, seed=7)
    with pytest.raises(ValueError, match="unsupported dtype"):
        Q.quantize_rows(x.double())
    with pytest.raises(ValueError, match="K >= 1"):
        Q.quantize_rows(x[:, :0])
    with pytest.raises(ValueError, match="K >= 1"):
        Q.quantize_rows(x[0, 0])
    with pytest.raises(ValueError, match="contiguous last dim"):
        Q.quantize_rows(x.t())
    for bad in (-1, 65):
        for quantize in (Q.quantize_rows, Q.quantize_rows_ref):
            with pytest.raises(ValueError, match=r"gelu_from must be None or an int in \[0, K = 64\]"):
                quantize(x, bad)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.quantize_rows(x, backend="cuda")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    x = randn(2, 9, 64, seed=8)
    # test_schema compares fp8 outputs with arithmetic torch lacks on the CPU (see test_joint_attention.py)
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    with ops.trace() as ran:
        for gelu_from in (None, 20):
            opcheck(torch.ops.fluxrt.quantize_rows.default, (x, gelu_from), {"backend": backend}, test_utils=utils)
    assert ran.backends() == {"quantize_rows": {backend}}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_op_matches_ref_and_compiles_without_graph_breaks(backend):
    wide = randn(2, 9, 192, seed=9)

    def dequantized_tail(wide):  # the single block's pattern: quantize a column slice, GELU on part of it
        x8, scale = ops.quantize_rows(wide[..., 64:], gelu_from=32, backend=backend)
        return x8.float() * scale[..., None]

    ref8, ref_scale = Q.quantize_rows_ref(wide[..., 64:], 32)
    torch._dynamo.reset()
    compiled = torch.compile(dequantized_tail, fullgraph=True, backend="aot_eager")
    for run in (dequantized_tail, compiled):
        with ops.trace() as ran:
            out = run(wide)
        assert ran == [("quantize_rows", backend)]
        # dequantized: the interpreter's carry defect (see assert_quantized_match) shows up here too
        x8 = (out / ref_scale[..., None]).to(torch.float8_e4m3fn)
        assert_quantized_match(x8, ref_scale, ref8, ref_scale)


@pytest.mark.gpu
@pytest.mark.parametrize("K, gelu_from, width", [(3072, None, 3072), (12288, 0, 12288), (15360, 3072, 21504)])
def test_bf16_at_flux_shapes(K, gelu_from, width):
    # attention out -> proj; gelu(mlp up) -> mlp down; the single block's [attention | gelu(mlp)] slice of linear1
    x = randn(1, 4608, width, seed=K, dtype=torch.bfloat16)[..., width - K :]
    x8, scale = Q.quantize_rows(x, gelu_from)
    ref8, ref_scale = Q.quantize_rows_ref(x, gelu_from)
    if gelu_from is None:  # hardware conversion + correctly rounded divisions: the reference exactly
        assert torch.equal(scale, ref_scale)
        assert torch.equal(x8.view(torch.uint8), ref8.view(torch.uint8))
    else:  # GELU in fp32 vs torch's fp32 gelu may differ in the last bit, which can move a value one step
        assert_quantized_match(x8, scale, ref8, ref_scale, min_equal=0.99, scale_rtol=2e-6)
