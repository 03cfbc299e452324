"""Module state beyond the weights: kept by fluxrt.compile or refused before anything changes (fluxrt.diffusers_state),
never dropped. Also: model offload before and after compile, sequential offload refused (never NaN), and `.to(...)`
keeping the batched modulation weights as one storage (FastFlux._apply)."""

import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from diffusers.hooks import FasterCacheConfig, PyramidAttentionBroadcastConfig, SeaCacheConfig
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxIPAdapterAttnProcessor
from test_compile_atomic import (
    TINY,
    assert_as_before,
    diffusers_flux,
    diffusers_inputs,
    diffusers_vae,
    refused_and_untouched,
    reference_flux,
    reference_inputs,
    snapshot,
)

import fluxrt
from fluxrt.reference.model import Flux


class ScaledFluxAttnProcessor(FluxAttnProcessor):
    """A user's attention processor: FLUX's attention, its output scaled (a stand-in for any custom processor)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        return tuple(0.5 * o for o in out) if isinstance(out, tuple) else 0.5 * out


class ScaledAttnProcessor(AttnProcessor2_0):
    """The same for the autoencoder's attention."""

    def __call__(self, *args, **kwargs):
        return 0.5 * super().__call__(*args, **kwargs)


def assert_compiles_and_matches(model, x, atol=1e-5):
    expected = model(**x)[0]
    fast = fluxrt.compile(model, backend="torch")
    torch.testing.assert_close(fast(**x)[0], expected, atol=atol, rtol=1e-4)


# ---- refused: attention processors, IP-Adapter, hooks ----


@torch.no_grad()
def test_custom_attention_processor_is_refused_untouched_and_the_default_compiles():
    model, x = diffusers_flux(), diffusers_inputs()
    model.single_transformer_blocks[0].attn.set_processor(ScaledFluxAttnProcessor())
    refused_and_untouched(model, x, fluxrt.CheckpointError,
                          r"non-default attention processors \(ScaledFluxAttnProcessor\) on "
                          r"single_transformer_blocks\.0\.attn.*set_attn_processor\(FluxAttnProcessor\(\)\)")
    model.set_attn_processor(FluxAttnProcessor())  # the advice works
    assert_compiles_and_matches(model, x)


@torch.no_grad()
def test_default_processor_with_another_attention_backend_compiles():
    """The attention backend is how the default processor computes the same attention: fluxrt's replaces it."""
    model, x = diffusers_flux(seed=1), diffusers_inputs()
    model.set_attention_backend("_native_math")
    assert_compiles_and_matches(model, x)


@torch.no_grad()
def test_ip_adapter_projection_is_refused_untouched():
    model, x = diffusers_flux(seed=2), diffusers_inputs()
    model.encoder_hid_proj = MultiIPAdapterImageProjection(
        [ImageProjection(image_embed_dim=16, cross_attention_dim=TINY.context_in_dim, num_image_text_embeds=4)])
    refused_and_untouched(model, x, fluxrt.CheckpointError,
                          r"IP-Adapter is loaded .*encoder_hid_proj.*unload_ip_adapter")


@torch.no_grad()
def test_ip_adapter_attention_processors_are_refused_untouched():
    """Without the image embeddings the IP-Adapter processors cannot run, so only the state is compared."""
    model = diffusers_flux(seed=3)
    model.set_attn_processor({name: FluxIPAdapterAttnProcessor(TINY.hidden_size, TINY.context_in_dim)
                              for name in model.attn_processors})
    before = snapshot(model)
    with pytest.raises(fluxrt.CheckpointError, match=r"IP-Adapter attention processors \(FluxIPAdapterAttnProcessor\) "
                                                      r"on transformer_blocks\.0\.attn.* and \d+ more.*unload_ip"):
        fluxrt.compile(model, backend="torch")
    assert_as_before(model, before)


@pytest.mark.parametrize("config", [
    SeaCacheConfig(),  # First-Block Cache and TaylorSeer map to fluxrt.cache (tests/test_diffusers_cache.py)
    PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2, current_timestep_callback=lambda: 500),
    FasterCacheConfig(spatial_attention_block_skip_range=2, current_timestep_callback=lambda: 500),
], ids=lambda config: type(config).__name__)
@torch.no_grad()
def test_diffusers_cache_is_refused_untouched(config):
    model, x = diffusers_flux(seed=4), diffusers_inputs()
    expected = model(**x)[0]
    model.enable_cache(config)
    before = snapshot(model)
    with pytest.raises(fluxrt.CheckpointError, match=rf"diffusers cache enabled \({type(config).__name__}.*"
                                                      r"disable_cache\(\)"):
        fluxrt.compile(model, backend="torch")
    assert_as_before(model, before)
    assert model.is_cache_enabled
    model.disable_cache()  # the advice works
    fast = fluxrt.compile(model, backend="torch")
    torch.testing.assert_close(fast(**x)[0], expected, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_an_empty_hook_registry_from_cache_context_is_fine():
    """FluxPipeline wraps every call in transformer.cache_context(), which leaves an empty diffusers HookRegistry."""
    model, x = diffusers_flux(seed=5), diffusers_inputs()
    with model.cache_context("cond"):
        pass
    assert hasattr(model, "_diffusers_hook")
    assert_compiles_and_matches(model, x)


@torch.no_grad()
def test_layerwise_casting_hooks_are_refused_untouched():
    model = diffusers_flux(seed=6)
    model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    before = snapshot(model)
    with pytest.raises(fluxrt.CheckpointError, match=r"diffusers hooks \(layerwise_casting\) on .*enable_layerwise_"):
        fluxrt.compile(model, backend="torch")
    assert_as_before(model, before)


@pytest.mark.parametrize("where", ["a block's forward hook", "the model's forward pre-hook"])
@torch.no_grad()
def test_torch_hooks_are_refused_untouched(where):
    model, x = diffusers_flux(seed=7), diffusers_inputs()
    calls = []
    if where == "a block's forward hook":
        handle = model.transformer_blocks[0].register_forward_hook(lambda *args: calls.append("block"))
        path = r"transformer_blocks\.0"
    else:
        handle = model.register_forward_pre_hook(lambda *args: calls.append("model"))
        path = r"\(the model itself\)"
    refused_and_untouched(model, x, fluxrt.CheckpointError, rf"torch hooks .* on {path}:.*handle\.remove\(\)")
    assert len(calls) == 2  # the hook still fires: refused_and_untouched called the model twice
    handle.remove()
    assert_compiles_and_matches(model, x)


@torch.no_grad()
def test_autoencoder_custom_processor_is_refused_and_its_defaults_compile():
    vae = diffusers_vae()
    z = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    expected = vae.decode(z).sample
    vae.set_attn_processor(ScaledAttnProcessor())
    before = snapshot(vae)
    with pytest.raises(fluxrt.CheckpointError, match=r"AutoencoderKL has non-default attention processors "
                                                      r"\(ScaledAttnProcessor\) on (en|de)coder\.mid_block"):
        fluxrt.compile(vae)
    assert_as_before(vae, before)
    vae.set_attn_processor(AttnProcessor())  # set_default_attn_processor()'s choice: plain attention, kept
    torch.testing.assert_close(fluxrt.compile(vae).decode(z).sample, expected, atol=1e-5, rtol=1e-4)


# ---- offload ----


def tiny_pipe(tmp_path, seed=11):
    from tiny_pipeline import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(tmp_path, seed=seed)


CALL = dict(prompt="a red apple", height=32, width=32, num_inference_steps=1, guidance_scale=3.5,
            max_sequence_length=16, output_type="pt")


def images(pipe):
    return pipe(**CALL, generator=torch.Generator().manual_seed(0)).images


def offload_hook(module):
    from accelerate.hooks import CpuOffload

    hook = getattr(module, "_hf_hook", None)
    return hook if isinstance(hook, CpuOffload) else None


@torch.no_grad()
def test_model_cpu_offload_after_compile_gives_equal_images(tmp_path):
    """On this CPU-only machine the offload device is the CPU, so this checks that accelerate's hooks attach to the
    compiled modules and run them (moving them with .to each call) with equal outputs; the move to a GPU is
    test_gpu_model_cpu_offload_before_and_after_compile."""
    pipe = tiny_pipe(tmp_path)
    plain = images(pipe)
    pipe = fluxrt.compile(pipe, backend="torch")
    compiled = images(pipe)
    torch.testing.assert_close(compiled, plain, atol=1e-4, rtol=0)
    pipe.enable_model_cpu_offload(device="cpu")
    assert offload_hook(pipe.transformer) is not None and offload_hook(pipe.vae) is not None
    assert torch.equal(images(pipe), compiled)
    assert torch.equal(images(pipe), compiled)  # the hooks, re-applied after a call, still run it


class CountingHook(ModelHook):
    """An accelerate hook that counts the calls which run it (model offload moves the model in pre_forward)."""

    def __init__(self):
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


@pytest.mark.parametrize("compiled", [False, True], ids=["diffusers", "compiled"])
@torch.no_grad()
def test_the_vae_decode_runs_the_offload_hook(tmp_path, compiled):
    """The pipeline calls vae.decode, not forward: diffusers' AutoencoderKL runs the model offload hook there
    (otherwise, on a GPU, the VAE would stay on the CPU under its latents)."""
    pipe = tiny_pipe(tmp_path, seed=15)
    if compiled:
        pipe = fluxrt.compile(pipe, backend="torch")
    counting = CountingHook()
    add_hook_to_module(pipe.vae, counting)
    images(pipe)
    assert counting.calls == 1


@torch.no_grad()
def test_model_cpu_offload_before_compile_is_kept(tmp_path):
    pipe = tiny_pipe(tmp_path)
    pipe.enable_model_cpu_offload(device="cpu")
    plain = images(pipe)
    pipe = fluxrt.compile(pipe, backend="torch")
    # before the first call: the compiled modules carry the offload hooks (on a GPU, a module without one would stay
    # on the CPU while its inputs are on the GPU)
    assert offload_hook(pipe.transformer) is not None and offload_hook(pipe.vae) is not None
    torch.testing.assert_close(images(pipe), plain, atol=1e-4, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("when", ["before", "after"])
@torch.no_grad()
def test_gpu_model_cpu_offload_before_and_after_compile(tmp_path, when):
    """The real thing: each model moved to the GPU for its call and back to the CPU after it."""
    pipe = tiny_pipe(tmp_path, seed=14)
    plain = images(pipe.to("cuda")).cpu()
    pipe.to("cpu")
    if when == "before":
        pipe.enable_model_cpu_offload(device="cuda")
    pipe = fluxrt.compile(pipe)
    if when == "after":
        pipe.enable_model_cpu_offload(device="cuda")
    torch.testing.assert_close(images(pipe).cpu(), plain, atol=1e-4, rtol=0)
    assert pipe.transformer.device.type == "cpu" and pipe.vae.device.type == "cpu"  # offloaded again after the call
    assert_one_modulation_storage(pipe.transformer.fast)
    torch.testing.assert_close(images(pipe).cpu(), plain, atol=1e-4, rtol=0)


@torch.no_grad()
def test_sequential_offload_before_compile_is_refused_untouched(tmp_path):
    """Offloaded weights sit on the meta device, so the state is compared once the hooks are removed."""
    pipe = tiny_pipe(tmp_path, seed=12)
    transformer, vae = pipe.transformer, pipe.vae
    before = {"transformer": snapshot(transformer), "vae": snapshot(vae)}
    expected = images(pipe)  # (accelerate 1.15 cannot run this pipeline's text encoders offloaded on the CPU)
    pipe.enable_sequential_cpu_offload(device="cpu")
    hooks = {name: module._hf_hook for name, module in transformer.named_modules() if hasattr(module, "_hf_hook")}
    with pytest.raises(fluxrt.CheckpointError, match=r"accelerate hooks \(AlignDevicesHook\) on .*sequential CPU "
                                                      r"offload.*enable_model_cpu_offload\(\)"):
        fluxrt.compile(pipe, backend="torch")
    assert pipe.transformer is transformer and pipe.vae is vae
    assert hooks == {name: module._hf_hook for name, module in transformer.named_modules()
                     if hasattr(module, "_hf_hook")}
    pipe.remove_all_hooks()  # the hooks were left as they were: removing them brings the same weights back
    assert_as_before(transformer, before["transformer"])
    assert_as_before(vae, before["vae"])
    assert torch.equal(images(pipe), expected)


@torch.no_grad()
def test_sequential_offload_after_compile_is_refused_at_the_call_never_nan(tmp_path):
    pipe = fluxrt.compile(tiny_pipe(tmp_path, seed=13), backend="torch")
    # the prompt encoded up front: accelerate 1.15 cannot run this pipeline's text encoders offloaded on the CPU
    prompt_embeds, pooled_prompt_embeds, _ = pipe.encode_prompt(CALL["prompt"], None, max_sequence_length=16)
    call = {**CALL, "prompt": None, "prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds}
    expected = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    pipe.enable_sequential_cpu_offload(device="cpu")
    with pytest.raises(RuntimeError, match=r"weights are on the meta device.*sequential CPU offload.*"
                                           r"pipe\.remove_all_hooks\(\).*enable_model_cpu_offload\(\)"):
        pipe(**call, generator=torch.Generator().manual_seed(0))
    pipe.remove_all_hooks()  # the advice works: the weights come back and give the same images
    assert torch.equal(pipe(**call, generator=torch.Generator().manual_seed(0)).images, expected)


@torch.no_grad()
def test_accelerate_cpu_offload_of_a_compiled_reference_model_is_refused():
    from accelerate import cpu_offload

    fast, x = fluxrt.compile(reference_flux(seed=3), backend="torch"), reference_inputs()
    expected = fast(**x)
    cpu_offload(fast, execution_device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="weights are on the meta device"):
        fast(**x)
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(fast, recurse=True)
    assert torch.equal(fast(**x), expected)


# ---- .to keeps the batched modulation weights as one storage ----


def modulation_views(fast) -> list[torch.nn.Module]:
    m = fast.model
    return ([lin for b in m.double_blocks for lin in (b.img_mod.lin, b.txt_mod.lin)]
            + [b.modulation.lin for b in m.single_blocks])


def assert_one_modulation_storage(fast):
    """Every block's modulation weight and bias is a view of its rows of the batched ones (no copy)."""
    for name in ("weight", "bias"):
        batched = getattr(fast.modulation, name)
        offset = 0
        for linear in modulation_views(fast):
            part = getattr(linear, name)
            assert part.untyped_storage().data_ptr() == batched.untyped_storage().data_ptr(), f"{name}: a copy"
            assert part.data_ptr() == batched[offset:].data_ptr(), f"{name}: not its rows of the batched weights"
            assert part.dtype == batched.dtype and part.device == batched.device
            offset += part.shape[0]
        assert offset == batched.shape[0]


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages under the module's parameters."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in module.parameters()}
    return sum(storages.values())


@torch.no_grad()
def test_to_dtype_and_back_keeps_one_modulation_storage():
    model, x = reference_flux(seed=5), reference_inputs()
    fast = fluxrt.compile(model, backend="torch")
    expected = fast(**x)
    size = parameter_bytes(fast)
    assert_one_modulation_storage(fast)

    fast.to(torch.float64)
    assert_one_modulation_storage(fast)
    assert parameter_bytes(fast) == 2 * size
    assert fast.modulation.weight.dtype == fast.model.img_in.weight.dtype == torch.float64
    reference64 = Flux(TINY).to(torch.float64)
    reference64.load_state_dict(fast.model.state_dict())
    x64 = {k: (v.double() if v is not None and v.is_floating_point() else v) for k, v in x.items()}
    torch.testing.assert_close(fast(**x64), reference64(**x64), atol=1e-10, rtol=1e-9)

    fast.to(torch.float32)
    assert_one_modulation_storage(fast)
    assert parameter_bytes(fast) == size
    torch.testing.assert_close(fast(**x), expected, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_diffusers_wrapper_to_keeps_one_storage_and_reports_its_dtype():
    model, x = diffusers_flux(seed=8), diffusers_inputs()
    wrapper = fluxrt.compile(model, backend="torch")
    expected = wrapper(**x)[0]
    wrapper.to(torch.float64)
    assert wrapper.dtype == torch.float64 and wrapper.fast.modulation.weight.dtype == torch.float64
    assert_one_modulation_storage(wrapper.fast)
    wrapper.to(dtype=torch.float32).to("cpu")
    assert_one_modulation_storage(wrapper.fast)
    torch.testing.assert_close(wrapper(**x)[0], expected, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_a_quantized_models_dtype_cannot_change_but_it_still_moves():
    model, x = reference_flux(seed=6), reference_inputs()
    fast = fluxrt.compile(model, quantize="fp8-weight", backend="torch")
    expected = fast(**x)
    qkv = fast.model.double_blocks[0].img_attn.qkv
    fp8 = qkv.weight.dtype
    for convert in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float()):
        with pytest.raises(ValueError, match="quantized .FP8 weights.*cannot change"):
            convert(fast)
        assert qkv.weight.dtype == fast.modulation.weight.dtype == fp8  # nothing converted
        assert fast.model.img_in.weight.dtype == torch.float32
    fast.to("cpu")  # a move keeps the dtypes
    assert_one_modulation_storage(fast)
    torch.testing.assert_close(fast(**x), expected, rtol=0, atol=0)
