"""fluxrt.FluxPipeline vs diffusers' FluxPipeline built from the same tiny components (fp32), loading (diffusers
folder, BFL files), seeds, validation, compile / quantize switches, progress bar."""

import logging
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
from fluxrt.validation import MAX_IMAGES_PER_CALL, MAX_PIXELS, MAX_STEPS

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


class ModuleCalls:
    """Counts forward calls of real modules (a forward pre-hook each) while in the with block."""

    def __init__(self, *modules):
        self.modules, self.count, self.handles = modules, 0, []

    def __enter__(self):
        self.handles = [m.register_forward_pre_hook(self._called) for m in self.modules]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def _called(self, module, args):
        self.count += 1


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


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(width=100), ValueError, "width must be a multiple of 16 between 16 and 4096, got 100"),
    (dict(height=8192), ValueError, "height must be a multiple of 16 between 16 and 4096, got 8192"),
    (dict(width=64.0), TypeError, "width must be an int, got float 64.0"),
    (dict(width=4096, height=4096), ValueError, f"4096 x 4096 is 16,777,216 pixels; the limit is {MAX_PIXELS:,}"),
    (dict(num_steps=0), ValueError, f"num_steps must be between 1 and {MAX_STEPS}"),
    (dict(num_steps=10**9), ValueError, rf"num_steps must be between 1 and {MAX_STEPS} \(fluxrt.validation.MAX_STEPS"),
    (dict(num_steps="4"), TypeError, "num_steps must be an int, got str '4'"),
    (dict(guidance=-1.0), ValueError, r"guidance must be a number in \[0, 100\], got -1.0"),
    (dict(guidance=float("nan")), ValueError, r"guidance must be a number in \[0, 100\], got nan"),
    (dict(guidance="3.5"), TypeError, "guidance must be a number, got str '3.5'"),
    (dict(seed=[1, 2]), ValueError, "got 2 seeds for 1 images; pass one int or one seed per image"),
    (dict(seed=-1), ValueError, r"seed must be an int in \[0, 2\*\*63\), got -1"),
    (dict(seed=True), TypeError, "seed must be an int, got bool True"),
    (dict(seed="5"), TypeError, r"seed must be an int, a list of ints \(one per image\) or None"),
    (dict(seed=2**63 - 1, num_images_per_prompt=2), ValueError, r"seed \+ 1 \(the last image's seed\) must be"),
    (dict(prompt=[]), ValueError, "prompt must be a string or a non-empty list of strings"),
    (dict(prompt=None), TypeError, "prompt is required: a string or a list of strings"),
    (dict(prompt={"a cat": 1}), TypeError, "got dict \\(a dict or set has no dependable order: pass a list\\)"),
    (dict(prompt={"a cat", "a dog"}), TypeError, "got set \\(a dict or set has no dependable order"),
    (dict(prompt=["a cat", 3]), TypeError, r"prompt\[1\] must be a string, got int 3"),
    (dict(num_images_per_prompt=0), ValueError, f"num_images_per_prompt must be between 1 and {MAX_IMAGES_PER_CALL}"),
    (dict(num_images_per_prompt=True), TypeError, "num_images_per_prompt must be an int, got bool True"),
    (dict(prompt=["a cat", "a dog"], num_images_per_prompt=MAX_IMAGES_PER_CALL // 2 + 1), ValueError,
     f"this call asks for {MAX_IMAGES_PER_CALL + 2} images \\(2 prompts x"),
    (dict(output_type="jpg"), ValueError, "output_type must be 'pil', 'np', 'pt' or 'latent', got 'jpg'"),
    (dict(progress="no"), TypeError, "progress must be True or False, got str 'no'"),
    (dict(callback=5), TypeError, r"callback must be a function \(step, total\) -> None, got int"),
])
def test_rejects_bad_arguments_before_any_work(tiny, kwargs, error, message):
    call = dict(prompt="a cat", num_steps=1, **SIZE) | kwargs
    with ModuleCalls(tiny.t5_encoder, tiny.transformer) as calls, pytest.raises(error, match=message):
        tiny(**call)
    assert calls.count == 0  # refused before any prompt was encoded or any step run


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
    with pytest.raises(ValueError, match="compile=False was passed: pass compile=True, or quantize=None"):
        tiny_random_pipeline(compile=False, quantize="fp8-weight")
    # compile left out: it is off by default on a CPU, and the message must not blame an argument never passed
    with pytest.raises(ValueError, match="compilation is off by default on cpu: pass compile=True") as refused:
        tiny_random_pipeline(quantize="fp8-weight", device="cpu")
    assert "compile=False" not in str(refused.value)
    with pytest.raises(ValueError, match="needs an FP8-capable CUDA GPU"):
        tiny_random_pipeline(compile=True, quantize="fp8", device="cpu")
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\), got 'cuda'"):
        tiny_random_pipeline(backend="cuda")
    pipe = tiny_random_pipeline(progress=False)
    for kwargs, message in ((dict(quantize="int8"), "quantize must be None, 'fp8'"),
                            (dict(quantize="fp8"), "needs an FP8-capable CUDA GPU")):
        with pytest.raises(ValueError, match=message):
            pipe.accelerate(**kwargs)
        assert pipe.plan is None and isinstance(pipe.transformer, fluxrt.reference.Flux)  # left as it was
    pipe.accelerate()
    with pytest.raises(RuntimeError, match="already compiled"):
        pipe.accelerate()


def test_accelerate_checks_both_models_before_converting_either():
    from diffusers import AutoencoderKL

    pipe = tiny_random_pipeline(progress=False)
    transformer = pipe.transformer
    weights = {name: (value.data_ptr(), value.clone()) for name, value in transformer.state_dict().items()}
    # an autoencoder compile refuses (Stable Diffusion's 4 latent channels, not FLUX's 16), checked second
    pipe.autoencoder = AutoencoderKL(block_out_channels=(32,), latent_channels=4)
    with pytest.raises(fluxrt.CheckpointError, match="fluxrt.compile takes FLUX's autoencoder"):
        pipe.accelerate()
    assert pipe.plan is None and pipe.transformer is transformer
    now = transformer.state_dict()  # neither converted in place (moved, batched) nor changed
    assert now.keys() == weights.keys()
    assert all(now[name].data_ptr() == ptr and torch.equal(now[name], value) for name, (ptr, value) in weights.items())


@pytest.fixture
def unloadable(dev, tmp_path):
    """A BFL-layout folder whose transformer and autoencoder files are not safetensors: loading it fails."""
    _, folder, _ = dev
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "flux1-dev.safetensors").write_bytes(b"not a safetensors file")
    (broken / "ae.safetensors").write_bytes(b"not a safetensors file")
    for name in ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"):
        shutil.copytree(folder / name, broken / name)
    return broken


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(dtype="int8"), ValueError, "dtype 'int8' is not a dtype name"),
    (dict(dtype=torch.int32), ValueError, "dtype must be a floating dtype"),
    (dict(dtype=torch.float32, torch_dtype=torch.bfloat16), ValueError, "torch_dtype is diffusers' name for dtype"),
    (dict(device="tpu"), ValueError, "device 'tpu' is not a device"),
    (dict(device="cuda:99"), RuntimeError, "device 'cuda:99'"),
    (dict(device="cpu", quantize="fp8", compile=True), ValueError, "quantize='fp8' \\(W8A8\\) needs an FP8-capable"),
    (dict(device="cpu", quantize="fp8-weight"), ValueError, "compilation is off by default on cpu: pass compile=True"),
    (dict(quantize="int4"), ValueError, "quantize must be None, 'fp8' \\(W8A8\\) or 'fp8-weight'"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(compile="yes"), TypeError, "compile must be True or False, got str 'yes'"),
    (dict(offload_text_encoders="no"), TypeError, "offload_text_encoders must be True or False"),
    (dict(progress=0), TypeError, "progress must be True or False, got int 0"),
    (dict(num_steps=4), TypeError, "unexpected keyword argument 'num_steps'"),
])
def test_from_pretrained_checks_arguments_before_loading(unloadable, kwargs, error, message):
    with pytest.raises(error, match=message):  # not the CheckpointError that loading this folder gives
        fluxrt.FluxPipeline.from_pretrained(unloadable, **kwargs)


def test_the_unloadable_folder_fails_only_when_loaded(unloadable):
    with pytest.raises(fluxrt.CheckpointError):  # what the argument checks above must come before
        fluxrt.FluxPipeline.from_pretrained(unloadable, progress=False)
    with pytest.raises(TypeError, match="path must be a path \\(str or pathlib.Path\\), got NoneType"):
        fluxrt.FluxPipeline.from_pretrained(None)
    with pytest.raises(TypeError, match="autoencoder must be a path"):
        fluxrt.FluxPipeline.from_pretrained(unloadable / "flux1-dev.safetensors", autoencoder=3, text_encoders=unloadable)


def test_torch_dtype_is_diffusers_name_for_dtype(dev):
    _, folder, _ = dev
    pipe = fluxrt.FluxPipeline.from_pretrained(folder, torch_dtype="bf16", progress=False)
    assert pipe.dtype == pipe.vae_dtype == next(pipe.t5_encoder.parameters()).dtype == torch.bfloat16
    same = fluxrt.FluxPipeline.from_pretrained(folder, dtype=torch.bfloat16, torch_dtype=torch.bfloat16, progress=False)
    assert same.dtype == torch.bfloat16


def test_progress_false_hides_the_loading_bars(dev, capsys):
    from transformers.utils import logging as hf_logging

    _, folder, _ = dev
    capsys.readouterr()
    fluxrt.FluxPipeline.from_pretrained(folder, progress=False)
    assert "Loading" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # transformers' own switch is put back
    fluxrt.FluxPipeline.from_pretrained(folder, progress=True)
    assert "Loading weights" in capsys.readouterr().err  # transformers 5's bar: what progress=False must hide


def test_seed_none_draws_a_logged_seed_that_reproduces(tiny, caplog):
    caplog.set_level(logging.INFO, logger="fluxrt")
    first = tiny(["a cat", "a dog"], num_steps=1, seed=None, output_type="pt", **SIZE)
    (record,) = [r for r in caplog.records if "seed=None" in r.getMessage()]
    drawn = record.args[0]
    assert torch.equal(tiny(["a cat", "a dog"], num_steps=1, seed=drawn, output_type="pt", **SIZE), first)
    caplog.clear()
    second = tiny(["a cat", "a dog"], num_steps=1, seed=None, output_type="pt", **SIZE)
    (record,) = [r for r in caplog.records if "seed=None" in r.getMessage()]
    assert record.args[0] != drawn and not torch.equal(second, first)


def test_numpy_seeds_are_ints(tiny):
    expected = tiny(["a cat", "a dog"], num_steps=1, seed=5, output_type="pt", **SIZE)
    assert torch.equal(tiny(["a cat", "a dog"], num_steps=1, seed=np.int64(5), output_type="pt", **SIZE), expected)
    assert torch.equal(tiny(["a cat", "a dog"], num_steps=1, seed=np.array([5, 6]), output_type="pt", **SIZE), expected)
    assert torch.equal(tiny(("a cat", "a dog"), width=np.int64(64), height=48, num_steps=np.int32(1), seed=5,
                            output_type="pt"), expected)


@pytest.mark.parametrize("output_type", ["pt", "pil"])
def test_nan_in_the_transformer_is_an_error(output_type):
    pipe = tiny_random_pipeline(progress=False)
    with torch.no_grad():
        pipe.transformer.final_layer.linear.weight[0, 0] = float("nan")  # a corrupt checkpoint
    with pytest.raises(fluxrt.NonFiniteError, match="NaN or inf after denoising step 1 of 2: .* Check the weights"):
        pipe("a cat", num_steps=2, output_type=output_type, **SIZE)
    assert issubclass(fluxrt.NonFiniteError, RuntimeError)


def test_nan_in_the_autoencoder_is_an_error():
    pipe = tiny_random_pipeline(progress=False)
    with torch.no_grad():
        pipe.autoencoder.decoder.conv_out.bias[0] = float("nan")
    with pytest.raises(fluxrt.NonFiniteError, match="the autoencoder decoded NaN or inf pixels"):
        pipe("a cat", num_steps=1, output_type="pt", **SIZE)


def test_long_prompts_warn_what_the_encoders_drop(tiny, caplog):
    long = "a photo of a cat sitting on a windowsill in the morning light, " * 60
    medium = "a cat, " * 40  # past CLIP's 77 tokens, well inside T5's 512
    t5_tokens = len(tiny.t5_tokenizer(long, verbose=False).input_ids)
    clip_long, clip_medium = (len(tiny.clip_tokenizer(p, verbose=False).input_ids) for p in (long, medium))
    assert t5_tokens > 512 and clip_medium > 77 and len(tiny.t5_tokenizer(medium).input_ids) < 512
    caplog.set_level(logging.WARNING)
    tiny.encode_prompt(["a cat", long, medium])
    # fluxrt's warnings only: not transformers' "... will result in indexing errors", which would be wrong here
    assert all(r.name == "fluxrt" for r in caplog.records), [r.getMessage() for r in caplog.records]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("prompt 1 is longer than the text encoders read: ")
    assert f"T5 keeps 512 of {t5_tokens} tokens ({t5_tokens - 512} dropped)" in warnings[0]
    assert f"CLIP keeps 77 of {clip_long} tokens ({clip_long - 77} dropped)" in warnings[0]
    assert warnings[1].startswith("prompt 2 ") and "T5" not in warnings[1]
    assert f"CLIP keeps 77 of {clip_medium} tokens ({clip_medium - 77} dropped)" in warnings[1]


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
