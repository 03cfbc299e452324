"""fluxrt.FluxPipeline vs diffusers' FluxPipeline built from the same tiny components (fp32), loading (diffusers
folder, BFL files), seeds, validation, compile / quantize switches, progress bar."""

import shutil

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import save_file
from tiny_pipeline import build_tiny_flux_pipeline

import fluxrt
from fluxrt.testing import sqnr_db
from fluxrt.tiny import tiny_random_pipeline

SIZE = dict(width=64, height=48)


def save_diffusers(tmp_path_factory, guidance_embeds: bool):
    """A tiny diffusers pipeline with a fluxrt-loadable VAE, and the folder save_pretrained wrote it to."""
    folder = tmp_path_factory.mktemp("dev" if guidance_embeds else "schnell")
    pipe = build_tiny_flux_pipeline(folder, guidance_embeds=guidance_embeds, seed=5, fluxrt_vae=True)
    if not guidance_embeds:  # FLUX.1-schnell's scheduler config: no resolution-dependent shift
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    pipe.save_pretrained(str(folder / "pipeline"), safe_serialization=True)
    return pipe, folder / "pipeline"


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    diffusers_pipe, folder = save_diffusers(tmp_path_factory, guidance_embeds=True)
    return diffusers_pipe, folder, fluxrt.FluxPipeline.from_pretrained(folder, progress=False)


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_pipeline(progress=False)


def assert_not_saturated(images):
    # random weights could push every pixel to 0 or 1, where any two pipelines agree: make sure most pixels carry signal
    inside = ((images > 0) & (images < 1)).float().mean().item()
    assert inside > 0.5, f"only {inside:.0%} of pixels inside (0, 1): the comparison would prove little"


def diffusers_images(pipe, prompts, seeds, **kwargs):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompt=prompts, generator=generators, output_type="pt", **SIZE, **kwargs).images


@torch.no_grad()
def test_dev_matches_diffusers(dev):
    diffusers_pipe, _, pipe = dev
    prompts = ["a red apple on a wooden table", "A Dog, running (fast) 42!"]
    expected = diffusers_images(diffusers_pipe, prompts, [10, 11, 12, 13], num_inference_steps=4, guidance_scale=3.5,
                                num_images_per_prompt=2, max_sequence_length=512)
    images = pipe(prompts, num_steps=4, guidance=3.5, seed=10, num_images_per_prompt=2, output_type="pt", **SIZE)
    assert images.shape == expected.shape == (4, 3, 48, 64)
    assert_not_saturated(expected)
    # fp32 end to end; what remains is the schedule (float64 here, float32 in diffusers) and summation order
    torch.testing.assert_close(images, expected, atol=2e-5, rtol=0)
    pil = np.stack([np.asarray(im) for im in pipe(prompts, num_steps=4, seed=10, num_images_per_prompt=2, **SIZE)])
    expected_pil = np.stack([np.asarray(im) for im in diffusers_pipe.image_processor.numpy_to_pil(
        expected.permute(0, 2, 3, 1).numpy())])
    assert pil.dtype == np.uint8 and pil.shape == (4, 48, 64, 3)
    assert np.abs(pil.astype(int) - expected_pil).max() <= 1  # a pixel at a rounding edge may land one level off


@torch.no_grad()
def test_schnell_matches_diffusers(tmp_path_factory):
    diffusers_pipe, folder = save_diffusers(tmp_path_factory, guidance_embeds=False)
    pipe = fluxrt.FluxPipeline.from_pretrained(folder, progress=False)
    assert (pipe.max_sequence_length, pipe.default_steps, pipe.default_guidance) == (256, 4, None)
    expected = diffusers_images(diffusers_pipe, ["a fox sleeping in the snow"], [3], num_inference_steps=4,
                                max_sequence_length=256)
    images = pipe("a fox sleeping in the snow", guidance=7.0, seed=3, output_type="pt", **SIZE)  # guidance ignored
    assert_not_saturated(expected)
    torch.testing.assert_close(images, expected, atol=2e-5, rtol=0)


def test_loads_the_diffusers_folder_as_saved(dev):
    diffusers_pipe, _, pipe = dev
    assert pipe.config == fluxrt.FluxConfig.from_diffusers(dict(diffusers_pipe.transformer.config))
    assert (pipe.max_sequence_length, pipe.default_steps, pipe.default_guidance) == (512, 28, 3.5)
    assert pipe.device.type == "cpu" and pipe.dtype == torch.float32 and pipe.plan is None  # no GPU: not compiled
    for name, module in (("text_encoder", pipe.clip_encoder), ("text_encoder_2", pipe.t5_encoder)):
        theirs = getattr(diffusers_pipe, name).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in module.state_dict().items()), name


@torch.no_grad()
def test_loads_bfl_files(dev, tmp_path):
    _, folder, pipe = dev
    # BFL's repo layout: flux1-dev.safetensors + ae.safetensors (BFL key names) beside the text-encoder folders
    bfl = tmp_path / "FLUX.1-dev"
    bfl.mkdir()
    save_file(pipe.transformer.state_dict(), str(bfl / "flux1-dev.safetensors"))
    save_file(pipe.autoencoder.state_dict(), str(bfl / "ae.safetensors"))
    for name in ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"):
        shutil.copytree(folder / name, bfl / name)
    expected = pipe("a cup of coffee", num_steps=2, seed=1, output_type="pt", **SIZE)
    from_folder = fluxrt.FluxPipeline.from_pretrained(bfl, progress=False)
    assert torch.equal(from_folder("a cup of coffee", num_steps=2, seed=1, output_type="pt", **SIZE), expected)
    from_files = fluxrt.FluxPipeline.from_pretrained(bfl / "flux1-dev.safetensors", autoencoder=bfl / "ae.safetensors",
                                                     text_encoders=folder, progress=False)
    assert torch.equal(from_files("a cup of coffee", num_steps=2, seed=1, output_type="pt", **SIZE), expected)


def test_from_pretrained_errors(dev, tmp_path):
    _, folder, _ = dev
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fluxrt.FluxPipeline.from_pretrained(tmp_path / "nowhere")
    transformer_file = tmp_path / "flux1-dev.safetensors"
    transformer_file.touch()
    with pytest.raises(ValueError, match="single transformer file: pass autoencoder="):
        fluxrt.FluxPipeline.from_pretrained(transformer_file)
    partial = tmp_path / "partial"
    shutil.copytree(folder / "transformer", partial / "transformer")
    shutil.copytree(folder / "vae", partial / "vae")
    with pytest.raises(FileNotFoundError, match=r"lacks the text-encoder folders \['tokenizer', 'text_encoder'"):
        fluxrt.FluxPipeline.from_pretrained(partial)


def test_seeds_are_per_image(tiny):
    batch = tiny(["a cat", "a dog"], num_steps=2, seed=7, num_images_per_prompt=2, output_type="pt", **SIZE)
    assert_not_saturated(batch)
    alone = tiny("a dog", num_steps=2, seed=9, output_type="pt", **SIZE)  # image 2 of the batch: "a dog", seed 7 + 2
    torch.testing.assert_close(batch[2], alone[0], atol=1e-5, rtol=0)  # batching changes only summation order
    listed = tiny(["a cat", "a dog"], num_steps=2, seed=[7, 8, 9, 10], num_images_per_prompt=2, output_type="pt",
                  **SIZE)
    assert torch.equal(listed, batch)
    assert not torch.allclose(batch[0], batch[1], atol=1e-2)  # same prompt, different seeds: different images
    again = tiny(["a cat", "a dog"], num_steps=2, seed=7, num_images_per_prompt=2, output_type="pt", **SIZE)
    assert torch.equal(again, batch)


@pytest.mark.parametrize("kwargs, message", [
    (dict(width=100), "width must be a multiple of 16 between 16 and 4096, got 100"),
    (dict(height=8192), "height must be a multiple of 16 between 16 and 4096, got 8192"),
    (dict(num_steps=0), "num_steps must be an int >= 1, got 0"),
    (dict(guidance=-1.0), r"guidance must be a number in \[0, 100\], got -1.0"),
    (dict(seed=[1, 2]), "got 2 seeds for 1 images; pass one int or one seed per image"),
    (dict(seed=-1), r"a seed must be an int in \[0, 2\*\*63\), got -1"),
    (dict(prompt=[]), "prompt must be a string or a non-empty list of strings"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be an int >= 1, got 0"),
    (dict(output_type="np"), "output_type must be 'pil' or 'pt', got 'np'"),
])
def test_rejects_bad_arguments(tiny, kwargs, message):
    call = dict(prompt="a cat", num_steps=1, **SIZE) | kwargs
    with pytest.raises(ValueError, match=message):
        tiny(**call)


@torch.no_grad()
def test_compile_on_cpu_gives_the_same_image():
    reference = tiny_random_pipeline(progress=False, seed=2)
    assert reference.plan is None  # on a CPU, compile defaults to off
    expected = reference("a cat", num_steps=3, seed=0, output_type="pt", **SIZE)
    assert_not_saturated(expected)
    compiled = tiny_random_pipeline(progress=False, seed=2, compile=True)
    assert compiled.plan["transformer"]["ops"]["joint_attention"] == "torch"  # backend="auto" on a CPU
    assert compiled.plan["autoencoder"]["ops"]["group_norm_silu"] == "fluxrt._C (CPU)"  # the C++ CPU kernels
    torch.testing.assert_close(compiled("a cat", num_steps=3, seed=0, output_type="pt", **SIZE), expected,
                               atol=1e-5, rtol=0)
    quantized = tiny_random_pipeline(progress=False, seed=2, compile=True, quantize="fp8-weight")
    assert "fp8 weight-only" in quantized.plan["transformer"]["linears"]
    images = quantized("a cat", num_steps=3, seed=0, output_type="pt", **SIZE)
    assert sqnr_db(images, expected) > 25  # FP8 weights: close (36 dB when written), not equal


def test_quantize_needs_compile_and_fp8_needs_a_gpu():
    with pytest.raises(ValueError, match="drop compile=False"):
        tiny_random_pipeline(compile=False, quantize="fp8-weight")
    with pytest.raises(ValueError, match="needs an FP8-capable CUDA GPU"):
        tiny_random_pipeline(compile=True, quantize="fp8", device="cpu")
    pipe = tiny_random_pipeline(progress=False)
    pipe.accelerate()
    with pytest.raises(RuntimeError, match="already compiled"):
        pipe.accelerate()


def test_progress_bar_and_callback(tiny, capsys):
    steps = []
    tiny("a cat", num_steps=3, callback=lambda step, total: steps.append((step, total)), progress=True, **SIZE)
    assert steps == [(1, 3), (2, 3), (3, 3)]
    bar = capsys.readouterr().err  # tqdm redraws at most every 0.1 s: the first frame is there, the last may not be
    assert "fluxrt:" in bar and "0/3" in bar
    tiny("a cat", num_steps=3, progress=False, **SIZE)
    assert capsys.readouterr().err == ""


def test_offloaded_text_encoders_rest_on_the_cpu(tiny):
    offloaded = tiny_random_pipeline(progress=False, offload_text_encoders=True)
    assert next(offloaded.t5_encoder.parameters()).device.type == "cpu"
    images = offloaded("a cat", num_steps=2, output_type="pt", **SIZE)
    assert torch.equal(images, tiny("a cat", num_steps=2, output_type="pt", **SIZE))
    assert next(offloaded.clip_encoder.parameters()).device.type == "cpu"
