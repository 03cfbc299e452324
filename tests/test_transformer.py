"""Reference blocks rewired onto fluxrt.ops (fluxrt.transformer) match the plain reference blocks."""

import pytest
import torch
import torch.nn.functional as F

from fluxrt import FluxConfig, ops, sampling
from fluxrt.ops import rope_cos_sin
from fluxrt.reference import DoubleStreamBlock, EmbedND, SingleStreamBlock
from fluxrt.testing import randomize_parameters_, rel_error
from fluxrt.transformer import double_block_forward, single_block_forward

CFG = FluxConfig.preset("tiny")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton runs in its interpreter


def inputs(B=2, T=7, height=48, width=80, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.cat([sampling.prepare_txt_ids(B, T), sampling.prepare_img_ids(B, height, width)], 1)
    pe = EmbedND(CFG.head_dim, CFG.theta, list(CFG.axes_dim))(ids)
    L = ids.shape[1] - T
    img = torch.randn(B, L, CFG.hidden_size, generator=gen)
    txt = torch.randn(B, T, CFG.hidden_size, generator=gen)
    vec = torch.randn(B, CFG.hidden_size, generator=gen)
    return img.to(DEVICE), txt.to(DEVICE), vec.to(DEVICE), pe.to(DEVICE)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@torch.no_grad()
def test_double_block(backend):
    block = randomize_parameters_(DoubleStreamBlock(CFG.hidden_size, CFG.num_heads, CFG.mlp_ratio, True), seed=1).to(DEVICE)
    img, txt, vec, pe = inputs(seed=2)
    expected_img, expected_txt = block(img, txt, vec, pe)
    img_mod, txt_mod = block.img_mod.lin(F.silu(vec)), block.txt_mod.lin(F.silu(vec))
    cos, sin = rope_cos_sin(pe)
    with ops.trace() as ran:
        out_img, out_txt = double_block_forward(block, img, txt, img_mod, txt_mod, cos, sin, backend=backend)
    assert rel_error(out_img, expected_img) <= 1e-5 and rel_error(out_txt, expected_txt) <= 1e-5
    assert ran.backends() == {op: {backend} for op in ("modulated_layer_norm", "rope_qk_norm_joint", "joint_attention",
                                                        "gated_residual_norm", "gated_residual")}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@torch.no_grad()
def test_single_block(backend):
    block = randomize_parameters_(SingleStreamBlock(CFG.hidden_size, CFG.num_heads, CFG.mlp_ratio), seed=3).to(DEVICE)
    img, txt, vec, pe = inputs(seed=4)
    x = torch.cat([txt, img], 1)
    expected = block(x, vec, pe)
    mod = block.modulation.lin(F.silu(vec))
    with ops.trace() as ran:
        out = single_block_forward(block, x, mod, *rope_cos_sin(pe), backend=backend)
    assert rel_error(out, expected) <= 1e-5
    assert ran.backends() == {op: {backend} for op in ("modulated_layer_norm", "rope_qk_norm", "joint_attention",
                                                        "gated_residual")}


def test_linear_gelu_tanh_on_cpu_is_the_plain_composition():
    from fluxrt.transformer import _linear_gelu_tanh

    linear, x = torch.nn.Linear(16, 64), torch.randn(2, 5, 16)
    assert torch.equal(_linear_gelu_tanh(linear, x), F.gelu(linear(x), approximate="tanh"))


@pytest.mark.gpu
@torch.no_grad()
def test_linear_gelu_tanh_cublaslt_epilogue_is_tanh_gelu():
    """The cuBLASLt epilogue path (bf16, the double blocks' MLP up at FLUX width) computes gelu_tanh within the
    DESIGN.md rule against the fp32 truth."""
    from fluxrt.testing import assert_within_rule
    from fluxrt.transformer import _linear_gelu_tanh

    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(3072, 12288).to("cuda", torch.bfloat16)
    x = torch.randn(1, 4608, 3072, generator=gen).to("cuda", torch.bfloat16)
    out = _linear_gelu_tanh(linear, x)
    truth = F.gelu(F.linear(x.float(), linear.weight.float(), linear.bias.float()), approximate="tanh")
    assert_within_rule(out, F.gelu(linear(x), approximate="tanh"), truth, atol=1e-2, what="linear + gelu_tanh")
