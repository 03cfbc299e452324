"""save_pretrained after fluxrt.compile (fluxrt.diffusers_save): a whole pipeline, a transformer or a VAE saved
compiled is loaded back by plain diffusers with the same weights (bit for bit, dtype kept) and gives the same
images; model_index.json names the diffusers classes; quantized models and pickle files are refused with nothing
written; a save that fails half-way leaves the target as it was."""

import copy
import json
import pickle

import pytest
import safetensors.torch
import torch
from diffusers import (
    AutoencoderKL,
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxImg2ImgPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    ModelMixin,
)

import fluxrt
from fluxrt import FluxConfig, sampling
from fluxrt.testing import randomize_parameters_

TINY = FluxConfig.preset("tiny")
PIPELINE_PARTS = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")


def tiny_transformer(seed: int = 0, dtype=torch.float32) -> FluxTransformer2DModel:
    model = FluxTransformer2DModel(**TINY.to_diffusers())
    return randomize_parameters_(model, seed=seed).to(dtype).eval().requires_grad_(False)


def tiny_vae(seed: int = 0, dtype=torch.float32) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[8, 8, 16, 16],
                         layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 4,
                         up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=4, use_quant_conv=False,
                         use_post_quant_conv=False, scaling_factor=0.3611,
                         shift_factor=0.1159).to(dtype).eval().requires_grad_(False)


def transformer_inputs(dtype, B=1, height=32, width=48, T=5, seed=1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=sampling.pack(sampling.get_noise(B, height, width, seed=seed)).to(dtype),
        encoder_hidden_states=torch.randn(B, T, TINY.context_in_dim, generator=gen).to(dtype),
        pooled_projections=torch.randn(B, TINY.vec_in_dim, generator=gen).to(dtype),
        timestep=torch.rand(B, generator=gen).to(dtype),
        img_ids=sampling.prepare_img_ids(1, height, width)[0],
        txt_ids=sampling.prepare_txt_ids(1, T)[0],
        guidance=torch.full((B,), 3.5, dtype=dtype),
        return_dict=False,
    )


def weights(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(model: torch.nn.Module, expected: dict) -> None:
    got = model.state_dict()
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), f"{key} differs"


def assert_nothing_left(parent, target) -> None:
    """No target and no temporary folder of a save next to it."""
    assert not target.exists(), f"{target} was written"
    leftovers = [p.name for p in parent.iterdir() if ".fluxrt-" in p.name]
    assert not leftovers, f"temporary folders left: {leftovers}"


def public(config) -> dict:
    """A diffusers config without its bookkeeping (_class_name, _diffusers_version, _name_or_path)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def folder_bytes(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---- the whole pipeline -------------------------------------------------------------------------------------------


@torch.no_grad()
def test_compiled_pipeline_saves_a_folder_diffusers_loads(tmp_path):
    from tiny_pipeline import build_tiny_flux_pipeline

    pipe = build_tiny_flux_pipeline(tmp_path / "build", seed=5)
    call = dict(prompt="a red apple", height=32, width=48, num_inference_steps=2, guidance_scale=3.5,
                max_sequence_length=16, output_type="pt")
    want = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    transformer_weights, vae_weights = weights(pipe.transformer), weights(pipe.vae)
    fluxrt.compile(pipe, backend="torch")
    assert type(pipe.transformer).__name__ == "FastFluxTransformer" and type(pipe.vae).__name__ == "FastAutoencoderKL"
    assert repr(pipe.transformer).startswith("FastFluxTransformer(")  # the stand-in reports diffusers' class, but
    assert isinstance(pipe.transformer, ModelMixin) and isinstance(pipe.vae, ModelMixin)  # repr and type() tell

    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    for component in ("transformer", "vae"):
        names = {p.name for p in (tmp_path / "saved" / component).iterdir()}
        assert names == {"config.json", "diffusion_pytorch_model.safetensors"}, names

    loaded = FluxPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.transformer) is FluxTransformer2DModel and type(loaded.vae) is AutoencoderKL
    assert_same_weights(loaded.transformer, transformer_weights)
    assert_same_weights(loaded.vae, vae_weights)
    assert public(loaded.transformer.config) == public(pipe.transformer.config)
    assert public(loaded.vae.config) == public(pipe.vae.config)
    got = loaded(**call, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)

    # diffusers' from_pipe keeps a ModelMixin component only if its type() is the annotated class: the compiled
    # ones are passed explicitly (diffusers' warning says so), and the new pipeline registers them as diffusers'
    img2img = FluxImg2ImgPipeline.from_pipe(pipe, transformer=pipe.transformer, vae=pipe.vae)
    assert img2img.transformer is pipe.transformer and img2img.vae is pipe.vae
    assert tuple(img2img.config["transformer"]) == ("diffusers", "FluxTransformer2DModel")


@torch.no_grad()
def test_compiled_controlnet_pipeline_saves_a_folder_diffusers_loads(tmp_path):
    from test_controlnet import controlnet
    from tiny_pipeline import build_tiny_flux_pipeline

    base = build_tiny_flux_pipeline(tmp_path / "build", seed=7)
    pipe = FluxControlNetPipeline(**{k: v for k, v in base.components.items() if k in PIPELINE_PARTS},
                                  controlnet=controlnet(seed=8))
    pipe.set_progress_bar_config(disable=True)
    control = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    call = dict(prompt="a red apple", control_image=control, height=32, width=48, num_inference_steps=2,
                guidance_scale=3.5, max_sequence_length=16, output_type="pt")
    want = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    expected = {name: weights(getattr(pipe, name)) for name in ("transformer", "vae", "controlnet")}
    fluxrt.compile(pipe, backend="torch")
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["controlnet"] == ["diffusers", "FluxControlNetModel"]
    loaded = FluxControlNetPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    for name, state in expected.items():
        assert_same_weights(getattr(loaded, name), state)
    got = loaded(**call, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@torch.no_grad()
def test_a_quantized_pipeline_refuses_and_leaves_no_loadable_folder(tmp_path):
    """diffusers' pipeline save writes the components one by one: those before the quantized transformer are
    written, model_index.json (last) is not, so the folder never loads as a pipeline with a transformer missing."""
    from tiny_pipeline import build_tiny_flux_pipeline

    pipe = fluxrt.compile(build_tiny_flux_pipeline(tmp_path / "build", seed=6), quantize="fp8-weight",
                          backend="torch")
    with pytest.raises(ValueError, match="fluxrt.save_transformer"):
        pipe.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "model_index.json").exists()
    assert not (tmp_path / "saved" / "transformer").exists()


# ---- single modules -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_compiled_transformer_round_trip(tmp_path, dtype):
    model = tiny_transformer(seed=2, dtype=dtype)
    inputs = transformer_inputs(dtype)
    (want,) = model(**inputs)
    expected = weights(model)
    fast = fluxrt.compile(model, backend="torch")
    (before,) = fast(**inputs)
    fast.save_pretrained(tmp_path / "transformer")
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "transformer", torch_dtype=dtype)
    assert_same_weights(loaded, expected)
    (got,) = loaded.eval()(**inputs)
    assert torch.equal(got, want)
    (after,) = fast(**inputs)  # saving leaves the compiled model as it was
    assert torch.equal(after, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_compiled_vae_round_trip(tmp_path, dtype):
    vae = tiny_vae(seed=3, dtype=dtype)
    z = torch.randn(1, 16, 5, 4, generator=torch.Generator().manual_seed(4)).to(dtype)
    want = vae.decode(z).sample
    expected = weights(vae)
    fast = fluxrt.compile(vae)
    fast.save_pretrained(tmp_path / "vae")
    loaded = AutoencoderKL.from_pretrained(tmp_path / "vae", torch_dtype=dtype).eval()
    assert_same_weights(loaded, expected)
    assert torch.equal(loaded.decode(z).sample, want)


@pytest.mark.parametrize("extra", [{}, {"num_mode": 3}], ids=["instantx", "union"])
@torch.no_grad()
def test_compiled_controlnet_round_trip(tmp_path, extra):
    """fluxrt.diffusers_save.save_controlnet: the trunk converted back, the ControlNet's own layers as they are."""
    from test_controlnet import control_latents, controlnet, inputs

    from fluxrt.diffusers_save import save_controlnet

    model = controlnet(seed=4, **extra)
    call = dict(inputs(), controlnet_cond=control_latents(), return_dict=False)
    if extra:
        call["controlnet_mode"] = torch.tensor([[1], [2]])
    want = model(**call)
    expected = weights(model)
    save_controlnet(fluxrt.compile(model, backend="torch"), tmp_path / "controlnet")
    loaded = FluxControlNetModel.from_pretrained(tmp_path / "controlnet").eval()
    assert_same_weights(loaded, expected)
    got = loaded(**call)
    for got_samples, want_samples in zip(got, want):
        assert len(got_samples) == len(want_samples)
        assert all(torch.equal(g, w) for g, w in zip(got_samples, want_samples))


def test_resave_variants_and_shards_into_an_existing_folder(tmp_path):
    """A save into an existing folder replaces the weights of its variant (stale shards and index removed, as
    diffusers does), keeps other variants and other files; from_pretrained(variant=...) reads the variant."""
    expected = weights(tiny_vae(seed=6))
    fast = fluxrt.compile(tiny_vae(seed=6))
    target = tmp_path / "vae"
    fast.save_pretrained(target, max_shard_size="20KB")
    shards = sorted(p.name for p in target.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1 and (target / "diffusion_pytorch_model.safetensors.index.json").exists()
    (target / "README.md").write_text("the user's notes")
    fast.save_pretrained(target, variant="fp32")
    fast.save_pretrained(target)  # unsharded now: the shards and the index of this variant go
    assert sorted(p.name for p in target.iterdir()) == [
        "README.md", "config.json", "diffusion_pytorch_model.fp32.safetensors", "diffusion_pytorch_model.safetensors"]
    assert (target / "README.md").read_text() == "the user's notes"
    assert_same_weights(AutoencoderKL.from_pretrained(target), expected)
    assert_same_weights(AutoencoderKL.from_pretrained(target, variant="fp32"), expected)
    assert_nothing_left(tmp_path, tmp_path / "absent")


# ---- refusals and failures ----------------------------------------------------------------------------------------


def test_quantized_transformer_refuses_and_points_to_save_transformer(tmp_path):
    fast = fluxrt.compile(tiny_transformer(seed=7), quantize="fp8-weight", backend="torch")
    target = tmp_path / "transformer"
    with pytest.raises(ValueError, match=r"quantized \(torch.float8_e4m3fn\).*fluxrt.save_transformer"):
        fast.save_pretrained(target)
    assert_nothing_left(tmp_path, target)
    fluxrt.save_transformer(fast.fast.model, tmp_path / "flux-fp8.safetensors")  # what the message says works
    inputs = transformer_inputs(torch.float32)
    (want,) = fast(**inputs)
    reloaded = fluxrt.compile(fluxrt.load_transformer(tmp_path / "flux-fp8.safetensors", dtype=torch.float32,
                                                      device="cpu"), backend="torch")
    got = reloaded(inputs["hidden_states"], inputs["img_ids"][None], inputs["encoder_hidden_states"],
                   inputs["txt_ids"][None], inputs["timestep"], inputs["pooled_projections"], inputs["guidance"])
    assert torch.equal(got, want)


@pytest.mark.parametrize("module", ["transformer", "vae"])
def test_bad_requests_are_refused_with_nothing_written(tmp_path, module):
    fast = fluxrt.compile(tiny_transformer() if module == "transformer" else tiny_vae(), backend="torch")
    target = tmp_path / module
    with pytest.raises(ValueError, match="fluxrt saves safetensors only"):
        fast.save_pretrained(target, safe_serialization=False)
    with pytest.raises(ValueError, match="variant must be a name"):
        fast.save_pretrained(target, variant="../up")
    assert_nothing_left(tmp_path, target)
    target.write_text("a file")
    with pytest.raises(ValueError, match="is a file; save_pretrained writes a folder"):
        fast.save_pretrained(target)
    assert target.read_text() == "a file"
    target.unlink()
    (target / "config.json").mkdir(parents=True)  # a folder where the save puts a file
    with pytest.raises(ValueError, match="config.json there is a folder where a file goes"):
        fast.save_pretrained(target)
    assert [p.name for p in target.iterdir()] == ["config.json"]
    with pytest.raises(pickle.PicklingError):  # pickle checks __class__, which reports diffusers' class
        pickle.dumps(fast)
    clone = copy.deepcopy(fast)  # copying does not
    assert type(clone) is type(fast) and clone.__module__ == fast.__module__
    assert_same_weights(clone, weights(fast))


@pytest.mark.parametrize("existing", [False, True])
def test_a_save_failing_half_way_leaves_the_target_as_it_was(tmp_path, monkeypatch, existing):
    """The disk fills up after the first of several shards: nothing of the new save reaches the target."""
    fast = fluxrt.compile(tiny_vae(seed=8))
    target = tmp_path / "vae"
    if existing:
        fluxrt.compile(tiny_vae(seed=9)).save_pretrained(target)
    before = folder_bytes(target) if existing else None
    real_save_file, written = safetensors.torch.save_file, []

    def disk_full_after_one_shard(tensors, filename, metadata=None):
        if written:
            raise OSError(28, "No space left on device")
        written.append(filename)
        real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_after_one_shard)
    with pytest.raises(OSError, match="No space left"):
        fast.save_pretrained(target, max_shard_size="20KB")
    assert written, "the failure must come after a shard was written"
    if existing:
        assert folder_bytes(target) == before
        assert_nothing_left(tmp_path, tmp_path / "absent")
    else:
        assert_nothing_left(tmp_path, target)


# ---- GPU: a CUDA model is converted in host memory -----------------------------------------------------------------


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_model_saves_without_a_second_copy_on_the_gpu(tmp_path):
    model = tiny_transformer(seed=10, dtype=torch.bfloat16).cuda()
    expected = {k: v.cpu() for k, v in weights(model).items()}
    fast = fluxrt.compile(model)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    allocated = torch.cuda.memory_allocated()
    fast.save_pretrained(tmp_path / "transformer")
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() == allocated, "the conversion allocated GPU memory"
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "transformer", torch_dtype=torch.bfloat16)
    assert_same_weights(loaded, expected)
