"""The reference blocks at real FLUX width on a GPU: bf16 vs fp32 truth, within the rule of diffusers' bf16 blocks."""

import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxPosEmbed, FluxSingleTransformerBlock, FluxTransformerBlock

import fluxrt
from fluxrt import FluxConfig, sampling
from fluxrt.reference import DoubleStreamBlock, EmbedND, SingleStreamBlock
from fluxrt.testing import assert_within_rule, randomize_parameters_, rel_error

DEV = FluxConfig.preset("flux-dev")


def block_to_diffusers(block, bfl_prefix, diffusers_prefix, diffusers_block):
    sd = fluxrt.bfl_to_diffusers({f"{bfl_prefix}.{k}": v for k, v in block.state_dict().items()})
    diffusers_block.load_state_dict({k.removeprefix(f"{diffusers_prefix}."): v for k, v in sd.items()}, strict=True)
    return diffusers_block


@pytest.mark.gpu
@torch.no_grad()
def test_double_and_single_block_bf16_at_flux_width():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    hidden, heads, head_dim = DEV.hidden_size, DEV.num_heads, DEV.head_dim
    with dev:
        double = randomize_parameters_(DoubleStreamBlock(hidden, heads, DEV.mlp_ratio, qkv_bias=True), seed=1)
        single = randomize_parameters_(SingleStreamBlock(hidden, heads, DEV.mlp_ratio), seed=2)
        dif_double = block_to_diffusers(double, "double_blocks.0", "transformer_blocks.0",
                                        FluxTransformerBlock(hidden, heads, head_dim))
        dif_single = block_to_diffusers(single, "single_blocks.0", "single_transformer_blocks.0",
                                        FluxSingleTransformerBlock(hidden, heads, head_dim, DEV.mlp_ratio))
        img, txt = torch.randn(1, 4096, hidden), torch.randn(1, 512, hidden)
        vec = torch.randn(1, hidden)
    ids = torch.cat([sampling.prepare_txt_ids(1, 512, dev), sampling.prepare_img_ids(1, 1024, 1024, dev)], dim=1)
    pe = EmbedND(head_dim, DEV.theta, list(DEV.axes_dim))(ids)
    rot = FluxPosEmbed(DEV.theta, list(DEV.axes_dim))(ids[0])

    truth_img, truth_txt = double(img, txt, vec, pe)
    truth_single = single(torch.cat([txt, img], 1), vec, pe)

    bf = torch.bfloat16
    double, single, dif_double, dif_single = (m.to(bf) for m in (double, single, dif_double, dif_single))
    out_img, out_txt = double(img.to(bf), txt.to(bf), vec.to(bf), pe)
    base_txt, base_img = dif_double(img.to(bf), txt.to(bf), vec.to(bf), image_rotary_emb=rot)
    out_single = single(torch.cat([txt, img], 1).to(bf), vec.to(bf), pe)
    base_single_txt, base_single_img = dif_single(img.to(bf), txt.to(bf), vec.to(bf), image_rotary_emb=rot)
    base_single = torch.cat([base_single_txt, base_single_img], 1)

    for name, out, base, truth in (
        ("double img", out_img, base_img, truth_img),
        ("double txt", out_txt, base_txt, truth_txt),
        ("single", out_single, base_single, truth_single),
    ):
        assert out.dtype == bf and torch.isfinite(out).all(), name
        assert_within_rule(out, base, truth, atol=1e-3, what=name)
        assert rel_error(out, truth) <= 2e-2, name
