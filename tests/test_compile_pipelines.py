"""fluxrt.compile(pipe) for every diffusers FLUX pipeline: each class, built from the same tiny fp32 components,
gives the plain pipeline's pixels (<= 1e-4) after a whole-pipeline compile; a pipeline is recognised by its
components (anything else is a TypeError saying what is accepted); a component that cannot convert leaves every
component as it was."""

import copy
import json

import diffusers
import pytest
import torch
from diffusers import FluxControlNetModel, FluxTransformer2DModel, SD3ControlNetModel, SD3Transformer2DModel
from test_compile_atomic import assert_as_before, snapshot

import fluxrt
from fluxrt import FluxConfig
from fluxrt.testing import randomize_parameters_

SIZE = 32  # pixels: 2 x 2 latent tokens
CALL = dict(prompt="a red apple", height=SIZE, width=SIZE, num_inference_steps=2, guidance_scale=3.5,
            max_sequence_length=16, output_type="pt")
TEXT_COMPONENTS = ("scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One tiny FluxPipeline whose components every test copies (compile consumes the transformer and VAE)."""
    from tiny_pipeline import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny_flux_pipelines"), seed=3)


def transformer(base, in_channels: int) -> FluxTransformer2DModel:
    """The base transformer, or for Fill (384) and Control (128) one with that many input channels."""
    if in_channels == base.transformer.config.in_channels:
        return copy.deepcopy(base.transformer)
    config = FluxConfig.preset("tiny").to_diffusers()
    config.update(in_channels=in_channels, out_channels=64)
    torch.manual_seed(in_channels)
    return FluxTransformer2DModel(**config).eval().requires_grad_(False)


def controlnet(seed: int, **extra) -> FluxControlNetModel:
    """A tiny ControlNet with every weight random (diffusers zero-initialises its residual layers)."""
    config = {k: v for k, v in FluxConfig.preset("tiny").to_diffusers().items() if k != "out_channels"}
    config.update(num_layers=1, num_single_layers=1, **extra)
    return randomize_parameters_(FluxControlNetModel(**config), seed=seed).eval().requires_grad_(False)


def pipeline(base, name: str, in_channels: int = 64, **extra_components):
    components = {name: base.components[name] for name in TEXT_COMPONENTS}
    components.update(vae=copy.deepcopy(base.vae), transformer=transformer(base, in_channels))
    components.update(extra_components)
    pipe = getattr(diffusers, name)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image(seed: int, channels: int = 3) -> torch.Tensor:
    return torch.rand(1, channels, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def mask() -> torch.Tensor:
    m = torch.zeros(1, 1, SIZE, SIZE)
    m[..., SIZE // 4 : 3 * SIZE // 4, SIZE // 2 :] = 1.0
    return m


IMG2IMG = dict(image=image(1), strength=0.9)
INPAINT = dict(image=image(1), mask_image=mask(), strength=0.9)
KONTEXT = dict(image=image(1), max_area=SIZE * SIZE, _auto_resize=False)  # the reference image as it is, 32 x 32
CONTROL = dict(control_image=image(2))

# name -> (pipeline class, transformer in_channels, call arguments, controlnet factory or None)
PIPELINES = {
    "FluxPipeline": ("FluxPipeline", 64, {}, None),
    "FluxImg2ImgPipeline": ("FluxImg2ImgPipeline", 64, IMG2IMG, None),
    "FluxInpaintPipeline": ("FluxInpaintPipeline", 64, INPAINT, None),
    "FluxFillPipeline": ("FluxFillPipeline", 384, dict(image=image(1), mask_image=mask()), None),
    "FluxControlPipeline": ("FluxControlPipeline", 128, CONTROL, None),
    "FluxControlImg2ImgPipeline": ("FluxControlImg2ImgPipeline", 128, {**CONTROL, **IMG2IMG}, None),
    "FluxControlInpaintPipeline": ("FluxControlInpaintPipeline", 128, {**CONTROL, **INPAINT}, None),
    "FluxControlNetPipeline": ("FluxControlNetPipeline", 64, dict(CONTROL, controlnet_conditioning_scale=0.7),
                               lambda: controlnet(10)),
    "FluxControlNetPipeline, Union": ("FluxControlNetPipeline", 64, dict(CONTROL, control_mode=2),
                                      lambda: controlnet(11, num_mode=3)),
    "FluxControlNetPipeline, multi": ("FluxControlNetPipeline", 64,
                                      dict(control_image=[image(2), image(3)],
                                           controlnet_conditioning_scale=[0.5, 1.0]),
                                      lambda: [controlnet(12), controlnet(13)]),
    "FluxControlNetImg2ImgPipeline": ("FluxControlNetImg2ImgPipeline", 64, {**CONTROL, **IMG2IMG},
                                      lambda: controlnet(14)),
    "FluxControlNetInpaintPipeline": ("FluxControlNetInpaintPipeline", 64, {**CONTROL, **INPAINT},
                                      lambda: controlnet(15)),
    "FluxKontextPipeline": ("FluxKontextPipeline", 64, KONTEXT, None),
    "FluxKontextInpaintPipeline": ("FluxKontextInpaintPipeline", 64, dict(KONTEXT, mask_image=mask(), strength=0.9),
                                   None),
}


def run(pipe, arguments: dict) -> torch.Tensor:
    return pipe(**CALL, **arguments, generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("case", list(PIPELINES))
@torch.no_grad()
def test_whole_pipeline_compile_matches_diffusers(base, case):
    name, in_channels, arguments, make_controlnet = PIPELINES[case]
    extra = {"controlnet": make_controlnet()} if make_controlnet else {}
    pipe = pipeline(base, name, in_channels, **extra)
    expected = run(pipe, arguments)
    assert fluxrt.compile(pipe, backend="torch") is pipe
    compiled = {"transformer": "FastFluxTransformer", "vae": "FastAutoencoderKL"}
    nets = getattr(pipe, "controlnet", None)
    nets = list(getattr(nets, "nets", [nets])) if nets is not None else []
    assert {k: type(getattr(pipe, k)).__name__ for k in compiled} == compiled
    assert all(type(net).__name__ == "FastFluxControlNetModel" for net in nets)
    got = run(pipe, arguments)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert pipe.transformer.plan["last_call"]["joint_attention"] == ["torch"]  # the fused blocks ran
    assert all(net.plan["last_call"]["joint_attention"] == ["torch"] for net in nets)


@torch.no_grad()
def test_fuse_qkv_projections_before_compile_is_kept(base):
    pipe = pipeline(base, "FluxPipeline")
    pipe.transformer.fuse_qkv_projections()
    pipe.vae.fuse_qkv_projections()
    assert pipe.transformer.transformer_blocks[0].attn.fused_projections
    assert any(name.endswith("to_qkv.weight") for name, _ in pipe.vae.named_parameters())
    expected = run(pipe, {})
    fluxrt.compile(pipe, backend="torch")
    torch.testing.assert_close(run(pipe, {}), expected, atol=1e-4, rtol=0)


# ---- what is not a FLUX pipeline, and atomicity ----


def tiny_sd3_transformer() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=16, out_channels=4)


def test_a_pipeline_without_flux_components_is_refused_clearly(base):
    pipe = pipeline(base, "FluxPipeline", transformer=tiny_sd3_transformer())
    vae, before = pipe.vae, snapshot(pipe.vae)
    with pytest.raises(TypeError, match=r"accepts a diffusers pipeline whose transformer is a FluxTransformer2DModel "
                                        r"and whose vae is an AutoencoderKL \(FluxPipeline, .*FluxKontextPipeline.*\); "
                                        r"this FluxPipeline has transformer SD3Transformer2DModel and vae "
                                        r"AutoencoderKL"):
        fluxrt.compile(pipe)
    assert pipe.vae is vae
    assert_as_before(vae, before)
    pipe = pipeline(base, "FluxImg2ImgPipeline", vae=None)
    with pytest.raises(TypeError, match="this FluxImg2ImgPipeline has transformer FluxTransformer2DModel and vae "
                                        "NoneType"):
        fluxrt.compile(pipe)


@torch.no_grad()
def test_a_controlnet_that_is_not_flux_is_refused_before_anything_moves(base):
    sd3_controlnet = SD3ControlNetModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                        pooled_projection_dim=16, out_channels=4)
    pipe = pipeline(base, "FluxControlNetPipeline", controlnet=sd3_controlnet)
    before = {name: snapshot(getattr(pipe, name)) for name in ("transformer", "vae")}
    with pytest.raises(TypeError, match="controlnet when it is a diffusers FluxControlNetModel or a "
                                        "FluxMultiControlNetModel of them; got SD3ControlNetModel"):
        fluxrt.compile(pipe, backend="torch")
    for name, snap in before.items():
        assert_as_before(getattr(pipe, name), snap)


@pytest.mark.parametrize("broken", ["transformer", "controlnet"])
@torch.no_grad()
def test_a_controlnet_pipeline_with_a_broken_component_keeps_every_component(base, broken):
    pipe = pipeline(base, "FluxControlNetPipeline", controlnet=controlnet(16))
    getattr(pipe, broken).transformer_blocks[0].attn.register_parameter("extra", torch.nn.Parameter(torch.randn(4)))
    modules = {name: getattr(pipe, name) for name in ("transformer", "vae", "controlnet")}
    before = {name: snapshot(module) for name, module in modules.items()}
    expected = run(pipe, CONTROL)
    with pytest.raises(fluxrt.CheckpointError, match=r"unrecognized .*transformer_blocks\.0\.attn\.extra"):
        fluxrt.compile(pipe, backend="torch")
    for name, module in modules.items():
        assert getattr(pipe, name) is module, f"pipe.{name} was replaced"
        assert_as_before(module, before[name])
    assert torch.equal(run(pipe, CONTROL), expected)


@torch.no_grad()
def test_a_compiled_pipeline_is_refused_as_compiled(base):
    pipe = pipeline(base, "FluxKontextPipeline")
    fluxrt.compile(pipe, backend="torch")
    with pytest.raises(TypeError, match="the transformer is already compiled by fluxrt"):
        fluxrt.compile(pipe)


@torch.no_grad()
def test_a_compiled_controlnet_pipeline_saves_a_folder_plain_diffusers_loads(base, tmp_path):
    pipe = pipeline(base, "FluxControlNetPipeline", controlnet=controlnet(17, num_mode=2))
    arguments = dict(CONTROL, control_mode=1)
    fluxrt.compile(pipe, backend="torch")
    expected = run(pipe, arguments)
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["controlnet"] == ["diffusers", "FluxControlNetModel"]
    loaded = diffusers.FluxControlNetPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.controlnet) is FluxControlNetModel
    torch.testing.assert_close(run(loaded, arguments), expected, atol=1e-4, rtol=0)
