"""Fused QK-RMSNorm + RoPE kernel vs its _ref (and the reference model), the ops, compile tracing."""

import pytest
import torch
from torch.library import opcheck

import fluxrt.ops as ops
from fluxrt import sampling
from fluxrt.config import default_axes_dim
from fluxrt.kernels import rope_qk_norm as K
from fluxrt.reference import EmbedND, SingleStreamBlock
from fluxrt.reference.math import apply_rope
from fluxrt.testing import assert_within_rule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rope_table(B, T, H_px, W_px, head_dim, device=DEVICE):
    """cos, sin of real FLUX position ids (T text tokens, then the image grid), FLUX's axes split."""
    ids = torch.cat([sampling.prepare_txt_ids(B, T), sampling.prepare_img_ids(B, H_px, W_px)], 1).to(device)
    pe = EmbedND(head_dim, 10000, list(default_axes_dim(head_dim)))(ids)
    return pe, *ops.rope_cos_sin(pe)


def make_qkv(B, L, H, D, dtype, seed, extra_cols=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(B, L, 3 * H * D + extra_cols, generator=gen)
    scales = [1 + 0.3 * torch.randn(D, generator=gen) for _ in range(4)]
    return wide.to(device, dtype)[..., : 3 * H * D], [s.to(device, dtype) for s in scales]


def check(out, ref_fn, args, dtype):
    floats = [a.float() if torch.is_tensor(a) else a for a in args]
    truth, baseline = ref_fn(*floats), ref_fn(*args)
    assert out.dtype == dtype and torch.isfinite(out).all()
    atol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    assert_within_rule(out, baseline, truth, atol=atol)


# (batch, text tokens, image H x W pixels, heads, head_dim): odd lengths, head_dim 32/64/128
CASES = [(2, 7, (48, 240), 3, 32), (2, 5, (80, 144), 2, 64), (1, 13, (32, 80), 2, 128)]


@pytest.mark.parametrize("B, T, img_px, H, D", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_single_stream_in_place_slice(B, T, img_px, H, D, dtype):
    _, cos, sin = rope_table(B, T, *img_px, D)
    S = cos.shape[1]
    qkv, (qs, ks, _, _) = make_qkv(B, S, H, D, dtype, seed=S + D, extra_cols=4 * H * D)  # linear1's qkv columns
    out = K.rope_qk_norm(qkv, qs, ks, cos, sin, H, out=torch.full((3, B, H, S, D), float("nan"), dtype=dtype, device=DEVICE))
    check(out, K.rope_qk_norm_ref, (qkv, qs, ks, cos, sin, H), dtype)


@pytest.mark.parametrize("B, T, img_px, H, D", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_joint_streams_fill_one_buffer(B, T, img_px, H, D, dtype):
    _, cos, sin = rope_table(B, T, *img_px, D)
    S = cos.shape[1]
    txt, (tq, tk, iq, ik) = make_qkv(B, T, H, D, dtype, seed=T)
    img, _ = make_qkv(B, S - T, H, D, dtype, seed=S)
    poisoned = torch.full((3, B, H, S, D), float("nan"), dtype=dtype, device=DEVICE)
    out = K.rope_qk_norm_joint(txt, img, tq, tk, iq, ik, cos, sin, H, out=poisoned)
    check(out, K.rope_qk_norm_joint_ref, (txt, img, tq, tk, iq, ik, cos, sin, H), dtype)


@pytest.mark.parametrize("B, T, img_px, H, D", CASES)
def test_joint_v_absmax_is_each_batch_items_max_abs_v(B, T, img_px, H, D):
    """The optional per-batch max |v| (the fp8 attention output's bound): exact, since it is a max of the values
    written, and per batch item (item 1 is scaled so the two maxima differ)."""
    _, cos, sin = rope_table(B, T, *img_px, D)
    S = cos.shape[1]
    txt, (tq, tk, iq, ik) = make_qkv(B, T, H, D, torch.float16, seed=T + 1)
    img, _ = make_qkv(B, S - T, H, D, torch.float16, seed=S + 1)
    img[-1:] *= 3
    v_absmax = torch.zeros(B, K.V_ABSMAX_SLOTS, device=DEVICE)
    out = K.rope_qk_norm_joint(txt, img, tq, tk, iq, ik, cos, sin, H, v_absmax=v_absmax)
    want = out[2].float().abs().amax(dim=(1, 2, 3))
    assert torch.equal(v_absmax.amax(dim=1), want)
    assert (v_absmax[:, : min(S, K.V_ABSMAX_SLOTS)] > 0).all()  # every slot a token reaches was written
    with ops.trace() as ran:
        op_out, op_absmax = ops.rope_qk_norm_joint_v_absmax(txt, img, tq, tk, iq, ik, cos, sin, H, backend="torch")
    assert ran == [("rope_qk_norm_joint_v_absmax", "torch")]
    assert torch.equal(op_absmax.amax(dim=1), K.rope_qk_norm_joint_ref(txt, img, tq, tk, iq, ik, cos, sin, H)[2]
                       .float().abs().amax(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="v_absmax must be a contiguous float32"):
        K.rope_qk_norm_joint(txt, img, tq, tk, iq, ik, cos, sin, H, v_absmax=torch.zeros(B, 3, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ref_is_the_reference_models_qk_norm_and_rope(dtype):
    B, T, H, D = 2, 5, 2, 64
    pe, cos, sin = rope_table(B, T, 48, 64, D, device="cpu")
    S = cos.shape[1]
    block = SingleStreamBlock(H * D, H).to(dtype)
    with torch.no_grad():
        block.norm.query_norm.scale.normal_(1, 0.3)
        block.norm.key_norm.scale.normal_(1, 0.3)
    qkv, _ = make_qkv(B, S, H, D, dtype, seed=3, device="cpu")
    q, k, v = qkv.reshape(B, S, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k = apply_rope(*block.norm(q, k, v), pe)
    ref = K.rope_qk_norm_ref(qkv, block.norm.query_norm.scale, block.norm.key_norm.scale, cos, sin, H)
    assert torch.equal(ref, torch.stack([q, k, v]))


def test_bad_inputs_are_rejected():
    _, cos, sin = rope_table(1, 3, 32, 32, 64)
    qkv, (qs, ks, _, _) = make_qkv(1, 7, 2, 64, torch.float32, seed=1)
    with pytest.raises(ValueError, match="not 3 \\* num_heads"):
        K.rope_qk_norm(qkv, qs, ks, cos, sin, 5)
    with pytest.raises(ValueError, match=r"q_scale must be \[64\]"):
        K.rope_qk_norm(qkv, qs[:32], ks, cos, sin, 2)
    with pytest.raises(ValueError, match="cos must be float32"):
        K.rope_qk_norm(qkv, qs, ks, cos.half(), sin, 2)
    odd, _ = make_qkv(1, 7, 2, 48, torch.float32, seed=1)
    with pytest.raises(ValueError, match="head_dim 48 unsupported"):
        K.rope_qk_norm(odd, qs[:48], ks[:48], cos[..., :24], sin[..., :24], 2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_and_compile_without_graph_breaks(backend):
    B, T, H, D = 2, 3, 2, 64
    _, cos, sin = rope_table(B, T, 32, 48, D)
    S = cos.shape[1]
    txt, (tq, tk, iq, ik) = make_qkv(B, T, H, D, torch.float32, seed=5)
    img, _ = make_qkv(B, S - T, H, D, torch.float32, seed=6)
    joint_args = (txt, img, tq, tk, iq, ik, cos, sin, H)
    with ops.trace() as ran:
        opcheck(torch.ops.fluxrt.rope_qk_norm.default, (img, iq, ik, cos[:, T:], sin[:, T:], H), {"backend": backend})
        opcheck(torch.ops.fluxrt.rope_qk_norm_joint.default, joint_args, {"backend": backend})
        opcheck(torch.ops.fluxrt.rope_qk_norm_joint_v_absmax.default, joint_args, {"backend": backend})
    assert ran.backends() == {op: {backend} for op in ("rope_qk_norm", "rope_qk_norm_joint",
                                                        "rope_qk_norm_joint_v_absmax")}

    def attention_inputs(*args):
        qkv = ops.rope_qk_norm_joint(*args, backend=backend)
        return qkv * 2

    torch._dynamo.reset()
    compiled = torch.compile(attention_inputs, fullgraph=True, backend="aot_eager")
    with ops.trace() as ran:
        out = compiled(*joint_args)
    torch.testing.assert_close(out, 2 * K.rope_qk_norm_joint_ref(*joint_args), atol=1e-5, rtol=1e-5)
    assert ran == [("rope_qk_norm_joint", backend)]


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 4])
def test_bf16_at_flux_shapes(B):
    dtype, H, D, T = torch.bfloat16, 24, 128, 512
    _, cos, sin = rope_table(B, T, 1024, 1024, D, device="cuda")
    S = cos.shape[1]
    wide, (qs, ks, tq, tk) = make_qkv(B, S, H, D, dtype, seed=B, extra_cols=4 * H * D, device="cuda")
    out = K.rope_qk_norm(wide, qs, ks, cos, sin, H, out=torch.full((3, B, H, S, D), float("nan"), dtype=dtype, device="cuda"))
    check(out, K.rope_qk_norm_ref, (wide, qs, ks, cos, sin, H), dtype)
    txt, img = wide[:, :T], wide[:, T:]
    v_absmax = torch.zeros(B, K.V_ABSMAX_SLOTS, device="cuda")
    joint = K.rope_qk_norm_joint(txt, img, tq, tk, qs, ks, cos, sin, H, v_absmax=v_absmax)
    check(joint, K.rope_qk_norm_joint_ref, (txt, img, tq, tk, qs, ks, cos, sin, H), dtype)
    assert torch.equal(v_absmax.amax(dim=1), joint[2].float().abs().amax(dim=(1, 2, 3)))
