"""The reference FLUX transformer vs diffusers' FluxTransformer2DModel with the same weights."""

import dataclasses

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

import fluxrt
from fluxrt import FluxConfig, sampling
from fluxrt.testing import assert_within_rule, randomize_parameters_, rel_error


def make_pair(cfg: FluxConfig, seed: int):
    """A reference Flux with random weights and a diffusers model holding the same weights (our converter)."""
    ref = randomize_parameters_(fluxrt.reference.Flux(cfg), seed).eval()
    dif = FluxTransformer2DModel(**cfg.to_diffusers()).eval()
    dif.load_state_dict(fluxrt.bfl_to_diffusers(ref.state_dict()), strict=True)
    return ref, dif


def make_inputs(cfg: FluxConfig, batch: int, height: int, width: int, txt_len: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    img = sampling.pack(sampling.get_noise(batch, height, width, seed=seed))
    return dict(
        img=img,
        img_ids=sampling.prepare_img_ids(batch, height, width),
        txt=torch.randn(batch, txt_len, cfg.context_in_dim, generator=gen),
        txt_ids=sampling.prepare_txt_ids(batch, txt_len),
        timesteps=torch.rand(batch, generator=gen),
        y=torch.randn(batch, cfg.vec_in_dim, generator=gen),
        guidance=(1 + 4 * torch.rand(batch, generator=gen)) if cfg.guidance_embed else None,
    )


def run_reference(model, inputs, dtype):
    cast = {k: (v.to(dtype) if k in ("img", "txt", "y") else v) for k, v in inputs.items()}
    with torch.no_grad():
        return model(**cast)


def run_diffusers(model, inputs, dtype):
    with torch.no_grad():
        (out,) = model(
            hidden_states=inputs["img"].to(dtype),
            encoder_hidden_states=inputs["txt"].to(dtype),
            pooled_projections=inputs["y"].to(dtype),
            timestep=inputs["timesteps"],
            img_ids=inputs["img_ids"][0],
            txt_ids=inputs["txt_ids"][0],
            guidance=inputs["guidance"],
            return_dict=False,
        )
    return out


CASES = [
    # variant, batch, height, width (pixels; tokens are /16), text tokens (not a multiple of 8)
    ("dev", 1, 64, 64, 7),
    ("dev", 2, 48, 80, 13),
    ("schnell", 1, 80, 48, 7),
    ("schnell", 2, 32, 96, 21),
]


@pytest.mark.parametrize("variant, batch, height, width, txt_len", CASES)
def test_fp32_matches_diffusers(variant, batch, height, width, txt_len):
    cfg = dataclasses.replace(FluxConfig.preset("tiny"), guidance_embed=variant == "dev")
    ref, dif = make_pair(cfg, seed=batch * 100 + txt_len)
    inputs = make_inputs(cfg, batch, height, width, txt_len, seed=txt_len)
    out = run_reference(ref, inputs, torch.float32)
    expected = run_diffusers(dif, inputs, torch.float32)
    assert out.shape == (batch, (height // 16) * (width // 16), cfg.out_channels)
    assert out.std() > 0.1  # a live signal, not a degenerate one
    assert rel_error(out, expected) <= 1e-5


def bf16_exact(batch: int, lo: int, hi: int, gen: torch.Generator) -> torch.Tensor:
    """Random values v = k/1000 whose v*1000 diffusers reproduces exactly in bf16 arithmetic.

    diffusers computes t.to(bf16) * 1000 in bf16 (0.75 -> 752); the reference embeds t*1000 from fp32. On
    these values both see the same embedding input, so the diffusers baseline differs from the truth only by
    the bf16 rounding inside the blocks, which is what the rule compares.
    """
    k = torch.arange(lo, hi)
    ok = ((k / 1000).bfloat16() * 1000).float() == k.float()
    pool = k[ok]
    return pool[torch.randint(len(pool), (batch,), generator=gen)] / 1000


@pytest.mark.parametrize("variant, batch, height, width, txt_len", CASES)
def test_bf16_within_rule_of_diffusers(variant, batch, height, width, txt_len):
    cfg = dataclasses.replace(FluxConfig.preset("tiny"), guidance_embed=variant == "dev")
    ref, dif = make_pair(cfg, seed=7 + batch)
    inputs = make_inputs(cfg, batch, height, width, txt_len, seed=3 + txt_len)
    gen = torch.Generator().manual_seed(txt_len)
    inputs["timesteps"] = bf16_exact(batch, 1, 1000, gen)
    if cfg.guidance_embed:
        inputs["guidance"] = bf16_exact(batch, 1000, 6000, gen)
    truth = run_reference(ref, inputs, torch.float32)
    out = run_reference(ref.to(torch.bfloat16), inputs, torch.bfloat16)
    baseline = run_diffusers(dif.to(torch.bfloat16), inputs, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert_within_rule(out, baseline, truth, atol=1e-3, what="bf16 reference vs fp32")
    assert rel_error(out, truth) <= 2e-2


def test_bfl_diffusers_round_trip_is_exact():
    ref = randomize_parameters_(fluxrt.reference.Flux(FluxConfig.preset("tiny")), seed=1)
    sd = ref.state_dict()
    back = fluxrt.diffusers_to_bfl(fluxrt.bfl_to_diffusers(sd))
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


@pytest.mark.parametrize("guidance", [True, False])
def test_converter_agrees_with_diffusers_own(guidance):
    # diffusers' converter hard-codes hidden 3072 (FLUX's split of linear1), so check at real width, one block each.
    cfg = dataclasses.replace(FluxConfig.preset("flux-dev"), depth=1, depth_single_blocks=1, context_in_dim=32,
                              vec_in_dim=16, guidance_embed=guidance)
    with torch.device("meta"):
        shapes = fluxrt.reference.Flux(cfg).state_dict()
    gen = torch.Generator().manual_seed(0)
    bfl = {k: torch.randn(v.shape, generator=gen, dtype=torch.bfloat16) for k, v in shapes.items()}
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    ours = fluxrt.bfl_to_diffusers(bfl)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
