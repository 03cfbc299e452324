"""Modulated LayerNorm / gated residual kernels vs their _ref (DESIGN.md §4 rule), the ops, compile tracing."""

import pytest
import torch
from torch.library import opcheck

import fluxrt.ops as ops
from fluxrt.kernels import modulated_norm as K
from fluxrt.testing import assert_within_rule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make(B, L, D, dtype, seed, device=DEVICE, batch_view=False):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x, y = rand(B, L, D), rand(B, L, D)
    if batch_view:  # modulation outputs are chunks of [B, 1, 6D]: [B, 1, D] views with batch stride 6D
        mod = rand(B, 1, 6 * D)
        gate, scale, shift = mod[..., :D], mod[..., 2 * D : 3 * D], mod[..., 5 * D :]
    else:
        gate, scale, shift = rand(B, D), rand(B, D), rand(B, D)
    return [t.to(device=device, dtype=dtype) for t in (x, gate, y, scale, shift)]


def nan_like(x):
    return torch.full_like(x, float("nan"))


def check(kernel_out, ref_fn, inputs, dtype):
    truth = ref_fn(*[t.float() for t in inputs])
    baseline = ref_fn(*inputs)
    truth, baseline = (truth, baseline) if isinstance(truth, tuple) else ((truth,), (baseline,))
    kernel_out = kernel_out if isinstance(kernel_out, tuple) else (kernel_out,)
    atol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    for out, base, ref in zip(kernel_out, baseline, truth):
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert_within_rule(out, base, ref, atol=atol)


SHAPES = [(2, 45, 64), (2, 37, 384), (1, 7, 3072)]  # L not a multiple of anything; D 64 and 128*k
DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("B, L, D", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_modulated_layer_norm(B, L, D, dtype):
    x, _, _, scale, shift = make(B, L, D, dtype, seed=L + D, batch_view=D == 384)
    out = K.modulated_layer_norm(x, scale, shift, out=nan_like(x))
    check(out, K.modulated_layer_norm_ref, (x, scale, shift), dtype)


@pytest.mark.parametrize("B, L, D", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_residual_norm(B, L, D, dtype):
    x, gate, y, scale, shift = make(B, L, D, dtype, seed=2 * L + D, batch_view=D == 64)
    h, out = K.gated_residual_norm(x, gate, y, scale, shift, out=(nan_like(x), nan_like(x)))
    check((h, out), K.gated_residual_norm_ref, (x, gate, y, scale, shift), dtype)


@pytest.mark.parametrize("B, L, D", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_residual(B, L, D, dtype):
    x, gate, y, _, _ = make(B, L, D, dtype, seed=3 * L + D)
    h = K.gated_residual(x, gate, y, out=nan_like(x))
    check(h, K.gated_residual_ref, (x, gate, y), dtype)


def test_strided_rows_are_read_in_place():
    wide = make(2, 19, 256, torch.float32, seed=4)[0]
    x = wide[..., :128]  # rows with stride 256
    _, _, _, scale, shift = make(2, 19, 128, torch.float32, seed=5)
    torch.testing.assert_close(K.modulated_layer_norm(x, scale, shift), K.modulated_layer_norm_ref(x, scale, shift),
                               atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_rejected():
    x, gate, y, scale, shift = make(2, 5, 64, torch.float32, seed=6)
    with pytest.raises(ValueError, match=r"modulation vectors must be \[2, 64\]"):
        K.modulated_layer_norm(x, scale[:1], shift)
    with pytest.raises(ValueError, match="y must match x"):
        K.gated_residual(x, gate, y[:, :3])
    with pytest.raises(ValueError, match="contiguous last dim"):
        K.modulated_layer_norm(x.transpose(1, 2), scale, shift)
    with pytest.raises(ValueError, match="unsupported dtype"):
        K.modulated_layer_norm(x.double(), scale.double(), shift.double())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    x, gate, y, scale, shift = make(2, 9, 64, torch.float32, seed=7)
    opcheck(torch.ops.fluxrt.modulated_layer_norm.default, (x, scale, shift), {"backend": backend})
    opcheck(torch.ops.fluxrt.gated_residual_norm.default, (x, gate, y, scale, shift), {"backend": backend})
    opcheck(torch.ops.fluxrt.gated_residual.default, (x, gate, y), {"backend": backend})


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ops_match_kernel_refs_and_compile_without_graph_breaks(backend):
    x, gate, y, scale, shift = make(2, 9, 64, torch.float32, seed=8)

    def glue(x, gate, y, scale, shift):
        h, normed = ops.gated_residual_norm(x, gate, y, scale, shift, backend=backend)
        return ops.gated_residual(h, gate, ops.modulated_layer_norm(normed, scale, shift, backend=backend),
                                  backend=backend)

    def glue_ref(x, gate, y, scale, shift):
        h, normed = K.gated_residual_norm_ref(x, gate, y, scale, shift)
        return K.gated_residual_ref(h, gate, K.modulated_layer_norm_ref(normed, scale, shift))

    expected = glue_ref(x, gate, y, scale, shift)
    torch._dynamo.reset()
    compiled = torch.compile(glue, fullgraph=True, backend="aot_eager")
    for out in (glue(x, gate, y, scale, shift), compiled(x, gate, y, scale, shift)):
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_unknown_backend():
    x, _, _, scale, shift = make(1, 3, 64, torch.float32, seed=9)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.modulated_layer_norm(x, scale, shift, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 4])
def test_bf16_at_flux_shapes(B):
    dtype = torch.bfloat16
    x, gate, y, scale, shift = make(B, 4608, 3072, dtype, seed=B, device="cuda", batch_view=True)
    check(K.modulated_layer_norm(x, scale, shift, out=nan_like(x)), K.modulated_layer_norm_ref, (x, scale, shift), dtype)
    check(K.gated_residual_norm(x, gate, y, scale, shift, out=(nan_like(x), nan_like(x))), K.gated_residual_norm_ref,
          (x, gate, y, scale, shift), dtype)
    check(K.gated_residual(x, gate, y, out=nan_like(x)), K.gated_residual_ref, (x, gate, y), dtype)
