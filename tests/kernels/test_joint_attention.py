"""Joint attention kernel vs the fp32 _ref with the DESIGN.md §4 rule (SDPA in the same dtype as baseline)."""

import pytest
import torch
from torch.library import opcheck

import fluxrt.ops as ops
from fluxrt.kernels import joint_attention as K
from fluxrt.testing import assert_within_rule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_qkv(B, H, S, D, dtype, seed, device=DEVICE):
    """q, k, v as rope_qk_norm writes them: three slices of one [3, B, H, S, D] buffer."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(3, B, H, S, D, generator=gen).to(device, dtype)
    return qkv[0], qkv[1], qkv[2]


def check(out, q, k, v):
    truth = K.joint_attention_ref(q.float(), k.float(), v.float())
    baseline = K.sdpa_attention(q, k, v)
    assert out.shape == truth.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    atol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[q.dtype]
    assert_within_rule(out, baseline, truth, atol=atol)


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("S", [52, 64, 7])  # 7 txt + 45 img tokens; a multiple of the blocks; shorter than a block
def test_matches_ref(S, D, dtype):
    q, k, v = make_qkv(2, 3, S, D, dtype, seed=S + D)
    poisoned = torch.full((2, S, 3 * D), float("nan"), dtype=dtype, device=DEVICE)
    check(K.joint_attention(q, k, v, out=poisoned), q, k, v)


def test_writes_into_a_wider_row_buffer():
    q, k, v = make_qkv(1, 2, 20, 64, torch.float32, seed=1)
    wide = torch.full((1, 20, 200), float("nan"), device=DEVICE)
    out = K.joint_attention(q, k, v, out=wide[..., :128])
    check(out, q, k, v)
    assert torch.isnan(wide[..., 128:]).all()  # nothing written outside the view


def test_bad_inputs_are_rejected():
    q, k, v = make_qkv(1, 2, 9, 64, torch.float32, seed=2)
    with pytest.raises(ValueError, match="head_dim 32 is not supported"):
        K.joint_attention(q[..., :32], k[..., :32], v[..., :32])
    with pytest.raises(ValueError, match="must all be"):
        K.joint_attention(q, k[:, :1], v)
    with pytest.raises(ValueError, match="share one of"):
        K.joint_attention(q, k.half(), v)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_and_compile_without_graph_breaks(backend):
    q, k, v = make_qkv(2, 2, 19, 64, torch.float32, seed=3)
    opcheck(torch.ops.fluxrt.joint_attention.default, (q, k, v), {"backend": backend})

    def attend(q, k, v):
        return ops.joint_attention(q, k, v, backend=backend) * 2

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), 2 * K.joint_attention_ref(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("S", [4608, 16896])
def test_bf16_at_flux_lengths(S):
    q, k, v = make_qkv(1, 24, S, 128, torch.bfloat16, seed=S, device="cuda")
    poisoned = torch.full((1, S, 24 * 128), float("nan"), dtype=torch.bfloat16, device="cuda")
    check(K.joint_attention(q, k, v, out=poisoned), q, k, v)
