"""The fast blocks' linear steps (fluxrt.quantize.BlockLinear) for each kind of linear: plain, FP8 weight-only, W8A8
on torch._scaled_mm and on the Triton GEMM. Each fused step computes what it stands for (the same linear's plain
call composed with the unfused formula), and the fusions happen: which fluxrt ops ran (ops.trace) and which aten
ops ran outside them (a dispatch-mode log: a GELU or a gated residual as a separate pass shows up there)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fluxrt import ops
from fluxrt.kernels.modulated_norm import gated_residual_norm_ref, modulated_layer_norm_ref
from fluxrt.quantize import FP8Linear
from fluxrt.testing import sqnr_db
from fluxrt.transformer import _mlp_after_attention, block_linear

KINDS = ["plain", "fp8-weight", "w8a8-scaled_mm", "w8a8-triton"]
C, MLP = 128, 512
BACKEND = "torch"  # the fused wiring on the reference formulas (the kernels have their own tests)


def make(kind: str, in_features: int, out_features: int, seed: int):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features).requires_grad_(False)
    if kind == "plain":
        return linear
    activations = "bf16" if kind == "fp8-weight" else "fp8"
    gemm = "triton" if kind.endswith("triton") else "scaled_mm"
    return FP8Linear.from_linear(linear, backend=BACKEND, activations=activations, w8a8_gemm=gemm)


def rows(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class AtenLog(TorchDispatchMode):
    """The top-level ops that ran: a fluxrt custom op is one entry (its insides are not logged)."""

    def __enter__(self):
        self.names = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def traced(fn):
    with ops.trace() as ran, AtenLog() as log:
        out = fn()
    return out, ran.backends(), log.names


def close(fused, definition):
    assert sqnr_db(fused, definition) >= 60, sqnr_db(fused, definition)  # fp32: summation order and fp8 ties only


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_after_norm(kind):
    lin = block_linear(make(kind, C, 3 * C, seed=1))
    x, scale, shift = rows(2, 24, C, seed=2), rows(2, 1, C, seed=3), rows(2, 1, C, seed=4)
    out, ran, _ = traced(lambda: lin.after_norm(x, scale, shift, BACKEND))
    close(out, lin(modulated_layer_norm_ref(x, scale, shift)))
    if kind.startswith("w8a8"):  # the norm kernel emits the fp8 rows: no separate quantization pass
        assert "modulated_layer_norm_fp8" in ran and "quantize_rows" not in ran
    else:
        assert "modulated_layer_norm" in ran


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_gated(kind):
    lin = block_linear(make(kind, MLP, C, seed=5))
    x, residual, gate = rows(2, 24, MLP, seed=6), rows(2, 24, C, seed=7), rows(2, 1, C, seed=8)
    out, ran, aten = traced(lambda: lin.gated(x, residual, gate, BACKEND))
    close(out, residual + gate * lin(x))
    # the gated residual rides in the GEMM's epilogue where the GEMM has one, else it is one fused op
    assert ("gated_residual" in ran) == (kind in ("plain", "w8a8-scaled_mm"))
    assert "add" not in aten and "mul" not in aten


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_mlp_after_attention(kind):
    """h += gate1 * attn_out, then h += gate2 * down(gelu(up(LN(h) * (1 + scale2) + shift2))); the GELU is never a
    pass of its own on the fp8 kinds (GEMM epilogue, or the down projection's quantization pass)."""
    up, down = make(kind, C, MLP, seed=9), make(kind, MLP, C, seed=10)
    mlp = torch.nn.Sequential(up, torch.nn.GELU(approximate="tanh"), down)
    h, attn_out = rows(2, 24, C, seed=11), rows(2, 24, C, seed=12)
    gate1, scale2, shift2, gate2 = (rows(2, 1, C, seed=s) for s in (13, 14, 15, 16))
    out, ran, aten = traced(lambda: _mlp_after_attention(mlp, h, gate1, attn_out, scale2, shift2, gate2, BACKEND))
    h1, x = gated_residual_norm_ref(h, gate1, attn_out, scale2, shift2)
    close(out, h1 + gate2 * block_linear(down)(F.gelu(block_linear(up)(x), approximate="tanh")))
    if kind != "plain":
        assert "gelu" not in aten
    if kind == "w8a8-scaled_mm":  # no epilogue in torch._scaled_mm: the GELU goes into quantize_rows
        assert ran["quantize_rows"] == {"torch"} and "gated_residual_norm_fp8" in ran


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_gated_attention_mlp(kind):
    """The single block's linear2 on [attention | gelu(mlp)]; W8A8 quantizes it straight from linear1's buffer."""
    lin = block_linear(make(kind, C + MLP, C, seed=17))
    hidden = rows(2, 24, 3 * C + MLP, seed=18)  # linear1's output [q | k | v | mlp]
    attention, residual, gate = rows(2, 24, C, seed=19), rows(2, 24, C, seed=20), rows(2, 1, C, seed=21)
    joined = torch.cat((attention, F.gelu(hidden[..., 3 * C :], approximate="tanh")), dim=-1)
    expected = residual + gate * lin(joined)
    out, ran, aten = traced(lambda: lin.gated_attention_mlp(attention, hidden.clone(), residual, gate, BACKEND))
    close(out, expected)
    if kind.startswith("w8a8"):  # one quantization pass over linear1's buffer, GELU inside it, no joined buffer
        assert "quantize_rows" in ran and "gelu" not in aten and "cat" not in aten


@pytest.mark.parametrize("kind", ["w8a8-scaled_mm", "w8a8-triton"])
@torch.no_grad()
def test_w8a8_runs_weight_only_at_16_rows_or_fewer(kind):
    lin = block_linear(make(kind, C, 3 * C, seed=22))
    x, scale, shift = rows(2, 8, C, seed=23), rows(2, 1, C, seed=24), rows(2, 1, C, seed=25)
    assert not lin.reads_fp8_rows(x)
    out, ran, _ = traced(lambda: lin.after_norm(x, scale, shift, BACKEND))
    assert set(ran) == {"modulated_layer_norm", "fp8_linear"}
    close(out, lin(modulated_layer_norm_ref(x, scale, shift)))
