"""Reference blocks rewired onto fluxrt.ops (fluxrt.transformer) match the plain reference blocks."""

import pytest
import torch
import torch.nn.functional as F

from fluxrt import FluxConfig, sampling
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
    out_img, out_txt = double_block_forward(block, img, txt, img_mod, txt_mod, *rope_cos_sin(pe), backend=backend)
    assert rel_error(out_img, expected_img) <= 1e-5 and rel_error(out_txt, expected_txt) <= 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
@torch.no_grad()
def test_single_block(backend):
    block = randomize_parameters_(SingleStreamBlock(CFG.hidden_size, CFG.num_heads, CFG.mlp_ratio), seed=3).to(DEVICE)
    img, txt, vec, pe = inputs(seed=4)
    x = torch.cat([txt, img], 1)
    expected = block(x, vec, pe)
    mod = block.modulation.lin(F.silu(vec))
    assert rel_error(single_block_forward(block, x, mod, *rope_cos_sin(pe), backend=backend), expected) <= 1e-5
