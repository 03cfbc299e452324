import dataclasses

import pytest

from fluxrt import FluxConfig


def test_presets_match_the_released_models():
    dev = FluxConfig.preset("flux-dev")
    assert (dev.hidden_size, dev.num_heads, dev.head_dim, dev.depth, dev.depth_single_blocks) == (3072, 24, 128, 19, 38)
    assert (dev.in_channels, dev.out_channels, dev.vec_in_dim, dev.context_in_dim) == (64, 64, 768, 4096)
    assert dev.axes_dim == (16, 56, 56) and dev.theta == 10000 and dev.mlp_ratio == 4.0
    assert dev.qkv_bias and dev.guidance_embed
    schnell = FluxConfig.preset("flux-schnell")
    assert not schnell.guidance_embed
    assert dataclasses.replace(schnell, guidance_embed=True) == dev
    tiny = FluxConfig.preset("tiny")
    assert tiny.head_dim == 64 and sum(tiny.axes_dim) == 64 and tiny.in_channels == 64


def test_replace_and_frozen():
    cfg = dataclasses.replace(FluxConfig.preset("flux-dev"), depth=1, depth_single_blocks=2)
    assert (cfg.depth, cfg.depth_single_blocks) == (1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.depth = 3
    assert hash(cfg) == hash(dataclasses.replace(cfg))
    assert FluxConfig(**{**dataclasses.asdict(cfg), "axes_dim": [16, 56, 56]}).axes_dim == (16, 56, 56)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(axes_dim=(16, 56, 48)), "must sum to head_dim"),
        (dict(num_heads=7), "divisible by num_heads"),
        (dict(axes_dim=(15, 57, 56)), "even"),
        (dict(hidden_size=0), "hidden_size must be a positive int"),
        (dict(depth=-1), "depth must be an int >= 0"),
        (dict(mlp_ratio=0.0), "mlp_ratio"),
    ],
)
def test_validation_errors(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(FluxConfig.preset("flux-dev"), **change)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown FluxConfig preset 'flux-pro'.*flux-dev"):
        FluxConfig.preset("flux-pro")


@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell", "tiny"])
def test_diffusers_config_round_trip(name):
    cfg = FluxConfig.preset(name)
    assert FluxConfig.from_diffusers(cfg.to_diffusers()) == cfg
