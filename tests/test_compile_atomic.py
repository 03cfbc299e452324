"""fluxrt.compile is atomic (check, then move): a compile that raises leaves its object exactly as it was (every
tensor at the same address with the same values, the same modules, the same output). Also: compiling a model
again keeps one copy of its weights, and `plan["last_call"]` records what a call actually ran."""

import dataclasses

import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel

import fluxrt
from fluxrt import FluxConfig, sampling
from fluxrt.quantize import FP8Linear
from fluxrt.reference import AutoEncoder, AutoEncoderParams
from fluxrt.testing import randomize_parameters_

TINY = FluxConfig.preset("tiny")
SMALL_AE = AutoEncoderParams(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=8)


def snapshot(module: torch.nn.Module) -> dict:
    """{state-dict name: (data_ptr, a copy of the values, type of the owning module)} of every tensor."""
    modules = dict(module.named_modules())
    return {name: (t.data_ptr(), t.detach().clone(), type(modules[name.rpartition(".")[0]]))
            for name, t in module.state_dict(keep_vars=True).items()}


def assert_as_before(module: torch.nn.Module, before: dict) -> None:
    now = snapshot(module)
    assert list(now) == list(before)
    for name, (ptr, value, owner) in before.items():
        assert now[name][0] == ptr, f"{name} moved"
        assert now[name][2] is owner, f"{name}'s module was replaced"
        assert now[name][1].dtype == value.dtype and torch.equal(now[name][1], value), f"{name} changed"


# ---- diffusers FluxTransformer2DModel ----


def diffusers_flux(seed: int = 0) -> FluxTransformer2DModel:
    model = FluxTransformer2DModel(**TINY.to_diffusers())
    return randomize_parameters_(model, seed=seed).eval().requires_grad_(False)


def diffusers_inputs(B=1, height=32, width=48, T=5, seed=1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=sampling.pack(sampling.get_noise(B, height, width, seed=seed)),
        encoder_hidden_states=torch.randn(B, T, TINY.context_in_dim, generator=gen),
        pooled_projections=torch.randn(B, TINY.vec_in_dim, generator=gen),
        timestep=torch.rand(B, generator=gen),
        img_ids=sampling.prepare_img_ids(1, height, width)[0],
        txt_ids=sampling.prepare_txt_ids(1, T)[0],
        guidance=torch.full((B,), 3.5),
        return_dict=False,
    )


def refused_and_untouched(model, x, error, match, **options):
    """compile(model) raises `error`; then the model is as it was and still computes what it computed before."""
    before, expected = snapshot(model), model(**x)[0]
    with pytest.raises(error, match=match):
        fluxrt.compile(model, backend="torch", **options)
    assert_as_before(model, before)
    assert torch.equal(model(**x)[0], expected)


@torch.no_grad()
def test_transformer_with_an_extra_parameter_is_refused_untouched():
    model, x = diffusers_flux(), diffusers_inputs()
    model.transformer_blocks[0].attn.register_parameter("extra", torch.nn.Parameter(torch.randn(512)))
    refused_and_untouched(model, x, fluxrt.CheckpointError, r"unrecognized .*transformer_blocks\.0\.attn\.extra")


@torch.no_grad()
def test_transformer_after_fuse_qkv_projections_is_converted_from_the_fused_weights():
    model, x = diffusers_flux(seed=2), diffusers_inputs()
    model.fuse_qkv_projections()
    with torch.no_grad():  # the fused layers are what diffusers then runs: make them differ from the unfused copies
        for module in model.modules():
            for name in ("to_qkv", "to_added_qkv"):
                if hasattr(module, name):
                    getattr(module, name).weight.mul_(1.5)
    expected = model(**x)[0]
    compiled = fluxrt.compile(model, backend="torch")
    torch.testing.assert_close(compiled(**x)[0], expected, rtol=1e-5, atol=1e-5)
    assert all(p.is_meta for p in model.parameters())  # every unfused duplicate released too


@torch.no_grad()
def test_a_fused_projection_that_does_not_stack_its_parts_is_refused_untouched():
    model, x = diffusers_flux(seed=2), diffusers_inputs()
    model.fuse_qkv_projections()
    attn = model.transformer_blocks[0].attn
    attn.to_qkv.weight = torch.nn.Parameter(attn.to_qkv.weight[:-3].clone())
    attn.to_qkv.bias = torch.nn.Parameter(attn.to_qkv.bias[:-3].clone())
    attn.to_qkv.out_features -= 3
    with pytest.raises(fluxrt.CheckpointError, match=r"fused projection transformer_blocks\.0\.attn\.to_qkv\.(weight|bias) "
                                                      r"does not stack"):
        fluxrt.compile(model, backend="torch")
    assert not any(p.is_meta for p in model.parameters())


@torch.no_grad()
def test_transformer_with_mixed_dtypes_is_refused_untouched():
    model, x = diffusers_flux(seed=3), diffusers_inputs()
    model.proj_out.double()  # diffusers runs it (the final layer casts); fluxrt would silently mix dtypes
    before = snapshot(model)
    with pytest.raises(fluxrt.CheckpointError, match=r"mixes parameter dtypes \(torch.float32, torch.float64\)"):
        fluxrt.compile(model, backend="torch")
    assert_as_before(model, before)


@torch.no_grad()
def test_an_option_refused_after_the_conversion_check_leaves_the_model_untouched():
    """The device checks (cuda_graphs=True on a CPU model here) come after the conversion check and still before
    any tensor moves."""
    model, x = diffusers_flux(seed=4), diffusers_inputs()
    refused_and_untouched(model, x, ValueError, "cuda_graphs=True needs the model on a CUDA device", cuda_graphs=True)


@torch.no_grad()
def test_a_consumed_transformer_and_a_compiled_one_are_refused_clearly():
    model, x = diffusers_flux(seed=5), diffusers_inputs()
    fast = fluxrt.compile(model, backend="torch")
    with pytest.raises(fluxrt.CheckpointError, match="an earlier fluxrt.compile consumed it"):
        fluxrt.compile(model)
    with pytest.raises(TypeError, match="already compiled by fluxrt"):
        fluxrt.compile(fast)
    fast(**x)  # the compiled model is unharmed by both refusals


@torch.no_grad()
def test_prepare_checks_without_moving_and_the_build_moves():
    """fluxrt.compiler.prepare is compile's check phase (for callers compiling several models as one step)."""
    model, x = diffusers_flux(seed=6), diffusers_inputs()
    before, expected = snapshot(model), model(**x)[0]
    build = fluxrt.compiler.prepare(model, backend="torch")
    assert_as_before(model, before)
    fast = build()
    assert all(p.is_meta for p in model.parameters())
    torch.testing.assert_close(fast(**x)[0], expected, rtol=1e-5, atol=1e-5)


# ---- diffusers AutoencoderKL and the FluxPipeline holding both ----


def diffusers_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[8, 8, 16, 16],
                        layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=4, use_quant_conv=False,
                        use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def test_autoencoder_kl_with_an_extra_module_is_refused_untouched():
    vae = diffusers_vae()
    vae.decoder.extra = torch.nn.Conv2d(16, 16, 1)
    z = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    before, expected = snapshot(vae), vae.decode(z).sample
    with pytest.raises(fluxrt.CheckpointError, match=r"unrecognized .*decoder\.extra\.weight"):
        fluxrt.compile(vae)
    assert_as_before(vae, before)
    assert torch.equal(vae.decode(z).sample, expected)


@torch.no_grad()
def test_pipeline_whose_vae_fails_keeps_its_transformer_too(tmp_path):
    from tiny_pipeline import build_tiny_flux_pipeline

    pipe = build_tiny_flux_pipeline(tmp_path, seed=7)
    pipe.vae.decoder.extra = torch.nn.Conv2d(16, 16, 1)
    transformer, vae = pipe.transformer, pipe.vae
    before = {"transformer": snapshot(transformer), "vae": snapshot(vae)}
    call = dict(prompt="a red apple", height=32, width=32, num_inference_steps=2, guidance_scale=3.5,
                max_sequence_length=16, output_type="pt")
    expected = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    with pytest.raises(fluxrt.CheckpointError, match=r"AutoencoderKL.*decoder\.extra"):
        fluxrt.compile(pipe, backend="torch")
    assert pipe.transformer is transformer and pipe.vae is vae
    assert_as_before(transformer, before["transformer"])
    assert_as_before(vae, before["vae"])
    assert torch.equal(pipe(**call, generator=torch.Generator().manual_seed(0)).images, expected)


# ---- the reference fluxrt Flux and AutoEncoder ----


def reference_flux(seed: int = 0, **changes) -> fluxrt.reference.Flux:
    model = fluxrt.reference.Flux(dataclasses.replace(TINY, **changes))
    return randomize_parameters_(model, seed=seed).eval().requires_grad_(False)


def reference_inputs(B=1, height=32, width=48, T=5, seed=1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return dict(
        img=sampling.pack(sampling.get_noise(B, height, width, seed=seed)),
        img_ids=sampling.prepare_img_ids(B, height, width),
        txt=torch.randn(B, T, TINY.context_in_dim, generator=gen),
        txt_ids=sampling.prepare_txt_ids(B, T),
        timesteps=torch.rand(B, generator=gen),
        y=torch.randn(B, TINY.vec_in_dim, generator=gen),
        guidance=torch.full((B,), 3.5),
    )


class ScaledLinear(torch.nn.Module):
    """A user's wrapper around a linear (what an unfused LoRA layer looks like to fluxrt)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.base = linear

    def forward(self, x):
        return 1.5 * self.base(x)


@torch.no_grad()
def test_reference_flux_with_a_wrapped_linear_is_refused_before_quantizing():
    """quantize="fp8-weight" replaced every other block linear before the wrapper was found; now nothing moves."""
    model, x = reference_flux(seed=8), reference_inputs()
    model.single_blocks[0].modulation.lin = ScaledLinear(model.single_blocks[0].modulation.lin)
    before, expected = snapshot(model), model(**x)
    with pytest.raises(fluxrt.CheckpointError, match=r"single_blocks\.0\.modulation\.lin is a ScaledLinear"):
        fluxrt.compile(model, quantize="fp8-weight", backend="torch")
    assert_as_before(model, before)
    assert not any(isinstance(m, FP8Linear) for m in model.modules())
    assert torch.equal(model(**x), expected)


@torch.no_grad()
def test_reference_flux_with_mixed_dtypes_is_refused_untouched():
    model = reference_flux(seed=9)
    model.double_blocks[1].txt_mod.lin.double()  # torch.cat would have promoted the batched modulation silently
    before = snapshot(model)
    with pytest.raises(fluxrt.CheckpointError, match="must share one floating dtype.*double_blocks.1.txt_mod.lin"):
        fluxrt.compile(model, backend="torch")
    assert_as_before(model, before)


@torch.no_grad()
def test_reference_autoencoder_with_mixed_dtypes_is_refused_untouched():
    ae = randomize_parameters_(AutoEncoder(SMALL_AE), 0).eval().requires_grad_(False)
    ae.decoder.conv_out.double()
    before = snapshot(ae)
    with pytest.raises(fluxrt.CheckpointError, match=r"autoencoder mixes parameter dtypes"):
        fluxrt.compile(ae)
    assert_as_before(ae, before)


# ---- compiling again: one copy of the weights ----


def storage_bytes(*modules) -> int:
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for m in modules for p in m.parameters()}
    return sum(storages.values())


@pytest.mark.parametrize("quantize", [None, "fp8-weight"])
@torch.no_grad()
def test_compiling_a_model_twice_keeps_one_copy_of_the_batched_modulation(quantize):
    model, x = reference_flux(seed=10), reference_inputs()
    first = fluxrt.compile(model, quantize=quantize, backend="torch")
    once = storage_bytes(first)
    expected = first(**x)
    second = fluxrt.compile(model, backend="torch")  # the first is still alive and in use
    assert storage_bytes(first, second) == once
    assert second.modulation.weight.data_ptr() == first.modulation.weight.data_ptr()
    assert torch.equal(second(**x), expected) and torch.equal(first(**x), expected)


# ---- plan["last_call"]: what ran, not what was asked ----


@torch.no_grad()
def test_plan_last_call_records_what_ran():
    model, x = reference_flux(seed=11), reference_inputs(B=2, T=9)
    fast = fluxrt.compile(model, quantize="fp8-weight", backend="torch")
    assert fast.plan["last_call"] is None
    fast(**x)
    ops = {"modulated_layer_norm", "gated_residual_norm", "rope_qk_norm", "rope_qk_norm_joint", "joint_attention",
           "fp8_linear"}
    assert fast.plan["last_call"] == {op: ["torch"] for op in ops}
    # one layer's own backend, which neither compile's arguments nor the plan's ops know: the record follows it
    model.single_blocks[0].linear2.backend = "triton"
    fast(**x)
    assert fast.plan["last_call"] == {op: ["torch", "triton"] if op == "fp8_linear" else ["torch"] for op in ops}


@torch.no_grad()
def test_plan_last_call_of_the_diffusers_wrapper_and_the_autoencoder():
    model, x = diffusers_flux(seed=12), diffusers_inputs()
    fast = fluxrt.compile(model, quantize="fp8-weight", backend="torch")
    fast(**x)
    assert fast.plan["last_call"]["fp8_linear"] == ["torch"] and fast.plan is fast.fast.plan
    ae = fluxrt.compile(randomize_parameters_(AutoEncoder(SMALL_AE), 1).eval().requires_grad_(False), backend="torch")
    assert ae.plan["last_call"] is None
    ae.decode(torch.randn(1, 16, 4, 4))
    assert ae.plan["last_call"] == {"group_norm_silu": ["torch"], "add_group_norm_silu": ["torch"]}


@torch.no_grad()
def test_transformer_with_an_unfused_peft_lora_is_refused_untouched():
    # a real peft LoRA adapter through diffusers' own add_adapter (lora_A/lora_B/base_layer wrap the linears)
    from peft import LoraConfig

    model, x = diffusers_flux(seed=4), diffusers_inputs()
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, use_dora=True,  # plain LoRAs compile
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    refused_and_untouched(model, x, fluxrt.CheckpointError, r"DoRA, rsLoRA or LoRA biases.*delete_adapters")
