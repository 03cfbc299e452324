import dataclasses
import logging

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


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(axes_dims_rope=5), "field 'axes_dims_rope' must be a list of positive even ints"),
        (dict(axes_dims_rope=[8, 28, 27]), "field 'axes_dims_rope' must be a list of positive even ints"),
        (dict(axes_dims_rope=[8, 28, 20]), r"field 'axes_dims_rope' \[8, 28, 20\] sums to 56, .*attention_head_dim 64"),
        (dict(attention_head_dim=None), "field 'attention_head_dim' must be a positive int, got None"),
        (dict(attention_head_dim=64.0), "field 'attention_head_dim' must be a positive int, got 64.0"),
        (dict(in_channels="64"), "field 'in_channels' must be a positive int, got '64'"),
        (dict(joint_attention_dim=-4096), "field 'joint_attention_dim' must be a positive int"),
        (dict(pooled_projection_dim=True), "field 'pooled_projection_dim' must be a positive int, got True"),
        (dict(num_single_layers=-2), "field 'num_single_layers' must be an int >= 0"),
        (dict(out_channels=0), "field 'out_channels' must be a positive int or null"),
        (dict(patch_size=2), "field 'patch_size' is 2; only patch_size 1"),
        (dict(guidance_embeds=1), "field 'guidance_embeds' must be true or false, got 1"),
        (dict(_class_name="SD3Transformer2DModel"), "_class_name is 'SD3Transformer2DModel'"),
    ],
)
def test_from_diffusers_names_the_wrong_field(change, message):
    with pytest.raises(ValueError, match=message):
        FluxConfig.from_diffusers({**FluxConfig.preset("tiny").to_diffusers(), **change})


@pytest.mark.parametrize("config", [[1, 2], "config.json", None])
def test_from_diffusers_needs_a_mapping(config):
    with pytest.raises(ValueError, match="must be a JSON object of fields"):
        FluxConfig.from_diffusers(config)


def test_from_diffusers_fills_in_diffusers_defaults_and_warns_on_unknown_fields(caplog):
    import inspect

    from diffusers import FluxTransformer2DModel

    defaults = {name: p.default for name, p in inspect.signature(FluxTransformer2DModel.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    assert FluxConfig.from_diffusers({}) == FluxConfig.from_diffusers(defaults)
    assert FluxConfig.from_diffusers({"out_channels": None, "guidance_embeds": True}) == FluxConfig.preset("flux-dev")
    with caplog.at_level(logging.WARNING, logger="fluxrt"):
        cfg = FluxConfig.from_diffusers({**FluxConfig.preset("tiny").to_diffusers(), "use_magic": True,
                                         "_diffusers_version": "0.42.1"})
    assert cfg == FluxConfig.preset("tiny")
    assert "ignoring config fields fluxrt does not know: ['use_magic']" in caplog.text


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(axes_dim=16), "axes_dim must be a tuple of ints, got 16"),
        (dict(axes_dim=(16.5, 56, 55.5)), "axes_dim must be a tuple of ints"),
        (dict(mlp_ratio="4"), "mlp_ratio must be a finite number > 0, got '4'"),
        (dict(mlp_ratio=float("inf")), "mlp_ratio must be a finite number > 0"),
        (dict(qkv_bias="yes"), "qkv_bias must be True or False"),
        (dict(guidance_embed=None), "guidance_embed must be True or False"),
    ],
)
def test_types_are_checked(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(FluxConfig.preset("flux-dev"), **change)
